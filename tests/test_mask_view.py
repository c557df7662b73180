"""Mask figures and the ipywidgets mask inspector, on the shipped toy backbone."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pigeon_utils import config, data, mask_view
from pigeon_utils.worlds import load_backbone
from pigeon_utils.keep import keep_count

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup():
    backbone = load_backbone("toy", REPO / "checkpoints" / "toy")
    ds = data.open_dataset(REPO / "dataset" / "toy-sticker", "sticker")
    items = mask_view.tokenize_samples(backbone, ds, ds.samples("test")[:4])
    cfg = config.resolve("toy", "sticker", run_dir="/nonexistent-run", seed=0)
    gen, source = mask_view.load_mask_generator(backbone, cfg)
    assert "untrained" in source
    return backbone, items, gen


def test_keep_counts_follow_the_formula(setup):
    backbone, items, gen = setup
    for r in (0.0, 0.3, 0.8, 1.0):
        keeps = mask_view.compute_masks(backbone, items, "mutual", 0.2, r, gen, seed=1)
        for it, k in zip(items, keeps):
            assert [len(x) for x in k] == it.counts
            n_h = sum(it.counts[:5])
            assert sum(int(x.sum()) for x in k[:5]) == keep_count(torch.tensor(n_h), 0.2).item()
            k_ref = keep_count(torch.tensor(it.counts[5] + 2), r).item()  # the group includes [IMG], [/IMG]
            assert k_ref - 2 <= int(k[5].sum()) <= k_ref


def test_masks_are_seeded_and_nested(setup):
    backbone, items, gen = setup
    a = mask_view.compute_masks(backbone, items, "mutual", 0.2, 0.5, gen, seed=3)
    b = mask_view.compute_masks(backbone, items, "mutual", 0.2, 0.5, gen, seed=3)
    assert all(torch.equal(x, y) for ka, kb in zip(a, b) for x, y in zip(ka, kb))
    assert mask_view.nested_fraction(backbone, items, [0.0, 0.5, 1.0], gen, seed=3) == 1.0


def test_overlay_shades_masked_patches(setup):
    _, items, _ = setup
    it = items[0]
    i = int((it.patch_index[5] >= 0).nonzero()[0])
    keep = torch.ones(len(it.codes[5]), dtype=torch.bool)
    keep[i] = False
    scale = 3
    img = np.asarray(mask_view.draw_overlay(it.images[5], it.patch_index[5], keep, it.grid, it.patch_size, scale))
    plain = np.asarray(it.images[5].resize((64 * scale, 64 * scale), Image.NEAREST)).astype(int)
    r, c = divmod(int(it.patch_index[5][i]), it.grid[1])
    ps = it.patch_size * scale
    patch = img[r * ps + 3:(r + 1) * ps - 3, c * ps + 3:(c + 1) * ps - 3].astype(int)
    orig = plain[r * ps + 3:(r + 1) * ps - 3, c * ps + 3:(c + 1) * ps - 3]
    assert (patch[..., 0] - patch[..., 1]).mean() > (orig[..., 0] - orig[..., 1]).mean() + 30  # shaded red


def test_inspector_reacts_to_programmatic_changes(setup):
    backbone, items, gen = setup
    ins = mask_view.MaskInspector(backbone, items, gen, ref_mask_ratio=0.2)
    assert "pigeon-mask-inspector" in ins.widget._dom_classes
    c02, png02 = dict(ins.counts), ins.overlay_png
    assert ins.overlay.value == png02 and png02.startswith(b"\x89PNG")
    ins.ref_ratio.value = 0.8  # as the slider would
    assert ins.counts["reference_kept"] < c02["reference_kept"] and ins.overlay_png != png02
    assert f"reference kept {ins.counts['reference_kept']} / " in ins.counts_html.value
    ins.set(mask_type="none")
    assert ins.counts["history_kept"] == ins.counts["history_total"]
    assert ins.counts["reference_kept"] == ins.counts["reference_total"]
    ins.set(mask_type="mutual", ref_mask_ratio=0.2)
    assert ins.counts == c02 and ins.overlay_png == png02  # same settings, same (seeded) mask
    ins.set(sample=1)
    assert ins.overlay_png != png02
    with pytest.raises(ValueError, match="mask_type"):
        ins.set(mask_type="learned")
