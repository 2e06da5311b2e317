"""Lint and format checks (ruff for Python, clang-format for csrc/), skipped if a tool is absent.

Both tools come with the `test` extra (pip install -e '.[test]'). To fix what they report:
``ruff check --fix .`` and ``clang-format -i csrc/**/*.{h,cpp,cu,cuh}``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CSRC_PATTERNS = ("*.h", "*.hpp", "*.cpp", "*.cu", "*.cuh")


def _tool(name: str) -> str | None:
    """On PATH, or beside this interpreter (a venv used without activating it)."""
    found = shutil.which(name)
    if found:
        return found
    local = Path(sys.executable).parent / name
    return str(local) if local.is_file() else None


def test_ruff_check():
    ruff = _tool("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install ruff)")
    r = subprocess.run([ruff, "check", "."], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_clang_format():
    clang_format = _tool("clang-format")
    if clang_format is None:
        pytest.skip("clang-format is not installed (pip install clang-format)")
    files = sorted({str(p) for pat in CSRC_PATTERNS for p in (REPO / "csrc").rglob(pat)})
    if not files:
        pytest.skip("no C++/CUDA sources")
    r = subprocess.run(
        [clang_format, "--dry-run", "--Werror", *files], cwd=REPO, capture_output=True, text=True
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-20000:]


def _package_imports() -> dict[str, set[str]]:
    """Module of fused_dropout -> the package's modules it imports (at any depth of its code)."""
    import ast

    graph = {}
    for path in (REPO / "fused_dropout").glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "fused_dropout":
                deps |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "fused_dropout."
            ):
                deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps |= {
                    a.name.split(".")[1] for a in node.names if a.name.startswith("fused_dropout.")
                }
        graph[path.stem] = deps - {path.stem}
    return graph


def test_no_import_cycles():
    """The package's modules import each other without a cycle (lazy imports inside functions
    count too): each depends on modules below it only."""
    graph = _package_imports()
    assert {"convert", "skip", "blocks"} <= graph.keys()
    done: set[str] = set()

    def visit(name: str, stack: list[str]) -> None:
        if name in stack:
            raise AssertionError(
                "import cycle: " + " -> ".join([*stack[stack.index(name) :], name])
            )
        if name in done or name not in graph:
            return
        for dep in sorted(graph[name]):
            visit(dep, [*stack, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
