"""The papermill batch runner and the notebooks' committed form."""
from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

from conftest import NOTEBOOK_PREREQUISITES, NOTEBOOK_SMOKE

from pigeon_utils.batch import BatchError, list_notebooks, run_batch

REPO = Path(__file__).resolve().parents[1]


def test_notebooks_are_committed_clean_with_a_parameters_cell():
    books = list_notebooks()
    assert books and books[0].name == "01_data_exploration.ipynb"
    for nb_path in books:
        nb = json.loads(nb_path.read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert "parameters" in code[0]["metadata"].get("tags", []), nb_path.name
        assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), nb_path.name
        src = "".join(code[0]["source"])
        for p in ("preset", "scenario", "run_dir", "data_dir", "checkpoint_dir", "seed", "device", "max_samples"):
            assert f"{p} =" in src, (nb_path.name, p)


def test_every_notebook_has_smoke_parameters():
    assert sorted(p.name[:2] for p in list_notebooks()) == sorted(NOTEBOOK_SMOKE)


def _figures(path) -> list:
    nb = nbformat.read(path, as_version=4)
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]


@pytest.mark.parametrize("number", [n for n in sorted(NOTEBOOK_SMOKE)
                                    if n != "01" and n not in NOTEBOOK_PREREQUISITES])
def test_notebook_runs_in_toy_mode(tmp_path, number):
    scenario = "movie" if number == "03" else "sticker"
    outs = run_batch("toy", scenario, tmp_path / "run", only=[number], parameters=NOTEBOOK_SMOKE[number])
    assert _figures(outs[0]), f"notebook {number} showed no figure"


def test_the_stages_run_in_a_chain_in_toy_mode(tmp_path):
    """03 → 04 → 05 → 07 in one run directory, each reading what the ones before wrote (smoke sizes)."""
    chained = sorted(set(NOTEBOOK_PREREQUISITES) | {n for v in NOTEBOOK_PREREQUISITES.values() for n in v})
    for number in chained:
        outs = run_batch("toy", "sticker", tmp_path / "run", only=[number], parameters=NOTEBOOK_SMOKE[number])
        assert _figures(outs[0]), f"notebook {number} showed no figure"
    assert (tmp_path / "run" / "preference" / "train" / "pairs.json").is_file()
    # 04 swept Stage 1 into the run's shared folder, the one 07 reads for the same settings: one folder per split
    pairs = json.loads((tmp_path / "run" / "preference" / "valid" / "pairs.json").read_text())
    shared = list((tmp_path / "run" / "sweeps" / "stage1").glob("valid-*"))
    assert len(shared) == 1, shared
    index = json.loads((shared[0] / "index.json").read_text())
    assert index["config"] == pairs["settings"]["sweep_config"] and len(index["samples"]) == 2
    assert (tmp_path / "run" / "dpo" / "best" / "pigeon_model.json").is_file()
    report = json.loads((tmp_path / "run" / "report" / "metrics.json").read_text())
    assert [c["claim"] for c in report["claims"]] == [1, 2, 3]
    assert {r["condition"] for r in report["rows"]} == {"pre-trained", "Stage 1", "Stage 2", "random masks", "no masks"}
    assert (tmp_path / "run" / "report" / "bars.png").is_file()


@pytest.mark.parametrize("scenario", ["sticker", "movie"])
def test_notebook_01_runs_in_toy_mode(tmp_path, scenario):
    outs = run_batch("toy", scenario, tmp_path / "run", only=["01"], parameters=NOTEBOOK_SMOKE["01"])
    nb = nbformat.read(outs[0], as_version=4)
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 4
    stats = json.loads((tmp_path / "run" / "01_data" / "stats.json").read_text())
    assert stats["scenario"] == scenario and stats["samples"]["train"] > 0
    assert (tmp_path / "run" / "01_data" / "sample.png").stat().st_size > 1000


def test_failure_names_notebook_and_cell(tmp_path):
    nb_dir = tmp_path / "nbs"
    nb_dir.mkdir()
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("preset = 'toy'\nscenario = 'sticker'\nrun_dir = ''", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("x = 1"),
        nbformat.v4.new_code_cell("raise ValueError('boom in cell three')"),
    ])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, nb_dir / "01_fails.ipynb")
    nbformat.write(nb, nb_dir / "02_never_runs.ipynb")
    with pytest.raises(BatchError) as e:
        run_batch("toy", "sticker", tmp_path / "run", notebook_dir=nb_dir)
    msg = str(e.value)
    assert "01_fails.ipynb failed in cell" in msg and "ValueError: boom in cell three" in msg
    assert str(tmp_path / "run" / "notebooks" / "01_fails.ipynb") in msg
    assert not (tmp_path / "run" / "notebooks" / "02_never_runs.ipynb").exists()
    with pytest.raises(ValueError, match="no notebook matches"):
        list_notebooks(nb_dir, only=["07"])
