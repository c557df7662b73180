"""Scores (docs/algorithm.md §6.1) on hand-made embeddings, and α_r selection under the paper's and the honest protocol (§6.2)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import pigeon_utils  # noqa: F401
from pigeon_utils.scoring import (ClipScorer, SweepScores, combined_score, history_cis, reference_cs, score_sweep,
                                  select_on_validation, select_per_sample)


def test_history_cis_is_mean_of_100_cosines():
    g = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    h = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [2.0, 0.0], [0.0, -3.0]],  # cos 1, 0, -1, 1, 0
                      [[0.0, 5.0], [0.0, 1.0], [1.0, 1.0], [1.0, 1.0], [3.0, 0.0]]])  # 1, 1, √½, √½, 0
    torch.testing.assert_close(history_cis(g, h), torch.tensor([20.0, 100 * (2 + 2 ** 0.5) / 5]))
    with pytest.raises(ValueError, match=r"history_feats \[N, K, D\]"):
        history_cis(g, h[:, 0])


def test_reference_cs_is_100_cosine_not_clamped():
    g = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    t = torch.tensor([[4.0, 3.0], [-2.0, 0.0]])
    torch.testing.assert_close(reference_cs(g, t), torch.tensor([96.0, -100.0]))
    with pytest.raises(ValueError, match="same shape"):
        reference_cs(g, t[:1])
    assert combined_score(10.0, 30.0) == 20.0 and combined_score(10.0, 30.0, weight=1.0) == 10.0
    with pytest.raises(ValueError, match="weight"):
        combined_score(1.0, 1.0, weight=1.5)


def _scores(cis, cs, split="test"):
    cis, cs = np.asarray(cis, float), np.asarray(cs, float)
    return SweepScores(split, [0.0, 0.5, 1.0][: cis.shape[1]], list(range(len(cis))), cis, cs)


def test_paper_protocol_picks_per_sample_argmax_first_on_ties():
    test = _scores(cis=[[10, 20, 30], [10, 20, 30], [50, 50, 50]],
                   cs=[[40, 20, 0], [30, 30, 10], [5, 5, 5]])
    # scores: [25, 20, 15], [20, 25, 20], [27.5, 27.5, 27.5] (tie → smallest α_r)
    sel = select_per_sample(test)
    assert sel.ratio_index.tolist() == [0, 1, 0] and sel.ratios.tolist() == [0.0, 0.5, 0.0]
    assert sel.cis.tolist() == [10, 20, 50] and sel.cs.tolist() == [40, 30, 5]
    s = sel.summary()
    assert s["score"] == pytest.approx((25 + 25 + 27.5) / 3) and s["ratio_counts"] == {"0.00": 2, "0.50": 1}
    # a weight of 0 selects on the history CIS alone
    assert select_per_sample(test, weight=0.0).ratio_index.tolist() == [2, 2, 0]


def test_honest_protocol_chooses_one_ratio_on_validation():
    valid = _scores(cis=[[0, 40, 80], [0, 40, 80]], cs=[[60, 50, 0], [60, 50, 0]], split="valid")
    # validation means: [30, 45, 40] → α_r = 0.5 for every test sample, whatever the test scores say
    test = _scores(cis=[[90, 0, 0], [0, 0, 90]], cs=[[90, 0, 0], [0, 0, 90]])
    sel = select_on_validation(valid, test)
    assert sel.ratios.tolist() == [0.5, 0.5] and sel.cis.tolist() == [0, 0]
    assert sel.details["chosen_ratio"] == 0.5 and sel.details["validation_score_per_ratio"] == [30, 45, 40]
    assert select_per_sample(test).summary()["score"] > sel.summary()["score"]  # the oracle looks at test outputs
    with pytest.raises(ValueError, match="different ratios"):
        select_on_validation(_scores([[1, 2]], [[1, 2]], "valid"), test)
    with pytest.raises(ValueError, match=r"\[samples, ratios\]"):
        SweepScores("test", [0.0], [0, 1], np.zeros((2, 2)), np.zeros((2, 2)))


class _MeanColourClip:
    """A fake CLIP: image feature = mean RGB (records the sizes it saw), text feature from a table."""

    def __init__(self):
        self.sizes = []
        self.texts = {"red": [1.0, 0.0, 0.0], "blue": [0.0, 0.0, 1.0]}

    def image_features(self, images):
        arr = [np.asarray(im, dtype=np.float32) for im in images]
        self.sizes += [a.shape[:2] for a in arr]
        return torch.tensor(np.stack([a.reshape(-1, 3).mean(0) for a in arr]))

    def text_features(self, texts):
        return torch.tensor([self.texts[t] for t in texts])


def test_score_sweep_on_files(tmp_path):
    from PIL import Image

    colours = {0: (255, 0, 0), 1: (0, 0, 255), 2: (255, 0, 255)}
    ds = SimpleNamespace(semantics=["red", "blue", "red"],
                         load_image=lambda i: Image.new("RGB", (4, 4), colours[i]))
    samples = {"0": {"history": [0, 0, 0, 1, 1], "target": 2, "images": {}},
               "1": {"history": [1, 1, 1, 1, 1], "target": 1, "images": {}}}
    gen = {("0", "0.00"): (255, 0, 0), ("0", "1.00"): (0, 0, 255), ("1", "0.00"): (255, 0, 0),
           ("1", "1.00"): (0, 0, 255)}
    for (k, r), c in gen.items():
        (tmp_path / r).mkdir(exist_ok=True)
        Image.new("RGB", (6, 6), c).save(tmp_path / r / f"{k}.png")
        samples[k]["images"][r] = {"path": f"{r}/{k}.png", "codes": []}
    index = {"version": 1, "split": "test", "config": {"ref_mask_ratios": [0.0, 1.0]}, "samples": samples}
    fake = _MeanColourClip()
    scores = score_sweep(index, tmp_path, ds, ClipScorer(fake, generated_size=8, name="fake"))
    # sample 0: history 3× red, 2× blue; target text "red"
    np.testing.assert_allclose(scores.cis, [[60, 40], [0, 100]], atol=1e-4)
    np.testing.assert_allclose(scores.cs, [[100, 0], [0, 100]], atol=1e-4)
    assert (8, 8) in fake.sizes and (4, 4) in fake.sizes and (6, 6) not in fake.sizes  # generated images resized
    per = scores.per_ratio()
    assert per[1]["history_cis"] == pytest.approx(70) and per[0]["reference_cs"] == pytest.approx(50)
    path = scores.save(tmp_path / "scores.json")
    assert SweepScores.from_dict(json.loads(path.read_text())).cis.tolist() == scores.cis.tolist()


def test_sweep_factor_scores_per_ratio(tmp_path):
    from PIL import Image

    from pigeon_utils.toy.scoring import sweep_factor_scores

    f = lambda g, c: {"glyph": g, "colour": c, "pattern": "plain", "stroke": "filled"}
    ds = SimpleNamespace(factors=[f("star", "red"), f("star", "red"), f("moon", "blue")], root=tmp_path)
    samples = {"0": {"history": [0, 0, 0, 1, 1], "target": 2, "images": {}}}
    pred = {(0, 0, 255): f("moon", "blue"), (255, 0, 0): f("star", "red")}  # the fake classifier: by colour
    for r, c in (("0.00", (0, 0, 255)), ("1.00", (255, 0, 0))):
        (tmp_path / r).mkdir()
        Image.new("RGB", (4, 4), c).save(tmp_path / r / "0.png")
        samples["0"]["images"][r] = {"path": f"{r}/0.png", "codes": []}
    index = {"version": 1, "split": "test", "config": {"ref_mask_ratios": [0.0, 1.0]}, "samples": samples}
    clip = SimpleNamespace(predict_factors=lambda ims: [pred[tuple(int(v) for v in im[0, 0])] for im in ims])
    at0, at1 = sweep_factor_scores(index, tmp_path, ds, clip)
    # α_r = 0 copies the reference (blue moon); α_r = 1 draws the history's red star
    assert at0["ref_mask_ratio"] == 0.0 and at0["semantic"] == 1.0 and at0["colour_vs_reference"] == 1.0
    assert at0["style"] == pytest.approx(2 / 3)  # pattern and stroke are the history's, colour is not
    assert at1["semantic"] == 0.0 and at1["colour_vs_reference"] == 0.0 and at1["style"] == 1.0


def test_slopes_are_per_sample_least_squares_with_standard_error():
    # sample 0: CIS rises 10 per unit α_r, CS falls 20; sample 1: CIS rises 30, CS flat
    r = [0.0, 0.5, 1.0]
    s = SweepScores("test", r, [0, 1], cis=[[0, 5, 10], [0, 15, 30]], cs=[[40, 30, 20], [7, 7, 7]])
    got = s.slopes()
    assert got["history_cis"]["mean"] == pytest.approx(20.0)
    assert got["history_cis"]["se"] == pytest.approx(np.std([10, 30], ddof=1) / np.sqrt(2))
    assert got["reference_cs"]["mean"] == pytest.approx(-10.0)
    # the mean slope is the least-squares slope of the mean curve; noise around a line does not move it
    noisy = SweepScores("test", r, [0], cis=[[1, 9, 9]], cs=[[0, 0, 0]])
    assert noisy.slopes()["history_cis"]["mean"] == pytest.approx(np.polyfit(r, [1, 9, 9], 1)[0])
    assert np.isnan(noisy.slopes()["history_cis"]["se"])
    with pytest.raises(ValueError, match="two ratios"):
        SweepScores("test", [0.0], [0], [[1.0]], [[1.0]]).slopes()
