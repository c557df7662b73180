"""Shared test fixtures.

`pigeon_utils` is imported first so that its torchvision guard runs before any test imports
transformers / open_clip.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

import pigeon_utils  # noqa: F401  (side effects: offline defaults, torchvision guard)

REPO = Path(__file__).resolve().parents[1]

# Smoke parameters of every notebook: the same notebooks, cut short (DESIGN.md §4). Papermill passes them to
# the notebook's parameters cell. A notebook added to notebooks/ must get an entry here (a test checks it), so
# it joins the CI runs in toy mode (tests/test_batch.py) and with preset="lavit" (tests/test_lavit_backbone.py).
NOTEBOOK_SMOKE = {
    "01": {"max_samples": 3},
    "02": {"max_samples": 2, "ref_mask_ratios": [0.0, 0.5, 1.0], "show_ratios": [0.0, 1.0]},
    "03": {"max_steps": 2, "max_samples": 8, "batch_size": 4, "eval_every": 1, "n_eval_samples": 4, "n_show": 2,
           "max_new_tokens": 12, "min_new_tokens": 1},
    "04": {"max_samples": 8, "train_samples": 4, "valid_samples": 2, "ref_mask_ratios": [0.0, 0.5, 1.0],
           "batch_size": 2, "max_new_tokens": 8, "min_new_tokens": 1, "num_inference_steps": 2, "n_show": 2},
    "05": {"max_samples": 8, "max_steps": 2, "eval_every": 1, "batch_size": 2, "compare_samples": 2,
           "ref_mask_ratios": [0.0, 0.5, 1.0], "sweep_batch_size": 2, "max_new_tokens": 8, "min_new_tokens": 1,
           "num_inference_steps": 2},
    "06": {"max_samples": 2, "ref_mask_ratios": [0.0, 0.5, 1.0], "batch_size": 2, "max_new_tokens": 8,
           "min_new_tokens": 1, "num_inference_steps": 2, "n_show": 2},
    "07": {"max_samples": 2, "select_samples": 2, "pixel_samples": 1, "ref_mask_ratios": [0.0, 0.5, 1.0],
           "batch_size": 2, "max_new_tokens": 8, "min_new_tokens": 1, "num_inference_steps": 2, "n_show": 1},
    "08": {"max_samples": 2, "ref_mask_ratios": [0.0, 1.0], "ref_mask_ratio": 1.0, "max_new_tokens": 8,
           "min_new_tokens": 1, "num_inference_steps": 2},
}
#: notebooks that read what earlier ones wrote: the smoke tests run those first, in the same run directory (04, 05 and
#: 07 sweep with the same settings, so 07 finds Stage 1's validation images in 04's sweep and its test images in 05's)
NOTEBOOK_PREREQUISITES = {"04": ["03"], "05": ["03", "04"], "07": ["03", "04", "05"]}
SHARED = Path(os.environ.get("PIGEON_SHARED", REPO.parent / "shared"))


def browser_helpers():
    """tests/browser/jupyterlab.py under a unique module name (a plain `import jupyterlab` would be JupyterLab)."""
    name = "pigeon_browser_jupyterlab"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "tests" / "browser" / "jupyterlab.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent: ../shared (specs and golden fixtures) exists only beside the "
                    "developers' checkout and in CI, not in a user's clone")
    return SHARED


def _shared_subdir(shared_dir: Path, *parts: str) -> Path:
    d = shared_dir.joinpath(*parts)
    if not d.is_dir():
        pytest.skip(f"{d} is absent")
    return d


@pytest.fixture(scope="session")
def golden_dir(shared_dir: Path) -> Path:
    """The golden fixtures computed by the reference implementations (shared/golden/lavit_tiny)."""
    return _shared_subdir(shared_dir, "golden", "lavit_tiny")


@pytest.fixture(scope="session")
def keys_dir(shared_dir: Path) -> Path:
    """The upstream parameter-name listings (shared/spec/keys)."""
    return _shared_subdir(shared_dir, "spec", "keys")
