"""Shared test fixtures.

`pigeon_utils` is imported first so that its torchvision guard runs before any test imports
transformers / open_clip.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

import pigeon_utils  # noqa: F401  (side effects: offline defaults, torchvision guard)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PIGEON_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent: ../shared (specs and golden fixtures) exists only beside the "
                    "developers' checkout and in CI, not in a user's clone")
    return SHARED


@pytest.fixture(scope="session")
def golden_dir(shared_dir: Path) -> Path:
    d = shared_dir / "golden" / "lavit_tiny"
    if not d.is_dir():
        pytest.skip(f"golden fixtures not found at {d}")
    return d
