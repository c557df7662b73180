"""The LaVIT loader's errors, and the small file checks that raise them.

Both errors are :class:`pigeon_utils.backbone.CheckpointError` subclasses, so callers of ``load_backbone`` catch one
type whatever the world:

* :class:`LaVITMissingFileError`: a file or folder of the checkpoint layout is missing; the message lists the expected
  layout and where to download it.
* :class:`LaVITWeightsError`: a weight file whose keys or shapes do not fit its module; the message lists the missing /
  unexpected keys. Nothing is renamed, re-initialised or guessed.
"""
from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from pigeon_utils.backbone import CheckpointError
from pigeon_utils.lavit.checkpoint import HUB_ID, LaVITCheckpointError, StateDictMismatchError

log = logging.getLogger(__name__)


class LaVITMissingFileError(LaVITCheckpointError, CheckpointError):
    """A file or folder of the LaVIT checkpoint layout is missing; the message lists the layout and the download."""


class LaVITWeightsError(StateDictMismatchError, CheckpointError):
    """A weight file's keys or shapes do not fit its module (never repaired by guessing)."""

    def __init__(self, message: str, path: Path, missing: Sequence[str] = (), unexpected: Sequence[str] = (),
                 shapes: dict | None = None) -> None:
        RuntimeError.__init__(self, message)
        self.path = Path(path)
        self.missing_keys, self.unexpected_keys = list(missing), list(unexpected)
        self.shape_mismatches = dict(shapes or {})

    @classmethod
    def from_mismatch(cls, err: StateDictMismatchError) -> "LaVITWeightsError":
        return cls(f"{err} -- the checkpoint file is damaged or from another model; re-download {HUB_ID}.",
                   err.path, err.missing_keys, err.unexpected_keys, err.shape_mismatches)


@contextlib.contextmanager
def checkpoint_errors():
    """Re-raise the layout loader's errors as :class:`CheckpointError` subclasses (same message and fields)."""
    try:
        yield
    except LaVITMissingFileError:
        raise
    except LaVITCheckpointError as e:
        raise LaVITMissingFileError(e.root, e.missing, e.role) from None
    except LaVITWeightsError:
        raise
    except StateDictMismatchError as e:
        raise LaVITWeightsError.from_mismatch(e) from None


def read_json(path: Path, root: Path, role: str) -> dict:
    """A config file of the checkpoint `root`: missing -> :class:`LaVITMissingFileError`, invalid -> CheckpointError."""
    if not path.is_file():
        raise LaVITMissingFileError(root, path, role)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} ({role}) is not valid JSON: {e}; re-download {HUB_ID}.") from e


def require_weights(folder: Path, root: Path, names: Sequence[str], role: str) -> None:
    """At least one of the weight files `names` must be in `folder`, else :class:`LaVITMissingFileError`."""
    if not any((folder / n).is_file() for n in names):
        raise LaVITMissingFileError(root, folder / names[0], f"{role} weights: one of {', '.join(names)}")


def check_loading_info(info: dict, folder: Path, what: str) -> None:
    """A transformers / diffusers ``output_loading_info`` dict: missing or mismatched keys -> :class:`LaVITWeightsError`
    (the library would have initialised them randomly); unexpected keys are logged."""
    missing = sorted(info.get("missing_keys", []))
    mismatched = info.get("mismatched_keys", [])
    unexpected = sorted(info.get("unexpected_keys", []))
    if missing or mismatched:
        shapes = {m[0]: (tuple(m[1]), tuple(m[2])) for m in mismatched if len(m) == 3}
        show = ", ".join(missing[:20]) + (f" ... (+{len(missing) - 20} more)" if len(missing) > 20 else "")
        raise LaVITWeightsError(
            f"{folder} does not fit {what}: {len(missing)} missing keys [{show or 'none'}]; "
            f"{len(mismatched)} shape mismatches {list(shapes.items())[:10]}. Refusing to initialise them "
            f"randomly; re-download {HUB_ID}.", folder, missing, unexpected, shapes)
    if unexpected:
        log.warning("%s: %d keys not used by %s: %s", folder, len(unexpected), what, unexpected[:20])


__all__ = [
    "LaVITMissingFileError",
    "LaVITWeightsError",
    "check_loading_info",
    "checkpoint_errors",
    "read_json",
    "require_weights",
]
