"""Small plotting helpers for the notebooks (matplotlib). Figures can be saved atomically as PNG."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np

from pigeon_utils.atomic import atomic_write


def save_figure(fig, path: Path | str, dpi: int = 110) -> Path:
    """Write `fig` as PNG through a temporary file, so an interrupted run never leaves a truncated image."""
    return atomic_write(path, lambda f: fig.savefig(f, dpi=dpi, bbox_inches="tight", format="png"))


def image_grid(images: Sequence, titles: Sequence[str] | None = None, ncols: int = 6, size: float = 1.8,
               suptitle: str | None = None):
    """A grid of PIL images (or arrays) with optional titles."""
    n = len(images)
    nrows = max(1, -(-n // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + (0.4 if suptitle else 0)),
                             squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < n:
            ax.imshow(np.asarray(images[k]), interpolation="nearest")
            if titles is not None:
                ax.set_title(titles[k], fontsize=7)
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    return fig


def sample_figure(ds, sample, with_factors: bool = True):
    """A sample as the model sees it: five history images, then the target (= the reference image)."""
    labels = ds.labels()
    titles = []
    for k, iid in enumerate(sample.iids):
        head = f"history {k + 1}" if k < 5 else "target / reference"
        t = f"{head}\niid {iid}: {labels[iid]}"
        if with_factors and ds.factors is not None:
            f = ds.factors[iid]
            t += f"\n{f['colour']} {f['pattern']} {f['stroke']}"
        titles.append(t)
    return image_grid([ds.load_image(i) for i in sample.iids], titles, ncols=6, size=1.9,
                      suptitle=f"user {sample.uid}, group {sample.gid}")


def bar_chart(counts: Counter | dict, title: str, xlabel: str = "", top: int | None = None):
    items = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
    fig, ax = plt.subplots(figsize=(max(4, 0.45 * len(items)), 2.8))
    ax.bar([str(k) for k, _ in items], [v for _, v in items], color="#4c72b0")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.tick_params(axis="x", rotation=45, labelsize=8)
    fig.tight_layout()
    return fig


def histogram(values: Sequence[float], title: str, xlabel: str, bins: int = 20):
    fig, ax = plt.subplots(figsize=(4.5, 2.8))
    ax.hist(values, bins=bins, color="#55a868")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    fig.tight_layout()
    return fig


def image_rows(images: Sequence, titles: Sequence[str] | None = None, width: float = 12.0):
    """Wide images (e.g. overlay strips) stacked one per row, each with its title; heights follow the aspect."""
    arrs = [np.asarray(im) for im in images]
    heights = [width * a.shape[0] / a.shape[1] + 0.35 for a in arrs]
    fig, axes = plt.subplots(len(arrs), 1, figsize=(width, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for k, (ax, a) in enumerate(zip(axes[:, 0], arrs)):
        ax.imshow(a, interpolation="nearest")
        ax.axis("off")
        if titles is not None:
            ax.set_title(titles[k], fontsize=9)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------------- notebook 03
def save(fig, path: Path | str):
    """:func:`save_figure`, returning `fig` (so a notebook cell shows it too)."""
    save_figure(fig, path)
    return fig


def parameter_table(summary: dict[str, dict[str, int]]) -> str:
    """Trainable / total parameters per component (:meth:`PigeonModel.parameter_summary`)."""
    return "\n".join(f"{part:16s} trainable {n['trainable']:>10,d} / {n['total']:>11,d}" for part, n in summary.items())


def sequence_layout_figure(seq):
    """The token type of every position of an assembled batch (one row per sample)."""
    from pigeon_utils.sequence import TOKEN_TYPE_NAMES

    fig, ax = plt.subplots(figsize=(12, 0.5 + 0.45 * seq.token_type.shape[0]))
    cmap = plt.get_cmap("tab10", len(TOKEN_TYPE_NAMES))
    ax.imshow(seq.token_type.numpy(), aspect="auto", cmap=cmap, vmin=-0.5, vmax=len(TOKEN_TYPE_NAMES) - 0.5,
              interpolation="nearest")
    ax.set_yticks(range(seq.token_type.shape[0]))
    ax.set_xlabel("position")
    handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(i)) for i in range(len(TOKEN_TYPE_NAMES))]
    ax.legend(handles, TOKEN_TYPE_NAMES, ncol=len(TOKEN_TYPE_NAMES), loc="upper center", bbox_to_anchor=(0.5, -0.6),
              fontsize=8)
    return fig


def loss_curve_figure(log: dict, title: str = "Stage-1 loss on the target's visual tokens and [/IMG]"):
    """Training loss per batch (and its running mean) and validation loss per evaluation, from a training log."""
    train, valid = log["train"], log["valid"]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    steps = [e["step"] for e in train]
    losses = np.array([e["loss"] for e in train])
    ax.plot(steps, losses, color="#bbbbbb", lw=0.8, label="train (per batch)")
    if len(losses) >= 10:
        k = max(1, len(losses) // 20)
        ax.plot(steps[k - 1:], np.convolve(losses, np.ones(k) / k, mode="valid"), color="#4c72b0",
                label=f"train ({k}-step mean)")
    ax.plot([e["step"] for e in valid], [e["loss"] for e in valid], "o-", color="#dd8452", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return fig


def snapshot_grid(snapshots: dict[int, Sequence], suptitle: str, rows: int = 5):
    """Images generated at several training steps (``{step: images}``), at most `rows` steps evenly spread."""
    steps = sorted(snapshots)
    if len(steps) > rows:
        steps = [steps[int(round(i))] for i in np.linspace(0, len(steps) - 1, rows)]
    n = len(snapshots[steps[0]])
    imgs = [snapshots[s][k] for s in steps for k in range(n)]
    titles = [f"step {s}" if k == 0 else "" for s in steps for k in range(n)]
    return image_grid(imgs, titles, ncols=n, size=1.6, suptitle=suptitle)


def history_reference_grid(ds, samples, generated: dict[str, Sequence], suptitle: str):
    """Per sample: its five history images, the reference (= the target), then one generated image per model."""
    imgs, titles = [], []
    for k, s in enumerate(samples):
        imgs += [ds.load_image(i) for i in s.history] + [ds.load_image(s.target)]
        imgs += [images[k] for images in generated.values()]
        titles += [f"history {j + 1}" for j in range(5)] + ["reference"] + list(generated)
    return image_grid(imgs, titles, ncols=6 + len(generated), size=1.4, suptitle=suptitle)


def factor_comparison_table(scores: dict[str, dict]) -> str:
    """Style accuracy vs the history and semantic accuracy vs the reference per model (toy)."""
    lines = [f"{'':12s}{'style vs history':>18s}{'semantic vs reference':>23s}"]
    lines += [f"{name:12s}{s['style']:>18.1%}{s['semantic']:>23.1%}" for name, s in scores.items()]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- notebook 06
def keep_count_table(ratios: Sequence[float], counts: dict) -> str:
    """Reference tokens kept per α_r for a few samples (``counts``: :func:`pigeon_utils.sweep.keep_counts`)."""
    lines = ["reference tokens kept per α_r (history tokens kept, identical across α_r):"]
    for k, c in counts.items():
        lines.append(f"  sample {k}: {c['reference']} tokens -> "
                     + ", ".join(f"{r:.1f}: {n}" for r, n in zip(ratios, c["kept"]))
                     + f"   (history {c['history_kept']}/{c['history']})")
    return "\n".join(lines)


def sweep_rows(ds, folder: Path | str, index: dict, k: int, ratios: Sequence[float] | None = None) -> list:
    """Sample k of a sweep: its five history images, the reference, then its images at `ratios` (default all)."""
    from pigeon_utils.sweep import load_image, ratio_key

    e = index["samples"][str(k)]
    keys = [ratio_key(r) for r in (ratios if ratios is not None else index["config"]["ref_mask_ratios"])]
    return ([ds.load_image(i) for i in e["history"]] + [ds.load_image(e["target"])]
            + [load_image(folder, e["images"][key]["path"]) for key in keys])


def sweep_gallery(ds, folder: Path | str, index: dict, ks: Sequence[int], suptitle: str):
    """One row per sample: history | reference | the generated image at each α_r, from α_r = 0 to 1."""
    ratios = index["config"]["ref_mask_ratios"]
    imgs, titles = [], []
    for k in ks:
        imgs += sweep_rows(ds, folder, index, k)
        titles += [f"history {j + 1}" for j in range(5)] + ["reference"] + [f"α_r={r:.1f}" for r in ratios]
    return image_grid(imgs, titles, ncols=6 + len(ratios), size=1.15, suptitle=suptitle)


def selected_gallery(ds, folder: Path | str, index: dict, ks: Sequence[int], selections: dict, positions: dict,
                     suptitle: str):
    """One row per sample: history | reference | the image at the α_r each protocol chose (``selections``:
    protocol → :class:`~pigeon_utils.scoring.Selection`; ``positions``: split index → row of the scores)."""
    imgs, titles = [], []
    for k in ks:
        imgs += sweep_rows(ds, folder, index, k, ratios=[])
        titles += [f"history {j + 1}" for j in range(5)] + ["reference"]
        for name, sel in selections.items():
            r = float(sel.ratios[positions[k]])
            imgs.append(sweep_rows(ds, folder, index, k, ratios=[r])[-1])
            titles.append(f"{name}: α_r={r:.1f}")
    return image_grid(imgs, titles, ncols=6 + len(selections), size=1.5, suptitle=suptitle)


def per_ratio_table(scores, title: str) -> str:
    """Mean history CIS, reference CS and selection score per α_r, then the per-sample slopes (mean ± SE) — the
    trade-off table of a :class:`~pigeon_utils.scoring.SweepScores`."""
    lines = [title, f"{'α_r':>5s}{'history CIS':>13s}{'reference CS':>14s}{'0.5·CS+0.5·CIS':>16s}"]
    lines += [f"{p['ref_mask_ratio']:>5.1f}{p['history_cis']:>13.2f}{p['reference_cs']:>14.2f}{p['score']:>16.2f}"
              for p in scores.per_ratio()]
    if len(scores.ratios) > 1:
        sl = scores.slopes()
        lines.append("slope per unit α_r (mean ± standard error over samples): history CIS "
                     f"{sl['history_cis']['mean']:+.2f} ± {sl['history_cis']['se']:.2f}, reference CS "
                     f"{sl['reference_cs']['mean']:+.2f} ± {sl['reference_cs']['se']:.2f}")
    return "\n".join(lines)


def factor_table(rows: Sequence[dict]) -> str:
    """Toy: per α_r, glyph / colour = the reference's and style = the history's (:func:`sweep_factor_scores`)."""
    lines = [f"{'α_r':>5s}{'glyph = ref':>13s}{'colour = ref':>14s}{'style = history':>17s}"]
    lines += [f"{f['ref_mask_ratio']:>5.1f}{f['semantic']:>13.1%}{f['colour_vs_reference']:>14.1%}{f['style']:>17.1%}"
              for f in rows]
    return "\n".join(lines)


def tradeoff_figure(scores, suptitle: str):
    """Mean history CIS and reference CS over α_r, and CIS against CS with one point per α_r."""
    per = scores.per_ratio()
    ratios = [p["ref_mask_ratio"] for p in per]
    cis = [p["history_cis"] for p in per]
    cs = [p["reference_cs"] for p in per]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(ratios, cis, "o-", color="#c44e52")
    ax1.set_xlabel("α_r (reference mask ratio)")
    ax1.set_ylabel("history CIS", color="#c44e52")
    ax1b = ax1.twinx()
    ax1b.plot(ratios, cs, "s-", color="#4c72b0")
    ax1b.set_ylabel("reference CS", color="#4c72b0")
    ax1.set_title("mean scores over α_r", fontsize=10)
    ax2.plot(cs, cis, "-", color="#999999", lw=1)
    sc = ax2.scatter(cs, cis, c=ratios, cmap="viridis", zorder=3)
    for r, x, y in zip(ratios, cs, cis):
        ax2.annotate(f"{r:.1f}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax2.set_xlabel("reference CS (keeps the target's meaning)")
    ax2.set_ylabel("history CIS (user's taste)")
    ax2.set_title("the trade-off, one point per α_r", fontsize=10)
    fig.colorbar(sc, ax=ax2, label="α_r")
    fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    return fig


def selection_text(summaries: dict[str, dict]) -> str:
    """One line per α_r-selection protocol (:meth:`~pigeon_utils.scoring.Selection.summary`); says so when the
    honest protocol is missing (it needs a second scored split)."""
    lines = [f"{name:7s} {s['protocol']}: CIS {s['history_cis']:.2f}, CS {s['reference_cs']:.2f}, "
             f"0.5·CS+0.5·CIS {s['score']:.2f}; α_r used: {s['ratio_counts']}" for name, s in summaries.items()]
    if "honest" not in summaries:
        lines.append("honest  skipped: it chooses α_r on another scored split (select_split)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- notebook 04
def pair_gallery(ds, folder: Path | str, index: dict, pairs: Sequence, suptitle: str):
    """One row per preference pair: history | reference | chosen | rejected, with their α_r and history CIS."""
    imgs, titles = [], []
    for p in pairs:
        imgs += sweep_rows(ds, folder, index, p.index, ratios=[p.chosen_ratio, p.rejected_ratio])
        titles += [f"history {j + 1}" for j in range(5)] + ["reference",
                                                            f"chosen α_r={p.chosen_ratio:.1f}\nCIS {p.chosen_cis:.1f}",
                                                            f"rejected α_r={p.rejected_ratio:.1f}\nCIS {p.rejected_cis:.1f}"]
    return image_grid(imgs, titles, ncols=8, size=1.4, suptitle=suptitle)


def pair_summary(psets: dict) -> str:
    """Per split: samples, pairs kept, pairs dropped as identical, and the history-CIS margin (mean, min–max)."""
    lines = [f"{'split':8s}{'samples':>9s}{'pairs':>7s}{'identical (dropped)':>21s}{'CIS margin: mean':>18s}{'min–max':>14s}"]
    for split, ps in psets.items():
        m = ps.margins()
        lines.append(f"{split:8s}{ps.counts['samples']:>9d}{ps.counts['pairs']:>7d}{ps.counts['dropped_identical']:>21d}"
                     f"{m.mean():>18.2f}{f'{m.min():.1f}–{m.max():.1f}':>14s}")
    return "\n".join(lines)


def margin_histogram(psets: dict):
    """The distribution of history-CIS margins (chosen − rejected) per split."""
    fig, ax = plt.subplots(figsize=(5, 3))
    for split, ps in psets.items():
        ax.hist(ps.margins(), bins=20, alpha=0.6, label=f"{split} ({len(ps)} pairs)")
    ax.set_xlabel("history CIS, chosen − rejected")
    ax.set_ylabel("pairs")
    ax.legend(fontsize=8)
    ax.set_title("preference margins", fontsize=10)
    fig.tight_layout()
    return fig


def value_counts(values) -> dict:
    """How often each value occurs, sorted by value (e.g. the α_r a set of pairs came from)."""
    c = Counter(values)
    return {k: c[k] for k in sorted(c)}


# ------------------------------------------------------------------------------------------------- notebook 05
DPO_CURVES = (("loss", "DPO loss"), ("rewards/accuracies", "reward accuracy"), ("rewards/margins", "reward margin"))


def dpo_curves(log: dict):
    """The DPO loss, reward accuracy and reward margin (TRL's names) per step, training and validation."""
    fig, axes = plt.subplots(1, len(DPO_CURVES), figsize=(4 * len(DPO_CURVES), 3))
    for ax, (key, title) in zip(axes, DPO_CURVES):
        tr = [(e["step"], e[key]) for e in log["train"] if key in e]
        va = [(e["step"], e[key]) for e in log["valid"] if key in e]
        if tr:
            ax.plot(*zip(*tr), color="#bbbbbb", lw=0.8, label="train (per batch)")
        if va:
            ax.plot(*zip(*va), "o-", color="#dd8452", label="validation pairs")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def paired_table(diff: dict, names: tuple[str, str]) -> str:
    """:func:`pigeon_utils.scoring.paired_difference` as a table: per α_r and overall, the mean ± SE of the
    per-sample difference ``names[1] − names[0]`` in history CIS and reference CS."""
    f = lambda d: f"{d['mean']:+.2f} ± {d['se']:.2f}"  # noqa: E731
    lines = [f"{names[1]} − {names[0]} on {diff['samples']} held-out samples (per-sample paired difference, "
             "mean ± SE)", f"{'α_r':>7s}{'history CIS':>18s}{'reference CS':>18s}"]
    lines += [f"{p['ref_mask_ratio']:>7.1f}{f(p['history_cis']):>18s}{f(p['reference_cs']):>18s}"
              for p in diff["per_ratio"]]
    o = diff["overall"]
    lines.append(f"{'all':>7s}{f(o['history_cis']):>18s}{f(o['reference_cs']):>18s}")
    return "\n".join(lines)
