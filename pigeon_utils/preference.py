"""DPO preference pairs from an α_r sweep (docs/algorithm.md §6.3), and the upstream files they are kept in (§4.2).

Per scored sample of a sweep (:func:`pigeon_utils.sweep.run_sweep`'s index, :class:`~pigeon_utils.scoring.SweepScores`):

* **chosen** = the sequence of the α_r whose image has the highest history CIS, **rejected** = of the lowest; the
  reference CS plays no part (it is kept beside each pair for inspection);
* ties go to the smallest α_r, for chosen and rejected alike (the first one in the reference's folder order; the
  rule of docs/deviations.md I7). A sample whose images all score the same thus gets chosen = rejected;
* a pair whose chosen and rejected token sequences are identical carries no preference and is dropped and counted
  (the reference keeps it: docs/deviations.md; ``keep_identical=True`` keeps it too).

:class:`PreferenceSet` holds the pairs, the counts and the settings they were made with, and is saved as JSON.
:func:`to_upstream` / :func:`from_upstream` convert it to and from the reference's layout
(``select_scores_dpo.ipynb``): ``preference_data[uid][target][gid] = {"chosen", "rejected"}`` with LMM token ids
``[IMG] y1+offset … [/IMG]`` (no ``[/IMG]`` when generation stopped at ``max_new_tokens``) and the windows
``uid -> gid -> [5 history iids + target]``; :func:`write_upstream` / :func:`read_upstream` put them in a data folder
through :mod:`pigeon_utils.data_formats` (``dpo/<split>_preference_data``, ``dpo/<split>``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from pigeon_utils.atomic import atomic_write_text
from pigeon_utils.data_formats import DataError, load_preference_files, save_preference_files
from pigeon_utils.prompts import IdLayout

if TYPE_CHECKING:
    from pigeon_utils.scoring import SweepScores

__all__ = ["PREFERENCE_VERSION", "SELECTION_RULE", "EmptyPreferenceSetError", "PreferencePair", "PreferenceSet",
           "build_pairs", "upstream_tokens", "codes_from_upstream", "to_upstream", "from_upstream", "write_upstream",
           "read_upstream", "preference_data"]

PREFERENCE_VERSION = 1
_KIND = "pigeon-preference-pairs"
SELECTION_RULE = ("chosen = the α_r with the highest history CIS, rejected = the lowest (reference CS unused); ties: "
                  "the smallest α_r for both")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


#: the JSON value kinds of a pair's fields, and their checks
_KINDS = {"int": _is_int, "list of ints": lambda v: isinstance(v, list) and all(_is_int(x) for x in v),
          "number or null": lambda v: v is None or _is_int(v) or isinstance(v, float),
          "bool": lambda v: isinstance(v, bool)}


class EmptyPreferenceSetError(ValueError):
    """No preference pair is left; the message says why."""


# ------------------------------------------------------------------------------------------------- pairs
@dataclass(frozen=True)
class PreferencePair:
    """One pair: the sample (split ``index``, ``uid``, ``gid``, ``history``, ``target``), the chosen and rejected
    code ids and whether each ended with ``[/IMG]`` (False: cut at ``max_new_tokens``), and, for pairs built from a
    sweep, their α_r, history CIS and reference CS (None for pairs read from upstream files)."""

    index: int
    uid: int
    gid: int
    history: tuple[int, ...]
    target: int
    chosen_codes: tuple[int, ...]
    rejected_codes: tuple[int, ...]
    chosen_ended: bool = True
    rejected_ended: bool = True
    chosen_ratio: Optional[float] = None
    rejected_ratio: Optional[float] = None
    chosen_cis: Optional[float] = None
    rejected_cis: Optional[float] = None
    chosen_cs: Optional[float] = None
    rejected_cs: Optional[float] = None

    @property
    def margin(self) -> Optional[float]:
        """History CIS of chosen minus rejected (None without scores)."""
        if self.chosen_cis is None or self.rejected_cis is None:
            return None
        return self.chosen_cis - self.rejected_cis

    @property
    def window(self) -> list[int]:
        return [*self.history, self.target]

    def without_scores(self) -> "PreferencePair":
        """The pair as the upstream files hold it: α_r, CIS and CS dropped."""
        return replace(self, chosen_ratio=None, rejected_ratio=None, chosen_cis=None, rejected_cis=None,
                       chosen_cs=None, rejected_cs=None)

    def to_dict(self) -> dict:
        side = {s: {"ratio": getattr(self, f"{s}_ratio"), "cis": getattr(self, f"{s}_cis"),
                    "cs": getattr(self, f"{s}_cs"), "ended": getattr(self, f"{s}_ended"),
                    "codes": list(getattr(self, f"{s}_codes"))} for s in ("chosen", "rejected")}
        return {"index": self.index, "uid": self.uid, "gid": self.gid, "history": list(self.history),
                "target": self.target, "margin": self.margin, **side}

    @classmethod
    def from_dict(cls, d: Any, where: str) -> "PreferencePair":
        def get(obj, key, kind, at=where):
            if key not in obj:
                raise DataError(f"{at}: key {key!r} missing")
            v = obj[key]
            if not _KINDS[kind](v):
                raise DataError(f"{at}: key {key!r} has {v!r:.60}, expected {kind}")
            return tuple(v) if kind == "list of ints" else v

        if not isinstance(d, dict):
            raise DataError(f"{where}: expected a dict, got {type(d).__name__}")
        kw = {k: get(d, k, "int") for k in ("index", "uid", "gid", "target")}
        kw["history"] = get(d, "history", "list of ints")
        for s in ("chosen", "rejected"):
            side, at = d.get(s), f"{where}, {s!r}"
            if not isinstance(side, dict):
                raise DataError(f"{where}: key {s!r} missing or not a dict")
            kw[f"{s}_codes"] = get(side, "codes", "list of ints", at)
            kw[f"{s}_ended"] = get(side, "ended", "bool", at)
            for k in ("ratio", "cis", "cs"):
                kw[f"{s}_{k}"] = get(side, k, "number or null", at)
        return cls(**kw)


@dataclass
class PreferenceSet:
    """The pairs of one split, sorted by split index, with the counts (``samples`` looked at = pairs + dropped
    identical) and the ``settings`` they were made with (the selection rule, the sweep's config and model label, or
    the upstream source). Raises :class:`EmptyPreferenceSetError` when no pair is left."""

    split: str
    pairs: list[PreferencePair]
    samples: int
    dropped_identical: int
    settings: dict = field(default_factory=dict)

    def __post_init__(self):
        self.pairs = sorted(self.pairs, key=lambda p: p.index)
        twice = sorted({a.index for a, b in zip(self.pairs, self.pairs[1:]) if a.index == b.index})
        if twice:
            raise ValueError(f"split indices {twice[:10]} have more than one pair")
        if self.samples != len(self.pairs) + self.dropped_identical:
            raise ValueError(f"counts disagree: {self.samples} samples, but {len(self.pairs)} pairs + "
                             f"{self.dropped_identical} dropped identical")
        if not self.pairs:
            why = ("no sample was given" if not self.samples else
                   f"all {self.samples} samples had identical chosen and rejected token sequences (dropped)")
            raise EmptyPreferenceSetError(f"no preference pair left for split {self.split!r}: {why}")

    @property
    def counts(self) -> dict[str, int]:
        return {"samples": self.samples, "pairs": len(self.pairs), "dropped_identical": self.dropped_identical}

    def __len__(self) -> int:
        return len(self.pairs)

    def margins(self) -> np.ndarray:
        """History-CIS margins of the pairs (NaN where a pair has no scores)."""
        return np.array([np.nan if p.margin is None else p.margin for p in self.pairs], dtype=np.float64)

    def without_scores(self) -> "PreferenceSet":
        return replace(self, pairs=[p.without_scores() for p in self.pairs])

    def training_pairs(self) -> list[dict]:
        """The plain form Stage 2 reads (:mod:`pigeon_utils.dpo_data`): ``{"index", "chosen", "rejected"}`` with
        code ids (α_r is drawn at training time, docs/algorithm.md §4.5; whether a sequence ended is not carried)."""
        return [{"index": p.index, "chosen": list(p.chosen_codes), "rejected": list(p.rejected_codes)}
                for p in self.pairs]

    # ---------------------------------------------------------------- validation
    def check_against(self, ds, split: Optional[str] = None) -> None:
        """Every pair must be sample ``index`` of `split` (default: the set's) of dataset `ds`, with the same uid, gid,
        history and target; raises :class:`DataError` naming the pairs and iids that are not."""
        split = split or self.split
        samples = ds.samples(split)
        bad, bad_iids = [], sorted({i for p in self.pairs for i in p.window if not 0 <= i < ds.n_items})
        for p in self.pairs:
            s = samples[p.index] if 0 <= p.index < len(samples) else None
            if s is None or (s.uid, s.gid, tuple(s.history), s.target) != (p.uid, p.gid, p.history, p.target):
                has = "out of range" if s is None else f"uid {s.uid}, gid {s.gid}, window {list(s.iids)}"
                bad.append(f"index {p.index} (uid {p.uid}, gid {p.gid}, window {p.window}; the split has {has})")
        if bad or bad_iids:
            msg = f"{len(bad)} of {len(self.pairs)} pairs are not in {ds.root} split {split!r} ({len(samples)} samples)"
            if bad:
                msg += ": " + "; ".join(bad[:5]) + ("; …" if len(bad) > 5 else "")
            if bad_iids:
                msg += f". iids not in the dataset (valid 0..{ds.n_items - 1}): {bad_iids[:10]}"
            raise DataError(msg)

    # ---------------------------------------------------------------- files
    def to_dict(self) -> dict:
        return {"version": PREFERENCE_VERSION, "kind": _KIND, "split": self.split, "counts": self.counts,
                "settings": self.settings, "pairs": [p.to_dict() for p in self.pairs]}

    @classmethod
    def from_dict(cls, d: Any, where: str = "preference set") -> "PreferenceSet":
        if not isinstance(d, dict) or d.get("kind") != _KIND:
            kind = d.get("kind") if isinstance(d, dict) else type(d).__name__
            raise DataError(f"{where}: not a preference-pair file (kind {kind!r}, expected {_KIND!r})")
        if d.get("version") != PREFERENCE_VERSION:
            raise DataError(f"{where}: version {d.get('version')!r}, expected {PREFERENCE_VERSION}")
        for key, kind in (("split", str), ("counts", dict), ("settings", dict), ("pairs", list)):
            if not isinstance(d.get(key), kind):
                raise DataError(f"{where}: key {key!r} missing or not a {kind.__name__}")
        counts = d["counts"]
        if not all(isinstance(counts.get(k), int) for k in ("samples", "pairs", "dropped_identical")):
            raise DataError(f"{where}: 'counts' needs integer 'samples', 'pairs', 'dropped_identical', got {counts}")
        pairs = [PreferencePair.from_dict(p, f"{where}: pair #{k}") for k, p in enumerate(d["pairs"])]
        if counts["pairs"] != len(pairs):
            raise DataError(f"{where}: counts say {counts['pairs']} pairs, the file holds {len(pairs)}")
        try:
            return cls(d["split"], pairs, counts["samples"], counts["dropped_identical"], d["settings"])
        except EmptyPreferenceSetError:
            raise
        except ValueError as e:
            raise DataError(f"{where}: {e}") from None

    def save(self, path: Path | str) -> Path:
        """Write the set as JSON (atomically)."""
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: Path | str) -> "PreferenceSet":
        """Read a set written by :meth:`save`; a missing or damaged file raises naming it."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no preference-pair file here (PreferenceSet.save writes it)")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: damaged preference-pair file (not valid JSON: {e})") from None
        return cls.from_dict(d, str(path))


# ------------------------------------------------------------------------------------------------- building
def build_pairs(index: dict, scores: "SweepScores", *, keep_identical: bool = False) -> PreferenceSet:
    """The preference pairs of a scored sweep (docs/algorithm.md §6.3; rule in the module docstring).

    `index`: the sweep's index (:func:`pigeon_utils.sweep.load_index`), `scores`: its scores (same split and ratios;
    every scored sample must be in the index). A sequence ended with ``[/IMG]`` when it is shorter than the sweep's
    ``max_new_tokens``. Pairs with identical sequences are dropped and counted unless ``keep_identical`` (the
    reference's behaviour). Raises :class:`EmptyPreferenceSetError` when every pair is dropped."""
    from pigeon_utils.sweep import ratio_key

    if index.get("split") != scores.split:
        raise ValueError(f"the sweep index is of split {index.get('split')!r}, the scores of {scores.split!r}")
    keys = [ratio_key(r) for r in scores.ratios]
    swept = [ratio_key(r) for r in index["config"]["ref_mask_ratios"]]
    if sorted(keys) != sorted(swept):
        raise ValueError(f"the scores' ratios {keys} are not the sweep's {swept}")
    missing = [k for k in scores.indices if str(k) not in index["samples"]]
    if missing:
        raise ValueError(f"scored samples {missing[:10]} are not in the sweep index ({len(missing)} missing)")
    nan = [k for k, row in zip(scores.indices, scores.cis) if not np.isfinite(row).all()]
    if nan:
        raise ValueError(f"history CIS is not finite for samples {nan[:10]}")
    cap = index["config"].get("sampling", {}).get("max_new_tokens")
    order = np.argsort(np.asarray(scores.ratios, dtype=np.float64), kind="stable")  # ties → the smallest α_r
    pairs, dropped = [], 0
    for n, k in enumerate(scores.indices):
        entry = index["samples"][str(k)]
        cis = scores.cis[n, order]
        jc, jr = int(order[np.argmax(cis)]), int(order[np.argmin(cis)])
        codes = [tuple(int(c) for c in entry["images"][keys[j]]["codes"]) for j in (jc, jr)]
        if codes[0] == codes[1] and not keep_identical:
            dropped += 1
            continue
        ended = [cap is None or len(c) < cap for c in codes]
        pairs.append(PreferencePair(
            index=int(k), uid=int(entry["uid"]), gid=int(entry["gid"]), history=tuple(int(i) for i in entry["history"]),
            target=int(entry["target"]), chosen_codes=codes[0], rejected_codes=codes[1], chosen_ended=ended[0],
            rejected_ended=ended[1], chosen_ratio=float(scores.ratios[jc]), rejected_ratio=float(scores.ratios[jr]),
            chosen_cis=float(scores.cis[n, jc]), rejected_cis=float(scores.cis[n, jr]),
            chosen_cs=float(scores.cs[n, jc]), rejected_cs=float(scores.cs[n, jr])))
    settings = {"source": "sweep", "rule": SELECTION_RULE, "identical_pairs": "kept" if keep_identical else "dropped",
                "model": index.get("model", ""), "sweep_config": index["config"]}
    return PreferenceSet(scores.split, pairs, len(scores.indices), dropped, settings)


# ------------------------------------------------------------------------------------------------- upstream layout
def upstream_tokens(codes, ended: bool, layout: IdLayout) -> list[int]:
    """LMM ids of a generated image as the reference stores them: ``[IMG]``, code + visual offset, ``[/IMG]`` if
    it ended."""
    bad = [c for c in codes if not 0 <= int(c) < layout.codebook_size]
    if bad:
        raise ValueError(f"code ids {bad[:5]} outside the codebook (0..{layout.codebook_size - 1})")
    return [layout.img_id, *(int(c) + layout.visual_offset for c in codes), *([layout.emb_id] if ended else [])]


def codes_from_upstream(tokens, layout: IdLayout, where: str = "") -> tuple[tuple[int, ...], bool]:
    """``(code ids, ended)`` of an upstream token sequence ``[IMG] visual ids … [/IMG]?``; any other id is a
    :class:`DataError` naming `where`, the position and the id."""
    t = [int(x) for x in tokens]
    if not t or t[0] != layout.img_id:
        raise DataError(f"{where}: a token sequence must start with [IMG] = {layout.img_id}, got {t[:3]}")
    ended = len(t) > 1 and t[-1] == layout.emb_id
    body = t[1:-1] if ended else t[1:]
    for pos, x in enumerate(body, start=1):
        if not layout.visual_offset <= x < layout.vocab_size:
            raise DataError(f"{where}: id {x} at position {pos} is not a visual id ({layout.visual_offset}.."
                            f"{layout.vocab_size - 1}); only [IMG] first and [/IMG] last may be other ids")
    return tuple(x - layout.visual_offset for x in body), ended


def to_upstream(pset: PreferenceSet, layout: IdLayout) -> tuple[dict, dict]:
    """``(preference_data, windows)`` in the reference's layout (module docstring). The layout keys a pair by
    (uid, target, gid); two pairs sharing these cannot both be written and raise a ValueError naming them."""
    pref: dict = {}
    windows: dict = {}
    seen: dict = {}
    clashes = []
    for p in pset.pairs:
        key = (p.uid, p.target, p.gid)
        if key in seen:
            clashes.append(f"indices {seen[key]} and {p.index} (uid {p.uid}, target {p.target}, gid {p.gid})")
            continue
        seen[key] = p.index
        pref.setdefault(p.uid, {}).setdefault(p.target, {})[p.gid] = {
            "chosen": upstream_tokens(p.chosen_codes, p.chosen_ended, layout),
            "rejected": upstream_tokens(p.rejected_codes, p.rejected_ended, layout)}
        windows.setdefault(p.uid, {}).setdefault(p.gid, []).append(p.window)
    if clashes:
        raise ValueError("the upstream layout keys pairs by (uid, target, gid) and cannot hold both of: "
                         + "; ".join(clashes[:5]))
    return pref, windows


def from_upstream(preference_data: dict, windows: dict, ds, layout: IdLayout, split: str, *,
                  keep_identical: bool = False) -> PreferenceSet:
    """A :class:`PreferenceSet` from the reference's ``(preference_data, windows)`` of dataset `ds`'s `split`: every
    window must be a sample of the split (its index is looked up) and have a pair; pairs with identical sequences
    are dropped and counted unless ``keep_identical``. α_r and scores are not in these files (None). Errors name the
    windows / iids."""
    lookup: dict = {}
    for k, s in enumerate(ds.samples(split)):
        lookup.setdefault((s.uid, s.gid, tuple(s.iids)), []).append(k)
    pairs, dropped, missing, no_pair = [], 0, [], []
    for uid, per_g in windows.items():
        for gid, ws in per_g.items():
            for w in ws:
                w = tuple(int(i) for i in w)
                where = f"uid {uid}, gid {gid}, window {list(w)}"
                free = lookup.get((int(uid), int(gid), w))
                if not free:
                    missing.append((where, w))
                    continue
                k = free.pop(0)  # a window listed twice takes the split's next copy
                pair = preference_data.get(uid, {}).get(w[-1], {}).get(gid)
                if pair is None:
                    no_pair.append(where)
                    continue
                chosen, c_end = codes_from_upstream(pair["chosen"], layout, f"{where}, chosen")
                rejected, r_end = codes_from_upstream(pair["rejected"], layout, f"{where}, rejected")
                if (chosen, c_end) == (rejected, r_end) and not keep_identical:
                    dropped += 1
                    continue
                pairs.append(PreferencePair(k, int(uid), int(gid), w[:-1], w[-1], chosen, rejected, c_end, r_end))
    if missing:
        bad_iids = sorted({i for _, w in missing for i in w if not 0 <= i < ds.n_items})
        iids = f". iids not in the dataset (valid 0..{ds.n_items - 1}): {bad_iids[:10]}" if bad_iids else ""
        raise DataError(f"{len(missing)} window(s) of the upstream files are not samples of {ds.root} split "
                        f"{split!r}: " + "; ".join(m for m, _ in missing[:5]) + iids)
    if no_pair:
        raise DataError(f"{len(no_pair)} window(s) have no entry preference_data[uid][target][gid]: "
                        + "; ".join(no_pair[:5]))
    settings = {"source": "upstream", "rule": "as stored (select_scores_dpo.ipynb: chosen = the highest history CIS, "
                                              "rejected = the lowest)",
                "identical_pairs": "kept" if keep_identical else "dropped"}
    return PreferenceSet(split, pairs, len(pairs) + dropped, dropped, settings)


def write_upstream(pset: PreferenceSet, data_path: Path | str, layout: IdLayout, *,
                   upstream: bool = True) -> list[Path]:
    """Write `pset` into a ``processed_seq`` folder as ``dpo/<split>_preference_data`` and ``dpo/<split>``: the safe
    twins, and with ``upstream=True`` (default) also the ``.npy`` pickles the reference reads. Returns the files."""
    pref, windows = to_upstream(pset, layout)
    return save_preference_files(data_path, pset.split, pref, windows, upstream=upstream)


def read_upstream(data_path: Path | str, ds, layout: IdLayout, split: str, trust_pickle: bool = False, *,
                  keep_identical: bool = False) -> PreferenceSet:
    """Read ``dpo/<split>_preference_data`` and ``dpo/<split>`` from a ``processed_seq`` folder (safe files first;
    upstream pickles only with ``trust_pickle=True``) as a :class:`PreferenceSet` (:func:`from_upstream`)."""
    pref, windows = load_preference_files(data_path, split, trust_pickle)
    return from_upstream(pref, windows, ds, layout, split, keep_identical=keep_identical)


# ------------------------------------------------------------------------------------------------- from a model
def preference_data(model, ds, split: str, out_dir: Path | str, cfg, clip, *, max_samples: Optional[int] = None,
                    model_label: str = "", resume: bool = True, progress: bool = True,
                    sweep_dir: Path | str | None = None):
    """Notebook 04 for one split: the α_r sweep of `model` over the first `max_samples` samples
    (:func:`pigeon_utils.sweep.run_sweep` into `sweep_dir`, default `out_dir`; resumable, shared across processes
    when launched on several), its scores (`clip`: a :class:`~pigeon_utils.scoring.ClipScorer`) and its pairs, saved
    as ``<out_dir>/scores.json`` and ``<out_dir>/pairs.json``. Notebook 04 passes the run's shared sweep folder
    (:func:`~pigeon_utils.sweep.sweep_folder`), so later notebooks reuse its images. Returns
    ``(PreferenceSet, SweepResult, SweepScores)``."""
    from pigeon_utils.scoring import sweep_scored

    out_dir = Path(out_dir)
    res, scores = sweep_scored(model, ds, split, out_dir if sweep_dir is None else sweep_dir, cfg, clip,
                               max_samples=max_samples, model_label=model_label, resume=resume, progress=progress)
    scores.save(out_dir / "scores.json")
    pset = build_pairs(res.index, scores)
    pset.check_against(ds, split)
    pset.save(out_dir / "pairs.json")
    return pset, res, scores
