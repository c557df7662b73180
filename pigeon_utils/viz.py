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
