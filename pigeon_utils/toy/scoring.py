"""The toy world's exact reading of generated images: their factors, read back by the toy CLIP, against the
sample's history (style) and its reference (meaning).

Every toy image is drawn from known factors (``factors.json``): the glyph is the *semantic* factor (emotion /
genre), colour, background pattern and stroke are the *style* factors. The toy CLIP's zero-shot classifier
(``predict_factors``) reads them back from a generated image, so the toy can say *why* the CLIP scores move:

* ``style`` — a style factor counts as right when its value is a most frequent one among the sample's five
  history images (:func:`history_style_accuracy`);
* ``semantic`` — the glyph equals the reference's (= the target's) glyph;
* ``<factor>_vs_reference`` — each style factor equal to the reference's.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import numpy as np

from pigeon_utils.toy.data import STYLE_FACTORS

__all__ = ["history_style_accuracy", "factor_scores", "compare_generation", "sweep_factor_scores"]


def history_style_accuracy(pred: Sequence[dict], history: Sequence[Sequence[dict]],
                           factors: Sequence[str] = STYLE_FACTORS) -> float:
    """Share of (image, style factor) pairs whose predicted value is a most frequent value of that factor among
    the sample's five history images (ties: any of the tied values counts)."""
    hits = []
    for p, hist in zip(pred, history):
        for f in factors:
            c = Counter(h[f] for h in hist)
            top = max(c.values())
            hits.append(p[f] in {v for v, n in c.items() if n == top})
    return float(np.mean(hits)) if hits else float("nan")


def factor_scores(pred: Sequence[dict], ds, samples) -> dict[str, float]:
    """The accuracies of the module docstring for predicted factors `pred` of one image per sample."""
    if ds.factors is None:
        raise ValueError(f"{ds.root}: factor accuracies need a toy dataset with factors.json")
    hist = [[ds.factors[i] for i in s.history] for s in samples]
    ref = [ds.factors[s.target] for s in samples]
    out = {"style": history_style_accuracy(pred, hist),
           "semantic": float(np.mean([p["glyph"] == r["glyph"] for p, r in zip(pred, ref)]))}
    for f in STYLE_FACTORS:
        out[f"{f}_vs_reference"] = float(np.mean([p[f] == r[f] for p, r in zip(pred, ref)]))
    return out


def compare_generation(models: dict, ds, samples, ref_mask_ratio: float, clip, sampling=None, *, seed: int = 0,
                       progress: bool = False) -> dict:
    """One image per sample with each model at α_r = `ref_mask_ratio`
    (:func:`~pigeon_utils.generation.generate_images`: the same prompts, mask noise and sampling seeds for every
    model), scored by :func:`factor_scores`. Returns ``{name: {"scores", "images" (uint8 [N, H, W, 3]), "factors",
    "tokens_per_image"}}``."""
    from pigeon_utils.generation import generate_images

    out = {}
    for name, model in models.items():
        gen = generate_images(model, ds, samples, ref_mask_ratio, sampling, seed=seed, progress=progress)
        pred = clip.predict_factors(gen["images"])
        out[name] = {"scores": factor_scores(pred, ds, samples), "images": gen["images"], "factors": pred,
                     "tokens_per_image": float(np.mean([len(c) for c in gen["codes"]]))}
    return out


def sweep_factor_scores(index: dict, folder: Path | str, ds, clip) -> list[dict]:
    """Per α_r, :func:`factor_scores` of a sweep's images (:func:`pigeon_utils.sweep.run_sweep`'s index and
    folder). Returns one dict per ratio, with ``ref_mask_ratio``."""
    from pigeon_utils.sweep import finished_entries, load_image

    _, keys, entries = finished_entries(index, folder)
    samples = [SimpleNamespace(history=e["history"], target=e["target"]) for e in entries]
    out = []
    for r, key in zip(index["config"]["ref_mask_ratios"], keys):
        pred = clip.predict_factors(np.stack([load_image(folder, e["images"][key]["path"]) for e in entries]))
        out.append({"ref_mask_ratio": float(r), **factor_scores(pred, ds, samples)})
    return out
