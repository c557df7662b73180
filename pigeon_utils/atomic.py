"""Atomic file writes: nothing is ever left half-written under its final name.

Every artefact the project writes (dataset files, checkpoints, figures, generated images, indexes) goes through
:func:`atomic_write`: the content is written to a temporary file in the same folder, flushed to disk, then
renamed over the final name. An interrupted write leaves at most a hidden ``.<name>.tmp<pid>`` file behind.
Whole folders (a checkpoint, a dataset) go through :func:`atomic_dir` the same way.
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


def atomic_dir(final: Path | str, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on an empty temporary folder beside `final` (``.<name>.partial-<pid>``, same parent, so
    the rename stays on one file system), then swap it in for `final`, replacing an old folder there.

    A failed `write` removes the temporary folder and leaves `final` as it was; the old folder is moved aside
    (``.<name>.old-<pid>``) before the swap and deleted after it, so `final` is always either the old or the new
    folder, never half of one.
    """
    import shutil

    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.partial-{os.getpid()}")
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    for leftover in (tmp, old):  # from an earlier run of this process id that was killed
        if leftover.exists():
            shutil.rmtree(leftover)
    tmp.mkdir()
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        final.rename(old)
    try:
        tmp.rename(final)
    except BaseException:
        if old.exists():
            old.rename(final)
        raise
    if old.exists():
        shutil.rmtree(old)
    return final
