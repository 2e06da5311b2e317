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
