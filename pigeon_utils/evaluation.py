"""Notebook 07: every model of a run side by side on held-out test samples (docs/algorithm.md §6–§7).

The rows of the comparison (:data:`CONDITIONS`): the pre-trained model (LoRA = identity, untrained adapter: the
Stage-1 starting point), Stage 1, Stage 2 and two ablations of the newest model — its mask generator replaced at
inference by random reference masks (``mask_type="random"``: history kept, ``ceil(n·α_r)`` reference tokens dropped
at random) and by no masks at all (``mask_type="none"``: everything kept, so α_r has no effect and one image per
sample is made). Each row sweeps α_r over the test samples and over validation samples
(:func:`pigeon_utils.sweep.run_sweep` into the run's shared ``sweeps/`` folder, so what notebooks 04, 05 and 06
already generated is reused), then picks one image per test sample by the paper's per-sample protocol and by the honest
one (:func:`pigeon_utils.scoring.select_protocols`) and scores the picked images with every metric of §7
(:class:`pigeon_utils.metrics_models.Evaluator`). :func:`claims` reads the paper's three claims off the results.
Every number is a mean with its standard error over the test samples.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from pigeon_utils.scoring import mean_se, paired_difference, select_protocols, sweep_scored
from pigeon_utils.sweep import load_image, sweep_folder

__all__ = ["Condition", "CONDITIONS", "find_models", "ModelLoader", "model_key", "with_mask_type", "make_evaluator", "sweep_condition",
           "evaluate_condition", "claims", "claims_text", "comparison_rows", "distinct_users", "GLYPH_BAR"]

#: claim (2) asks that at α_r = 0 the generated glyph be the reference's for at least this share of samples
GLYPH_BAR = 0.40


@dataclass(frozen=True)
class Condition:
    """One row of the comparison: ``key`` (its sweep folder under ``run_dir/sweeps``), ``label``, which model
    (``"pretrained"``, ``"stage1"``, ``"stage2"`` or ``"newest"``) and, for an ablation, the ``mask_type`` used at
    inference instead of the model's own."""

    key: str
    label: str
    model: str
    mask_type: Optional[str] = None


CONDITIONS = (
    Condition("pretrained", "pre-trained", "pretrained"),
    Condition("stage1", "Stage 1", "stage1"),
    Condition("stage2", "Stage 2", "stage2"),
    Condition("random-masks", "random masks", "newest", "random"),
    Condition("no-masks", "no masks", "newest", "none"),
)


def find_models(run) -> dict[str, Optional[Path]]:
    """The models a run directory holds: ``{"pretrained": None, "stage1": sft/best, "stage2": dpo/best}`` (those
    present) and ``"newest"``, the last of them."""
    from pigeon_utils.checkpoints import MODEL_CONFIG_FILE

    out: dict[str, Optional[Path]] = {"pretrained": None}
    for key, rel in (("stage1", "sft/best"), ("stage2", "dpo/best")):
        if (run.run_dir / rel / MODEL_CONFIG_FILE).is_file():
            out[key] = run.run_dir / rel
    out["newest"] = out[[k for k in ("stage2", "stage1", "pretrained") if k in out][0]]
    return out


class ModelLoader:
    """Loads the models of :func:`find_models` one at a time, each on a backbone of its own (a Pigeon model wraps
    its backbone's LMM with LoRA in place, so two models cannot share one), keeping only the last one in memory.
    The pre-trained model is built with Stage 1's configuration and seed when the run has a Stage-1 model, as
    :func:`pigeon_utils.sft.train_sft` built its starting point. `backbone`: a freshly loaded backbone the first
    model may take (its tokenizers stay usable), which saves one load."""

    def __init__(self, run, device="cpu", backbone=None):
        self.run, self.device, self.folders = run, device, find_models(run)
        self._key, self._model, self._spare = None, None, backbone

    def __call__(self, key: str):
        folder = self.folders[key]
        if self._key != folder or self._model is None:
            self._model = None  # free the previous model first
            self._model, self._key = self._load(folder), folder
        return self._model

    def _load(self, folder: Optional[Path]):
        import json

        from pigeon_utils.checkpoints import MODEL_CONFIG_FILE, load_pigeon_model, read_model_config
        from pigeon_utils.sft import SFTConfig, pretrained_model
        from pigeon_utils.worlds import load_backbone

        backbone, self._spare = self._spare, None
        if backbone is None:
            backbone = load_backbone(self.run.preset, self.run.checkpoint_dir, device=self.device)
        if folder is not None:
            return load_pigeon_model(backbone, folder)
        cfg = SFTConfig.for_preset(self.run.preset)
        sft = self.run.run_dir / "sft"
        if (sft / "sft_config.json").is_file():  # only the seed matters here: the adapter's initialisation
            cfg.seed = int(json.loads((sft / "sft_config.json").read_text()).get("seed", cfg.seed))
        if (sft / "best" / MODEL_CONFIG_FILE).is_file():
            cfg.model = read_model_config(sft / "best")
        return pretrained_model(self.run, cfg, backbone=backbone).eval()


def model_key(run, folder: Optional[Path]) -> str:
    """The sweep-folder key of a model folder of `run` (as :data:`CONDITIONS` name them): ``stage2`` for
    ``dpo/best``, ``stage1`` for ``sft/best``, ``pretrained`` for None, else ``model-<folder name>``."""
    if folder is None:
        return "pretrained"
    folder = Path(folder).resolve()
    for key, rel in (("stage2", "dpo/best"), ("stage1", "sft/best")):
        if folder == (run.run_dir / rel).resolve():
            return key
    return f"model-{folder.name}"


def make_evaluator(run, clip, *, clip_preset: Optional[str] = None, eval_dir=None, pixel_samples=None,
                   device="cpu"):
    """The :class:`~pigeon_utils.metrics_models.Evaluator` of the run's world: on the toy (or with
    ``clip_preset="toy"``) around the run's `clip`; in the real world with open_clip, DINOv2, LPIPS and Inception
    from `eval_dir` (a missing weight file is an error naming it and where to put it)."""
    from pigeon_utils.metrics_models import Evaluator

    if (clip_preset or run.preset) == "toy":
        return Evaluator("toy", clip=clip, pixel_samples=pixel_samples, device=device)
    return Evaluator.for_world(run.preset, eval_dir=eval_dir, pixel_samples=pixel_samples, device=device)


def distinct_users(samples: Sequence, n: int) -> list[int]:
    """Positions of up to `n` samples with different users (the first sample of each user, in order)."""
    seen, out = set(), []
    for p, s in enumerate(samples):
        if s.uid not in seen and len(out) < n:
            seen.add(s.uid)
            out.append(p)
    return out


def with_mask_type(model, mask_type: Optional[str]):
    """`model` with its masks made by `mask_type` at inference (a shallow copy sharing every weight; None: the model
    itself)."""
    if mask_type is None or mask_type == model.config.mask_type:
        return model
    other = copy.copy(model)
    other.config = dataclasses.replace(model.config, mask_type=mask_type)
    return other


def sweep_condition(cond: Condition, model, ds, run, cfg, clip, *, samples: dict[str, Optional[int]],
                    resume: bool = True, progress: bool = True) -> dict:
    """Sweep one row over each split of `samples` (``{split: how many}``; an ablation without masks at one α_r) and
    score it. Returns ``{"scores": {split: SweepScores}, "folders": {split: Path}, "indexes": {split: index},
    "config": cfg}``."""
    if cond.mask_type == "none":
        cfg = dataclasses.replace(cfg, ref_mask_ratios=(0.0,))
    model = with_mask_type(model, cond.mask_type)
    out: dict = {"scores": {}, "folders": {}, "indexes": {}, "config": cfg}
    for split, n in samples.items():
        folder = sweep_folder(run.run_dir, cond.key, split, cfg)
        res, out["scores"][split] = sweep_scored(model, ds, split, folder, cfg, clip, max_samples=n,
                                                 model_label=cond.label, resume=resume, progress=progress)
        out["folders"][split], out["indexes"][split] = folder, res.index
    return out


def evaluate_condition(cond: Condition, swept: dict, ds, evaluator, *, split: str = "test",
                       select_split: str = "valid", progress: bool = False) -> dict:
    """Both α_r-selection protocols on one swept row and every metric of the images they pick. Returns
    ``{protocol: {"selection": summary, "ratios": α_r per test sample, "images": the picked images, "metrics":
    Evaluator results}}``."""
    scores, folder, index = swept["scores"], swept["folders"][split], swept["indexes"][split]
    chosen = select_protocols(scores, split, select_split)
    test = scores[split]
    samples = [ds.samples(split)[k] for k in test.indices]
    out: dict = {}
    for name, sel in chosen.items():
        same = next((o for o in out.values() if o["ratios"] == [float(r) for r in sel.ratios]), None)
        if same is not None:  # both protocols picked the same images: the same metrics
            out[name] = {**same, "selection": sel.summary()}
            continue
        images = [load_image(folder, index["samples"][str(k)]["images"][f"{r:.2f}"]["path"])
                  for k, r in zip(test.indices, sel.ratios)]
        out[name] = {"selection": sel.summary(), "ratios": [float(r) for r in sel.ratios], "images": images,
                     "metrics": evaluator.evaluate_dataset(images, ds, samples, progress=progress)}
    return out


def _diff(a: np.ndarray, b: np.ndarray) -> dict:
    return mean_se(np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64))


def _verdict(mean: float, se: float, sign: int = 1) -> bool:
    return bool(np.isfinite(se) and sign * mean > 2 * se)


def claims(swept: dict[str, dict], factors: dict[str, list[dict]], split: str = "test") -> list[dict]:
    """The paper's three claims, each with its figures and whether it holds (a difference beyond 2 standard errors
    over the test samples; missing models make a claim ``"unavailable"``):

    1. Stage 1 raises agreement with the user's history over the pre-trained model — per-sample history CIS averaged
       over α_r, Stage 1 − pre-trained (and, on the toy, style accuracy at every α_r);
    2. α_r trades history for reference on Stage 1 — the per-sample slope of history CIS over α_r above 0 and that
       of reference CS below 0, each beyond 2 SE, and (toy) the glyph at α_r = 0 the reference's for at least
       :data:`GLYPH_BAR` of the samples;
    3. Stage 2 raises history CIS over Stage 1 at equal α_r — the paired difference averaged over α_r.

    `swept`: :func:`sweep_condition` results by condition key; `factors`: toy factor rows per α_r by key."""
    out = []
    s = {k: v["scores"][split] for k, v in swept.items() if split in v["scores"]}
    if "stage1" in s and "pretrained" in s:
        d = paired_difference(s["pretrained"], s["stage1"])["overall"]["history_cis"]
        c = {"claim": 1, "text": "Stage 1 raises agreement with the user's history over the pre-trained model",
             "history_cis_difference": d, "holds": _verdict(d["mean"], d["se"])}
        if "stage1" in factors and "pretrained" in factors:
            c["style_accuracy"] = {k: float(np.mean([r["style"] for r in factors[k]])) for k in ("pretrained", "stage1")}
        out.append(c)
    else:
        out.append({"claim": 1, "text": "Stage 1 vs the pre-trained model", "holds": "unavailable",
                    "reason": "the run has no Stage-1 model (notebook 03)"})
    if "stage1" in s and len(s["stage1"].ratios) > 1:
        sl = s["stage1"].slopes()
        cis, cs = sl["history_cis"], sl["reference_cs"]
        c = {"claim": 2, "text": "α_r trades history for reference (Stage 1)", "history_cis_slope": cis,
             "reference_cs_slope": cs, "holds": _verdict(cis["mean"], cis["se"]) and _verdict(cs["mean"], cs["se"], -1)}
        if "stage1" in factors:
            at0 = next((r["semantic"] for r in factors["stage1"] if r["ref_mask_ratio"] == 0.0), None)
            c["glyph_is_reference_at_0"] = at0
            c["holds"] = c["holds"] and at0 is not None and at0 >= GLYPH_BAR
        out.append(c)
    else:
        out.append({"claim": 2, "text": "the α_r trade-off", "holds": "unavailable",
                    "reason": "the run has no Stage-1 model swept over several α_r"})
    if "stage1" in s and "stage2" in s:
        d = paired_difference(s["stage1"], s["stage2"])["overall"]["history_cis"]
        out.append({"claim": 3, "text": "Stage 2 raises history CIS over Stage 1 at equal α_r",
                    "history_cis_difference": d, "holds": _verdict(d["mean"], d["se"])})
    else:
        out.append({"claim": 3, "text": "Stage 2 vs Stage 1", "holds": "unavailable",
                    "reason": "the run has no Stage-2 model (notebooks 04 and 05)"})
    return out


def _pm(d: dict, fmt: str = "+.2f") -> str:
    return f"{d['mean']:{fmt}} ± {d['se']:.2f}"


def claims_text(cl: Sequence[dict], samples: Optional[int] = None) -> str:
    """The claims as a few lines: each with its figures and ``holds`` / ``does not hold`` / ``unavailable``."""
    lines = [f"The paper's claims on {samples} held-out test samples (mean ± standard error; 'holds' = beyond 2 SE):"
             if samples else "The paper's claims (mean ± standard error; 'holds' = beyond 2 SE):"]
    for c in cl:
        verdict = {True: "holds", False: "does NOT hold"}.get(c["holds"], "unavailable")
        if c["holds"] == "unavailable":
            lines.append(f"  ({c['claim']}) {c['text']}: unavailable — {c['reason']}")
            continue
        if c["claim"] == 2:
            fig = (f"history CIS slope {_pm(c['history_cis_slope'])}, reference CS slope "
                   f"{_pm(c['reference_cs_slope'])} per unit α_r")
            if c.get("glyph_is_reference_at_0") is not None:
                fig += f"; glyph = reference's at α_r = 0: {c['glyph_is_reference_at_0']:.0%} (bar {GLYPH_BAR:.0%})"
        else:
            fig = f"history CIS {_pm(c['history_cis_difference'])}"
            if "style_accuracy" in c:
                fig += (f"; style accuracy {c['style_accuracy']['pretrained']:.0%} → "
                        f"{c['style_accuracy']['stage1']:.0%}")
        lines.append(f"  ({c['claim']}) {c['text']}: {verdict} — {fig}")
    return "\n".join(lines)


#: the table's columns: metric key → short header
TABLE_METRICS = {"hist_clip_image_score": "hist CIS", "clip_score": "ref CS", "clip_image_score": "CLIP-I",
                 "hist_clip_score": "hist CLIP-T", "fid": "FID", "hist_ssim": "hist SSIM",
                 "hist_ms_ssim": "hist MS-SSIM", "dino_score": "DINO", "hist_dino_score": "hist DINO",
                 "hist_lpips": "hist LPIPS", "style_accuracy": "style", "semantic_accuracy": "glyph"}


def comparison_rows(results: dict[str, dict]) -> list[dict]:
    """One row per (condition, protocol): label, protocol, α_r used and each metric's mean / SE (None: unavailable)
    — what the table, the bar charts and ``metrics.json`` show. `results`: ``{condition label: evaluate_condition
    result}``."""
    rows = []
    for label, res in results.items():
        for protocol, r in res.items():
            m = r["metrics"]
            row = {"condition": label, "protocol": protocol, "ratio_counts": r["selection"]["ratio_counts"]}
            for key in TABLE_METRICS:
                x = m.get(key, {"available": False})
                if not x["available"]:
                    row[key] = None
                elif "value" in x:
                    row[key] = {"mean": x["value"], "se": float("nan"), "n": x["n_generated"]}
                else:
                    row[key] = {"mean": x["mean"], "se": x["se"], "n": len(x["per_sample"])}
            rows.append(row)
    return rows
