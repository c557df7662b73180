"""Pigeon's model folders: reading them back, the pre-trained starting point, and the newest model of a run.

A model folder (``run_dir/sft/best``, or a training ``checkpoint-<step>/``) holds what
:meth:`~pigeon_utils.model.PigeonModel.save_pretrained` writes: ``lora/`` (peft), ``adapter.safetensors``,
``mask_generator.safetensors`` and ``pigeon_model.json`` (the :class:`~pigeon_utils.model.PigeonModelConfig`).
Every reader of such a folder goes through this module.

The authors' released checkpoints (:data:`UPSTREAM_LAYOUTS`) load through :func:`load_upstream_model`, and
:func:`load_any_model` reads either kind.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


from pigeon_utils.model import PigeonModel, PigeonModelConfig

__all__ = ["MODEL_CONFIG_FILE", "STAGES", "stage1_model", "read_model_config", "load_pigeon_model", "load_mask_generator",
           "newest_model", "UPSTREAM_LAYOUTS", "UpstreamLayoutError", "UpstreamCheckpoint", "find_upstream_checkpoint",
           "read_upstream_weights", "upstream_model_config", "load_upstream_model", "load_any_model"]

MODEL_CONFIG_FILE = "pigeon_model.json"
#: the trained stages a run directory can hold, newest first: (label, folder under run_dir)
STAGES = (("Stage 2 (DPO)", "dpo/best"), ("Stage 1 (SFT)", "sft/best"))


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


def newest_model(run, backbone, config: Optional[PigeonModelConfig] = None, seed: Optional[int] = None, *,
                 model_dir: Path | str | None = None, stage1_dir: Path | str | None = None):
    """The newest trained model of ``run.run_dir`` (:data:`STAGES`), else the pre-trained one; or, with
    `model_dir`, that folder (ours, or the authors' checkpoint: :func:`load_any_model`, `stage1_dir` for a Stage-2
    one).

    Returns ``(model, label, folder)``; ``folder`` is None for the pre-trained model, whose adapter is untrained
    (``config`` / ``seed``: its configuration and initialisation, default the preset's Stage-1 ones)."""
    if model_dir is not None:
        return load_any_model(backbone, model_dir, stage1_dir), f"model of {Path(model_dir).name}", Path(model_dir)
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


# ------------------------------------------------------------------------------------------------- upstream folders
#: the authors' checkpoint layouts (docs/algorithm.md §3.6, §4.6), as error messages list them
UPSTREAM_LAYOUTS = (
    "Stage 1 (finetune_sft.py): checkpoint-N/mask_generator/pytorch_model.bin, checkpoint-N/adapter/pytorch_model.bin, "
    "checkpoint-N/llama/{adapter_config.json, adapter_model.bin} (model.safetensors / adapter_model.safetensors "
    "accepted instead of the .bin files)",
    "Stage 2 (finetune_dpo.py): checkpoint-N/llama/policy/{adapter_config.json, adapter_model.safetensors or "
    "adapter_model.bin}, with stage1_dir = the Stage-1 checkpoint-N whose mask_generator/ and adapter/ it was "
    "trained on",
)
_PART_FILES = ("model.safetensors", "pytorch_model.bin")  # what HF's Trainer writes, safetensors preferred
_LORA_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_LORA_CONFIG = "adapter_config.json"


class UpstreamLayoutError(FileNotFoundError):
    """A folder is not one of the authors' checkpoint layouts; the message names the missing file and lists them."""


@dataclass(frozen=True)
class UpstreamCheckpoint:
    """The files of an upstream checkpoint: ``stage`` (1 or 2), the LoRA folder and weights file, the mask generator
    and adapter weights files (``mask_generator_file`` None when the folder has none)."""

    stage: int
    lora_dir: Path
    lora_file: Path
    adapter_file: Path
    mask_generator_file: Optional[Path]


def _layout_error(folder: Path, missing: Path, stage: Optional[int] = None) -> UpstreamLayoutError:
    which = f"the Stage-{stage} layout" if stage else "an upstream checkpoint layout"
    listed = "\n".join(f"  - {x}" for x in UPSTREAM_LAYOUTS)
    return UpstreamLayoutError(f"{folder}: {missing} is missing ({which} was expected). The authors' layouts:\n"
                               f"{listed}\nOur own model folders hold {MODEL_CONFIG_FILE} (load_pigeon_model).")


def _first_file(folder: Path, names: tuple[str, ...]) -> Optional[Path]:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def find_upstream_checkpoint(folder: Path | str, stage1_dir: Path | str | None = None, *,
                             require_mask_generator: bool = True) -> UpstreamCheckpoint:
    """Detect the layout of an authors' checkpoint folder (:data:`UPSTREAM_LAYOUTS`; docs/algorithm.md §3.6, §4.6).

    ``llama/policy/`` makes it a Stage-2 folder, whose mask generator and adapter come from `stage1_dir` (required
    then); otherwise a Stage-1 folder, whose parts are its own (`stage1_dir`, when given, overrides where they come
    from). A missing file raises :class:`UpstreamLayoutError` naming it, the layout expected and both layouts."""
    folder = Path(folder)
    if not folder.is_dir():
        raise _layout_error(folder, Path("the folder itself"))
    policy = folder / "llama" / "policy"
    stage = 2 if policy.is_dir() else 1
    lora_dir = policy if stage == 2 else folder / "llama"
    if not lora_dir.is_dir():  # neither layout
        raise _layout_error(folder, Path(f"llama/{_LORA_CONFIG} (Stage 1) or llama/policy/{_LORA_CONFIG} (Stage 2)"))
    if not (lora_dir / _LORA_CONFIG).is_file():
        raise _layout_error(folder, lora_dir / _LORA_CONFIG, stage)
    lora_file = _first_file(lora_dir, _LORA_FILES)
    if lora_file is None:
        raise _layout_error(folder, lora_dir / " or ".join(_LORA_FILES), stage)
    if stage == 2 and stage1_dir is None:
        raise UpstreamLayoutError(f"{folder}: a Stage-2 checkpoint holds only the policy LoRA (llama/policy/); pass "
                                  "stage1_dir = the Stage-1 checkpoint-N folder for its mask_generator/ and adapter/ "
                                  "(docs/algorithm.md §4.6)")
    parts = Path(stage1_dir) if stage1_dir is not None else folder
    files = {}
    for name in ("adapter", "mask_generator"):
        files[name] = _first_file(parts / name, _PART_FILES)
        if files[name] is None and (name == "adapter" or require_mask_generator):
            raise _layout_error(parts, Path(f"{parts / name / _PART_FILES[1]} (or {_PART_FILES[0]})"), 1)
    return UpstreamCheckpoint(stage, lora_dir, lora_file, files["adapter"], files["mask_generator"])


def read_upstream_weights(path: Path | str) -> dict:
    """A weights file of an upstream checkpoint: ``.safetensors``, or a ``.bin`` read with
    ``torch.load(weights_only=True)`` (tensors only, no code runs). A damaged file raises naming it."""
    import torch

    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, a pickle that is not a plain state dict, ...
        raise ValueError(f"{path}: not a readable weights file ({type(e).__name__}: {e})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: expected a state dict (name -> tensor), got {type(sd).__name__}")
    return sd


def _lora_config(path: Path) -> dict:
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: damaged LoRA config ({e})") from None
    unsupported = {k: cfg.get(k) for k in ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern",
                                           "layers_to_transform", "modules_to_save") if cfg.get(k)}
    if not isinstance(cfg.get("target_modules"), list):
        unsupported["target_modules"] = cfg.get("target_modules")  # a regex or nothing: not a list of module names
    if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("bias", "none") != "none" or unsupported:
        raise ValueError(f"{path}: a plain LoRA (peft_type LORA, bias none) is expected, got peft_type "
                         f"{cfg.get('peft_type')!r}, bias {cfg.get('bias')!r}, {unsupported or ''}")
    return cfg


def upstream_model_config(ckpt: UpstreamCheckpoint, config: Optional[PigeonModelConfig] = None) -> PigeonModelConfig:
    """The :class:`PigeonModelConfig` of an upstream checkpoint: LoRA r / α / dropout / target modules from
    ``adapter_config.json``, adapter hidden width and mask-generator FFN width / layers from the weights' shapes, the
    rest the paper's (docs/algorithm.md §3.5). A given `config` is checked against the files (a disagreement names
    the field and both values)."""
    return _config_of(ckpt, _read_parts(ckpt), config)


def _read_parts(ckpt: UpstreamCheckpoint) -> dict:
    return {"adapter": read_upstream_weights(ckpt.adapter_file),
            "mask_generator": None if ckpt.mask_generator_file is None else
            read_upstream_weights(ckpt.mask_generator_file)}


def _config_of(ckpt: UpstreamCheckpoint, states: dict, config: Optional[PigeonModelConfig]) -> PigeonModelConfig:
    import dataclasses

    lora = _lora_config(ckpt.lora_dir / _LORA_CONFIG)
    found: dict = {"lora_r": int(lora["r"]), "lora_alpha": lora["lora_alpha"],
                   "lora_dropout": float(lora.get("lora_dropout", 0.0)),
                   "lora_target_modules": tuple(sorted(lora["target_modules"]))}
    if "encoder.weight" in states["adapter"]:
        found["adapter_hidden"] = int(states["adapter"]["encoder.weight"].shape[0])
    mg = states["mask_generator"]
    if mg is not None:
        found["mask_layers"] = len({k.split(".")[2] for k in mg if k.startswith("encoder.layers.")}) or 1
        if "encoder.layers.0.linear1.weight" in mg:
            found["mask_feedforward"] = int(mg["encoder.layers.0.linear1.weight"].shape[0])
    if config is None:
        return dataclasses.replace(PigeonModelConfig(), **found)
    given = {k: getattr(config, k) for k in found}
    given["lora_target_modules"] = tuple(sorted(given["lora_target_modules"]))
    bad = {k: (v, given[k]) for k, v in found.items() if v != given[k]}
    if bad:
        raise ValueError(f"{ckpt.lora_dir}: the checkpoint does not match the given config: "
                         + ", ".join(f"{k} = {a!r} in the files, {b!r} in the config" for k, (a, b) in bad.items()))
    return config


def load_upstream_model(backbone, folder: Path | str, *, stage1_dir: Path | str | None = None,
                        config: Optional[PigeonModelConfig] = None) -> PigeonModel:
    """A :class:`PigeonModel` on `backbone` with the weights of an authors' checkpoint (either layout of
    :data:`UPSTREAM_LAYOUTS`; docs/algorithm.md §3.6, §4.6), in eval mode.

    The mask generator and adapter state dicts carry the upstream names, which are ours; they load strictly (upstream
    loads them non-strictly), the released 257-row position table included (docs/deviations.md M1). The LoRA (Stage
    1's ``default`` adapter, or Stage 2's ``policy``) becomes the model's LoRA through peft; its keys must be exactly
    the model's. ``config``: see :func:`upstream_model_config` (default: read from the files)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    ckpt = find_upstream_checkpoint(folder, stage1_dir,
                                    require_mask_generator=config is None or config.mask_type == "mutual")
    states = _read_parts(ckpt)
    model = PigeonModel(backbone, _config_of(ckpt, states, config))
    parts = [("adapter", model.adapter, ckpt.adapter_file)]
    if model.mask_generator is not None:
        parts.append(("mask_generator", model.mask_generator, ckpt.mask_generator_file))
    for name, module, path in parts:
        try:
            module.load_state_dict(states[name], strict=True)
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"{path}: does not fit the model's {name} ({e})") from None
    weights = read_upstream_weights(ckpt.lora_file)
    want = set(get_peft_model_state_dict(model.lmm))
    if set(weights) != want:
        missing, extra = sorted(want - set(weights)), sorted(set(weights) - want)
        raise ValueError(f"{ckpt.lora_file}: LoRA keys differ from the model's: missing {missing[:4]} "
                         f"({len(missing)}), unexpected {extra[:4]} ({len(extra)})")
    try:
        set_peft_model_state_dict(model.lmm, {k: v.to(model.device) for k, v in weights.items()})
    except RuntimeError as e:
        raise ValueError(f"{ckpt.lora_file}: does not fit the model's LoRA ({e})") from None
    return model.eval()


def load_any_model(backbone, folder: Path | str, stage1_dir: Path | str | None = None) -> PigeonModel:
    """Our model folder (it has ``pigeon_model.json``: :func:`load_pigeon_model`) or an authors' checkpoint
    (:func:`load_upstream_model`), in eval mode."""
    if (Path(folder) / MODEL_CONFIG_FILE).is_file():
        return load_pigeon_model(backbone, folder)
    return load_upstream_model(backbone, folder, stage1_dir=stage1_dir)


def stage1_model(run, backbone, folder: Path | str | None = None):
    """The Stage-1 model a later stage starts from: `folder` (ours, or the authors' released Stage-1 checkpoint,
    :func:`load_any_model`) or ``run_dir/sft/best``. Returns ``(model, folder)``; a missing folder is a
    FileNotFoundError that says what to run or pass."""
    path = Path(folder) if folder else run.run_dir / "sft" / "best"
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no Stage-1 model here — run notebook 03 (Stage 1) first, or pass the "
                                f"folder of a Stage-1 model (ours, or the authors' checkpoint-N/) as sft_dir")
    return load_any_model(backbone, path), path
