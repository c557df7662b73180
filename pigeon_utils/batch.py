"""Run the notebooks in order with papermill: one run directory, one set of parameters.

    python -m pigeon_utils batch --preset toy --scenario sticker --run-dir runs/toy-demo

runs the main job, notebooks 01 → 07 (the playground, 08, runs when named: ``--only 08``), showing which notebook
runs, a bar over its cells and the elapsed time, and ends with the summary of notebook 07's report. Each executed
copy goes to ``<run_dir>/notebooks/<name>.ipynb`` (with its outputs and figures). A failing cell stops the batch
with a :class:`BatchError` that names the notebook, the cell and the error, and points at the executed copy, which
holds the full traceback.
"""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, Iterable

from pigeon_utils.config import resolve
from pigeon_utils.paths import REPO_ROOT

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
_NAME = re.compile(r"^(\d\d)_.+\.ipynb$")
#: the kernel's own log shows errors only: its start-up warning about unencrypted local TCP is not the notebook's
KERNEL_ARGUMENTS = ["--IPKernelApp.log_level=ERROR"]
#: notebooks made for a person at the keyboard: a batch runs them only when named
INTERACTIVE = ("08",)


class BatchError(RuntimeError):
    """A notebook of the batch failed; the message names the notebook, the cell and the error."""


def list_notebooks(notebook_dir: Path = NOTEBOOK_DIR, only: Iterable[str] | None = None) -> list[Path]:
    """The numbered notebooks (``NN_name.ipynb``) in order; `only` selects by number or name (``"01"``)."""
    books = sorted(p for p in Path(notebook_dir).glob("*.ipynb") if _NAME.match(p.name))
    if only:
        wanted = [str(w) for w in only]
        chosen = [p for p in books if any(p.name.startswith(w) or p.stem == w for w in wanted)]
        unknown = [w for w in wanted if not any(p.name.startswith(w) or p.stem == w for p in books)]
        if unknown:
            raise ValueError(f"no notebook matches {unknown} in {notebook_dir}; have {[p.name for p in books]}")
        return chosen
    return books


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s:02d} s" if m else f"{s} s"


def run_batch(preset: str = "toy", scenario: str = "sticker", run_dir: str | Path | None = None,
              only: Iterable[str] | None = None, parameters: dict[str, Any] | None = None,
              notebook_dir: Path = NOTEBOOK_DIR, kernel_name: str | None = None,
              log_output: bool = False, progress: bool = False) -> list[Path]:
    """Execute the notebooks in order into ``<run_dir>/notebooks/`` and return the executed copies.

    `parameters` are passed to every notebook in addition to ``preset``, ``scenario`` and ``run_dir``. Without
    `only`, every numbered notebook but the :data:`INTERACTIVE` ones runs. `progress`: a bar over each notebook's
    cells (the command line shows it).
    """
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    cfg = resolve(preset=preset, scenario=scenario, run_dir=run_dir)
    out_dir = cfg.run_dir / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    params = {"preset": cfg.preset, "scenario": cfg.scenario, "run_dir": str(cfg.run_dir), **(parameters or {})}
    books = list_notebooks(notebook_dir, only)
    if not only:
        books = [p for p in books if p.name[:2] not in INTERACTIVE]
    if not books:
        raise BatchError(f"no numbered notebooks (NN_name.ipynb) found in {notebook_dir}")
    done, start = [], time.perf_counter()
    for k, nb in enumerate(books, 1):
        out = out_dir / nb.name
        t0 = time.perf_counter()
        print(f"[batch {k}/{len(books)}] {nb.name} -> {out}", flush=True)
        try:
            pm.execute_notebook(str(nb), str(out), parameters=params, cwd=str(nb.parent), kernel_name=kernel_name,
                                progress_bar=progress and not log_output, log_output=log_output,
                                extra_arguments=KERNEL_ARGUMENTS)
        except PapermillExecutionError as e:
            src = "\n".join("      " + line for line in (e.source or "").splitlines()[:12])
            raise BatchError(f"{nb.name} failed in cell {e.cell_index} (execution count {e.exec_count}): "
                             f"{e.ename}: {e.evalue}\n    cell source:\n{src}\n    executed copy with the full "
                             f"traceback: {out}") from None
        now = time.perf_counter()
        print(f"[batch {k}/{len(books)}] {nb.name} done in {_clock(now - t0)} (elapsed {_clock(now - start)})",
              flush=True)
        done.append(out)
    return done
