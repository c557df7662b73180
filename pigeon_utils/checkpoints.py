"""Pigeon's model folders: reading them back, the pre-trained starting point, and the newest model of a run.

A model folder (``run_dir/sft/best``, or a training ``checkpoint-<step>/``) holds what
:meth:`~pigeon_utils.model.PigeonModel.save_pretrained` writes: ``lora/`` (peft), ``adapter.safetensors``,
``mask_generator.safetensors`` and ``pigeon_model.json`` (the :class:`~pigeon_utils.model.PigeonModelConfig`).
Every reader of such a folder goes through this module.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional


from pigeon_utils.model import PigeonModel, PigeonModelConfig

__all__ = ["MODEL_CONFIG_FILE", "STAGES", "read_model_config", "load_pigeon_model", "load_mask_generator",
           "newest_model"]

MODEL_CONFIG_FILE = "pigeon_model.json"
#: the trained stages a run directory can hold, newest first: (label, folder under run_dir)
STAGES = (("Stage 1 (SFT)", "sft/best"),)


def read_model_config(folder: Path | str) -> PigeonModelConfig:
    """The :class:`PigeonModelConfig` of a model folder; a folder without one is a FileNotFoundError naming it."""
    path = Path(folder) / MODEL_CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a Pigeon model folder (no {MODEL_CONFIG_FILE}); expected a folder "
                                f"written by notebook 03 (run_dir/sft/best or a checkpoint-<step>/)")
    try:
        return PigeonModelConfig.from_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: damaged model config ({e})") from None


def load_pigeon_model(backbone, folder: Path | str, config: Optional[PigeonModelConfig] = None) -> PigeonModel:
    """A :class:`PigeonModel` on `backbone` with the trained weights of `folder` (in eval mode); the model config is
    read from the folder unless given."""
    config = config or read_model_config(folder)
    return PigeonModel(backbone, config).load_trained(folder).eval()


def load_mask_generator(folder: Path | str, hidden: int):
    """Only the mask generator of a model folder (for LMM width `hidden`), in eval mode."""
    from safetensors.torch import load_file

    folder = Path(folder)
    gen = read_model_config(folder).build_mask_generator(hidden)
    path = folder / "mask_generator.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the Pigeon model folder {folder}")
    gen.load_state_dict(load_file(str(path)), strict=True)
    return gen.eval()


def newest_model(run, backbone, config: Optional[PigeonModelConfig] = None, seed: Optional[int] = None):
    """The newest trained model of ``run.run_dir`` (:data:`STAGES`), else the pre-trained one.

    Returns ``(model, label, folder)``; ``folder`` is None for the pre-trained model, whose adapter is untrained
    (``config`` / ``seed``: its configuration and initialisation, default the preset's Stage-1 ones)."""
    for label, rel in STAGES:
        folder = run.run_dir / rel
        if (folder / MODEL_CONFIG_FILE).is_file():
            return load_pigeon_model(backbone, folder), label, folder
    from pigeon_utils.sft import SFTConfig, pretrained_model

    sft = SFTConfig.for_preset(run.preset)
    if config is not None:
        sft.model = config
    if seed is not None:
        sft.seed = seed
    return pretrained_model(run, sft, backbone=backbone).eval(), "pre-trained (no Stage 1)", None
