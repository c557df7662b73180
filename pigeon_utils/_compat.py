"""Environment guards that must run before any library imports torchvision.

On machines with a CPU-only torch, the only torchvision wheels on PyPI are CUDA builds: their compiled
extension (`_C.so`) cannot load, and `torchvision/_meta_registrations.py` then fails with
``RuntimeError: operator torchvision::nms does not exist``. That error also breaks ``transformers``,
``open_clip``, ``timm`` and ``lpips``, which import torchvision.

:func:`ensure_torchvision_importable` declares the two operator schemas that the registration file
expects (``nms`` and ``qnms``), so the import goes through. Transforms and models then work; the C++
ops themselves (``torchvision.ops.nms`` ...) and ``torchvision.io`` stay unavailable, and this project
never calls them (images are read with PIL). Where torchvision's extension loads normally (a CUDA torch
with its matching torchvision, or the PyTorch channel's CPU builds) this is a no-op.
"""
from __future__ import annotations

import importlib.util
import os

_FRAGMENT = None


def ensure_torchvision_importable() -> None:
    global _FRAGMENT
    if _FRAGMENT is not None:
        return
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return
    import torch

    if hasattr(torch.ops, "torchvision"):
        try:
            torch.ops.torchvision.nms  # noqa: B018 - registered already (extension loaded)
            return
        except (AttributeError, RuntimeError):
            pass
    try:
        torch.ops.load_library(os.path.join(os.path.dirname(spec.origin), "_C.so"))
        return
    except (OSError, ImportError, RuntimeError):
        pass
    _FRAGMENT = torch.library.Library("torchvision", "FRAGMENT")
    _FRAGMENT.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _FRAGMENT.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


def set_offline_defaults() -> None:
    """No network at run time: Hugging Face libraries fail at once instead of hanging on a download."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
