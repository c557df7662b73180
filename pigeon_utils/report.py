"""Notebook 07's report: the comparison table, its figures, ``runs/<run>/report/metrics.json``, and the summary the
batch prints at the end of the main job (:func:`summary_text`)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Sequence

import matplotlib.pyplot as plt
import numpy as np

from pigeon_utils.evaluation import TABLE_METRICS

__all__ = ["REPORT_DIR", "comparison_table", "bar_figure", "curves_figure", "user_gallery", "write_report",
           "read_report", "summary_text"]

REPORT_DIR = "report"
_COLOURS = {"paper": "#4c72b0", "honest": "#dd8452"}


def _cell(x: Optional[dict], pct: bool) -> str:
    if x is None:
        return "n/a"
    if pct:
        return f"{100 * x['mean']:.1f}±{100 * x['se']:.1f}"
    return f"{x['mean']:.2f}" if math.isnan(x["se"]) else f"{x['mean']:.2f}±{x['se']:.2f}"


def comparison_table(rows: Sequence[dict], columns: Optional[Sequence[str]] = None) -> str:
    """The comparison as fixed-width text: one line per (condition, protocol), mean ± SE per metric ("n/a": the
    world cannot compute it; toy accuracies in %). `columns`: metric keys (default: every available one)."""
    cols = [c for c in (columns or TABLE_METRICS) if any(r.get(c) is not None for r in rows)]
    pct = {"style_accuracy", "semantic_accuracy"}
    head = f"{'model':<14}{'α_r by':<8}" + "".join(f"{TABLE_METRICS[c]:>14}" for c in cols)
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['condition']:<14}{r['protocol']:<8}" + "".join(f"{_cell(r.get(c), c in pct):>14}"
                                                                         for c in cols))
    ns = sorted({r[c]["n"] for r in rows for c in cols if r.get(c) is not None and c != "fid"})
    lines.append(f"mean ± standard error over test samples (n = {', '.join(map(str, ns))}); FID is one number per set")
    return "\n".join(lines)


def bar_figure(rows: Sequence[dict], metrics: Sequence[str] = ("hist_clip_image_score", "clip_score",
                                                              "style_accuracy", "semantic_accuracy")):
    """One panel per metric: a bar per condition and protocol with its standard error."""
    metrics = [m for m in metrics if any(r.get(m) is not None for r in rows)]
    conds = list(dict.fromkeys(r["condition"] for r in rows))
    protocols = list(dict.fromkeys(r["protocol"] for r in rows))
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.4 * len(metrics), 3.4), squeeze=False)
    w = 0.8 / max(len(protocols), 1)
    for ax, m in zip(axes[0], metrics):
        for j, p in enumerate(protocols):
            vals = [next((r[m] for r in rows if r["condition"] == c and r["protocol"] == p and r.get(m)), None)
                    for c in conds]
            x = np.arange(len(conds)) + (j - (len(protocols) - 1) / 2) * w
            ax.bar(x, [v["mean"] if v else np.nan for v in vals], w, yerr=[v["se"] if v else 0 for v in vals],
                   capsize=3, color=_COLOURS.get(p), label=p)
        ax.set_xticks(np.arange(len(conds)))
        ax.set_xticklabels(conds, rotation=30, ha="right", fontsize=8)
        ax.set_title(TABLE_METRICS[m], fontsize=10)
    axes[0][0].legend(title="α_r chosen by", fontsize=8)
    fig.tight_layout()
    return fig


def curves_figure(scores: dict[str, object], title: str = "test samples"):
    """Mean history CIS and reference CS over α_r for each model (``{label: SweepScores}``), with ±1 SE bands."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for label, s in scores.items():
        if len(s.ratios) < 2:
            continue
        n = len(s.indices)
        for ax, y in zip(axes, (s.cis, s.cs)):
            m, se = y.mean(0), y.std(0, ddof=1) / math.sqrt(n) if n > 1 else np.zeros(y.shape[1])
            ax.plot(s.ratios, m, "o-", ms=3, label=label)
            ax.fill_between(s.ratios, m - se, m + se, alpha=0.2)
    for ax, name in zip(axes, ("history CIS (the user's taste)", "reference CS (the target's meaning)")):
        ax.set_xlabel("α_r (reference mask ratio)")
        ax.set_title(name, fontsize=10)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"the α_r curves of each model ({title}; mean ± SE)", fontsize=10)
    fig.tight_layout()
    return fig


def user_gallery(ds, picks: dict[str, list], samples: Sequence, positions: Sequence[int]):
    """One row per chosen test sample (pick samples of different users): its history, the reference, then each
    condition's picked image (``picks``: label → images per test sample; ``positions``: rows of `samples`)."""
    from pigeon_utils.viz import image_grid

    imgs, titles = [], []
    for p in positions:
        s = samples[p]
        imgs += [ds.load_image(i) for i in s.history] + [ds.load_image(s.target)]
        titles += [f"user {s.uid}: h{j + 1}" if j == 0 else f"h{j + 1}" for j in range(len(s.history))] + ["reference"]
        for label, images in picks.items():
            imgs.append(images[p])
            titles.append(label)
    return image_grid(imgs, titles, ncols=len(samples[positions[0]].history) + 1 + len(picks), size=1.3,
                      suptitle="per user: history | reference | each model's image (α_r chosen on validation)")


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if not np.isfinite(x) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, Path):
        return str(x)
    return x


def write_report(run_dir: Path | str, report: dict) -> Path:
    """``<run_dir>/report/metrics.json`` (atomically; NaN written as null)."""
    from pigeon_utils.atomic import atomic_write_text

    path = Path(run_dir) / REPORT_DIR / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, json.dumps(_jsonable(report), indent=1))


def read_report(run_dir: Path | str) -> Optional[dict]:
    """The report of a run, or None when notebook 07 has not written one."""
    path = Path(run_dir) / REPORT_DIR / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None


def summary_text(run_dir: Path | str) -> str:
    """What the main job prints at its end: the claims with their figures and where the report is."""
    from pigeon_utils.evaluation import claims_text

    rep = read_report(run_dir)
    if rep is None:
        return f"no report in {Path(run_dir) / REPORT_DIR} (notebook 07 writes it)"
    return (claims_text(rep["claims"], rep.get("test_samples")) + f"\nreport: {Path(run_dir) / REPORT_DIR}"
            f" (metrics.json, figures); executed notebooks: {Path(run_dir) / 'notebooks'}")
