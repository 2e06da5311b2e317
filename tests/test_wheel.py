"""The wheel: ``FUSED_DROPOUT_AOT=1 pip wheel --no-build-isolation .`` (CPU only here).

It holds every CPU path, and installed with pip into a fresh venv (torch from this environment
by a .pth file) it imports with no compiler, ninja or nvcc on PATH and builds nothing; its
kernels give this build's bits on every path; ``python -m fused_dropout`` reports it. Slow:
building the wheel compiles the extension (1-2 minutes on 2 idle cores).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from fused_dropout import ops

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
from helpers import assert_avx_only_in_capability_code, assert_bitwise  # noqa: E402

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of what it is made of (the checkout stays untouched)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in"):
        shutil.copy(REPO / name, src / name)
    junk = shutil.ignore_patterns("__pycache__", "*.so", "_C_build_info.json", "csrc")
    shutil.copytree(REPO / "fused_dropout", src / "fused_dropout", ignore=junk)
    shutil.copytree(REPO / "csrc", src / "csrc", ignore=shutil.ignore_patterns(".*", "*.o"))
    env = {**os.environ, "FUSED_DROPOUT_AOT": "1", "FUSED_DROPOUT_BUILD_CUDA": "0"}
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps"]
    r = subprocess.run(
        [*cmd, "-w", str(root / "dist"), str(src)], env=env, capture_output=True, text=True
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    (found,) = (root / "dist").glob("fused_dropout-*.whl")
    return found


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed by pip; torch comes from this environment."""
    root = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # after the venv's own site-packages: the installed wheel comes first
    (Path(site) / "shared_torch.pth").write_text(str(Path(torch.__file__).parent.parent) + "\n")
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps"]
    r = subprocess.run([*install, "--no-index", str(wheel)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return root


def run_without_compiler(venv: Path, args: list[str], tmp_path: Path):
    """Run the venv's python where no compiler could be found: PATH holds the venv only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FUSED_DROPOUT_", "CUDA_"))}
    env.update(
        PATH=str(venv / "bin"),
        CXX=str(tmp_path / "no-c++"),
        CUDA_HOME=str(tmp_path / "no-cuda"),
        TORCH_EXTENSIONS_DIR=str(tmp_path / "extensions"),
    )
    r = subprocess.run(
        [str(venv / "bin" / "python"), *args], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert shutil.which("c++", path=env["PATH"]) is None and not (tmp_path / "extensions").exists()
    return r


def test_wheel_holds_the_library_with_every_cpu_path_and_the_sources(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    libs = [n for n in names if n.startswith("fused_dropout/_C") and n.endswith(".so")]
    assert len(libs) == 1, sorted(names)
    assert b".debug_info" not in zipfile.ZipFile(wheel).read(libs[0])  # -g0: no debug info
    info = json.loads(zipfile.ZipFile(wheel).read("fused_dropout/_C_build_info.json"))
    assert info["cpu_capabilities"] == ops.cpu_capabilities() and info["with_cuda"] is False
    assert info["torch"] == torch.__version__
    loader = {f"fused_dropout/_loader/{m}.py" for m in ("__init__", "config", "report", "jit")}
    assert loader | {"fused_dropout/__main__.py", "fused_dropout/csrc/cpu/capability.h"} <= names


# Runs in the venv: imports the package, checks what was loaded and writes every CPU path's
# output of one op call for the test to compare with this process's build.
IMPORT = r"""
import json, sys, time
t = time.perf_counter()
import fused_dropout
seconds = time.perf_counter() - t
import torch
from fused_dropout import _loader, ops
x = torch.randn(4099, 9, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
outputs = {}
for path in [c for c in ops.cpu_capabilities() if not ops.cpu_capability_missing(c)]:
    ops.set_cpu_capability(path)
    outputs[path] = ops.dropout(x, 0.3, seed_offset=(2024, 8))[0]
torch.save({"x": x, "outputs": outputs}, sys.argv[1])
loaded = _loader.loaded()
print(json.dumps({"seconds": seconds, "package": fused_dropout.__file__,
                  "kind": loaded.plan.kind, "library": str(loaded.plan.path)}))
"""


def test_wheel_imports_with_no_compiler_builds_nothing_and_gives_the_same_bits(venv, tmp_path):
    out_file = tmp_path / "outputs.pt"
    r = run_without_compiler(venv, ["-c", IMPORT, str(out_file)], tmp_path)
    assert r.returncode == 0 and r.stderr == "", r.stderr  # nothing built, nothing said
    data = json.loads(r.stdout)
    assert data["kind"] == "prebuilt" and data["package"].startswith(str(venv))
    saved = torch.load(out_file)
    assert sorted(saved["outputs"]) == sorted(
        c for c in ops.cpu_capabilities() if not ops.cpu_capability_missing(c)
    )
    expected = ops.dropout(saved["x"], 0.3, seed_offset=(2024, 8))[0]  # this build's
    for path, y in saved["outputs"].items():
        assert_bitwise(y, expected, f"wheel, CPU path {path}")
    if shutil.which("objdump") and len(ops.cpu_capabilities()) > 1:
        assert_avx_only_in_capability_code(data["library"])


def test_report_of_the_installed_wheel(venv, tmp_path):
    r = run_without_compiler(venv, ["-m", "fused_dropout"], tmp_path)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    built_for = f"for torch {torch.__version__} (CUDA {torch.version.cuda})"
    assert f"extension: prebuilt (FUSED_DROPOUT_AOT=1 build or wheel) {built_for}" in r.stdout
    assert f"paths built: {', '.join(ops.cpu_capabilities())}\n" in r.stdout
    assert "CUDA kernels built: no; archs: -" in r.stdout
