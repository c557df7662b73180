"""The dataset: Pigeon's data folders opened, validated and held in a typed in-memory form (:class:`PigeonData`).

Folder layout (real or toy; one loader serves both)::

    <data_dir>/                      e.g. dataset/SER-30K, dataset/ml-latest-small, dataset/toy-sticker
      processed_seq/                 the seed's files (docs/algorithm.md §1.1), upstream .npy or safe format
        all_image_paths              iid -> image path relative to the image folder
        mapped_anno_dict             sticker: iid -> {'emo', 'text'}
        mapped_movies                movie:   iid -> {'title', 'genres', 'intro'}
        mapped_user_dict / user_seq_dict   uid -> gid -> [iid, ...] (interaction sequence)
        sticker_semantics / movie_semantics   iid -> textual description
        train / valid / test         uid -> gid -> [[6 iids], ...] (5 history + 1 target)
        all_clip_feats, all_dino_feats     [N_items, D] evaluation features
        data_ready/{split}_ready, data_ready/{split}_hist_embeds
        dpo/{split}, dpo/{split}_preference_data, data_ready_dpo/{split}_ready
        map/...                      id maps saved by the authors' preprocessing (kept as read)
      Images/ (sticker) or poster/ (movie)

The files themselves (the upstream pickles, which need ``trust_pickle=True``, and the safe JSON / safetensors
format) are read and written by :mod:`pigeon_utils.data_formats`; windows and splits of interaction sequences
are made by :mod:`pigeon_utils.windows`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

# re-exported: callers import the file-format and window names from here too
from pigeon_utils.data_formats import (DataError, MissingDataError, PickleNotTrustedError, convert_upstream,
                                       find_file, load_safe, load_upstream_npy, read_file, save_safe,
                                       save_upstream_npy)
from pigeon_utils.prompts import N_HISTORY, build_prompt_text, clean_title
from pigeon_utils.windows import SPLITS, WINDOW, build_windows, split_windows

SCENARIOS = ("sticker", "movie")

_DOWNLOAD = ("{dataset} as processed by the Pigeon authors: download it from the 'Dataset' link of the Pigeon README "
             "(https://github.com/YiyanXu/Pigeon, Google Drive folder 1MpvkQ_DCimfcXBZJpPmliNf8s4reUA9B) and unpack it "
             "so that {{root}}/processed_seq/ and {{root}}/{images}/ exist; then run "
             "pigeon_utils.data_formats.convert_upstream('{{root}}/processed_seq', trust_pickle=True) once. The toy "
             "stand-in needs no download: preset='toy'.")
DOWNLOAD_HINT = {"sticker": _DOWNLOAD.format(dataset="SER-30K", images="Images"),
                 "movie": _DOWNLOAD.format(dataset="MovieLens-latest-small", images="poster")}
IMAGE_DIRS = {"sticker": "Images", "movie": "poster"}
SEMANTICS_FILE = {"sticker": "sticker_semantics", "movie": "movie_semantics"}
USER_FILE = {"sticker": "mapped_user_dict", "movie": "user_seq_dict"}
META_FILE = {"sticker": "mapped_anno_dict", "movie": "mapped_movies"}


class ImageError(DataError):
    """An image referenced by the dataset is missing or cannot be decoded."""


# ------------------------------------------------------------------------------------ typed records
@dataclass(frozen=True)
class Sample:
    """One training / evaluation sample: five history items and a target (which also serves as reference)."""

    uid: int
    gid: int
    history: tuple[int, ...]
    target: int

    @property
    def iids(self) -> tuple[int, ...]:
        return (*self.history, self.target)


@dataclass(frozen=True)
class MovieInfo:
    title: str
    genres: tuple[str, ...]
    intro: str

    @property
    def clean_title(self) -> str:
        return clean_title(self.title)


@dataclass(frozen=True)
class StickerInfo:
    emo: str
    text: str = ""


@dataclass
class DataReady:
    """The cached model-input lists of ``data_ready/{split}_ready`` (and ``data_ready_dpo``)."""

    uids: list[int]
    genres: list[int]
    image: list[list[int]]
    text_input_ids: list[list[int]]
    text_attn_mask: list[list[int]]
    chosen_tokens: list[list[int]] | None = None
    rejected_tokens: list[list[int]] | None = None

    def __len__(self) -> int:
        return len(self.uids)


def _check_windows(windows: Any, n_items: int, where: str) -> dict[int, dict[int, list[list[int]]]]:
    if not isinstance(windows, dict):
        raise DataError(f"{where}: expected a dict uid -> gid -> list of windows, got {type(windows).__name__}")
    out: dict[int, dict[int, list[list[int]]]] = {}
    for uid, per_g in windows.items():
        if not isinstance(per_g, dict):
            raise DataError(f"{where}: uid {uid!r} maps to {type(per_g).__name__}, expected a dict gid -> windows")
        out[int(uid)] = {}
        for gid, ws in per_g.items():
            rows = []
            for k, w in enumerate(ws):
                w = [int(i) for i in w]
                if len(w) != WINDOW:
                    raise DataError(f"{where}: uid {uid}, gid {gid}, window #{k} has {len(w)} iids {w}; expected "
                                    f"{WINDOW} (5 history + 1 target)")
                rows.append(w)
            out[int(uid)][int(gid)] = rows
    _check_iids([i for per_g in out.values() for ws in per_g.values() for w in ws for i in w], n_items, where)
    return out


def _check_iids(iids: Iterable[int], n_items: int, where: str) -> None:
    a = np.fromiter(iids, dtype=np.int64)
    bad = a[(a < 0) | (a >= n_items)]
    if bad.size:
        raise DataError(f"{where}: iid {int(bad[0])} has no image path: all_image_paths has {n_items} entries "
                        f"(valid iids 0..{n_items - 1}); {bad.size} reference(s) out of range")


# ----------------------------------------------------------------------------------- the dataset
@dataclass
class PigeonData:
    """A validated Pigeon dataset (one scenario) in memory.

    Attributes mirror the seed's files; ``factors`` holds the toy world's known image factors (None for
    real data). Optional files (features, data_ready, dpo) are read on first use.
    """

    scenario: str
    root: Path
    image_paths: list[str]
    semantics: list[str]
    windows: dict[str, dict[int, dict[int, list[list[int]]]]]
    user_seqs: dict[int, dict[int, list[int]]] | None = None
    stickers: dict[int, StickerInfo] | None = None
    movies: dict[int, MovieInfo] | None = None
    factors: list[dict] | None = None
    trust_pickle: bool = False
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def data_path(self) -> Path:
        return self.root / "processed_seq"

    @property
    def image_dir(self) -> Path:
        return self.root / IMAGE_DIRS[self.scenario]

    @property
    def n_items(self) -> int:
        return len(self.image_paths)

    # ---------------------------------------------------------------- samples
    def samples(self, split: str) -> list[Sample]:
        """The split's samples in file order (uid -> gid -> window), as the reference iterates them."""
        if split not in self.windows:
            raise KeyError(f"split={split!r}: expected one of {sorted(self.windows)}")
        return [Sample(uid, gid, tuple(w[:N_HISTORY]), w[N_HISTORY])
                for uid, per_g in self.windows[split].items() for gid, ws in per_g.items() for w in ws]

    # ---------------------------------------------------------------- images
    def image_path(self, iid: int) -> Path:
        if not 0 <= int(iid) < self.n_items:
            raise DataError(f"iid {iid} has no image path: {self.data_path}/all_image_paths has {self.n_items} "
                            "entries")
        rel = self.image_paths[int(iid)]
        if not rel:
            raise DataError(f"iid {iid} has an empty path in {self.data_path}/all_image_paths")
        return self.image_dir / rel

    def load_image(self, iid: int):
        """The image of `iid` as an RGB PIL image; a missing or corrupt file is an :class:`ImageError`."""
        from PIL import Image, UnidentifiedImageError

        p = self.image_path(iid)
        try:
            with Image.open(p) as im:
                im.load()
                return im.convert("RGB")
        except FileNotFoundError:
            raise ImageError(f"{p}: image file of iid {iid} not found (all_image_paths[{iid}] = "
                             f"{self.image_paths[int(iid)]!r}, image folder {self.image_dir})") from None
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise ImageError(f"{p}: image file of iid {iid} is corrupt or not an image ({e})") from e

    # ---------------------------------------------------------------- text
    def target_info(self, iid: int) -> str:
        """The emotion (sticker) or title (movie) of `iid`, as the prompt's target line uses it."""
        if self.scenario == "sticker":
            info = (self.stickers or {}).get(int(iid))
            if info is None:
                raise DataError(f"{self.data_path}/mapped_anno_dict: no entry for iid {iid}")
            return info.emo
        info = (self.movies or {}).get(int(iid))
        if info is None:
            raise DataError(f"{self.data_path}/mapped_movies: no entry for iid {iid}")
        return info.title

    def prompt(self, sample: Sample) -> str:
        """The sample's instruction text with its ``<img>`` and ``<emb>`` placeholders (docs/algorithm.md §1.3)."""
        titles = [self.target_info(i) for i in sample.history] if self.scenario == "movie" else None
        return build_prompt_text(self.scenario, self.target_info(sample.target), self.semantics[sample.target],
                                 history_titles=titles)

    # ---------------------------------------------------------------- optional files
    def _optional(self, name: str, required: bool = True) -> Any:
        if name not in self._cache:
            self._cache[name] = read_file(self.data_path, name, self.trust_pickle, required=False)
        if self._cache[name] is None and required:
            raise MissingDataError(f"{self.data_path}/{name} (.json / .safetensors / .npy): file not found")
        return self._cache[name]

    def features(self, kind: str) -> np.ndarray:
        """``all_clip_feats`` or ``all_dino_feats`` as a float array [N_items, D]."""
        if kind not in ("clip", "dino"):
            raise ValueError(f"kind={kind!r}: expected 'clip' or 'dino'")
        name = f"all_{kind}_feats"
        feats = np.asarray(self._optional(name), dtype=np.float32)
        if feats.ndim != 2 or feats.shape[0] != self.n_items:
            raise DataError(f"{self.data_path}/{name}: shape {tuple(feats.shape)}, expected [{self.n_items}, D] "
                            "(one row per iid)")
        return feats

    def data_ready(self, split: str, dpo: bool = False) -> DataReady:
        """``data_ready/{split}_ready`` (or ``data_ready_dpo/...``), validated."""
        name = f"{'data_ready_dpo' if dpo else 'data_ready'}/{split}_ready"
        raw = self._optional(name)
        where = f"{self.data_path}/{name}"
        keys = ["uids", "genres", "image", "text_input_ids", "text_attn_mask"]
        if dpo:
            keys += ["chosen_tokens", "rejected_tokens"]
        missing = [k for k in keys if k not in raw]
        if missing:
            raise DataError(f"{where}: missing key(s) {missing}; expected {keys}")
        n = len(raw["uids"])
        for k in keys:
            if len(raw[k]) != n:
                raise DataError(f"{where}: key {k!r} has {len(raw[k])} entries, 'uids' has {n}")
        for k, (ids, mask) in enumerate(zip(raw["text_input_ids"], raw["text_attn_mask"])):
            if len(ids) != len(mask):
                raise DataError(f"{where}: sample #{k}: text_input_ids has {len(ids)} ids, text_attn_mask "
                                f"{len(mask)}")
        for k, w in enumerate(raw["image"]):
            if len(w) != WINDOW:
                raise DataError(f"{where}: sample #{k}: 'image' has {len(w)} iids; expected {WINDOW}")
        _check_iids((int(i) for w in raw["image"] for i in w), self.n_items, where)

        def ints(rows):
            return [[int(x) for x in np.asarray(r).tolist()] for r in rows]

        return DataReady(
            uids=[int(u) for u in raw["uids"]], genres=[int(g) for g in raw["genres"]], image=ints(raw["image"]),
            text_input_ids=ints(raw["text_input_ids"]), text_attn_mask=ints(raw["text_attn_mask"]),
            chosen_tokens=ints(raw["chosen_tokens"]) if dpo else None,
            rejected_tokens=ints(raw["rejected_tokens"]) if dpo else None)

    def hist_embeds(self, split: str) -> dict[int, dict[int, dict[int, np.ndarray]]]:
        """``data_ready/{split}_hist_embeds``: uid -> target iid -> gid -> [5, D] CLIP features of the history."""
        name = f"data_ready/{split}_hist_embeds"
        raw = self._optional(name)
        out: dict = {}
        for uid, per_t in raw.items():
            for tgt, per_g in per_t.items():
                for gid, feats in per_g.items():
                    a = np.asarray(feats, dtype=np.float32)
                    if a.ndim != 2 or a.shape[0] != N_HISTORY:
                        raise DataError(f"{self.data_path}/{name}: uid {uid}, target {tgt}, gid {gid} has shape "
                                        f"{tuple(a.shape)}, expected [{N_HISTORY}, D]")
                    out.setdefault(int(uid), {}).setdefault(int(tgt), {})[int(gid)] = a
        return out

    def dpo_windows(self, split: str) -> dict[int, dict[int, list[list[int]]]]:
        """``dpo/{split}``: the windows for which a preference pair exists (same format as ``train``)."""
        name = f"dpo/{split}"
        return _check_windows(self._optional(name), self.n_items, f"{self.data_path}/{name}")

    def preference_data(self, split: str) -> dict[int, dict[int, dict[int, dict[str, list[int]]]]]:
        """``dpo/{split}_preference_data``: uid -> target -> gid -> {'chosen', 'rejected'} token id lists."""
        name = f"dpo/{split}_preference_data"
        raw = self._optional(name)
        out: dict = {}
        for uid, per_t in raw.items():
            for tgt, per_g in per_t.items():
                for gid, pair in per_g.items():
                    if not isinstance(pair, dict) or {"chosen", "rejected"} - set(pair):
                        raise DataError(f"{self.data_path}/{name}: uid {uid}, target {tgt}, gid {gid}: expected "
                                        "a dict with 'chosen' and 'rejected' token sequences")
                    out.setdefault(int(uid), {}).setdefault(int(tgt), {})[int(gid)] = {
                        k: [int(x) for x in np.asarray(pair[k]).reshape(-1).tolist()] for k in ("chosen", "rejected")}
        return out

    def maps(self) -> dict[str, Any]:
        """The files under ``map/`` as read (their content is not documented upstream)."""
        d = self.data_path / "map"
        if not d.is_dir():
            return {}
        names = sorted({p.relative_to(self.data_path).with_suffix("").as_posix() for p in d.iterdir()
                        if p.suffix in (".json", ".npy")})
        return {n.split("/", 1)[1]: read_file(self.data_path, n, self.trust_pickle) for n in names}

    # ---------------------------------------------------------------- statistics
    def stats(self) -> dict[str, Any]:
        """Counts a data-exploration notebook shows: users, items, samples per split, sequence lengths."""
        seq_lens = ([len(s) for per_g in self.user_seqs.values() for s in per_g.values()]
                    if self.user_seqs else [])
        users = {u for w in self.windows.values() for u in w}
        return {
            "scenario": self.scenario,
            "items": self.n_items,
            "users": len(users),
            "samples": {s: len(self.samples(s)) for s in self.windows},
            "sequence_length": ({"min": int(min(seq_lens)), "mean": float(np.mean(seq_lens)),
                                 "max": int(max(seq_lens))} if seq_lens else None),
        }

    def labels(self) -> list[str]:
        """Each item's semantic label: the sticker emotion, or the movie's first genre."""
        if self.scenario == "sticker":
            return [self.stickers[i].emo if self.stickers and i in self.stickers else "?" for i in range(self.n_items)]
        return [self.movies[i].genres[0] if self.movies and i in self.movies and self.movies[i].genres else "?"
                for i in range(self.n_items)]


def open_dataset(data_dir: Path | str, scenario: str, trust_pickle: bool = False) -> PigeonData:
    """Open and validate a dataset folder (see the module docstring for the layout).

    Raises :class:`MissingDataError` (what to download and where to put it) when the folder or a required
    file is missing, :class:`DataError` naming the file / key / value for malformed content, and
    :class:`PickleNotTrustedError` for an upstream pickle read without ``trust_pickle=True``.
    """
    if scenario not in SCENARIOS:
        raise ValueError(f"scenario={scenario!r}: expected one of {SCENARIOS}")
    root = Path(data_dir)
    data_path = root / "processed_seq"
    if not data_path.is_dir():
        raise MissingDataError(f"data folder {data_path} not found. Expected the {scenario} dataset here: "
                               + DOWNLOAD_HINT[scenario].format(root=root))
    image_dir = root / IMAGE_DIRS[scenario]
    if not image_dir.is_dir():
        raise MissingDataError(f"image folder {image_dir} not found. " + DOWNLOAD_HINT[scenario].format(root=root))

    def need(name: str) -> Any:
        p = find_file(data_path, name)
        if p is None:
            raise MissingDataError(f"{data_path / name}.npy (or its converted .json) not found: the {scenario} "
                                   f"dataset is incomplete. " + DOWNLOAD_HINT[scenario].format(root=root))
        return read_file(data_path, name, trust_pickle)

    paths = [str(p) for p in need("all_image_paths")]
    n = len(paths)
    sem_name = SEMANTICS_FILE[scenario]
    semantics = [str(s) for s in need(sem_name)]
    if len(semantics) != n:
        raise DataError(f"{data_path}/{sem_name}: {len(semantics)} descriptions, but all_image_paths has {n} "
                        "entries (one description per iid expected)")
    windows = {s: _check_windows(need(s), n, f"{data_path}/{s}") for s in SPLITS}

    user_seqs = None
    raw_users = read_file(data_path, USER_FILE[scenario], trust_pickle, required=False)
    if raw_users is not None:
        where = f"{data_path}/{USER_FILE[scenario]}"
        user_seqs = {int(u): {int(g): [int(i) for i in seq] for g, seq in per_g.items()}
                     for u, per_g in raw_users.items()}
        _check_iids((i for per_g in user_seqs.values() for s in per_g.values() for i in s), n, where)

    meta_name = META_FILE[scenario]
    meta = need(meta_name)
    where = f"{data_path}/{meta_name}"
    stickers = movies = None
    if scenario == "sticker":
        stickers = {}
        for iid, d in meta.items():
            if not isinstance(d, dict) or "emo" not in d:
                raise DataError(f"{where}: iid {iid}: expected a dict with key 'emo', got {d!r}")
            stickers[int(iid)] = StickerInfo(emo=str(d["emo"]), text=str(d.get("text", "")))
        _check_iids(stickers, n, where)
    else:
        movies = {}
        for iid, d in meta.items():
            if not isinstance(d, dict) or "title" not in d:
                raise DataError(f"{where}: iid {iid}: expected a dict with key 'title', got {d!r}")
            genres = tuple(g for g in str(d.get("genres", "")).split("|") if g)
            movies[int(iid)] = MovieInfo(title=str(d["title"]), genres=genres, intro=str(d.get("intro", "")))
        _check_iids(movies, n, where)
    # sticker prompts use the target's emotion; movie prompts use every title of the window
    used = {i for per_u in windows.values() for per_g in per_u.values() for ws in per_g.values() for w in ws
            for i in (w[-1:] if scenario == "sticker" else w)}
    lacking = sorted(used - set(stickers if scenario == "sticker" else movies))
    if lacking:
        raise DataError(f"{where}: no entry for iid {lacking[0]} ({len(lacking)} iid(s) used by the windows lack one)")

    factors = None
    fpath = root / "factors.json"
    if fpath.is_file():
        factors = json.loads(fpath.read_text(encoding="utf-8"))
        if len(factors) != n:
            raise DataError(f"{fpath}: {len(factors)} entries, all_image_paths has {n}")
    return PigeonData(scenario=scenario, root=root, image_paths=paths, semantics=semantics, windows=windows,
                      user_seqs=user_seqs, stickers=stickers, movies=movies, factors=factors,
                      trust_pickle=trust_pickle)


__all__ = ["DOWNLOAD_HINT", "DataError", "DataReady", "ImageError", "MissingDataError", "MovieInfo",
           "PickleNotTrustedError", "PigeonData", "SCENARIOS", "SPLITS", "Sample", "StickerInfo", "WINDOW",
           "build_windows", "convert_upstream", "find_file", "load_safe", "load_upstream_npy", "open_dataset",
           "read_file", "save_safe", "save_upstream_npy", "split_windows"]
