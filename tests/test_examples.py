"""Every script in examples/ runs with --smoke: it exits 0, prints its table, writes its PNG.

They need the test extra's matplotlib, scikit-learn and timm. The full-length statistical
claims are checked by the examples themselves (a full run exits 1 when one fails).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted(p for p in (REPO / "examples").glob("*.py") if not p.name.startswith("_"))


def test_examples_found():
    assert {p.stem for p in EXAMPLES} >= {"overfitting", "drop_rate_sweep", "drop_path"}


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.stem)
def test_example_smoke(script: Path, tmp_path: Path):
    png = tmp_path / f"{script.stem}.png"
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    r = subprocess.run(
        [sys.executable, str(script), "--smoke", "--out", str(png)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n"), f"{png} is not a PNG"
    assert "claims" in r.stdout and f"wrote {png}" in r.stdout, r.stdout
