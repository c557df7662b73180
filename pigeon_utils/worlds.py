"""The two worlds in one table: what a ``preset`` means.

Each :class:`World` says where its datasets and checkpoints live by default, how its backbone and its CLIP are
loaded, and the defaults of each stage that differ from the paper's (the paper's values are the defaults of the
stage configs themselves: :class:`~pigeon_utils.sft.SFTConfig`, :class:`~pigeon_utils.generation.SamplingConfig`).
Pigeon's code never branches on the world; it looks the world up here.

* ``toy`` — the embedded world: synthetic datasets in ``dataset/`` and the small LaVIT-shaped backbone in
  ``checkpoints/toy`` (both built by the project's own scripts), runs on a CPU;
* ``lavit`` — LaVIT-7B-v2, SER-30K and MovieLens from folders the user downloaded (README, "The real world").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

__all__ = ["World", "WORLDS", "PRESETS", "world", "load_backbone"]


def _toy_backbone(checkpoint_dir: Path, device):
    from pigeon_utils.toy.load import load_toy_backbone

    return load_toy_backbone(checkpoint_dir, device=device)


def _lavit_backbone(checkpoint_dir: Path, device):
    from pigeon_utils.lavit.backbone import load_lavit_backbone

    return load_lavit_backbone(checkpoint_dir, device=device)


def _toy_clip(checkpoint_dir: Optional[Path], text_tokenizer, clip_path, device):
    from pigeon_utils.toy.load import load_toy_clip

    if checkpoint_dir is None:
        raise ValueError("preset='toy' needs checkpoint_dir (the toy CLIP lives in <checkpoint_dir>/clip)")
    return load_toy_clip(Path(checkpoint_dir), text_tokenizer)


def _lavit_clip(checkpoint_dir, text_tokenizer, clip_path, device):
    from pigeon_utils.lavit.extractors import load_open_clip

    return load_open_clip(clip_path, device=device)


@dataclass(frozen=True)
class World:
    """One world. ``data_dirs``: scenario → dataset folder, and ``checkpoint_dir``, relative to the repository
    root. ``backbone_loader(checkpoint_dir, device)`` → :class:`~pigeon_utils.backbone.Backbone`;
    ``clip_loader(checkpoint_dir, text_tokenizer, clip_path, device)`` → a model with ``image_features`` /
    ``text_features``; ``clip_name`` names it in reports; ``generated_size``: the side generated images are resized
    to before CLIP (None: as they are). ``sft`` / ``sampling`` / ``dpo``: the world's overrides of the stage configs;
    ``preference``: how many training / validation samples notebook 04 makes preference pairs from (the paper:
    1,000 and 200), and on how many test samples notebook 05 compares Stage 2 with Stage 1. ``sweep_samples``: how
    many test samples notebooks 06 and 07 sweep by default, ``select_samples`` how many validation samples the
    honest protocol chooses α_r on (None: all); ``pixel_samples``: on how many of them notebook 07 computes the
    512-px pixel metrics (SSIM, MS-SSIM, LPIPS; None: all). ``sweep_decoder_steps``: the pixel decoder's steps in
    an α_r sweep (None: the decoder's own default); ``sweep_ratios``: the α_r of a sweep (None: the paper's eleven,
    0, 0.1, …, 1); ``sweep_batch_size``: samples per LMM batch in a sweep (None: 4; the images do not depend on it)."""

    name: str
    data_dirs: dict[str, str]
    checkpoint_dir: str
    backbone_loader: Callable[..., Any]
    clip_loader: Callable[..., Any]
    clip_name: str
    generated_size: Optional[int]
    sft: dict = field(default_factory=dict)
    sampling: dict = field(default_factory=dict)
    preference: dict = field(default_factory=lambda: dict(train_samples=1000, valid_samples=200, compare_samples=200))
    dpo: dict = field(default_factory=dict)
    sweep_samples: Optional[int] = None
    select_samples: Optional[int] = None
    pixel_samples: Optional[int] = None
    sweep_decoder_steps: Optional[int] = None
    sweep_ratios: Optional[tuple] = None
    sweep_batch_size: Optional[int] = None


WORLDS: dict[str, World] = {
    "toy": World(
        name="toy",
        data_dirs={"sticker": "dataset/toy-sticker", "movie": "dataset/toy-poster"},
        checkpoint_dir="checkpoints/toy",
        backbone_loader=_toy_backbone, clip_loader=_toy_clip, clip_name="toy CLIP",
        generated_size=None,  # the toy CLIP reads the toy images' own 64 × 64
        # a run of a few minutes on 2 CPU cores; the adapter learns alone first (deviation S8)
        sft=dict(lr=2e-3, batch_size=16, epochs=50, max_steps=900, warmup_steps=20, eval_every=100,
                 max_eval_samples=128, patience=4, seed=123, adapter_only_steps=300,
                 model=dict(adapter_hidden=128, mask_feedforward=256)),
        sampling=dict(min_new_tokens=1, max_new_tokens=40),  # toy images have 5–25 tokens
        # pairs from 512 training samples over the six ratios: DPO's gain holds on new samples (docs/benchmarks.md)
        preference=dict(train_samples=512, valid_samples=64, compare_samples=48),
        # the trade-off with its standard errors, within the main job's 15 minutes (docs/benchmarks.md)
        sweep_samples=128, select_samples=64, pixel_samples=4,
        sweep_decoder_steps=10,  # 10 DDIM steps: the same scores and factors as the decoder's 20 (docs/benchmarks.md)
        # notebooks 04–07 sweep every other of the paper's eleven α_r (the main job's minutes)
        sweep_ratios=(0.0, 0.2, 0.4, 0.6, 0.8, 1.0),
        sweep_batch_size=16,  # the same images as 4 per batch, a sweep in 0.7 of the time on 2 CPU cores
        # the paper's learning rate scaled as the toy SFT's (2e-3 / 1e-5); minutes on 2 CPU cores
        dpo=dict(lr=1e-3, batch_size=8, epochs=50, max_steps=300, warmup_steps=20, eval_every=25,
                 max_eval_samples=64, patience=6, seed=123, beta=0.1),
    ),
    "lavit": World(
        name="lavit",
        data_dirs={"sticker": "dataset/SER-30K", "movie": "dataset/ml-latest-small"},
        checkpoint_dir="checkpoints/LaVIT-7B-v2",
        backbone_loader=_lavit_backbone, clip_loader=_lavit_clip, clip_name="open_clip ViT-H-14 laion2b_s32b_b79k",
        generated_size=512,  # cal_scores.py resizes generated images to 512 × 512 first
    ),
}
PRESETS = tuple(WORLDS)


def world(preset: str) -> World:
    """The :class:`World` of `preset`; an unknown name is a ValueError listing the known ones."""
    try:
        return WORLDS[preset]
    except (KeyError, TypeError):
        raise ValueError(f"preset={preset!r}: expected one of {PRESETS}") from None


def load_backbone(preset: str, checkpoint_dir: Path | str, device="cpu"):
    """Load the backbone of `preset` from `checkpoint_dir`; a missing or damaged file raises
    :class:`~pigeon_utils.backbone.CheckpointError` naming it."""
    return world(preset).backbone_loader(Path(checkpoint_dir), device)
