"""Where the repository is on disk (a leaf module: it imports nothing from the package)."""
from __future__ import annotations

from pathlib import Path

#: the repository root (the folder holding ``pigeon_utils/``, ``notebooks/``, ``checkpoints/``).
REPO_ROOT = Path(__file__).resolve().parents[1]

__all__ = ["REPO_ROOT"]
