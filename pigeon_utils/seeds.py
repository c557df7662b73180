"""Every seed the pipeline derives from the run's seed, written once.

A random draw that must not depend on what else is computed with it (the batch a sample lands in, the number of
processes, an interruption and resume) gets its own generator, seeded by a pure function of the run's seed and of
what the draw is for:

* :func:`derive_seed` — the one formula: ``seed · 1,000,003 + index · 104,729 + salt · 7,919`` (mod 2⁶³ − 1);
* :func:`sample_seed` — a sample's Exp(1) noise for the mask generator's Gumbel top-k, per epoch;
* :func:`row_seed` — a sample's decoding noise (``ratio=None``) or one (sample, α_r) row of the sampling loop;
* :func:`image_seed` — a stochastic tokenization of one image (LaVIT's tokenizer samples its keep decisions);
* :func:`step_seed` — the dropout of one training step on one process;
* :func:`epoch_seed` — the shuffling order of one epoch;
* :func:`step_ref_mask_ratio` — α_r of one training / validation batch, drawn from U(lo, hi).
"""
from __future__ import annotations

import random

__all__ = ["derive_seed", "sample_seed", "row_seed", "image_seed", "step_seed", "epoch_seed", "step_ref_mask_ratio"]

_MOD = 2**63 - 1
#: offset that keeps the indices of images and processes apart from sample indices
_OTHER = 10_000_000


def derive_seed(seed: int, index: int, salt: int = 0) -> int:
    """The seed of draw `salt` for item `index` of a run seeded `seed` (a pure function of its arguments)."""
    return (int(seed) * 1_000_003 + int(index) * 104_729 + int(salt) * 7_919) % _MOD


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Sample `index`'s mask noise in `epoch` (inference uses epoch 0)."""
    return derive_seed(seed, index, epoch)


def row_seed(seed: int, index: int, ratio: float | None = None) -> int:
    """Sample `index`'s decoding noise (``ratio=None``) or the sampling loop of its row at α_r = `ratio`."""
    r = -1 if ratio is None else int(round(float(ratio) * 1000))
    return derive_seed(seed, index, r + 2)


def image_seed(seed: int, iid: int) -> int:
    """A stochastic tokenization of image `iid`: the same tokens whatever else is tokenized with it."""
    return row_seed(seed, _OTHER + int(iid))


def step_seed(seed: int, step: int, process: int = 0) -> int:
    """torch's global RNG (dropout) at training step `step` on process `process`."""
    return derive_seed(seed, _OTHER + int(process), step)


def epoch_seed(seed: int, epoch: int) -> int:
    """The permutation of the training samples in `epoch`."""
    return int(seed) * 31 + int(epoch)


def step_ref_mask_ratio(seed: int, step: int, lo: float = 0.0, hi: float = 1.0, stream: str = "train") -> float:
    """α_r ~ U(lo, hi) for one batch (docs/algorithm.md §3.3), a pure function of (seed, stream, step): every process
    of a data-parallel run and a resumed run draw the same value."""
    return random.Random(f"{seed}/{stream}/{step}").uniform(lo, hi)
