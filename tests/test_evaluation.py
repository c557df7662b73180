"""Notebook 07's logic without models: the claims' verdicts, the shared sweep folders, the report's summary."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from pigeon_utils import evaluation, report
from pigeon_utils.scoring import SweepScores
from pigeon_utils.sweep import InferenceConfig, first_samples, sweep_folder

RATIOS = [0.0, 0.5, 1.0]


def _scores(cis_slope: float, cs_slope: float, offset: float = 0.0, n: int = 40, seed: int = 0) -> SweepScores:
    rng = np.random.default_rng(seed)
    x = np.asarray(RATIOS)
    cis = 40 + offset + cis_slope * x + rng.normal(0, 1.0, (n, len(x)))
    cs = 50 + cs_slope * x + rng.normal(0, 1.0, (n, len(x)))
    return SweepScores("test", RATIOS, list(range(n)), cis, cs)


def _swept(**scores) -> dict:
    return {k: {"scores": {"test": s}} for k, s in scores.items()}


def _factors(glyph_at_0: float) -> list[dict]:
    return [{"ref_mask_ratio": r, "semantic": glyph_at_0 if r == 0 else 0.1, "style": 0.7} for r in RATIOS]


def test_the_three_claims_hold_when_the_effects_are_clear():
    swept = _swept(pretrained=_scores(0, 0, offset=-10, seed=1), stage1=_scores(6, -20, seed=2),
                   stage2=_scores(6, -20, offset=5, seed=3))
    cl = evaluation.claims(swept, {"stage1": _factors(0.55), "pretrained": _factors(0.1)})
    assert [c["holds"] for c in cl] == [True, True, True]
    assert cl[0]["history_cis_difference"]["mean"] == pytest.approx(10 + 6 * 0.5, abs=1.0)  # mean over α_r
    assert cl[1]["history_cis_slope"]["mean"] == pytest.approx(6, abs=1.0)
    text = evaluation.claims_text(cl, 40)
    assert text.count("holds") == 3 + 1 and "glyph = reference's at α_r = 0: 55%" in text


def test_a_claim_fails_on_a_weak_effect_or_a_missed_glyph_and_is_unavailable_without_its_model():
    swept = _swept(pretrained=_scores(0, 0, seed=1), stage1=_scores(-0.5, -20, seed=2))
    cl = evaluation.claims(swept, {"stage1": _factors(0.9)})
    assert cl[0]["holds"] is False  # no difference to the pre-trained model
    assert cl[1]["holds"] is False  # CIS does not rise
    assert cl[2]["holds"] == "unavailable" and "notebooks 04 and 05" in cl[2]["reason"]
    strong = _swept(pretrained=_scores(0, 0, seed=1), stage1=_scores(6, -20, seed=2))
    assert evaluation.claims(strong, {"stage1": _factors(0.2)})[1]["holds"] is False  # glyph below the bar
    assert evaluation.claims(strong, {"stage1": _factors(0.4)})[1]["holds"] is True
    assert "does NOT hold" in evaluation.claims_text(cl) and "unavailable" in evaluation.claims_text(cl)
    only = evaluation.claims(_swept(pretrained=_scores(0, 0)), {})
    assert [c["holds"] for c in only] == ["unavailable"] * 3


def test_shared_sweep_folders_differ_by_settings_and_subsets_keep_the_first_samples(tmp_path):
    a = sweep_folder(tmp_path, "stage1", "test", InferenceConfig(ref_mask_ratios=RATIOS))
    b = sweep_folder(tmp_path, "stage1", "test", InferenceConfig(ref_mask_ratios=RATIOS))
    c = sweep_folder(tmp_path, "stage1", "test", InferenceConfig(ref_mask_ratios=RATIOS, seed=1))
    assert a == b != c and a.parent == tmp_path / "sweeps" / "stage1" and a.name.startswith("test-")
    index = {"samples": {str(k): {"k": k} for k in (0, 1, 2, 5)}}
    assert sorted(first_samples(index, 2)["samples"]) == ["0", "1"] and first_samples(index, None) is index


def test_model_keys_and_mask_type_override(tmp_path):
    run = SimpleNamespace(run_dir=tmp_path)
    assert evaluation.model_key(run, None) == "pretrained"
    assert evaluation.model_key(run, tmp_path / "sft" / "best") == "stage1"
    assert evaluation.model_key(run, tmp_path / "dpo" / "best") == "stage2"
    assert evaluation.model_key(run, Path("/elsewhere/checkpoint-7")) == "model-checkpoint-7"

    class Model:
        config = SimpleNamespace(mask_type="mutual")

    import dataclasses

    @dataclasses.dataclass
    class Cfg:
        mask_type: str = "mutual"

    m = Model()
    m.config = Cfg()
    assert evaluation.with_mask_type(m, None) is m and evaluation.with_mask_type(m, "mutual") is m
    r = evaluation.with_mask_type(m, "random")
    assert r is not m and r.config.mask_type == "random" and m.config.mask_type == "mutual"


def test_report_round_trip_and_summary(tmp_path):
    swept = _swept(pretrained=_scores(0, 0, offset=-10, seed=1), stage1=_scores(6, -20, seed=2))
    cl = evaluation.claims(swept, {})
    rows = [{"condition": "Stage 1", "protocol": "honest", "ratio_counts": {"0.50": 40},
             "hist_clip_image_score": {"mean": 41.0, "se": 1.2, "n": 40}, "fid": {"mean": 0.3, "se": float("nan"),
                                                                               "n": 40}}]
    path = report.write_report(tmp_path, {"claims": cl, "test_samples": 40, "rows": rows, "x": np.float32(1.5)})
    assert path == tmp_path / "report" / "metrics.json" and report.read_report(tmp_path)["x"] == 1.5
    text = report.summary_text(tmp_path)
    assert "40 held-out test samples" in text and "(3) Stage 2 vs Stage 1: unavailable" in text
    assert str(tmp_path / "report") in text
    assert "no report" in report.summary_text(tmp_path / "nothing")
    table = report.comparison_table(rows)
    assert "41.00±1.20" in table and "0.30" in table and "hist CIS" in table
