"""A person's own images: read any file PIL reads, with errors that name the file.

Every image becomes an upright RGB PIL image (:func:`to_rgb`): EXIF orientation applied, transparency laid over
white, greyscale / palette / CMYK converted. Its size is left alone — each world resizes it with its own
preprocessing (toy: 64×64 in :mod:`pigeon_utils.toy.tokenizer`; LaVIT: its image processor).
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["ImageInputError", "IMAGE_SUFFIXES", "to_rgb", "load_image", "image_from_bytes", "list_images",
           "history_paths"]

#: file name endings taken as images when a folder is given
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_ORIENTATION = 0x0112  # EXIF tag
BACKGROUND = (255, 255, 255)


class ImageInputError(ValueError):
    """An input image is missing, unreadable, or there are not as many as expected; the message names the file."""


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` upright (EXIF orientation applied) and in RGB, transparent parts over white; RGB images without an
    orientation tag come back as they are."""
    if image.getexif().get(_ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        rgba = image.convert("RGBA")
        out = Image.new("RGB", rgba.size, BACKGROUND)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return image.convert("RGB")


def _decode(source, name: str) -> Image.Image:
    try:
        with Image.open(source) as im:
            im.load()
            return to_rgb(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        why = "unknown or damaged format" if isinstance(e, UnidentifiedImageError) else f"{type(e).__name__}: {e}"
        raise ImageInputError(f"{name}: not a readable image ({why}); expected an image file PIL can open, e.g. "
                              f"{', '.join(IMAGE_SUFFIXES[:4])}") from None


def load_image(path: Path | str) -> Image.Image:
    """The image file `path` as an upright RGB PIL image (:func:`to_rgb`); a missing or unreadable file is an
    :class:`ImageInputError` naming it."""
    path = Path(path)
    if not path.exists():
        raise ImageInputError(f"{path}: image file not found")
    if not path.is_file():
        raise ImageInputError(f"{path}: not a file (expected an image file)")
    return _decode(path, str(path))


def image_from_bytes(data: bytes, name: str = "upload") -> Image.Image:
    """An uploaded file's bytes as an upright RGB PIL image; `name` is used in the error."""
    return _decode(io.BytesIO(bytes(data)), name)


def list_images(folder: Path | str) -> list[Path]:
    """The image files (:data:`IMAGE_SUFFIXES`, any case) of `folder`, in name order; hidden files skipped."""
    folder = Path(folder)
    return sorted((p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                   and p.suffix.lower() in IMAGE_SUFFIXES), key=lambda p: p.name)


def history_paths(paths: Sequence[Path | str], n: int = 5) -> list[Path]:
    """The `n` history image files: `paths` as given (exactly `n` files), or one folder, whose first `n` images in
    name order are taken. Anything else is an :class:`ImageInputError` saying what was given and expected."""
    paths = [Path(p) for p in paths]
    if len(paths) == 1 and paths[0].is_dir():
        found = list_images(paths[0])
        if len(found) < n:
            raise ImageInputError(f"{paths[0]}: holds {len(found)} image file(s) ({', '.join(IMAGE_SUFFIXES)}); "
                                  f"expected at least {n} history images")
        return found[:n]
    dirs = [str(p) for p in paths if p.is_dir()]
    if dirs:
        raise ImageInputError(f"history: a folder must be given alone (got {len(paths)} paths, folders {dirs})")
    if len(paths) != n:
        raise ImageInputError(f"history: expected exactly {n} images (or one folder), got {len(paths)}: "
                              f"{[str(p) for p in paths]}")
    return paths
