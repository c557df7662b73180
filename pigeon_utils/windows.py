"""Samples from interaction sequences: sliding windows of 5 history items + 1 target, and the train / valid / test
split (docs/algorithm.md §1.2).

A window is a list of ``WINDOW`` iids; a split maps uid -> gid -> windows, the format of the seed's ``train`` /
``valid`` / ``test`` files.
"""
from __future__ import annotations

import numpy as np

from pigeon_utils.prompts import N_HISTORY

WINDOW = N_HISTORY + 1
SPLITS = ("train", "valid", "test")


def build_windows(user_seqs: dict[int, dict[int, list[int]]], length: int = WINDOW,
                  stride: int = 1) -> dict[int, dict[int, list[list[int]]]]:
    """Sliding windows over each user's interaction sequence: `length` consecutive items (5 history + 1
    target by default), moving `stride` items at a time. Sequences shorter than `length` yield none."""
    if length < 2 or stride < 1:
        raise ValueError(f"length={length}, stride={stride}: expected length >= 2 and stride >= 1")
    out: dict[int, dict[int, list[list[int]]]] = {}
    for uid, per_g in user_seqs.items():
        for gid, seq in per_g.items():
            seq = [int(i) for i in seq]
            ws = [seq[s:s + length] for s in range(0, len(seq) - length + 1, stride)]
            if ws:
                out.setdefault(int(uid), {})[int(gid)] = ws
    return out


def split_windows(windows: dict[int, dict[int, list[list[int]]]], ratios: tuple[float, float, float] = (0.8, 0.1, 0.1),
                  seed: int = 0, by: str = "window") -> dict[str, dict[int, dict[int, list[list[int]]]]]:
    """Split samples into train / valid / test (8:1:1 by default).

    ``by="window"`` (the paper's split) shuffles all windows, so one user appears in every split;
    ``by="user"`` is user-disjoint: whole users go to one split, so test users are unseen in training.
    """
    if len(ratios) != 3 or any(r < 0 for r in ratios) or abs(sum(ratios) - 1) > 1e-6:
        raise ValueError(f"ratios={ratios}: expected three non-negative numbers summing to 1")
    rng = np.random.default_rng(seed)
    if by == "window":
        units = [(u, g, k) for u, per_g in windows.items() for g, ws in per_g.items() for k in range(len(ws))]
    elif by == "user":
        units = list(windows)
    else:
        raise ValueError(f"by={by!r}: expected 'window' or 'user'")
    order = rng.permutation(len(units))
    n_train = int(len(units) * ratios[0])
    n_valid = int(len(units) * ratios[1])
    assign = np.empty(len(units), dtype=np.int64)
    assign[order[:n_train]] = 0
    assign[order[n_train:n_train + n_valid]] = 1
    assign[order[n_train + n_valid:]] = 2
    out: dict[str, dict[int, dict[int, list[list[int]]]]] = {s: {} for s in SPLITS}
    if by == "window":
        for (u, g, k), a in zip(units, assign):
            out[SPLITS[a]].setdefault(u, {}).setdefault(g, []).append(windows[u][g][k])
    else:
        for u, a in zip(units, assign):
            out[SPLITS[a]][u] = {g: list(ws) for g, ws in windows[u].items()}
    return out


__all__ = ["SPLITS", "WINDOW", "build_windows", "split_windows"]
