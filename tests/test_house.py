"""The repository's house rules, checked: one job per file (no module over 450 lines), no import cycle among
``pigeon_utils`` modules (imports inside functions count too), thin notebooks, a README that is a user's guide, the
algorithm in the repository (never cited from the developers' ``../shared``), and nothing that unpickles."""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "pigeon_utils"
MAX_MODULE_LINES = 450
MAX_NOTEBOOK_CODE_LINES = 100
MAX_README_LINES = 250


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The package modules a file imports anywhere in it (module level or inside functions). ``from a import b``
    counts as importing ``a.b`` when that is a module, else ``a``; relative imports are resolved."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):  # `if TYPE_CHECKING:` imports count too
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        out.update(t for t in targets if t in known and t != name)
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (cyc := visit(n)):
                return cyc
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cyc := visit(m)):
            return cyc
    return None


def test_no_module_is_over_the_line_limit():
    long = {n: len(p.read_text().splitlines()) for n, p in modules().items()}
    assert {n: k for n, k in long.items() if k > MAX_MODULE_LINES} == {}


def test_no_import_cycle_among_package_modules():
    mods = modules()
    graph = {n: imported_modules(p, set(mods)) for n, p in mods.items()}
    assert graph["pigeon_utils.worlds"], "the import walk found nothing: it is broken"
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_imports_inside_functions_are_counted(tmp_path):
    known = {"pigeon_utils.x", "pigeon_utils.y"}
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from pigeon_utils.y import thing\n")
    pkg = PACKAGE / "_probe_for_test.py"
    try:
        pkg.write_text(f.read_text())
        assert imported_modules(pkg, known | {"pigeon_utils._probe_for_test"}) == {"pigeon_utils.y"}
    finally:
        pkg.unlink()


def notebook_code_lines(path: Path) -> int:
    nb = json.loads(path.read_text())
    lines = [line for c in nb["cells"] if c["cell_type"] == "code" for line in "".join(c["source"]).splitlines()]
    return sum(1 for line in lines if line.strip() and not line.strip().startswith("#"))


@pytest.mark.parametrize("notebook", sorted((REPO / "notebooks").glob("*.ipynb")), ids=lambda p: p.name)
def test_notebooks_are_thin(notebook):
    assert notebook_code_lines(notebook) <= MAX_NOTEBOOK_CODE_LINES


def test_readme_is_a_short_guide_with_the_two_commands_first():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= MAX_README_LINES
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    assert blocks[0].strip() == ("bash scripts/setup.sh && .venv/bin/python -m pigeon_utils batch --preset toy "
                                 "--run-dir runs/toy-demo")
    assert blocks[1].strip() == "bash scripts/setup.sh && .venv/bin/python -m pytest"
    ci = (REPO / ".ci" / "run").read_text()
    assert blocks[1].strip() in ci  # CI calls the README's test command


def _texts(*globs: str):
    for g in globs:
        for p in sorted(REPO.glob(g)):
            if p.is_file():
                yield p, p.read_text(errors="replace")


def test_the_algorithm_lives_in_the_repository():
    algo = (REPO / "docs" / "algorithm.md").read_text()
    for section in range(1, 8):
        assert re.search(rf"^## {section}\. ", algo, flags=re.M), f"docs/algorithm.md has no section {section}"
    for p, text in _texts("pigeon_utils/**/*.py", "notebooks/*.ipynb", "README.md", "bench/*.py", "docs/*.md"):
        assert "spec §" not in text, f"{p.relative_to(REPO)} cites the spec; cite docs/algorithm.md"
    for p, text in _texts("pigeon_utils/**/*.py", "notebooks/*.ipynb", "README.md"):
        assert "../shared" not in text, f"{p.relative_to(REPO)} points users at ../shared, which they do not have"


def test_nothing_unpickles():
    for p, text in _texts("pigeon_utils/**/*.py", "tests/**/*.py", "bench/*.py", "notebooks/*.ipynb", "scripts/**/*"):
        if p == Path(__file__):
            continue
        assert "weights_only=False" not in text, f"{p.relative_to(REPO)} loads with weights_only=False"
