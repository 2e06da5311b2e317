"""The CPU capability dispatch (csrc/cpu/capability.h, csrc/ops/cpu_dispatch.cpp).

What each capability's objects may contain (nm, objdump on the built library), which path
runs, forcing one, and the errors. The kernels' output on every path is compared bit for bit
with the reference by the tests marked ``cpu_paths`` (tests/conftest.py); tests/test_build.py
checks the dispatch mechanism itself on a throwaway library.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fused_dropout import _loader, ops
from fused_dropout._loader import config, cpu_kernels

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
from helpers import assert_avx_only_in_capability_code  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
NEEDS_BINUTILS = pytest.mark.skipif(
    shutil.which("nm") is None or shutil.which("objdump") is None,
    reason="needs nm and objdump (binutils)",
)
#: Defined in every object that has C++ exception tables: a pointer to the personality routine
#: (data, the same in every object), not code.
SHARED_DATA = {"DW.ref.__gxx_personality_v0"}


def runnable() -> list[str]:
    return [c for c in ops.cpu_capabilities() if not ops.cpu_capability_missing(c)]


def shared_symbols(obj: Path, capability: str) -> list[str]:
    """What ``obj`` (a kernel object of ``capability``) defines that another object could
    define too: every global, weak or unique symbol that does not name the capability's own
    namespace. The linker keeps one copy of a weak symbol for the whole library: an AVX-512
    copy of an inline function picked for generic code would crash an older CPU."""
    out = subprocess.run(
        ["nm", "--defined-only", "-C", str(obj)], capture_output=True, text=True, check=True
    ).stdout
    shared = []
    for line in out.splitlines():
        parts = line.split(None, 2)
        if len(parts) < 3:
            continue
        _, kind, name = parts
        if kind.islower() and kind not in "wvu":  # local
            continue
        if f"fused_dropout::cpu_{capability}::" in name or name in SHARED_DATA:
            continue
        shared.append(f"{kind} {name}")
    return shared


@pytest.fixture(scope="module")
def kernel_objects(tmp_path_factory) -> dict[str, list[Path]]:
    """The kernel objects of the loaded library, by capability (compiled afresh when the
    library is prebuilt, whose objects are not installed)."""
    lib = Path(_loader.load())
    objects = sorted((lib.parent / "cpu").glob("*.o"))
    caps = _loader.config.capabilities(_loader.find_source_dir(_loader.PACKAGE_DIR))
    if not objects:
        cfg = _loader.build_config(_loader.find_source_dir(_loader.PACKAGE_DIR))
        objects = cpu_kernels.compile_cpu_kernels(cfg, tmp_path_factory.mktemp("k"), False)
    by_cap = {c.name: [o for o in objects if o.suffixes[-2:] == [f".{c.name}", ".o"]] for c in caps}
    assert all(by_cap.values()) and sum(map(len, by_cap.values())) == len(objects), objects
    return by_cap


# ---------------------------------------------------------------------------------------------
# What the objects and the library contain
# ---------------------------------------------------------------------------------------------
@NEEDS_BINUTILS
def test_kernel_objects_share_no_symbol_with_other_objects(kernel_objects):
    for cap, objects in kernel_objects.items():
        for obj in objects:
            assert shared_symbols(obj, cap) == [], obj
            defined = subprocess.run(
                ["nm", "--defined-only", "-C", str(obj)], capture_output=True, text=True
            ).stdout
            assert f"fused_dropout::cpu_{cap}::" in defined, obj


@NEEDS_BINUTILS
def test_kernel_objects_use_no_torch_code(kernel_objects):
    for objects in kernel_objects.values():
        for obj in objects:
            undefined = subprocess.run(
                ["nm", "--undefined-only", "-C", str(obj)], capture_output=True, text=True
            ).stdout
            assert not re.search(r"\b(at|c10|torch)::", undefined), undefined


@NEEDS_BINUTILS
def test_the_symbol_check_catches_an_inline_function_emitted_out_of_line(tmp_path):
    """A planted violation: an inline function of a shared header (as core/ has), which the
    compiler emits out of line as a weak symbol that the AVX-512 object and generic code could
    share (noinline stands for "too big to inline")."""
    src = tmp_path / "planted.cpp"
    src.write_text(
        "#include <cstdint>\n"
        "namespace fused_dropout {\n"
        "inline __attribute__((noinline)) int64_t shared_helper(int64_t x) { return 3 * x; }\n"
        "namespace FD_CPU_NS {\n"
        "int64_t planted(int64_t n) { return shared_helper(n); }\n"
        "}}\n"
    )
    cfg = _loader.build_config(_loader.find_source_dir(_loader.PACKAGE_DIR))
    cap = cfg.cpu_capabilities[-1]
    obj = tmp_path / f"planted.{cap.name}.o"
    cmd = [cfg.cxx, *cfg.kernel_flags, *cap.flags, "-c", str(src), "-o", str(obj)]
    subprocess.run(cmd, check=True)
    assert shared_symbols(obj, cap.name) == ["W fused_dropout::shared_helper(long)"]


@NEEDS_BINUTILS
@pytest.mark.skipif(len(ops.cpu_capabilities()) == 1, reason="x86-64 only (AVX2, AVX-512)")
def test_only_capability_code_in_the_library_uses_avx():
    assert_avx_only_in_capability_code(_loader.load())


# ---------------------------------------------------------------------------------------------
# Which path runs
# ---------------------------------------------------------------------------------------------
def test_the_library_and_the_loader_read_one_capability_table():
    src = _loader.find_source_dir(_loader.PACKAGE_DIR)
    assert ops.cpu_capabilities() == [c.name for c in config.capabilities(src)]


def test_the_best_runnable_path_runs_and_each_runnable_one_can_be_chosen():
    paths = runnable()
    assert paths[0] == "default"
    if not os.environ.get("FUSED_DROPOUT_CPU_CAPABILITY"):
        assert ops.cpu_capability() == paths[-1]
    start = ops.cpu_capability()
    try:
        for path in paths:
            ops.set_cpu_capability(path)
            assert ops.cpu_capability() == path
            x = torch.ones(1000)
            y, _ = ops.dropout(x, 0.5, seed_offset=(1, 0))
            assert set(y.unique().tolist()) <= {0.0, 2.0}
    finally:
        ops.set_cpu_capability(start)


def test_a_path_the_cpu_cannot_run_is_refused_with_what_it_lacks(monkeypatch):
    monkeypatch.setenv("FUSED_DROPOUT_CPU_HIDE", "avx512bw,avx512vl,f16c")
    start = ops.cpu_capability()
    if len(ops.cpu_capabilities()) > 1:
        assert {"f16c", "avx512bw", "avx512vl"} <= set(ops.cpu_capability_missing("avx512"))
        assert ops.cpu_capability_missing("avx2") == ["f16c"]
        with pytest.raises(RuntimeError) as info:
            ops.set_cpu_capability("avx512")
        assert re.search(
            r"set_cpu_capability\('avx512'\): this CPU lacks [^;]*avx512bw[^;]*, which that path "
            r"needs; it can run default\. Fix: choose one of those",
            str(info.value),
        ), str(info.value)
    with pytest.raises(RuntimeError, match="no such CPU capability; fused_dropout has default"):
        ops.set_cpu_capability("sse9")
    assert ops.cpu_capability() == start  # nothing changed


def _import_with(**env: str) -> subprocess.CompletedProcess:
    code = "import fused_dropout; print(fused_dropout.ops.cpu_capability())"
    full = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=full, capture_output=True, text=True
    )


def test_environment_forces_a_lower_path_at_load():
    r = _import_with(FUSED_DROPOUT_CPU_CAPABILITY="default")
    assert r.returncode == 0 and r.stdout.split() == ["default"], r.stderr


@pytest.mark.skipif(len(ops.cpu_capabilities()) == 1, reason="x86-64 only (AVX2, AVX-512)")
def test_environment_asking_more_than_the_cpu_has_fails_the_import_with_the_reason():
    r = _import_with(FUSED_DROPOUT_CPU_CAPABILITY="avx512", FUSED_DROPOUT_CPU_HIDE="avx512bw")
    assert r.returncode != 0
    assert re.search(
        r"BuildError: FUSED_DROPOUT_CPU_CAPABILITY=avx512: this CPU lacks [^;]*avx512bw[^;]*, "
        r"which that path needs; it can run default, avx2\. Fix: set it to one of those, or "
        r"unset it",
        r.stderr,
    ), r.stderr
    # without forcing, the best path it has runs
    r = _import_with(FUSED_DROPOUT_CPU_HIDE="avx512bw")
    assert r.returncode == 0 and r.stdout.split() == ["avx2"], r.stderr
