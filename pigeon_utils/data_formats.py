"""The two on-disk formats of a ``processed_seq`` folder: the upstream ``.npy`` pickles and our safe format.

Each logical file (``train``, ``mapped_anno_dict``, ``data_ready/test_ready``, ...) exists in one of two forms:

* **upstream** ``<name>.npy``, as the Pigeon authors' preprocessing saved it (``np.save``; dicts and lists are
  pickled object arrays): :func:`load_upstream_npy`, :func:`save_upstream_npy`;
* **safe** ``<name>.json`` (ids and text) or ``<name>.safetensors`` (features and token sequences, nested dict keys
  joined with ``/``): :func:`save_safe`, :func:`load_safe`.

:func:`read_file` reads a logical file in whichever form is there, the safe one first (:func:`find_file`).

**Security.** The upstream ``.npy`` files are pickles: loading one can run code. They are read only with an
explicit ``trust_pickle=True``; :func:`convert_upstream` converts a whole folder once into the safe format, which is
what the project reads from then on (a safe file wins over an ``.npy`` beside it).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from pigeon_utils.atomic import atomic_write, atomic_write_text

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
                "pigeon_utils.data_formats.convert_upstream(data_path, trust_pickle=True) and read the safe files "
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


def convert_upstream(data_path: Path | str, out_path: Path | str | None = None,
                     trust_pickle: bool = False) -> list[Path]:
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


# ------------------------------------------------------------------------------------- DPO preference files
# (imported by name from here, e.g. by pigeon_utils.preference; not in __all__, which pigeon_utils.data re-exports)
def preference_file_names(split: str) -> tuple[str, str]:
    """The logical files of a split's DPO data (docs/algorithm.md §4.2, §6.3), as ``select_scores_dpo.ipynb`` names
    them: ``dpo/<split>_preference_data`` (uid -> target -> gid -> {'chosen', 'rejected'} LMM token ids) and
    ``dpo/<split>`` (the windows that have a pair, uid -> gid -> [5 history iids + target])."""
    return f"dpo/{split}_preference_data", f"dpo/{split}"


def save_preference_files(data_path: Path | str, split: str, preference_data: dict, windows: dict, *,
                          upstream: bool = False) -> list[Path]:
    """Write a split's DPO files into `data_path` (a ``processed_seq`` folder): always the safe twins
    (``dpo/<split>_preference_data.safetensors``, one int64 tensor per token sequence, and ``dpo/<split>.json``);
    with ``upstream=True`` also the ``.npy`` pickles the reference's ``finetune_dpo.py`` reads, its token sequences
    as int64 CPU tensors (the reference slices them with ``[1:]`` and calls ``.to(device)``). Returns the files."""
    import torch

    data_path = Path(data_path)
    pref_name, win_name = preference_file_names(split)
    written = [save_safe(data_path, pref_name, preference_data), save_safe(data_path, win_name, windows)]
    if upstream:
        as_tensors = {u: {t: {g: {k: torch.as_tensor(np.asarray(v, dtype=np.int64)) for k, v in pair.items()}
                              for g, pair in per_g.items()} for t, per_g in per_t.items()}
                      for u, per_t in preference_data.items()}
        for name, obj in ((pref_name, as_tensors), (win_name, windows)):
            save_upstream_npy(data_path / f"{name}.npy", obj)
            written.append(data_path / f"{name}.npy")
    return written


def _ints(value: Any, where: str) -> list[int]:
    """A token sequence or window (list, numpy array or tensor of a pickle) as a list of ints."""
    a = np.asarray(value.detach().cpu() if hasattr(value, "detach") else value)
    if a.dtype == object or not (np.issubdtype(a.dtype, np.integer) or a.size == 0):
        raise DataError(f"{where}: expected a flat sequence of integer ids, got {str(value)[:80]!r} "
                        f"(dtype {a.dtype})")
    return [int(x) for x in a.reshape(-1).tolist()]


def load_preference_files(data_path: Path | str, split: str, trust_pickle: bool = False) -> tuple[dict, dict]:
    """Read a split's DPO files (:func:`preference_file_names`; safe format first, an upstream ``.npy`` pickle only
    with ``trust_pickle=True``) as plain ``(preference_data, windows)`` with int keys and int lists. A structure
    other than expected raises :class:`DataError` naming the file and key."""
    data_path = Path(data_path)
    pref_name, win_name = preference_file_names(split)
    raw_pref = read_file(data_path, pref_name, trust_pickle)
    raw_win = read_file(data_path, win_name, trust_pickle)
    where = f"{data_path}/{pref_name}"
    if not isinstance(raw_pref, dict):
        raise DataError(f"{where}: expected a dict uid -> target -> gid -> pair, got {type(raw_pref).__name__}")
    pref: dict = {}
    for uid, per_t in raw_pref.items():
        if not isinstance(per_t, dict):
            raise DataError(f"{where}: uid {uid} maps to {type(per_t).__name__}, expected a dict target -> gid -> pair")
        for tgt, per_g in per_t.items():
            if not isinstance(per_g, dict):
                raise DataError(f"{where}: uid {uid}, target {tgt} maps to {type(per_g).__name__}, expected a dict "
                                "gid -> pair")
            for gid, pair in per_g.items():
                at = f"{where}: uid {uid}, target {tgt}, gid {gid}"
                if not isinstance(pair, dict) or {"chosen", "rejected"} - set(pair):
                    raise DataError(f"{at}: expected a dict with 'chosen' and 'rejected' token sequences")
                pref.setdefault(int(uid), {}).setdefault(int(tgt), {})[int(gid)] = {
                    k: _ints(pair[k], f"{at}, {k!r}") for k in ("chosen", "rejected")}
    where = f"{data_path}/{win_name}"
    if not isinstance(raw_win, dict):
        raise DataError(f"{where}: expected a dict uid -> gid -> windows, got {type(raw_win).__name__}")
    windows: dict = {}
    for uid, per_g in raw_win.items():
        if not isinstance(per_g, dict):
            raise DataError(f"{where}: uid {uid} maps to {type(per_g).__name__}, expected a dict gid -> windows")
        for gid, ws in per_g.items():
            if not isinstance(ws, (list, tuple, np.ndarray)):
                raise DataError(f"{where}: uid {uid}, gid {gid} maps to {type(ws).__name__}, expected a list of "
                                "windows")
            windows.setdefault(int(uid), {})[int(gid)] = [_ints(w, f"{where}: uid {uid}, gid {gid}, window #{k}")
                                                          for k, w in enumerate(ws)]
    return pref, windows


__all__ = [
    "DataError",
    "MissingDataError",
    "PickleNotTrustedError",
    "convert_upstream",
    "find_file",
    "load_safe",
    "load_upstream_npy",
    "read_file",
    "save_safe",
    "save_upstream_npy",
]
