"""Run configuration shared by every notebook: preset, scenario, folders, device, seed.

Every notebook's `parameters` cell sets ``preset``, ``scenario``, ``run_dir``, ``data_dir``,
``checkpoint_dir``, ``seed``, ``device`` and ``max_samples``; :func:`resolve` turns them into a
:class:`RunConfig` with absolute paths (relative paths are taken from the repository root, so a notebook
behaves the same whether it runs from ``notebooks/`` or from a papermill batch).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from pigeon_utils.data import SCENARIOS
from pigeon_utils.paths import REPO_ROOT
from pigeon_utils.worlds import world


@dataclass(frozen=True)
class RunConfig:
    preset: str
    scenario: str
    run_dir: Path
    data_dir: Path
    checkpoint_dir: Path
    seed: int = 0
    device: str = "auto"
    max_samples: int | None = None

    def stage_dir(self, name: str) -> Path:
        """``run_dir/<name>``, created on demand: where one stage writes its artefacts."""
        d = self.run_dir / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def to_json(self) -> str:
        return json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}, indent=1)


def _abs(p: str | os.PathLike) -> Path:
    p = Path(p).expanduser()
    return p if p.is_absolute() else (REPO_ROOT / p)


def resolve(preset: str = "toy", scenario: str = "sticker", run_dir: str | os.PathLike | None = None,
            data_dir: str | os.PathLike | None = None, checkpoint_dir: str | os.PathLike | None = None,
            seed: int = 0, device: str = "auto", max_samples: int | None = None) -> RunConfig:
    """Validate the notebook parameters and fill in the preset's default folders (:mod:`pigeon_utils.worlds`)."""
    w = world(preset)
    if scenario not in SCENARIOS:
        raise ValueError(f"scenario={scenario!r}: expected one of {SCENARIOS}")
    if max_samples is not None and int(max_samples) < 1:
        raise ValueError(f"max_samples={max_samples!r}: expected None or a positive integer")
    return RunConfig(
        preset=preset, scenario=scenario,
        run_dir=_abs(run_dir or f"runs/{preset}-{scenario}"),
        data_dir=_abs(data_dir or w.data_dirs[scenario]),
        checkpoint_dir=_abs(checkpoint_dir or w.checkpoint_dir),
        seed=int(seed), device=device, max_samples=None if max_samples is None else int(max_samples))


def from_dict_strict(cls, d: dict):
    """Build dataclass `cls` from `d`, refusing unknown keys (named in the error) instead of ignoring them."""
    from dataclasses import fields

    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known: {sorted(known)}")
    return cls(**d)


def pick_device(device: str = "auto"):
    """``"auto"`` → CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
