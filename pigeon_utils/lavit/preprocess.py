"""Image preprocessing of LaVIT's visual tokenizer (upstream ``LaVITImageProcessor``).

PIL bicubic resize to a square (antialiased, uint8 result, **no crop**, aspect ratio not kept), then
/255 and per-channel CLIP mean/std normalisation in float32. torch's own bicubic interpolation differs
from PIL's by up to 26 grey levels, so PIL is used on purpose.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from pigeon_utils.lavit.config import CLIP_MEAN, CLIP_STD

ImageLike = Image.Image | np.ndarray | torch.Tensor


def _to_pil(image: ImageLike) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = image.cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected a PIL image or a uint8 HWC RGB array, got dtype {arr.dtype} "
                         f"shape {arr.shape}")
    return Image.fromarray(np.ascontiguousarray(arr))


class LaVITImageProcessor:
    """Images -> pixel values [B, 3, S, S] for the EVA encoder (S = 224 for LaVIT-7B-v2)."""

    def __init__(self, image_size: int = 224, mean: Sequence[float] = CLIP_MEAN,
                 std: Sequence[float] = CLIP_STD) -> None:
        self.image_size = image_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def resize(self, image: ImageLike) -> np.ndarray:
        """PIL bicubic resize to ``image_size`` x ``image_size``: uint8 HWC array."""
        pil = _to_pil(image).resize((self.image_size, self.image_size), Image.BICUBIC)
        return np.array(pil, dtype=np.uint8)

    def normalize(self, resized: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 HWC (or [B, H, W, C]) -> float32 CHW (or [B, C, H, W]) with CLIP mean/std."""
        t = torch.from_numpy(np.array(resized, dtype=np.uint8))
        t = t.permute(2, 0, 1) if t.dim() == 3 else t.permute(0, 3, 1, 2)
        return (t.float().div(255.0) - self.mean) / self.std

    def __call__(self, images: ImageLike | Sequence[ImageLike]) -> torch.Tensor:
        if isinstance(images, (Image.Image, np.ndarray, torch.Tensor)):
            images = [images]
        return torch.stack([self.normalize(self.resize(im)) for im in images])
