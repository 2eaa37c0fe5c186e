"""The package's layers (CONTRIBUTING "Layout"): each imports only from those below it,
and no module imports itself back through others.

The layer contracts live in ``pyproject.toml`` (``[tool.importlinter]``) and are checked by
import-linter's ``lint-imports``; cycles are found on the import graph it builds (grimp),
lazy imports inside functions included.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = [
    sys.executable, "-c", "from importlinter.cli import lint_imports_command as c; c()"
]  # fmt: skip


def lint_imports(config: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run(
        [*LINT_IMPORTS, "--no-cache", "--config", str(config)],
        cwd=config.parent, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_layer_contracts_are_kept():
    result = lint_imports(ROOT / "pyproject.toml")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_an_upward_import_breaks_the_contracts(tmp_path):
    """The contracts have teeth: the model importing from the command line fails them."""
    shutil.copytree(ROOT / "pyramidflow", tmp_path / "pyramidflow")
    shutil.copytree(ROOT / "kernels", tmp_path / "pyramidflow_kernels")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(tmp_path / "pyramidflow" / "model" / "flow.py", "a") as handle:
        handle.write("\nfrom ..cli.common import PROG  # noqa: E402, F401\n")
    result = lint_imports(tmp_path / "pyproject.toml", pythonpath=tmp_path)
    assert result.returncode != 0
    assert "pyramidflow.model.flow -> pyramidflow.cli.common" in result.stdout


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one member."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


@pytest.mark.parametrize("package", ["pyramidflow", "pyramidflow_kernels"])
def test_no_import_cycles(package):
    graph = grimp.build_graph(package, cache_dir=None)
    # a package's __init__ re-exporting its submodules is not a cycle of the code's logic
    modules = {m for m in graph.modules if not graph.find_children(m)}
    edges = {m: graph.find_modules_directly_imported_by(m) & modules for m in modules}
    assert strongly_connected(edges) == []


def test_cycle_finder_finds_a_cycle():
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
