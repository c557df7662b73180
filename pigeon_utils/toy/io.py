"""Checkpoint files of the toy backbone: atomic writes, checked reads, hashes.

Every part lives in its own sub-folder of the checkpoint (``checkpoints/toy/<part>/``) with a ``config.json`` and a
``model.safetensors`` (the LMM and text tokenizer use the ``transformers`` / ``tokenizers`` file names). Reads go
through :func:`require_file`, :func:`read_json` and :func:`read_safetensors`, which turn a missing or unreadable
file into a :class:`~pigeon_utils.backbone.CheckpointError` that names the file and says how to rebuild it.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from pigeon_utils.atomic import atomic_write, atomic_write_text
from pigeon_utils.backbone import CheckpointError

REBUILD = ("rebuild it with `python -m pigeon_utils.toy.build --out checkpoints/toy --seed 0` (about 30 min on 2 "
           "CPU cores), or restore the committed copy with `git checkout -- checkpoints/toy`")


def require_file(path: Path) -> Path:
    """`path` if it is a file, else a :class:`CheckpointError` naming it."""
    path = Path(path)
    if not path.parent.is_dir():
        raise CheckpointError(f"{path.parent}: checkpoint folder not found (expected file {path.name}); {REBUILD}")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file missing; {REBUILD}")
    return path


def read_json(path: Path) -> dict:
    try:
        return json.loads(require_file(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: damaged checkpoint file (not valid JSON: {e}); {REBUILD}") from None


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(require_file(path)))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: damaged checkpoint file (not readable as safetensors: {e}); {REBUILD}") \
            from None


def load_state(module: torch.nn.Module, path: Path) -> None:
    """Load `path` into `module` strictly; a key or shape mismatch is reported as a damaged file."""
    state = read_safetensors(path)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: damaged checkpoint file (does not fit its config: {e}); {REBUILD}") from None


def write_json(obj, path: Path) -> Path:
    """Write `obj` as indented JSON, atomically (temporary file, then rename)."""
    return atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    """Write tensors (made contiguous, on CPU) as safetensors, atomically."""
    from safetensors.torch import save

    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    return atomic_write(path, lambda f: f.write(data))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
