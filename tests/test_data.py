"""The data layer: upstream and safe formats round-trip, validation errors, windows and splits, the toy datasets."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pigeon_utils import data, data_formats
from pigeon_utils.data import DataError, ImageError, MissingDataError, PickleNotTrustedError, open_dataset
from pigeon_utils.data_formats import convert_upstream, save_upstream_npy
from pigeon_utils.toy import data as toy_data
from pigeon_utils.windows import build_windows, split_windows

REPO = Path(__file__).resolve().parents[1]


def _upstream_sticker(root: Path) -> dict:
    """A tiny SER-30K-style folder written exactly as the seed README shows (np.save of dicts / lists)."""
    d = root / "processed_seq"
    (root / "Images" / "theme_a").mkdir(parents=True)
    n = 9
    paths = [f"theme_a/{k}.png" for k in range(n)]
    for k, rel in enumerate(paths):
        toy_data.render(toy_data.ToyFactors("star", "red", "dots", "filled")).save(root / "Images" / rel)
    objs = {
        "all_image_paths": np.array(paths, dtype=object),
        "mapped_anno_dict": {k: {"emo": ["Neutral", "Happiness", "Sadness"][k % 3], "text": ""} for k in range(n)},
        "mapped_user_dict": {0: {0: list(range(n))}},
        "sticker_semantics": np.array([f"a sticker {k}" for k in range(n)], dtype=object),
        "train": {0: {0: [[0, 1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 6]]}},
        "valid": {0: {0: [[2, 3, 4, 5, 6, 7]]}},
        "test": {0: {0: [[3, 4, 5, 6, 7, 8]]}},
        "all_clip_feats": np.arange(n * 4, dtype=np.float32).reshape(n, 4),
        "all_dino_feats": np.ones((n, 3), dtype=np.float32),
        "data_ready/train_ready": {"uids": [0, 0], "genres": [0, 0], "image": [[0, 1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 6]],
                                   "text_input_ids": [[5, 6, 32000], [7, 32000]],
                                   "text_attn_mask": [[1, 1, 1], [1, 1]]},
        "data_ready/test_hist_embeds": {0: {8: {0: torch.arange(20, dtype=torch.float32).reshape(5, 4)}}},
        "dpo/train": {0: {0: [[0, 1, 2, 3, 4, 5]]}},
        "dpo/train_preference_data": {0: {5: {0: {"chosen": torch.tensor([32000, 32010, 32001]),
                                                  "rejected": torch.tensor([32000, 32011])}}}},
        "data_ready_dpo/train_ready": {"uids": [0], "genres": [0], "image": [[0, 1, 2, 3, 4, 5]],
                                       "text_input_ids": [[5, 32000]], "text_attn_mask": [[1, 1]],
                                       "chosen_tokens": [torch.tensor([32000, 32010, 32001])],
                                       "rejected_tokens": [torch.tensor([32000, 32011])]},
        "map/uid_map": {"theme_a": 0},
    }
    for name, obj in objs.items():
        save_upstream_npy(d / f"{name}.npy", obj)
    return objs


def _assert_same(a, b):
    if isinstance(a, dict):
        assert set(a) == set(b)
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)) or (isinstance(a, np.ndarray) and a.dtype == object):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_upstream_pickles_round_trip_through_converter(tmp_path):
    objs = _upstream_sticker(tmp_path)
    d = tmp_path / "processed_seq"
    for name, obj in objs.items():  # the opt-in reader gives back what was written
        _assert_same(obj, data_formats.read_file(d, name, trust_pickle=True))
    out = tmp_path / "safe"
    written = convert_upstream(d, out, trust_pickle=True)
    assert len(written) == len(objs)
    assert not list(out.rglob("*.npy"))
    for name, obj in objs.items():  # the safe reader gives back the same content, no pickle involved
        _assert_same(obj, data_formats.read_file(out, name, trust_pickle=False))


def test_open_dataset_from_upstream_and_from_converted(tmp_path):
    _upstream_sticker(tmp_path)
    with pytest.raises(PickleNotTrustedError, match="trust_pickle=True"):
        open_dataset(tmp_path, "sticker")
    raw = open_dataset(tmp_path, "sticker", trust_pickle=True)
    convert_upstream(tmp_path / "processed_seq", trust_pickle=True)
    for p in (tmp_path / "processed_seq").rglob("*.npy"):
        p.unlink()
    safe = open_dataset(tmp_path, "sticker")
    assert [s for s in raw.samples("train")] == safe.samples("train") == [
        data.Sample(0, 0, (0, 1, 2, 3, 4), 5), data.Sample(0, 0, (1, 2, 3, 4, 5), 6)]
    assert safe.prompt(safe.samples("test")[0]) == raw.prompt(raw.samples("test")[0])
    np.testing.assert_array_equal(safe.features("clip"), raw.features("clip"))
    assert safe.data_ready("train").text_input_ids == [[5, 6, 32000], [7, 32000]]
    dr = safe.data_ready("train", dpo=True)
    assert dr.chosen_tokens == [[32000, 32010, 32001]] and dr.rejected_tokens == [[32000, 32011]]
    assert safe.preference_data("train") == {0: {5: {0: {"chosen": [32000, 32010, 32001], "rejected": [32000, 32011]}}}}
    assert safe.hist_embeds("test")[0][8][0].shape == (5, 4)
    assert safe.dpo_windows("train") == {0: {0: [[0, 1, 2, 3, 4, 5]]}}
    assert safe.maps() == {"uid_map": {"theme_a": 0}}
    assert safe.load_image(3).size == (64, 64)


def test_plain_numeric_npy_needs_no_opt_in(tmp_path):
    p = tmp_path / "all_clip_feats.npy"
    save_upstream_npy(p, np.zeros((3, 2), dtype=np.float32))
    assert data_formats.load_upstream_npy(p).shape == (3, 2)


def test_format_and_window_names_stay_importable_from_data():
    """pigeon_utils.data re-exports what moved to data_formats / windows (notebooks and older code use it)."""
    from pigeon_utils import windows

    for name in data_formats.__all__:
        assert getattr(data, name) is getattr(data_formats, name), name
    for name in windows.__all__:
        assert getattr(data, name) is getattr(windows, name), name


# ----------------------------------------------------------------------------------- bad input
@pytest.fixture()
def sticker_copy(tmp_path):
    dst = tmp_path / "toy-sticker"
    shutil.copytree(REPO / "dataset" / "toy-sticker", dst)
    return dst


def test_missing_data_folder_says_what_to_download_and_where(tmp_path):
    for scenario, name in (("sticker", "SER-30K"), ("movie", "ml-latest-small")):
        with pytest.raises(MissingDataError) as e:
            open_dataset(tmp_path / name, scenario)
        msg = str(e.value)
        assert str(tmp_path / name / "processed_seq") in msg and "download" in msg
        assert "Pigeon" in msg and ("Images/" in msg or "poster/" in msg)


def test_missing_file_is_named(sticker_copy):
    (sticker_copy / "processed_seq" / "valid.json").unlink()
    with pytest.raises(MissingDataError, match=r"processed_seq/valid\.npy"):
        open_dataset(sticker_copy, "sticker")


def _edit_first_window(folder: Path, split: str, edit) -> tuple[str, str]:
    """Apply `edit` to the first window of a split file; returns its (uid, gid)."""
    p = folder / "processed_seq" / f"{split}.json"
    obj = json.loads(p.read_text())
    uid = next(iter(obj))
    gid = next(iter(obj[uid]))
    obj[uid][gid][0] = edit(obj[uid][gid][0])
    p.write_text(json.dumps(obj))
    return uid, gid


def test_window_of_wrong_length(sticker_copy):
    uid, gid = _edit_first_window(sticker_copy, "test", lambda w: w[:5])
    with pytest.raises(DataError, match=rf"test: uid {uid}, gid {gid}, window #0 has 5 iids .*expected 6"):
        open_dataset(sticker_copy, "sticker")


def test_iid_without_image_path(sticker_copy):
    _edit_first_window(sticker_copy, "train", lambda w: w[:2] + [99999] + w[3:])
    with pytest.raises(DataError, match=r"train: iid 99999 has no image path: all_image_paths has 4843 entries"):
        open_dataset(sticker_copy, "sticker")


def test_missing_and_corrupt_image_files(sticker_copy):
    ds = open_dataset(sticker_copy, "sticker")
    ds.image_path(0).unlink()
    with pytest.raises(ImageError, match=r"theme_000/000\.png: image file of iid 0 not found"):
        ds.load_image(0)
    ds.image_path(1).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(ImageError, match=r"theme_000/001\.png: image file of iid 1 is corrupt"):
        ds.load_image(1)
    with pytest.raises(DataError, match="iid 5000 has no image path"):
        ds.load_image(5000)


def test_corrupt_json_and_npy_are_named(sticker_copy, tmp_path):
    p = sticker_copy / "processed_seq" / "mapped_anno_dict.json"
    p.write_text("{not json")
    with pytest.raises(DataError, match=r"mapped_anno_dict\.json: not valid JSON"):
        open_dataset(sticker_copy, "sticker")
    bad = tmp_path / "x.npy"
    bad.write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"x\.npy: not a readable \.npy file"):
        data_formats.load_upstream_npy(bad)


def test_missing_label_is_named(sticker_copy):
    p = sticker_copy / "processed_seq" / "mapped_anno_dict.json"
    obj = json.loads(p.read_text())
    target = json.loads((sticker_copy / "processed_seq" / "train.json").read_text())
    uid = next(iter(target))
    gid = next(iter(target[uid]))
    t = str(target[uid][gid][0][-1])
    del obj[t]
    p.write_text(json.dumps(obj))
    with pytest.raises(DataError, match=rf"mapped_anno_dict: no entry for iid"):
        open_dataset(sticker_copy, "sticker")


# -------------------------------------------------------------------------------- windows / splits
def test_sliding_windows():
    seqs = {7: {3: list(range(10))}, 8: {1: [1, 2, 3]}}
    w = build_windows(seqs)
    assert w == {7: {3: [list(range(k, k + 6)) for k in range(5)]}}  # 10 - 6 + 1 windows; short user dropped
    assert build_windows(seqs, length=3, stride=2)[8] == {1: [[1, 2, 3]]}
    with pytest.raises(ValueError):
        build_windows(seqs, stride=0)


def test_split_8_1_1_deterministic_and_user_disjoint():
    seqs = {u: {0: list(range(u, u + 16))} for u in range(40)}
    w = build_windows(seqs)
    total = 40 * 11
    s1 = split_windows(w, seed=3)
    assert s1 == split_windows(w, seed=3) and s1 != split_windows(w, seed=4)
    counts = {k: sum(len(ws) for per_g in v.values() for ws in per_g.values()) for k, v in s1.items()}
    assert counts == {"train": int(total * 0.8), "valid": int(total * 0.1), "test": total - 352 - 44}
    flat = sorted(tuple(x) for v in s1.values() for per_g in v.values() for ws in per_g.values() for x in ws)
    assert flat == sorted(tuple(x) for per_g in w.values() for ws in per_g.values() for x in ws)
    su = split_windows(w, seed=3, by="user")
    assert not set(su["train"]) & set(su["test"]) and not set(su["train"]) & set(su["valid"])
    assert len(su["train"]) == 32 and len(su["valid"]) == 4 and len(su["test"]) == 4
    with pytest.raises(ValueError, match="ratios"):
        split_windows(w, ratios=(0.5, 0.1, 0.1))


# ----------------------------------------------------------------------------------- toy datasets
@pytest.mark.parametrize("scenario,name", [("sticker", "toy-sticker"), ("movie", "toy-poster")])
def test_shipped_toy_dataset_is_valid_and_labelled(scenario, name):
    ds = open_dataset(REPO / "dataset" / name, scenario)
    st = ds.stats()
    assert st["samples"]["train"] > 8 * st["samples"]["test"] * 0.9 > 0
    assert ds.factors is not None and len(ds.factors) == ds.n_items
    glyph_of = toy_data.EMOTION_GLYPH if scenario == "sticker" else toy_data.GENRE_GLYPH
    labels = ds.labels()
    assert all(glyph_of[labels[i]] == ds.factors[i]["glyph"] for i in range(ds.n_items))
    s = ds.samples("valid")[0]
    im = ds.load_image(s.target)
    f = toy_data.ToyFactors(**ds.factors[s.target])
    assert np.array_equal(np.asarray(im), np.asarray(toy_data.render(f)))


def test_toy_sticker_themes_have_a_house_style_and_poster_users_a_taste():
    st = open_dataset(REPO / "dataset" / "toy-sticker", "sticker")
    shares = []
    for per_g in st.user_seqs.values():
        for seq in per_g.values():
            styles = [(st.factors[i]["colour"], st.factors[i]["pattern"], st.factors[i]["stroke"]) for i in seq]
            house = [max(set(col), key=col.count) for col in zip(*styles)]  # the theme's style, factor by factor
            shares.append([np.mean([s[k] == house[k] for s in styles]) for k in range(3)])
    shares = np.array(shares)
    # each factor follows the house style in about 3 of 4 stickers (style_keep = 0.75), never all of them
    assert 0.68 < shares.mean() < 0.82 and (shares.min(0) > 0.5).all() and (shares < 1).any(axis=1).all()
    mv = open_dataset(REPO / "dataset" / "toy-poster", "movie")
    tastes = json.loads((REPO / "dataset" / "toy-poster" / "toy_user_tastes.json").read_text())
    in_taste = np.mean([mv.factors[i]["colour"] in tastes[str(u)]["colours"]
                        for u, per_g in mv.user_seqs.items() for seq in per_g.values() for i in seq])
    base = np.mean([mv.factors[i]["colour"] in tastes[str(u)]["colours"]
                    for u in mv.user_seqs for i in range(mv.n_items)])
    assert in_taste > base + 0.25  # history carries taste that a random poster does not


def test_toy_datasets_rebuild_identically(tmp_path):
    toy_data.make_sticker(tmp_path, seed=0)
    toy_data.make_poster(tmp_path, seed=0)
    for name in ("toy-sticker", "toy-poster"):
        shipped = sorted(p.relative_to(REPO / "dataset" / name) for p in (REPO / "dataset" / name).rglob("*") if p.is_file())
        rebuilt = sorted(p.relative_to(tmp_path / name) for p in (tmp_path / name).rglob("*") if p.is_file())
        assert shipped == rebuilt
        for rel in shipped:
            if rel.suffix == ".json":
                assert (REPO / "dataset" / name / rel).read_bytes() == (tmp_path / name / rel).read_bytes(), rel
        for rel in [r for r in shipped if r.suffix == ".png"][::97]:
            a = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(REPO / "dataset" / name / rel))
            b = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(tmp_path / name / rel))
            assert np.array_equal(a, b), rel


def test_toy_sticker_style_keep(tmp_path):
    one = open_dataset(toy_data.make_sticker(tmp_path / "a", n_themes=3, stickers_per_theme=(8, 10), style_keep=1.0),
                       "sticker")
    for per_g in one.user_seqs.values():
        for seq in per_g.values():
            assert len({(one.factors[i]["colour"], one.factors[i]["pattern"], one.factors[i]["stroke"])
                        for i in seq}) == 1
    rng = np.random.default_rng(0)
    theme = ("red", "dots", "filled")
    off = [toy_data._off_style(rng, theme, keep=0.0) for _ in range(50)]  # every factor swapped, each time
    assert all(o[k] != theme[k] for o in off for k in range(3)) and len({o[0] for o in off}) > 3
    with pytest.raises(ValueError, match="style_keep=1.5"):
        toy_data.make_sticker(tmp_path / "c", style_keep=1.5)
    with pytest.raises(ValueError, match="n_themes=65"):
        toy_data.make_sticker(tmp_path / "c", n_themes=65)


def test_toy_upstream_format_reads_like_the_safe_one(tmp_path):
    up = toy_data.make_poster(tmp_path / "up", seed=0, n_movies=40, n_users=6, write_upstream=True)
    safe = open_dataset(up, "movie")
    for p in (up / "processed_seq").rglob("*.json"):
        p.unlink()
    raw = open_dataset(up, "movie", trust_pickle=True)
    assert raw.samples("train") == safe.samples("train")
    assert raw.movies == safe.movies and raw.semantics == safe.semantics
