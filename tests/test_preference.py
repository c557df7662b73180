"""DPO preference pairs (docs/algorithm.md §6.3): the selection rule on a hand-made sweep index and scores, the JSON
file, the reference's file layout (ours → upstream → ours), and the errors. Samples come from the toy sticker
dataset."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import pigeon_utils  # noqa: F401
from pigeon_utils.data import open_dataset
from pigeon_utils.data_formats import DataError, PickleNotTrustedError, load_upstream_npy
from pigeon_utils.preference import (EmptyPreferenceSetError, PreferenceSet, build_pairs, codes_from_upstream,
                                     from_upstream, read_upstream, to_upstream, write_upstream)
from pigeon_utils.prompts import LAVIT_LAYOUT
from pigeon_utils.scoring import SweepScores

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "dataset" / "toy-sticker"
RATIOS = (0.0, 0.5, 1.0)
CAP = 6  # max_new_tokens of the hand-made sweep: a 6-code image hit the cap (no [/IMG])


@pytest.fixture(scope="module")
def ds():
    return open_dataset(DATA, "sticker")


def make_index(ds, split: str, codes: dict[int, list[list[int]]], ratios=RATIOS) -> dict:
    """A sweep index (pigeon_utils.sweep.run_sweep's layout) for samples ``codes`` = {split index: codes per α_r}."""
    samples = ds.samples(split)
    out = {}
    for k, per_ratio in codes.items():
        s = samples[k]
        out[str(k)] = {"uid": s.uid, "gid": s.gid, "history": list(s.history), "target": s.target,
                       "images": {f"{r:.2f}": {"path": f"{r:.2f}/{k:05d}.png", "codes": c}
                                  for r, c in zip(ratios, per_ratio)}}
    return {"version": 1, "split": split, "model": "hand-made", "samples": out,
            "config": {"ref_mask_ratios": list(ratios), "sampling": {"max_new_tokens": CAP}}}


def distinct(k: int) -> list[list[int]]:
    """Three different code sequences for sample k (one per α_r)."""
    return [[k, 1, 2], [k, 3, 4, 5], [k, 6, 7, 8, 9, 10]]


def hand_made(ds):
    """Five samples: argmax / argmin, two ties, and two that are dropped as identical."""
    codes = {0: distinct(0), 1: distinct(1), 2: distinct(2), 3: [[4, 4]] * 3, 4: distinct(4)}
    cis = [[1.0, 3.0, 2.0],   # chosen 0.5, rejected 0.0
           [3.0, 3.0, 1.0],   # tie for the highest: chosen the smaller α_r (0.0); rejected 1.0
           [1.0, 3.0, 1.0],   # tie for the lowest: rejected the smaller α_r (0.0); chosen 0.5
           [1.0, 2.0, 3.0],   # the same codes at every α_r: dropped
           [2.0, 2.0, 2.0]]   # all equal: chosen = rejected = 0.0, dropped
    cs = [[90.0, 0.0, 0.0]] + [[0.0, 0.0, 90.0]] * 4  # a CS that would choose otherwise: ignored
    return make_index(ds, "valid", codes), SweepScores("valid", list(RATIOS), sorted(codes), cis, cs)


def test_chosen_is_argmax_rejected_argmin_of_history_cis(ds):
    pset = build_pairs(*hand_made(ds))
    assert pset.counts == {"samples": 5, "pairs": 3, "dropped_identical": 2}
    got = {p.index: (p.chosen_ratio, p.rejected_ratio, p.margin) for p in pset.pairs}
    assert got == {0: (0.5, 0.0, 2.0), 1: (0.0, 1.0, 2.0), 2: (0.5, 0.0, 2.0)}
    p = pset.pairs[0]
    s = ds.samples("valid")[0]
    assert (p.uid, p.gid, p.history, p.target) == (s.uid, s.gid, s.history, s.target)
    assert p.chosen_codes == (0, 3, 4, 5) and p.rejected_codes == (0, 1, 2)
    assert (p.chosen_cis, p.rejected_cis, p.chosen_cs, p.rejected_cs) == (3.0, 1.0, 0.0, 90.0)
    assert pset.pairs[1].rejected_ended is False and pset.pairs[1].chosen_ended  # 6 codes = the cap
    assert pset.settings["model"] == "hand-made" and pset.settings["sweep_config"]["ref_mask_ratios"] == list(RATIOS)
    pset.check_against(ds)
    assert pset.training_pairs()[0] == {"index": 0, "chosen": [0, 3, 4, 5], "rejected": [0, 1, 2]}


def test_ties_follow_the_ratio_not_the_column(ds):
    """Scores whose columns are not in α_r order: ties still go to the smallest α_r."""
    ratios = (1.0, 0.0, 0.5)
    index = make_index(ds, "valid", {0: distinct(0)}, ratios)
    pset = build_pairs(index, SweepScores("valid", list(ratios), [0], [[5.0, 5.0, 1.0]], [[0.0] * 3]))
    assert (pset.pairs[0].chosen_ratio, pset.pairs[0].rejected_ratio) == (0.0, 0.5)


def test_no_pair_left_is_an_error_saying_why(ds):
    index = make_index(ds, "valid", {0: [[1, 2]] * 3, 1: distinct(1)})
    scores = SweepScores("valid", list(RATIOS), [0, 1], [[1.0, 2.0, 3.0], [2.0, 2.0, 2.0]], [[0.0] * 3] * 2)
    with pytest.raises(EmptyPreferenceSetError, match="all 2 samples had identical chosen and rejected"):
        build_pairs(index, scores)
    kept = build_pairs(index, scores, keep_identical=True)  # the reference's behaviour
    assert kept.counts == {"samples": 2, "pairs": 2, "dropped_identical": 0}
    assert kept.pairs[0].chosen_codes == kept.pairs[0].rejected_codes == (1, 2)


def test_sweep_and_scores_must_agree(ds):
    index, scores = hand_made(ds)
    with pytest.raises(ValueError, match="split 'valid', the scores of 'test'"):
        build_pairs(index, SweepScores("test", scores.ratios, scores.indices, scores.cis, scores.cs))
    with pytest.raises(ValueError, match=r"scored samples \[7\] are not in the sweep index"):
        build_pairs(index, SweepScores("valid", scores.ratios, [0, 7], scores.cis[:2], scores.cs[:2]))


# ------------------------------------------------------------------------------------------------- files
def test_json_round_trip(ds, tmp_path):
    pset = build_pairs(*hand_made(ds))
    path = pset.save(tmp_path / "pairs" / "valid.json")
    back = PreferenceSet.load(path)
    assert back == pset
    assert json.loads(path.read_text())["pairs"][0]["margin"] == 2.0


def test_damaged_file_is_named(ds, tmp_path):
    path = build_pairs(*hand_made(ds)).save(tmp_path / "valid.json")
    text = path.read_text()
    with pytest.raises(FileNotFoundError, match="no preference-pair file"):
        PreferenceSet.load(tmp_path / "absent.json")
    path.write_text(text[: len(text) // 2])
    with pytest.raises(DataError, match=r"valid.json: damaged preference-pair file"):
        PreferenceSet.load(path)
    d = json.loads(text)
    d["pairs"][1]["chosen"]["codes"] = ["x"]
    path.write_text(json.dumps(d))
    with pytest.raises(DataError, match=r"pair #1, 'chosen': key 'codes' has \[.x.\], expected list of ints"):
        PreferenceSet.load(path)
    d = json.loads(text)
    d["counts"]["dropped_identical"] = 5
    path.write_text(json.dumps(d))
    with pytest.raises(DataError, match="counts disagree"):
        PreferenceSet.load(path)
    d = json.loads(text)
    d["pairs"][1]["index"] = d["pairs"][0]["index"]
    path.write_text(json.dumps(d))
    with pytest.raises(DataError, match=r"split indices \[0\] have more than one pair"):
        PreferenceSet.load(path)
    path.write_text(json.dumps({"kind": "something else"}))
    with pytest.raises(DataError, match="not a preference-pair file"):
        PreferenceSet.load(path)


def test_upstream_round_trip(ds, tmp_path):
    pset = build_pairs(*hand_made(ds))
    pref, windows = to_upstream(pset, LAVIT_LAYOUT)
    p = pset.pairs[0]
    entry = pref[p.uid][p.target][p.gid]
    assert entry["chosen"] == [32000, 32002, 32005, 32006, 32007, 32001]
    assert entry["rejected"] == [32000, 32002, 32003, 32004, 32001]
    capped = pset.pairs[1]
    assert pref[capped.uid][capped.target][capped.gid]["rejected"][-1] != 32001  # cut at max_new_tokens
    assert [p.window for p in pset.pairs] == [w for per_g in windows.values() for ws in per_g.values() for w in ws]
    back = from_upstream(pref, windows, ds, LAVIT_LAYOUT, "valid")
    assert back.pairs == pset.without_scores().pairs and back.counts["pairs"] == 3

    folder = tmp_path / "processed_seq"
    written = {f.relative_to(folder).as_posix() for f in write_upstream(pset, folder, LAVIT_LAYOUT)}
    assert written == {"dpo/valid_preference_data.safetensors", "dpo/valid.json", "dpo/valid_preference_data.npy",
                       "dpo/valid.npy"}
    assert read_upstream(folder, ds, LAVIT_LAYOUT, "valid").pairs == back.pairs  # the safe twins
    raw = load_upstream_npy(folder / "dpo/valid_preference_data.npy", trust_pickle=True)
    token = raw[p.uid][p.target][p.gid]["chosen"]  # the reference calls token[1:].to(device)
    assert isinstance(token, torch.Tensor) and token.dtype == torch.int64 and token.tolist() == entry["chosen"]
    for f in ("dpo/valid_preference_data.safetensors", "dpo/valid.json"):
        (folder / f).unlink()
    with pytest.raises(PickleNotTrustedError):
        read_upstream(folder, ds, LAVIT_LAYOUT, "valid")
    assert read_upstream(folder, ds, LAVIT_LAYOUT, "valid", trust_pickle=True).pairs == back.pairs


def test_the_dataset_reads_the_files_written(ds, tmp_path):
    """PigeonData.preference_data / dpo_windows read what write_upstream writes into a dataset folder."""
    root = tmp_path / "toy-sticker"
    shutil.copytree(DATA / "processed_seq", root / "processed_seq")
    (root / "Images").symlink_to(DATA / "Images", target_is_directory=True)
    pset = build_pairs(*hand_made(ds))
    write_upstream(pset, root / "processed_seq", LAVIT_LAYOUT, upstream=False)
    copy = open_dataset(root, "sticker")
    pref, windows = to_upstream(pset, LAVIT_LAYOUT)
    assert copy.preference_data("valid") == pref
    assert copy.dpo_windows("valid") == windows


def test_upstream_identical_pairs_are_dropped_and_counted(ds):
    pset = build_pairs(*hand_made(ds))
    pref, windows = to_upstream(pset, LAVIT_LAYOUT)
    s = ds.samples("valid")[3]
    windows.setdefault(s.uid, {}).setdefault(s.gid, []).append(list(s.iids))
    pref.setdefault(s.uid, {}).setdefault(s.target, {})[s.gid] = {"chosen": [32000, 32010, 32001],
                                                                 "rejected": [32000, 32010, 32001]}
    back = from_upstream(pref, windows, ds, LAVIT_LAYOUT, "valid")
    assert back.counts == {"samples": 4, "pairs": 3, "dropped_identical": 1}
    kept = from_upstream(pref, windows, ds, LAVIT_LAYOUT, "valid", keep_identical=True)
    assert kept.counts == {"samples": 4, "pairs": 4, "dropped_identical": 0} and kept.pairs[3].index == 3


# ------------------------------------------------------------------------------------------------- errors
def test_pairs_not_in_the_dataset_are_named(ds):
    pset = build_pairs(*hand_made(ds))
    p = pset.pairs[1]
    wrong = PreferenceSet("valid", [pset.pairs[0], type(p)(**{**p.__dict__, "target": 99999}),
                                    type(p)(**{**pset.pairs[2].__dict__, "index": 10 ** 6})], 3, 0)
    with pytest.raises(DataError) as e:
        wrong.check_against(ds)
    msg = str(e.value)
    assert "2 of 3 pairs are not in" in msg and "index 1 (" in msg and "index 1000000" in msg
    assert "iids not in the dataset (valid 0..4842): [99999]" in msg
    with pytest.raises(DataError, match="split 'test'"):
        pset.check_against(ds, "test")

    pref, windows = to_upstream(pset, LAVIT_LAYOUT)
    windows[p.uid][p.gid][0] = [*p.history, 99999]
    with pytest.raises(DataError, match=r"not samples of .* split 'valid'.*iids not in the dataset .*\[99999\]"):
        from_upstream(pref, windows, ds, LAVIT_LAYOUT, "valid")


def test_upstream_format_errors_are_named(ds):
    pset = build_pairs(*hand_made(ds))
    pref, windows = to_upstream(pset, LAVIT_LAYOUT)
    p = pset.pairs[0]
    pref[p.uid][p.target][p.gid]["chosen"] = [32000, 32005, 15, 32001]
    with pytest.raises(DataError, match=r"chosen: id 15 at position 2 is not a visual id"):
        from_upstream(pref, windows, ds, LAVIT_LAYOUT, "valid")
    del pref[p.uid][p.target][p.gid]
    with pytest.raises(DataError, match=r"no entry preference_data\[uid\]\[target\]\[gid\]"):
        from_upstream(pref, windows, ds, LAVIT_LAYOUT, "valid")
    with pytest.raises(DataError, match="must start with"):
        codes_from_upstream([32005, 32001], LAVIT_LAYOUT, "x")
    assert codes_from_upstream(np.array([32000, 32002, 32003]), LAVIT_LAYOUT) == ((0, 1), False)


def test_upstream_layout_cannot_hold_two_pairs_of_one_key(ds):
    pset = build_pairs(*hand_made(ds))
    p = pset.pairs[0]
    twin = type(p)(**{**p.__dict__, "index": 99})
    with pytest.raises(ValueError, match=r"cannot hold both of: indices 0 and 99"):
        to_upstream(PreferenceSet("valid", [p, twin], 2, 0), LAVIT_LAYOUT)
