"""Stage 1 of Pigeon: masked preference reconstruction (docs/algorithm.md §3).

What is trained: LoRA on the LMM's ``q_proj``/``v_proj``, the adapter MLP and (with our straight-through default)
the mask generator; the visual tokenizer, the detokenizer and the LMM's base weights stay frozen. Each step draws
one reference mask ratio α_r ~ U(0, 1) for the batch (§3.3), masks the history with α_h = 0.2 and the reference
(= the target image, §1.6) with α_r, and asks the LMM to write the *unmasked* target's visual tokens and ``[/IMG]``
(token-averaged cross-entropy, §3.4).

This module gives only what is Stage 1's own — :class:`SFTConfig` (the paper's values by default, the toy's from
:mod:`pigeon_utils.worlds`), :class:`SFTStage` (its data, its loss, its parameter groups) and
:func:`pretrained_model` (its starting point); :func:`pigeon_utils.train.train` runs the loop (accelerate,
checkpoints, exact resume, validation, early stopping, progress).

Files under ``out_dir`` (default ``run_dir/sft``): ``checkpoint-<step>/``, ``best/`` (the lowest validation loss;
what later stages load, see :mod:`pigeon_utils.checkpoints`), ``loss_log.json`` and ``sft_config.json``.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from pigeon_utils.batching import ImageTokenCache, PigeonCollator, PromptDataset
from pigeon_utils.config import from_dict_strict
from pigeon_utils.model import PigeonModel, PigeonModelConfig
from pigeon_utils.seeds import step_ref_mask_ratio
from pigeon_utils.train import Stage, TrainConfig, TrainResult, make_accelerator, train

__all__ = ["SFTConfig", "SFTStage", "pretrained_model", "train_sft"]


@dataclass
class SFTConfig(TrainConfig):
    """Stage-1 settings: the :class:`~pigeon_utils.train.TrainConfig` fields (the paper's values, docs/algorithm.md
    §3.5) and Stage 1's own. ``for_preset("toy")`` gives a run of a few minutes on 2 CPU cores.

    ``cache_tokens``: tokenize each image once (False: on every use, as upstream does with LaVIT's stochastic
    tokenizer). ``max_train_samples``: cut the training set. ``ref_mask_ratio_range``: α_r ~ U(lo, hi) per batch.
    ``adapter_only_steps``: for the first N optimiser steps only the adapter learns (every other trainable part —
    LoRA, a straight-through mask generator — has learning rate 0, then follows the same schedule); 0 = the
    reference, which trains everything from the start (deviation S8). ``model``: the
    :class:`~pigeon_utils.model.PigeonModelConfig`.
    """

    cache_tokens: bool = True
    max_train_samples: Optional[int] = None
    ref_mask_ratio_range: tuple[float, float] = (0.0, 1.0)
    adapter_only_steps: int = 0
    model: PigeonModelConfig = field(default_factory=PigeonModelConfig)

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.model, dict):
            self.model = PigeonModelConfig.from_dict(self.model)
        self.ref_mask_ratio_range = tuple(self.ref_mask_ratio_range)
        if int(self.adapter_only_steps) != self.adapter_only_steps or self.adapter_only_steps < 0:
            raise ValueError(f"SFTConfig.adapter_only_steps must be a non-negative integer, "
                             f"got {self.adapter_only_steps!r}")
        lo, hi = self.ref_mask_ratio_range
        if not (0.0 <= lo <= hi <= 1.0):
            raise ValueError(f"SFTConfig.ref_mask_ratio_range must satisfy 0 <= lo <= hi <= 1, got {(lo, hi)}")

    @classmethod
    def for_preset(cls, preset: str, **overrides) -> "SFTConfig":
        """The preset's defaults (:data:`pigeon_utils.worlds.WORLDS`), with `overrides` (``model=`` may be a dict of
        :class:`PigeonModelConfig` fields)."""
        from pigeon_utils.worlds import world

        base: dict[str, Any] = dict(world(preset).sft)
        model = {**base.pop("model", {}), **(overrides.pop("model", None) or {})}
        if isinstance(model, PigeonModelConfig):
            model = asdict(model)
        return cls(**{**base, **overrides}, model=PigeonModelConfig(**model))

    @classmethod
    def from_dict(cls, d: dict) -> "SFTConfig":
        return from_dict_strict(cls, d)


class SFTStage(Stage):
    """Stage 1 for :func:`~pigeon_utils.train.train`: the training and validation samples of `ds` as training
    sequences, and the loss of :meth:`PigeonModel.forward` at the batch's α_r (training: drawn per step; validation:
    per batch position, from another stream, with other mask noise — the same on every evaluation)."""

    name = "SFT"
    config_file = "sft_config.json"

    def __init__(self, cfg: SFTConfig, model: PigeonModel, ds, *, max_samples: Optional[int] = None,
                 progress: bool = False):
        backbone = model.backbone
        self.config, self.model = cfg, model
        max_train = cfg.max_train_samples if cfg.max_train_samples is not None else max_samples
        self.train_set = PromptDataset(ds, "train", backbone, max_samples=max_train)
        n_eval = cfg.max_eval_samples
        if max_samples is not None:
            n_eval = min(n_eval or max_samples, max_samples)
        self.valid_set = PromptDataset(ds, "valid", backbone, max_samples=n_eval)
        tokens = ImageTokenCache(ds, backbone.tokenizer, cache=cfg.cache_tokens)
        tokens.warm([i for s in self.train_set.samples + self.valid_set.samples for i in s.iids], progress=progress)
        self.train_collate = PigeonCollator(tokens, backbone.layout, cfg.seed, train=True)
        self.valid_collate = PigeonCollator(tokens, backbone.layout, cfg.seed + 1, train=True)

    def loss(self, model, batch, step: int, train: bool):
        r = step_ref_mask_ratio(self.config.seed, step, *self.config.ref_mask_ratio_range,
                                stream="train" if train else "valid")
        out = model(batch, r)
        return out.loss_sum, out.num_tokens, {"ref_mask_ratio": r}

    def param_groups(self, params: list, schedule: Callable[[int], float]):
        wait = self.config.adapter_only_steps
        if not wait:
            return params, schedule
        # two groups: everything but the adapter waits (learning rate 0) for the first `wait` steps
        adapter = {id(p) for p in self.model.adapter.parameters()}
        groups = [{"params": [p for p in params if id(p) not in adapter]},
                  {"params": [p for p in params if id(p) in adapter]}]
        return groups, [lambda step: 0.0 if step < wait else schedule(step), schedule]


def pretrained_model(run, cfg: SFTConfig, *, backbone=None, device=None) -> PigeonModel:
    """The Stage-1 starting point: the pre-trained LMM (LoRA = identity) with an adapter and a mask generator
    freshly initialised from ``cfg.seed`` — the backbone is loaded unless given, torch's RNG seeded, then the model
    built (so the same seed gives the same model whether or not the backbone was given), as :func:`train_sft` does. ``run``: a :class:`~pigeon_utils.config.RunConfig`."""
    from pigeon_utils.config import pick_device
    from pigeon_utils.worlds import load_backbone

    device = device or pick_device(run.device)
    if backbone is None:  # loaded before seeding: loading may draw random numbers, which would change the model
        backbone = load_backbone(run.preset, run.checkpoint_dir, device=device)
    torch.manual_seed(cfg.seed)
    return PigeonModel(backbone, cfg.model).to(device)


def train_sft(cfg: SFTConfig, run, *, backbone=None, out_dir: Path | str | None = None,
              resume: bool | str | Path = True, interrupt_after: Optional[int] = None, progress: bool = True,
              on_eval: Optional[Callable[[PigeonModel, int, dict], None]] = None,
              accelerator=None) -> TrainResult:
    """Train Stage 1 and return a :class:`~pigeon_utils.train.TrainResult` (the model with its best weights).

    ``run``: a :class:`~pigeon_utils.config.RunConfig` (dataset, checkpoint folder, device, ``max_samples``).
    ``backbone``: an already loaded backbone (default: the preset's, from ``run.checkpoint_dir``). ``resume``,
    ``interrupt_after``, ``on_eval``: see :func:`pigeon_utils.train.train`.
    """
    from pigeon_utils.data import open_dataset

    accelerator = accelerator or make_accelerator(cfg, run.device)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    model = pretrained_model(run, cfg, backbone=backbone, device=accelerator.device)
    if cfg.gradient_checkpointing:
        model.lmm.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    stage = SFTStage(cfg, model, open_dataset(run.data_dir, run.scenario), max_samples=run.max_samples,
                     progress=progress and accelerator.is_main_process)
    out_dir = Path(out_dir) if out_dir is not None else run.run_dir / "sft"
    return train(stage, out_dir, accelerator, resume=resume, interrupt_after=interrupt_after, progress=progress,
                 on_eval=on_eval)
