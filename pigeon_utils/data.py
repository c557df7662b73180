"""The data layer: Pigeon's two dataset formats, read, validated and held in a typed in-memory form.

Folder layout (real or toy; one loader serves both)::

    <data_dir>/                      e.g. dataset/SER-30K, dataset/ml-latest-small, dataset/toy-sticker
      processed_seq/                 the seed's files (spec §1.1), upstream .npy or our safe .json/.safetensors
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

**Security.** The upstream ``.npy`` files are pickles: loading one can run code. They are read only with an
explicit ``trust_pickle=True``; :func:`convert_upstream` converts a whole folder once into the safe format
(JSON for ids and text, safetensors for features and token sequences), which is what the project reads from
then on (a safe file wins over an ``.npy`` beside it).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from pigeon_utils.atomic import atomic_write, atomic_write_text
from pigeon_utils.prompts import N_HISTORY, build_prompt_text, clean_title

WINDOW = N_HISTORY + 1
SPLITS = ("train", "valid", "test")
SCENARIOS = ("sticker", "movie")

DOWNLOAD_HINT = {
    "sticker": ("SER-30K as processed by the Pigeon authors: download it from the 'Dataset' link of the Pigeon "
                "README (https://github.com/YiyanXu/Pigeon, Google Drive folder "
                "1MpvkQ_DCimfcXBZJpPmliNf8s4reUA9B) and unpack it so that {root}/processed_seq/ and "
                "{root}/Images/ exist; then run pigeon_utils.data.convert_upstream('{root}/processed_seq', "
                "trust_pickle=True) once. The toy stand-in needs no download: preset='toy'."),
    "movie": ("MovieLens-latest-small as processed by the Pigeon authors: download it from the 'Dataset' link "
              "of the Pigeon README (https://github.com/YiyanXu/Pigeon, Google Drive folder "
              "1MpvkQ_DCimfcXBZJpPmliNf8s4reUA9B) and unpack it so that {root}/processed_seq/ and "
              "{root}/poster/ exist; then run pigeon_utils.data.convert_upstream('{root}/processed_seq', "
              "trust_pickle=True) once. The toy stand-in needs no download: preset='toy'."),
}
IMAGE_DIRS = {"sticker": "Images", "movie": "poster"}
SEMANTICS_FILE = {"sticker": "sticker_semantics", "movie": "movie_semantics"}
USER_FILE = {"sticker": "mapped_user_dict", "movie": "user_seq_dict"}
META_FILE = {"sticker": "mapped_anno_dict", "movie": "mapped_movies"}
# files stored as safetensors in the safe format; everything else is JSON
_FEATURE_FILES = ("all_clip_feats", "all_dino_feats")
_INT_KEY = re.compile(r"^-?\d+$")


# --------------------------------------------------------------------------------------------- errors
class DataError(ValueError):
    """A dataset file has content other than expected; the message names the file, key and value."""


class MissingDataError(FileNotFoundError):
    """A data folder or file is absent; the message says what was expected and where to get it."""


class PickleNotTrustedError(DataError):
    """An upstream pickled ``.npy`` file was about to be read without ``trust_pickle=True``."""


class ImageError(DataError):
    """An image referenced by the dataset is missing or cannot be decoded."""


# ------------------------------------------------------------------------------------- upstream .npy
def load_upstream_npy(path: Path | str, trust_pickle: bool = False) -> Any:
    """Read one upstream ``.npy`` file. Object arrays (pickles) need ``trust_pickle=True``.

    A 0-d object array (a saved dict) is returned as the dict; a 1-d object array as a list; numeric arrays
    as numpy arrays.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingDataError(f"{path}: file not found")
    with open(path, "rb") as fh:
        if fh.read(6) != b"\x93NUMPY":
            raise DataError(f"{path}: not a readable .npy file (no NPY header; truncated or another format)")
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as e:
        if "allow_pickle" not in str(e):
            raise DataError(f"{path}: not a readable .npy file ({e})") from e
        if not trust_pickle:
            raise PickleNotTrustedError(
                f"{path} is a pickled object array: reading it runs code stored in the file. If you trust its "
                "source, pass trust_pickle=True, or convert the folder once with "
                "pigeon_utils.data.convert_upstream(data_path, trust_pickle=True) and read the safe files "
                "from then on.") from None
        arr = np.load(path, allow_pickle=True)
    except Exception as e:  # truncated or not an npy file at all
        raise DataError(f"{path}: not a readable .npy file ({type(e).__name__}: {e})") from e
    if arr.dtype == object:
        return arr.item() if arr.ndim == 0 else list(arr)
    return arr


def save_upstream_npy(path: Path | str, obj: Any) -> None:
    """Write `obj` the way the upstream preprocessing did (``np.save``; dicts and lists become pickles)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(obj, np.ndarray):
        arr = obj
    elif isinstance(obj, dict):
        arr = np.empty((), dtype=object)
        arr[()] = obj
    else:
        arr = np.empty(len(obj), dtype=object)
        arr[:] = list(obj)
    with open(path, "wb") as fh:  # np.save(str) would append .npy to a name without it
        np.save(fh, arr, allow_pickle=True)


# ------------------------------------------------------------------------------------- safe format
def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays
        return obj.tolist()
    return obj


def _int_keys(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {(int(k) if isinstance(k, str) and _INT_KEY.match(k) else k): _int_keys(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_int_keys(v) for v in obj]
    return obj


def _flatten_tensors(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten_tensors(v, f"{prefix}{k}/"))
        return out
    return {prefix[:-1]: obj}


def _unflatten(flat: dict[str, Any]) -> dict:
    root: dict = {}
    for key, value in flat.items():
        node = root
        parts = key.split("/")
        for p in parts[:-1]:
            node = node.setdefault(int(p) if _INT_KEY.match(p) else p, {})
        last = parts[-1]
        node[int(last) if _INT_KEY.match(last) else last] = value
    return root


def _is_tensor_file(name: str) -> bool:
    stem = name.split("/")[-1]
    return stem in _FEATURE_FILES or stem.endswith("_hist_embeds") or stem.endswith("_preference_data")


def save_safe(data_path: Path | str, name: str, obj: Any) -> Path:
    """Write one logical file (`name` like ``train`` or ``data_ready/test_ready``) in the safe format.

    Features and token sequences go to ``<name>.safetensors`` (nested dict keys joined with ``/``), everything
    else to ``<name>.json``. The write is atomic (temporary file, then rename).
    """
    import torch
    from safetensors.torch import save

    data_path = Path(data_path)
    if _is_tensor_file(name):
        dst = data_path / f"{name}.safetensors"
        if isinstance(obj, dict):
            flat = {k: torch.as_tensor(np.asarray(v)).contiguous() for k, v in _flatten_tensors(obj).items()}
        else:
            flat = {"feats": torch.as_tensor(np.asarray(obj, dtype=np.float32)).contiguous()}
        data = save(flat)
        atomic_write(dst, lambda f: f.write(data))
    else:
        dst = data_path / f"{name}.json"
        atomic_write_text(dst, json.dumps(_jsonable(obj), separators=(",", ":")))
    return dst


def load_safe(path: Path) -> Any:
    """Read a safe-format file written by :func:`save_safe` (keys that are integers come back as ints)."""
    if path.suffix == ".json":
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: not valid JSON ({e})") from e
        return obj if "/map/" in path.as_posix() else _int_keys(obj)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        flat = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise DataError(f"{path}: not a readable safetensors file ({e})") from e
    if set(flat) == {"feats"}:
        return flat["feats"].numpy()
    return _unflatten(flat)


def find_file(data_path: Path, name: str) -> Path | None:
    """The file holding logical file `name`: the safe version if present, else the upstream ``.npy``."""
    for suffix in (".json", ".safetensors", ".npy"):
        p = data_path / f"{name}{suffix}"
        if p.is_file():
            return p
    return None


def read_file(data_path: Path | str, name: str, trust_pickle: bool = False, required: bool = True) -> Any:
    """Read logical file `name` from a ``processed_seq`` folder, safe format first."""
    data_path = Path(data_path)
    p = find_file(data_path, name)
    if p is None:
        if required:
            raise MissingDataError(f"{data_path / name}.npy (or .json / .safetensors): file not found in "
                                   f"{data_path}")
        return None
    if p.suffix == ".npy":
        return load_upstream_npy(p, trust_pickle=trust_pickle)
    return load_safe(p)


def convert_upstream(data_path: Path | str, out_path: Path | str | None = None, trust_pickle: bool = False) -> list[Path]:
    """Convert every upstream ``.npy`` file under `data_path` to the safe format (into `out_path`, default
    the same folder). Needs ``trust_pickle=True`` for the pickled files. Returns the files written."""
    data_path = Path(data_path)
    out = Path(out_path) if out_path is not None else data_path
    if not data_path.is_dir():
        raise MissingDataError(f"{data_path}: folder not found")
    written = []
    for npy in sorted(data_path.rglob("*.npy")):
        name = npy.relative_to(data_path).with_suffix("").as_posix()
        obj = load_upstream_npy(npy, trust_pickle=trust_pickle)
        written.append(save_safe(out, name, _to_plain(obj)))
    return written


def _to_plain(obj: Any) -> Any:
    """Turn numpy / torch containers read from a pickle into plain Python or array values."""
    if isinstance(obj, dict):
        return {(k.item() if hasattr(k, "item") else k): _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


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
        """The sample's full instruction text with its ``<img>`` and ``<emb>`` placeholders (spec §1.3)."""
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


# --------------------------------------------------------------------------- windows and splits
def build_windows(user_seqs: dict[int, dict[int, list[int]]], length: int = WINDOW,
                  stride: int = 1) -> dict[int, dict[int, list[list[int]]]]:
    """Sliding windows over each user's interaction sequence: `length` consecutive items (5 history + 1
    target by default), moving `stride` items at a time. Sequences shorter than `length` yield none."""
    if length < 2 or stride < 1:
        raise ValueError(f"length={length}, stride={stride}: expected length >= 2 and stride >= 1")
    out: dict[int, dict[int, list[list[int]]]] = {}
    for uid, per_g in user_seqs.items():
        for gid, seq in per_g.items():
            seq = [int(i) for i in seq]
            ws = [seq[s:s + length] for s in range(0, len(seq) - length + 1, stride)]
            if ws:
                out.setdefault(int(uid), {})[int(gid)] = ws
    return out


def split_windows(windows: dict[int, dict[int, list[list[int]]]], ratios: tuple[float, float, float] = (0.8, 0.1, 0.1),
                  seed: int = 0, by: str = "window") -> dict[str, dict[int, dict[int, list[list[int]]]]]:
    """Split samples into train / valid / test (8:1:1 by default).

    ``by="window"`` (the paper's split) shuffles all windows, so one user appears in every split;
    ``by="user"`` is user-disjoint: whole users go to one split, so test users are unseen in training.
    """
    if len(ratios) != 3 or any(r < 0 for r in ratios) or abs(sum(ratios) - 1) > 1e-6:
        raise ValueError(f"ratios={ratios}: expected three non-negative numbers summing to 1")
    rng = np.random.default_rng(seed)
    if by == "window":
        units = [(u, g, k) for u, per_g in windows.items() for g, ws in per_g.items() for k in range(len(ws))]
    elif by == "user":
        units = list(windows)
    else:
        raise ValueError(f"by={by!r}: expected 'window' or 'user'")
    order = rng.permutation(len(units))
    n_train = int(len(units) * ratios[0])
    n_valid = int(len(units) * ratios[1])
    assign = np.empty(len(units), dtype=np.int64)
    assign[order[:n_train]] = 0
    assign[order[n_train:n_train + n_valid]] = 1
    assign[order[n_train + n_valid:]] = 2
    out: dict[str, dict[int, dict[int, list[list[int]]]]] = {s: {} for s in SPLITS}
    if by == "window":
        for (u, g, k), a in zip(units, assign):
            out[SPLITS[a]].setdefault(u, {}).setdefault(g, []).append(windows[u][g][k])
    else:
        for u, a in zip(units, assign):
            out[SPLITS[a]][u] = {g: list(ws) for g, ws in windows[u].items()}
    return out
