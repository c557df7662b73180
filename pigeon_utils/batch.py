"""Run the notebooks in order with papermill: one run directory, one set of parameters.

    python -m pigeon_utils batch --preset toy --scenario sticker --run-dir runs/toy-demo

Each executed copy goes to ``<run_dir>/notebooks/<name>.ipynb`` (with its outputs and figures). A failing
cell stops the batch with a :class:`BatchError` that names the notebook, the cell and the error, and points at
the executed copy, which holds the full traceback.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable

from pigeon_utils.config import resolve
from pigeon_utils.paths import REPO_ROOT

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
_NAME = re.compile(r"^(\d\d)_.+\.ipynb$")


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


def run_batch(preset: str = "toy", scenario: str = "sticker", run_dir: str | Path | None = None,
              only: Iterable[str] | None = None, parameters: dict[str, Any] | None = None,
              notebook_dir: Path = NOTEBOOK_DIR, kernel_name: str | None = None,
              log_output: bool = False) -> list[Path]:
    """Execute the notebooks in order into ``<run_dir>/notebooks/`` and return the executed copies.

    `parameters` are passed to every notebook in addition to ``preset``, ``scenario`` and ``run_dir``.
    """
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    cfg = resolve(preset=preset, scenario=scenario, run_dir=run_dir)
    out_dir = cfg.run_dir / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    params = {"preset": cfg.preset, "scenario": cfg.scenario, "run_dir": str(cfg.run_dir), **(parameters or {})}
    books = list_notebooks(notebook_dir, only)
    if not books:
        raise BatchError(f"no numbered notebooks (NN_name.ipynb) found in {notebook_dir}")
    done = []
    for nb in books:
        out = out_dir / nb.name
        print(f"[batch] {nb.name} -> {out}", flush=True)
        try:
            pm.execute_notebook(str(nb), str(out), parameters=params, cwd=str(nb.parent), kernel_name=kernel_name,
                                progress_bar=False, log_output=log_output)
        except PapermillExecutionError as e:
            src = "\n".join("      " + line for line in (e.source or "").splitlines()[:12])
            raise BatchError(f"{nb.name} failed in cell {e.cell_index} (execution count {e.exec_count}): "
                             f"{e.ename}: {e.evalue}\n    cell source:\n{src}\n    executed copy with the full "
                             f"traceback: {out}") from None
        done.append(out)
    return done
