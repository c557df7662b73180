"""Atomic file writes: nothing is ever left half-written under its final name.

Every artefact the project writes (dataset files, checkpoints, figures, generated images, indexes) goes through
:func:`atomic_write`: the content is written to a temporary file in the same folder, flushed to disk, then
renamed over the final name. An interrupted write leaves at most a hidden ``.<name>.tmp<pid>`` file behind.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Callable


def atomic_write(path: Path | str, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(f)`` on a binary file handle of a temporary file, then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    return path


def atomic_write_text(path: Path | str, text: str) -> Path:
    """Write UTF-8 text atomically."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda f: f.write(data))
