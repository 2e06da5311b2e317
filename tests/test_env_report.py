"""``python -m fused_dropout``: the environment report (fused_dropout/_loader/report.py), on a
warm cache and on a cold one, where it must build nothing. tests/test_wheel.py runs it on a
prebuilt library."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

import fused_dropout
from fused_dropout import _loader, ops

REPO = Path(__file__).resolve().parent.parent


def report(**env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, "-m", "fused_dropout"],
        cwd=REPO,
        env=full,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_report_of_the_loaded_build():
    r = report(FUSED_DROPOUT_CPU_CAPABILITY="default")
    assert r.returncode == 0 and r.stderr == "", r.stderr  # nothing built, nothing said
    out = r.stdout
    plan = _loader.plan()
    assert f"fused_dropout {fused_dropout.__version__}: {REPO / 'fused_dropout'}" in out
    assert f"torch {torch.__version__} (CUDA {torch.version.cuda})" in out
    assert "extension: JIT (compiled on the first import, then cached)" in out
    assert f"cache: {_loader.cache_root()}, key {plan.key}\n" in out
    assert f"  library: {_loader.load()}\n" in out
    assert "path in use: default (forced by FUSED_DROPOUT_CPU_CAPABILITY=default)" in out
    assert f"paths built: {', '.join(ops.cpu_capabilities())}\n" in out
    for cap in ops.cpu_capabilities():
        missing = ops.cpu_capability_missing(cap)
        assert f"    {cap}: {'lacks ' + ', '.join(missing) if missing else 'runs here'}" in out
    cuda = "yes" if _loader.built_with_cuda() else "no"
    assert re.search(rf"^CUDA kernels built: {cuda}; archs: ", out, re.MULTILINE), out
    gpus = "none" if not torch.cuda.is_available() else "GPU 0: "
    assert f"GPUs visible: {gpus}" in out
    assert "FUSED_DROPOUT_CPU_CAPABILITY=default" in out.splitlines()[-1]


def test_report_on_a_cold_cache_builds_nothing_and_says_how(tmp_path):
    cache = tmp_path / "cache"
    r = report(TORCH_EXTENSIONS_DIR=str(cache), FUSED_DROPOUT_BUILD_CUDA="0")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert not cache.exists()  # no build started, not even a lock file
    out = r.stdout
    assert re.search(r"  library: not built yet \(\S+fused_dropout_C\.so\)\n", out), out
    assert "to build it: python -c 'import fused_dropout'" in out
    assert "path: chosen when the library loads" in out
    assert "CUDA kernels built: not built yet (would be: no); archs: -" in out
    assert "why not: FUSED_DROPOUT_BUILD_CUDA=0" in out
