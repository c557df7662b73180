"""Evaluation feature extractors of the real world, loaded only from local files (docs/algorithm.md §6–§7).

* :func:`load_open_clip` (CLIP score, CLIP-I, history CIS): ``open_clip/ViT-H-14-laion2b_s32b_b79k/``
  ``open_clip_pytorch_model.bin`` (or ``open_clip_model.safetensors``), from HF
  ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``.
* :func:`load_dinov2` (DINO scores): the folder ``dinov2-large/`` (config.json, model.safetensors,
  preprocessor_config.json), from HF ``facebook/dinov2-large``.
* :func:`load_lpips_vgg` (history LPIPS): ``vgg16-397923af.pth`` from
  ``https://download.pytorch.org/models/vgg16-397923af.pth``; the LPIPS heads ship inside the ``lpips`` package.
* :func:`load_fid_inception` (FID): ``pt_inception-2015-12-05-6726825d.pth``, pytorch-fid's release ``fid_weights``.

Paths are relative to the evaluation-model folder, ``$PIGEON_EVAL_DIR`` or ``<repo>/checkpoints/eval`` (each loader also
takes an explicit path). Nothing is ever downloaded: a missing file raises :class:`ExtractorWeightsError` naming the
path expected and what to download. ``lpips`` and ``pytorch_fid`` belong to the optional ``eval`` extra
(``pip install -e .[eval]``) and are imported only by their loaders.

Every extractor is in eval mode with gradients off and returns features on the CPU as float32.
"""
from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pigeon_utils.backbone import CheckpointError
from pigeon_utils.paths import REPO_ROOT

OPEN_CLIP_MODEL = "ViT-H-14"
OPEN_CLIP_TAG = "laion2b_s32b_b79k"
OPEN_CLIP_DIR = "open_clip/ViT-H-14-laion2b_s32b_b79k"
OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
OPEN_CLIP_SOURCE = ("https://huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K (file open_clip_pytorch_model.bin "
                    "or open_clip_model.safetensors), e.g. `huggingface-cli download "
                    "laion/CLIP-ViT-H-14-laion2B-s32B-b79K open_clip_pytorch_model.bin --local-dir <folder>`")
DINO_DIR = "dinov2-large"
DINO_SOURCE = ("https://huggingface.co/facebook/dinov2-large (config.json, model.safetensors, "
               "preprocessor_config.json), e.g. `huggingface-cli download facebook/dinov2-large --local-dir <folder>`")
VGG16_FILE = "vgg16-397923af.pth"
VGG16_SOURCE = "https://download.pytorch.org/models/vgg16-397923af.pth (torchvision's ImageNet VGG16 weights)"
INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_SOURCE = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                    "pt_inception-2015-12-05-6726825d.pth (pytorch-fid's FID Inception weights)")


class ExtractorWeightsError(CheckpointError):
    """An evaluation model's weights are missing or do not fit; the message names the path and the download."""


def default_eval_dir() -> Path:
    """``$PIGEON_EVAL_DIR`` if set, else ``<repo>/checkpoints/eval``."""
    env = os.environ.get("PIGEON_EVAL_DIR")
    return Path(env).expanduser() if env else REPO_ROOT / "checkpoints" / "eval"


def _missing(what: str, path: Path, source: str) -> ExtractorWeightsError:
    return ExtractorWeightsError(f"{what}: expected local weights at {path}, which does not exist. Download {source} "
                                 f"and put it there (or pass its path / set PIGEON_EVAL_DIR). Nothing is downloaded "
                                 f"at run time.")


def _import_optional(module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{module} is needed for this metric but could not be imported ({e}). Install the optional "
                          f"evaluation extra: pip install -e '.[eval]' (or pip install {package}).") from e


def _resolve_file(path: str | Path | None, default_rel: str, names: Sequence[str], what: str, source: str) -> Path:
    """A weight file: `path` itself if it is a file, else the first of `names` inside the folder `path`
    (default: ``<eval dir>/<default_rel>``)."""
    base = Path(path).expanduser() if path is not None else default_eval_dir() / default_rel
    if base.is_file():
        return base
    if base.is_dir():
        for n in names:
            if (base / n).is_file():
                return base / n
        raise _missing(what, base / names[0], f"{source} (one of {', '.join(names)} in {base})")
    raise _missing(what, base if base.suffix else base / names[0], source)


def _read_weights(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ExtractorWeightsError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def _strict_load(module: nn.Module, state: dict[str, Tensor], path: Path, what: str) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: {list(state[k].shape)} vs {list(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ExtractorWeightsError(f"{path} does not fit {what}: missing {missing[:10]}, unexpected "
                                    f"{unexpected[:10]}, shape mismatches {shapes[:10]}")
    module.load_state_dict(state)


def _as_pil_list(images: Any) -> list:
    from PIL import Image

    if isinstance(images, Image.Image):
        return [images]
    return [im if isinstance(im, Image.Image) else Image.fromarray(im) for im in images]


# ------------------------------------------------------------------------------------------ open_clip
@dataclass
class OpenClipExtractor:
    """open_clip ViT-H-14: L2-normalised image and text embeddings (CLIP score = 100 · cos)."""

    model: nn.Module
    preprocess: Any
    tokenizer: Any
    device: torch.device
    batch_size: int = 32

    @torch.no_grad()
    def image_features(self, images: Sequence[Any]) -> Tensor:
        """PIL images (or uint8 HWC arrays) -> [N, D] unit vectors (open_clip preprocessing)."""
        images = _as_pil_list(images)
        out = []
        for i in range(0, len(images), self.batch_size):
            x = torch.stack([self.preprocess(im.convert("RGB")) for im in images[i:i + self.batch_size]])
            out.append(F.normalize(self.model.encode_image(x.to(self.device)).float(), dim=-1).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> Tensor:
        """Texts -> [N, D] unit vectors (open_clip tokenizer, 77-token context)."""
        out = []
        for i in range(0, len(texts), self.batch_size):
            ids = self.tokenizer(list(texts[i:i + self.batch_size])).to(self.device)
            out.append(F.normalize(self.model.encode_text(ids).float(), dim=-1).cpu())
        return torch.cat(out)


def load_open_clip(path: str | Path | None = None, device: str | torch.device = "cpu",
                   model_name: str = OPEN_CLIP_MODEL, precision: str = "fp32") -> OpenClipExtractor:
    """open_clip ``ViT-H-14`` with the ``laion2b_s32b_b79k`` weights from a local file (strict key check).

    `path`: the weight file or its folder (default ``<eval dir>/open_clip/ViT-H-14-laion2b_s32b_b79k``).
    `model_name` selects another registered open_clip architecture (tests use a tiny one).
    """
    weights = _resolve_file(path, OPEN_CLIP_DIR, OPEN_CLIP_FILES, f"open_clip {model_name} ({OPEN_CLIP_TAG})",
                            OPEN_CLIP_SOURCE)
    import open_clip

    device = torch.device(device)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=str(weights),
                                                                     device=device, precision=precision)
    except RuntimeError as e:  # strict load_state_dict failure
        raise ExtractorWeightsError(f"{weights} does not fit open_clip {model_name}: {e}") from e
    model = model.eval().requires_grad_(False)
    return OpenClipExtractor(model, preprocess, open_clip.get_tokenizer(model_name), device)


# ------------------------------------------------------------------------------------------ DINOv2
@dataclass
class DinoExtractor:
    """DINOv2 (HF ``AutoModel``): ``pooler_output`` features, as the reference's DINO scores use them."""

    model: nn.Module
    processor: Any
    device: torch.device
    batch_size: int = 32

    @torch.no_grad()
    def image_features(self, images: Sequence[Any], normalize: bool = False) -> Tensor:
        """PIL images -> [N, D] ``pooler_output`` (unit vectors with ``normalize=True``)."""
        images = _as_pil_list(images)
        out = []
        for i in range(0, len(images), self.batch_size):
            x = self.processor(images=[im.convert("RGB") for im in images[i:i + self.batch_size]],
                               return_tensors="pt")["pixel_values"]
            f = self.model(pixel_values=x.to(self.device, self.model.dtype)).pooler_output.float()
            out.append((F.normalize(f, dim=-1) if normalize else f).cpu())
        return torch.cat(out)


def load_dinov2(path: str | Path | None = None, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> DinoExtractor:
    """DINOv2-large from a local Hugging Face folder (default ``<eval dir>/dinov2-large``), PIL image processor
    (the reference's transformers 4.33 ``BitImageProcessor``). Missing weights (randomly initialised keys) raise."""
    folder = Path(path).expanduser() if path is not None else default_eval_dir() / DINO_DIR
    for name in ("config.json", "preprocessor_config.json"):
        if not (folder / name).is_file():
            raise _missing("DINOv2-large", folder / name, DINO_SOURCE)
    if not any((folder / n).is_file() for n in ("model.safetensors", "pytorch_model.bin")):
        raise _missing("DINOv2-large", folder / "model.safetensors", DINO_SOURCE)
    from transformers import AutoImageProcessor, AutoModel

    model, info = AutoModel.from_pretrained(folder, local_files_only=True, dtype=dtype, output_loading_info=True)
    if info.get("missing_keys") or info.get("mismatched_keys"):
        raise ExtractorWeightsError(f"{folder} does not fit {type(model).__name__}: missing "
                                    f"{sorted(info.get('missing_keys', []))[:10]}, mismatched "
                                    f"{list(info.get('mismatched_keys', []))[:10]}")
    processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True, backend="pil")
    device = torch.device(device)
    return DinoExtractor(model.to(device).eval().requires_grad_(False), processor, device)


# ------------------------------------------------------------------------------------------ LPIPS
@dataclass
class LPIPSMetric:
    """LPIPS (VGG): ``distance(a, b)`` for float images [N, 3, H, W] in [0, 1] (scaled to [-1, 1] as the reference)."""

    model: nn.Module
    device: torch.device

    @torch.no_grad()
    def distance(self, a: Tensor, b: Tensor) -> Tensor:
        """[N] LPIPS distances between matching images of `a` and `b`."""
        if a.shape != b.shape or a.dim() != 4 or a.shape[1] != 3:
            raise ValueError(f"LPIPS needs two [N, 3, H, W] batches of the same shape, got {tuple(a.shape)} and "
                             f"{tuple(b.shape)}")
        a, b = (t.to(self.device, torch.float32) * 2 - 1 for t in (a, b))
        return self.model(a, b).reshape(-1).cpu()


def load_lpips_vgg(vgg_path: str | Path | None = None, device: str | torch.device = "cpu") -> LPIPSMetric:
    """``lpips.LPIPS(net="vgg")`` without downloads: the LPIPS heads from the ``lpips`` package, the VGG16 trunk
    from the local torchvision file `vgg_path` (default ``<eval dir>/vgg16-397923af.pth``), checked key by key."""
    weights = _resolve_file(vgg_path, VGG16_FILE, (VGG16_FILE,), "LPIPS VGG16 trunk", VGG16_SOURCE)
    lpips = _import_optional("lpips", "lpips")
    heads = Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth"
    if not heads.is_file():
        raise ExtractorWeightsError(f"the lpips package has no VGG head weights at {heads}; reinstall lpips>=0.1.4")
    # pnet_rand=True: build the VGG trunk without torchvision's download; pretrained=True loads the package's heads
    model = lpips.LPIPS(pretrained=True, net="vgg", pnet_rand=True, verbose=False)
    state = _read_weights(weights)
    features = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    trunk = {}
    for name in model.net.state_dict():  # "slice{s}.{index}.{weight|bias}" <- torchvision "features.{index}..."
        key = name.split(".", 1)[1]
        if key not in features:
            raise ExtractorWeightsError(f"{weights} has no 'features.{key}' needed by LPIPS's VGG trunk ({name}); is "
                                        f"it torchvision's vgg16 state dict? Download {VGG16_SOURCE}")
        trunk[name] = features[key]
    _strict_load(model.net, trunk, weights, "LPIPS VGG16 trunk")
    device = torch.device(device)
    return LPIPSMetric(model.to(device).eval().requires_grad_(False), device)


# ------------------------------------------------------------------------------------------ FID Inception
@dataclass
class InceptionFeatures:
    """pytorch-fid's Inception-V3 (FID weights): pool3 features [N, 2048] of images [N, 3, H, W] in [0, 1]."""

    model: nn.Module
    device: torch.device
    batch_size: int = 50

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [N, 3, H, W] in [0, 1], got {tuple(images.shape)}")
        out = []
        for i in range(0, len(images), self.batch_size):
            f = self.model(images[i:i + self.batch_size].to(self.device, torch.float32))[0]
            out.append(f.reshape(f.shape[0], -1).cpu())
        return torch.cat(out)


@contextlib.contextmanager
def _local_url_weights(module, path: Path):
    """Make `module.load_state_dict_from_url` read `path` (weights-only) instead of downloading, for this block."""
    original = module.load_state_dict_from_url

    def local(url, *args, **kwargs):
        return torch.load(path, map_location="cpu", weights_only=True)

    module.load_state_dict_from_url = local
    try:
        yield
    finally:
        module.load_state_dict_from_url = original


def load_fid_inception(path: str | Path | None = None, device: str | torch.device = "cpu") -> InceptionFeatures:
    """pytorch-fid's ``InceptionV3([pool3])`` with the FID weights read from a local file (default
    ``<eval dir>/pt_inception-2015-12-05-6726825d.pth``), strictly; inputs are resized to 299 and scaled to [-1, 1]
    inside, as pytorch-fid does."""
    weights = _resolve_file(path, INCEPTION_FILE, (INCEPTION_FILE,), "FID Inception-V3", INCEPTION_SOURCE)
    inception = _import_optional("pytorch_fid.inception", "pytorch-fid")
    try:
        with _local_url_weights(inception, weights):
            model = inception.InceptionV3([inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True,
                                          normalize_input=True, use_fid_inception=True)
    except RuntimeError as e:
        raise ExtractorWeightsError(f"{weights} does not fit pytorch-fid's FID Inception-V3: {e}") from e
    device = torch.device(device)
    return InceptionFeatures(model.to(device).eval().requires_grad_(False), device)


__all__ = [
    "DinoExtractor",
    "ExtractorWeightsError",
    "InceptionFeatures",
    "LPIPSMetric",
    "OpenClipExtractor",
    "default_eval_dir",
    "load_dinov2",
    "load_fid_inception",
    "load_lpips_vgg",
    "load_open_clip",
]
