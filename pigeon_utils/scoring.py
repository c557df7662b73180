"""Scores of generated images and the choice of α_r (docs/algorithm.md §6.1–6.2), in both worlds.

Per generated image g of a sample with history images h_1…h_5 and target (= reference) t, with f(·) the
L2-normalised CLIP embedding of the world (toy: the toy ``open_clip`` model; lavit: ``open_clip`` ViT-H-14
``laion2b_s32b_b79k`` from a local file):

* **history CIS** = (1/5) Σ_k 100 · cos(f_img(g), f_img(h_k)) — how much g looks like what the user liked;
* **reference CS** = 100 · cos(f_img(g), f_txt(semantics[t])) — how well g keeps the target's meaning
  (a CLIP *text* score against the target's description; not clamped at 0).

As upstream, the generated image is first resized to 512×512 (bilinear) and the history images are used as they are
(``cal_scores.py``; docs/algorithm.md §8.26). The toy CLIP reads 64×64 images, the toy images' own size, so nothing is resized.

α_r selection, two protocols, both reported:

* **paper** (``select_scores.ipynb``): per test sample, the α_r whose image maximises 0.5·CS + 0.5·CIS — chosen on
  the test images themselves (an oracle per sample; ties: the smallest α_r);
* **honest**: one α_r for all, the one with the highest mean 0.5·CS + 0.5·CIS on the *validation* split, then
  applied to the test split.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["SELECT_WEIGHT", "history_cis", "reference_cs", "combined_score", "mean_se",
           "ClipScorer", "load_clip", "SweepScores", "score_sweep", "Selection", "select_per_sample", "select_on_validation",
           "select_protocols", "load_run_clip", "paired_difference",
           "sweep_scored", "sweep_and_score", "optional_clip"]

#: weight of the reference CS in the selection score (``select_ratio = 0.5`` upstream)
SELECT_WEIGHT = 0.5


# ------------------------------------------------------------------------------------------------- formulas
def _unit(x: Tensor) -> Tensor:
    return F.normalize(torch.as_tensor(x).float(), dim=-1)


def history_cis(image_feats: Tensor, history_feats: Tensor) -> Tensor:
    """History CIS [N] = mean over k of 100·cos(f(g_n), f(h_{n,k})); ``image_feats`` [N, D], ``history_feats``
    [N, K, D] (any scale: both are L2-normalised here)."""
    g, h = torch.as_tensor(image_feats), torch.as_tensor(history_feats)
    if g.dim() != 2 or h.dim() != 3 or h.shape[0] != g.shape[0] or h.shape[2] != g.shape[1]:
        raise ValueError(f"history_cis needs image_feats [N, D] and history_feats [N, K, D]; got {tuple(g.shape)} "
                         f"and {tuple(h.shape)}")
    return 100.0 * torch.einsum("nd,nkd->nk", _unit(g), _unit(h)).mean(1)


def reference_cs(image_feats: Tensor, text_feats: Tensor) -> Tensor:
    """Reference CS [N] = 100·cos(f_img(g_n), f_txt(text_n)); both [N, D]."""
    g, t = torch.as_tensor(image_feats), torch.as_tensor(text_feats)
    if g.dim() != 2 or g.shape != t.shape:
        raise ValueError(f"reference_cs needs image_feats and text_feats of the same shape [N, D]; got "
                         f"{tuple(g.shape)} and {tuple(t.shape)}")
    return 100.0 * (_unit(g) * _unit(t)).sum(-1)


def mean_se(values) -> dict[str, float]:
    """``{"mean", "se"}``: the mean of `values` and its standard error (sample standard deviation / √n; NaN for a
    single value)."""
    v = np.asarray(values, dtype=np.float64)
    se = float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")
    return {"mean": float(v.mean()), "se": se}


def combined_score(cs, cis, weight: float = SELECT_WEIGHT):
    """The selection score ``weight·CS + (1 − weight)·CIS`` (0.5 / 0.5 upstream)."""
    if not (0.0 <= weight <= 1.0):
        raise ValueError(f"weight must lie in [0, 1], got {weight!r}")
    return weight * cs + (1.0 - weight) * cis


# ------------------------------------------------------------------------------------------------- CLIP
@dataclass
class ClipScorer:
    """The world's CLIP behind one interface. ``model`` has ``image_features(images) -> [N, D]`` and
    ``text_features(texts) -> [N, D]`` (the toy CLIP, or :class:`pigeon_utils.lavit.extractors.OpenClipExtractor`);
    ``generated_size``: side generated images are resized to first (bilinear), None = as they are."""

    model: Any
    generated_size: Optional[int]
    name: str
    batch_size: int = 64

    def _feats(self, images: Sequence) -> Tensor:
        out = [_unit(self.model.image_features(list(images[i:i + self.batch_size])))
               for i in range(0, len(images), self.batch_size)]
        return torch.cat(out) if out else torch.zeros(0)

    def image_features(self, images: Sequence) -> Tensor:
        """Unit CLIP features of dataset images (PIL or uint8 [H, W, 3]) as they are."""
        return self._feats(images)

    def generated_features(self, images: Sequence) -> Tensor:
        """Unit CLIP features of generated images, resized to ``generated_size`` first (docs/algorithm.md §6.1)."""
        if self.generated_size is not None:
            from PIL import Image

            s = int(self.generated_size)
            images = [(im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im)))
                      .resize((s, s), Image.BILINEAR) for im in images]
        return self._feats(images)

    def text_features(self, texts: Sequence[str]) -> Tensor:
        out = [_unit(self.model.text_features(list(texts[i:i + self.batch_size])))
               for i in range(0, len(texts), self.batch_size)]
        return torch.cat(out)


def load_clip(preset: str, checkpoint_dir: Path | str | None = None, *, text_tokenizer=None,
              clip_path: Path | str | None = None, device="cpu") -> ClipScorer:
    """The world's CLIP (:data:`pigeon_utils.worlds.WORLDS`): ``toy`` → ``<checkpoint_dir>/clip`` (the toy
    ``open_clip`` model); ``lavit`` → open_clip ViT-H-14 from the local file `clip_path` (default
    ``$PIGEON_EVAL_DIR/open_clip/…``; a missing file raises an error naming the path and the download)."""
    from pigeon_utils.worlds import world

    w = world(preset)
    return ClipScorer(w.clip_loader(checkpoint_dir, text_tokenizer, clip_path, device), w.generated_size, w.clip_name)


def optional_clip(run, text_tokenizer=None, **kw) -> tuple[Optional[ClipScorer], Optional[str]]:
    """``(clip, None)`` — the run's CLIP (:func:`load_run_clip`, `kw` passed on) — or ``(None, why)`` when its
    weights are missing: for callers whose scores are optional (reported unavailable then, never faked)."""
    from pigeon_utils.backbone import CheckpointError

    try:
        return load_run_clip(run, text_tokenizer, **kw), None
    except (CheckpointError, FileNotFoundError) as err:
        return None, str(err)


# ------------------------------------------------------------------------------------------------- sweep
@dataclass
class SweepScores:
    """Scores of one sweep: ``cis`` and ``cs`` [N, R] (sample n at ``ratios[r]``); ``indices``: the samples' split
    indices."""

    split: str
    ratios: list[float]
    indices: list[int]
    cis: np.ndarray
    cs: np.ndarray

    def __post_init__(self):
        self.cis, self.cs = np.asarray(self.cis, dtype=np.float64), np.asarray(self.cs, dtype=np.float64)
        want = (len(self.indices), len(self.ratios))
        if self.cis.shape != want or self.cs.shape != want:
            raise ValueError(f"cis {self.cis.shape} and cs {self.cs.shape} must both be [samples, ratios] = {want}")

    def per_ratio(self) -> list[dict]:
        """Mean history CIS / reference CS / selection score per α_r (the trade-off curve)."""
        s = combined_score(self.cs, self.cis)
        return [{"ref_mask_ratio": r, "history_cis": float(self.cis[:, j].mean()),
                 "reference_cs": float(self.cs[:, j].mean()), "score": float(s[:, j].mean())}
                for j, r in enumerate(self.ratios)]

    def slopes(self) -> dict[str, dict[str, float]]:
        """The trade-off's direction with its uncertainty: per sample, the least-squares slope of history CIS and of
        reference CS over α_r (score per unit α_r); returns ``{"history_cis" | "reference_cs": {"mean", "se"}}``,
        the mean over samples and its standard error (NaN with a single sample). The mean slope is the slope of the
        mean curve; the paper's trade-off is a positive CIS slope and a negative CS slope."""
        x = np.asarray(self.ratios, dtype=np.float64)
        if len(x) < 2:
            raise ValueError(f"slopes need at least two ratios, got {list(self.ratios)}")
        xc = x - x.mean()
        return {name: mean_se((y - y.mean(1, keepdims=True)) @ xc / float(xc @ xc))
                for name, y in (("history_cis", self.cis), ("reference_cs", self.cs))}

    def to_dict(self) -> dict:
        return {"split": self.split, "ratios": list(self.ratios), "indices": list(self.indices),
                "cis": self.cis.tolist(), "cs": self.cs.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "SweepScores":
        return cls(d["split"], list(d["ratios"]), list(d["indices"]), np.asarray(d["cis"]), np.asarray(d["cs"]))

    def save(self, path: Path | str) -> Path:
        import json

        from pigeon_utils.atomic import atomic_write_text

        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1))


def score_sweep(index: dict, folder: Path | str, ds, clip: ClipScorer, progress: bool = False) -> SweepScores:
    """History CIS and reference CS of every image of a sweep (:func:`pigeon_utils.sweep.run_sweep`'s index and
    folder). History features are computed once per image id; the text is the target's ``ds.semantics``."""
    from tqdm.auto import tqdm

    from pigeon_utils.sweep import finished_entries, load_image

    folder = Path(folder)
    indices, keys, entries = finished_entries(index, folder)
    hist_iids = sorted({i for e in entries for i in e["history"]})
    hfeat = clip.image_features([ds.load_image(i) for i in hist_iids])
    row = {iid: j for j, iid in enumerate(hist_iids)}
    h = torch.stack([hfeat[[row[i] for i in e["history"]]] for e in entries])  # [N, 5, D]
    t = clip.text_features([ds.semantics[e["target"]] for e in entries])  # [N, D]
    cis = np.zeros((len(entries), len(keys)))
    cs = np.zeros_like(cis)
    for j, key in enumerate(tqdm(keys, desc="scoring", disable=not progress)):
        g = clip.generated_features([load_image(folder, e["images"][key]["path"]) for e in entries])
        cis[:, j] = history_cis(g, h).numpy()
        cs[:, j] = reference_cs(g, t).numpy()
    return SweepScores(index["split"], [float(r) for r in index["config"]["ref_mask_ratios"]], indices, cis, cs)


# ------------------------------------------------------------------------------------------------- selection
@dataclass
class Selection:
    """A chosen α_r per test sample under one protocol: ``ratio_index`` [N] (column of the sweep), the chosen
    ``ratios`` [N], and the chosen images' ``cis`` / ``cs`` [N]. ``details``: what the choice was based on."""

    protocol: str
    ratio_index: np.ndarray
    ratios: np.ndarray
    cis: np.ndarray
    cs: np.ndarray
    details: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {"protocol": self.protocol, "samples": int(len(self.ratios)),
                "history_cis": float(self.cis.mean()), "reference_cs": float(self.cs.mean()),
                "score": float(combined_score(self.cs, self.cis).mean()),
                "ratio_counts": {f"{r:.2f}": int(n) for r, n in zip(*np.unique(self.ratios, return_counts=True))},
                **self.details}


def _pick(scores: SweepScores, j: np.ndarray, protocol: str, details: dict) -> Selection:
    n = np.arange(len(j))
    return Selection(protocol, j, np.asarray(scores.ratios)[j], scores.cis[n, j], scores.cs[n, j], details)


def select_per_sample(test: SweepScores, weight: float = SELECT_WEIGHT) -> Selection:
    """The paper's protocol (docs/algorithm.md §6.2): per sample, the α_r maximising ``weight·CS + (1 − weight)·CIS`` on the
    test images themselves (ties: the first, i.e. smallest, α_r). An oracle: it looks at the test outputs."""
    j = np.argmax(combined_score(test.cs, test.cis, weight), axis=1)
    return _pick(test, j, "paper (per-sample argmax on the test images)", {"weight": weight})


def select_on_validation(valid: SweepScores, test: SweepScores, weight: float = SELECT_WEIGHT) -> Selection:
    """The honest protocol: the single α_r with the highest mean ``weight·CS + (1 − weight)·CIS`` over the
    validation samples (ties: the smallest), applied to every test sample."""
    if [round(r, 6) for r in valid.ratios] != [round(r, 6) for r in test.ratios]:
        raise ValueError(f"validation and test sweeps use different ratios: {valid.ratios} vs {test.ratios}")
    mean = combined_score(valid.cs, valid.cis, weight).mean(0)
    j = int(np.argmax(mean))
    return _pick(test, np.full(len(test.indices), j), "honest (one α_r chosen on validation)",
                 {"weight": weight, "chosen_ratio": float(valid.ratios[j]), "validation_samples": len(valid.indices),
                  "validation_score_per_ratio": [round(float(v), 4) for v in mean]})


def select_protocols(scores: dict[str, SweepScores], split: str, select_split: str,
                     weight: float = SELECT_WEIGHT) -> dict[str, Selection]:
    """Both protocols on the sweeps' scores (``{split: SweepScores}``): ``paper`` on `split` itself and, when
    `select_split` is another scored split, ``honest`` (α_r chosen on `select_split`, applied to `split`)."""
    out = {"paper": select_per_sample(scores[split], weight)}
    if select_split in scores and select_split != split:
        out["honest"] = select_on_validation(scores[select_split], scores[split], weight)
    return out


def load_run_clip(run, text_tokenizer=None, *, clip_preset: Optional[str] = None, clip_path=None,
                  device="cpu") -> ClipScorer:
    """The CLIP a run scores with: its own world's (:func:`load_clip`), or with ``clip_preset="toy"`` the toy CLIP
    from the toy world's checkpoint folder — for smoke runs of the real code path on toy images."""
    from pigeon_utils.paths import REPO_ROOT
    from pigeon_utils.worlds import world

    preset = clip_preset or run.preset
    if preset == run.preset:
        return load_clip(preset, run.checkpoint_dir, text_tokenizer=text_tokenizer, clip_path=clip_path, device=device)
    return load_clip(preset, REPO_ROOT / world(preset).checkpoint_dir, clip_path=clip_path, device=device)


def paired_difference(base: SweepScores, new: SweepScores) -> dict:
    """How a second model's scores differ from a first's on the same samples and α_r (e.g. Stage 2 vs Stage 1):
    per sample the difference new − base, then mean ± standard error over the samples — per α_r and for the
    sample's mean over all α_r (``"overall"``), for history CIS and reference CS."""
    if list(base.indices) != list(new.indices) or [round(r, 6) for r in base.ratios] != [round(r, 6) for r in new.ratios]:
        raise ValueError("paired_difference needs two sweeps of the same samples and ratios; got "
                         f"{len(base.indices)} vs {len(new.indices)} samples, ratios {base.ratios} vs {new.ratios}")
    d = {"history_cis": new.cis - base.cis, "reference_cs": new.cs - base.cs}
    return {"samples": len(base.indices),
            "per_ratio": [{"ref_mask_ratio": r, **{k: mean_se(v[:, j]) for k, v in d.items()}}
                          for j, r in enumerate(base.ratios)],
            "overall": {k: mean_se(v.mean(1)) for k, v in d.items()}}


def sweep_scored(model, ds, split: str, folder: Path | str, cfg, clip: ClipScorer, *, max_samples: Optional[int] = None,
                 model_label: str = "", resume: bool = True, progress: bool = True):
    """:func:`pigeon_utils.sweep.run_sweep` of `model` into `folder` (resumable), then the scores of its first
    `max_samples` samples — a shared folder may hold more than were asked for. Returns ``(SweepResult, SweepScores)``,
    the result's index restricted to those samples."""
    from dataclasses import replace

    from pigeon_utils.sweep import first_samples, run_sweep

    res = run_sweep(model, ds, split, folder, cfg, max_samples=max_samples, model_label=model_label, resume=resume,
                    progress=progress)
    res = replace(res, index=first_samples(res.index, max_samples))
    return res, score_sweep(res.index, folder, ds, clip, progress=progress)


def sweep_and_score(models: dict, ds, split: str, root: Path | str, cfg, clip: ClipScorer, *,
                    max_samples: Optional[int] = None, resume: bool = True,
                    progress: bool = True) -> dict[str, SweepScores]:
    """Sweep each of `models` (``{model key: model}``) over the first `max_samples` samples of `split` with the same
    settings (:func:`pigeon_utils.sweep.run_sweep` into the run's shared folder
    :func:`~pigeon_utils.sweep.sweep_folder` under `root`, resumable) and score those samples' images; returns
    ``{key: SweepScores}``. The same samples, ratios and seeds for every model, so their scores can be compared
    sample by sample (:func:`paired_difference`)."""
    from pigeon_utils.sweep import sweep_folder

    return {name: sweep_scored(model, ds, split, sweep_folder(root, name, split, cfg), cfg, clip,
                               max_samples=max_samples, model_label=name, resume=resume, progress=progress)[1]
            for name, model in models.items()}
