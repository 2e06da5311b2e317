"""Tests of the JIT loader (fused_dropout/_loader/); none needs a GPU.

Most tests build a tiny throwaway TORCH_LIBRARY source tree (namespace ``fd_loader_test``) in a
temp dir, into a fresh TORCH_EXTENSIONS_DIR, in a subprocess: they do not depend on the real
csrc/ (but for its CPU capability table) and never load a second library into the pytest
process. The loader package is imported from its directory, so importing it does not run the
package's ``__init__`` (which builds csrc/).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
LOADER_DIR = REPO / "fused_dropout" / "_loader"


def _import_loader():
    name = "fused_dropout_loader_under_test"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, LOADER_DIR / "__init__.py", submodule_search_locations=[str(LOADER_DIR)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


L = _import_loader()
X86 = len(L.config.capabilities(REPO / "csrc")) > 1

HAS_CUDA_TOOLKIT = bool(torch.version.cuda) and L.find_cuda_home() is not None

# ---------------------------------------------------------------------------------------------
# A throwaway extension with the real layout: ops.cpp, a CPU kernel file and its header
# (compiled per CPU capability, with the real cpu/capability.h), cuda/*.cu, a header.
# ---------------------------------------------------------------------------------------------
OPS_CPP = r"""
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "common.h"
#include "cpu/marker.h"

#ifdef FUSED_DROPOUT_WITH_CUDA
int64_t fdlt_cuda_marker();
#endif

namespace fused_dropout {
static int g_capability = 0;
int cpu_capability_index() { return g_capability; }
void cpu_parallel_for(int64_t begin, int64_t end, int64_t grain,
                      void (*body)(void*, int64_t, int64_t), void* ctx) {
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) { body(ctx, b, e); });
}
}  // namespace fused_dropout

// cpu_marker() of the first n capabilities' objects, in the table's order (n: those this CPU
// runs; an AVX-512 object dies of SIGILL on an AVX2 CPU).
static std::vector<int64_t> cpu_markers(int64_t n) {
  std::vector<int64_t> out;
#define FDLT_ROW(cap, extensions, ...) out.push_back(0);
  FD_CPU_CAPABILITIES(FDLT_ROW, _)
  out.resize(std::min<size_t>(out.size(), static_cast<size_t>(n)));
  for (size_t i = 0; i < out.size(); ++i) {
    fused_dropout::g_capability = static_cast<int>(i);
    out[i] = fused_dropout::cpu_marker();
  }
  fused_dropout::g_capability = 0;
  return out;
}

static int64_t with_cuda() {
#ifdef FUSED_DROPOUT_WITH_CUDA
  return fdlt_cuda_marker();
#else
  return 0;
#endif
}

static at::Tensor twice(const at::Tensor& x) { return x * FDLT_FACTOR; }

TORCH_LIBRARY(fd_loader_test, m) {
  m.def("twice(Tensor x) -> Tensor", &twice);
  m.def("with_cuda() -> int", &with_cuda);
  m.def("cpu_markers(int n) -> int[]", &cpu_markers);
}
"""
COMMON_H = "#pragma once\n#define FDLT_FACTOR 2\n"
MARKER_H = r"""
#pragma once
#include <cstdint>

#include "cpu/capability.h"

namespace fused_dropout {
FD_CPU_KERNEL(cpu_marker, int64_t())
}
"""
# 10 x (1, + 2 with AVX2, + 4 with AVX-512 F and BW), summed over a parallel loop.
MARKER_CPP = r"""
#include "cpu/marker.h"

namespace fused_dropout {
namespace FD_CPU_NS {
int64_t cpu_marker() {
  int64_t isa = 1;
#ifdef __AVX2__
  isa += 2;
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__)
  isa += 4;
#endif
  int64_t parts[10] = {};
  parallel_for(0, 10, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) parts[i] = isa;
  });
  int64_t sum = 0;
  for (int64_t v : parts) sum += v;
  return sum;
}
}  // namespace FD_CPU_NS
}  // namespace fused_dropout
"""
#: cpu_markers() of the throwaway library: each capability's object, compiled for its ISA.
#: The driver calls those this CPU runs (RUNNABLE: the table's rows, lowest first, whose ISA
#: extensions /proc/cpuinfo lists); on an AVX2-only CPU the AVX-512 object is built, not run.
CPU_MARKERS = [10, 30, 70] if X86 else [10]
_CPU_EXTENSIONS = set(importlib.import_module(L.__name__ + ".report")._cpuinfo_extensions())
RUNNABLE = sum(
    1 for c in L.config.capabilities(REPO / "csrc") if set(c.extensions) <= _CPU_EXTENSIONS
)
KERNEL_CU = r"""
#ifndef FUSED_DROPOUT_WITH_CUDA
#error "FUSED_DROPOUT_WITH_CUDA is not defined for nvcc"
#endif
#include <cstdint>

#include "common.h"

__global__ void fdlt_kernel(float* x) { x[threadIdx.x] *= FDLT_FACTOR; }
int64_t fdlt_cuda_marker() { return 42; }
"""

# Loads the throwaway library in a fresh interpreter and reports on it as JSON (stdout only).
DRIVER = r"""
import importlib.util, json, os, sys, time
import torch
loader_path, src, runnable = sys.argv[1], sys.argv[2], int(sys.argv[3])
spec = importlib.util.spec_from_file_location(
    "fdl_driver", os.path.join(loader_path, "__init__.py"),
    submodule_search_locations=[loader_path])
L = importlib.util.module_from_spec(spec)
sys.modules["fdl_driver"] = L
spec.loader.exec_module(L)
t0 = time.perf_counter()
path = L.load(src)
dt = time.perf_counter() - t0
ops = torch.ops.fd_loader_test
cpp_ext = sys.modules.get("torch.utils.cpp_extension")
print(json.dumps({
    "path": path, "seconds": dt, "built_with_cuda": L.built_with_cuda(src),
    "twice": ops.twice(torch.ones(2)).tolist(), "with_cuda": ops.with_cuda(),
    "cpu_markers": ops.cpu_markers(runnable), "CUDA_HOME": os.environ.get("CUDA_HOME"),
    "cpp_extension_CUDA_HOME": getattr(cpp_ext, "CUDA_HOME", None),
    "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST"),
}))
"""

BUILDING_RE = re.compile(
    r"^fused_dropout: building the extension \((?P<what>[^)]*)\) in (?P<dir>\S+); "
    r"first import only\.\.\.$",
    re.MULTILINE,
)
BUILT_RE = re.compile(r"^fused_dropout: built in \d+\.\d s$", re.MULTILINE)


def write_sources(root: Path, *, ops_cpp: str = OPS_CPP) -> Path:
    (root / "cpu").mkdir(parents=True)
    (root / "cuda").mkdir()
    (root / "ops.cpp").write_text(ops_cpp)
    (root / "common.h").write_text(COMMON_H)
    (root / "cpu" / "marker.h").write_text(MARKER_H)
    (root / "cpu" / "marker.cpp").write_text(MARKER_CPP)
    shutil.copy(REPO / "csrc" / "cpu" / "capability.h", root / "cpu" / "capability.h")
    (root / "cuda" / "kernel.cu").write_text(KERNEL_CU)
    return root


def child_env(cache: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["TORCH_EXTENSIONS_DIR"] = str(cache)
    env["FUSED_DROPOUT_BUILD_CUDA"] = "0"
    env.pop("FUSED_DROPOUT_VERBOSE", None)
    env.update(extra)
    return env


def driver_cmd(src: Path) -> list[str]:
    return [sys.executable, "-c", DRIVER, str(LOADER_DIR), str(src), str(RUNNABLE)]


def run_driver(src: Path, env: dict[str, str], timeout: float = 900):
    r = subprocess.run(driver_cmd(src), env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    return json.loads(r.stdout), r.stderr


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """In-process loader calls: a fresh cache, CPU-only, no verbose; returns the sources."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FUSED_DROPOUT_BUILD_CUDA", "0")
    monkeypatch.delenv("FUSED_DROPOUT_VERBOSE", raising=False)
    return write_sources(tmp_path / "src")


@pytest.fixture(scope="session")
def cpu_build(tmp_path_factory):
    """One cold CPU-only build of the throwaway sources (about 15 s)."""
    root = tmp_path_factory.mktemp("cpu_build")
    src, cache = write_sources(root / "src"), root / "cache"
    env = child_env(cache)
    data, stderr = run_driver(src, env)
    return src, cache, env, data, stderr


# ---------------------------------------------------------------------------------------------
# The cache key (unit tests: nothing is compiled)
# ---------------------------------------------------------------------------------------------
def test_cache_key_follows_every_source_and_header(isolated):
    src = isolated
    cfg = L.build_config(src)
    k0 = L.cache_key(cfg)
    assert re.fullmatch(r"[0-9a-f]{16}", k0)
    assert L.cache_key(L.build_config(src)) == k0  # deterministic

    original = (src / "ops.cpp").read_text()
    (src / "ops.cpp").write_text(original + "\n// an edit\n")
    k1 = L.cache_key(cfg)
    (src / "ops.cpp").write_text(original)
    assert L.cache_key(cfg) == k0

    (src / "common.h").write_text(COMMON_H.replace("2", "3"))  # a header
    k2 = L.cache_key(cfg)
    (src / "common.h").write_text(COMMON_H)

    (src / "core").mkdir()
    (src / "core" / "new.h").write_text("#pragma once\n")  # a new file
    k3 = L.cache_key(cfg)
    shutil.rmtree(src / "core")

    (src / "cuda" / "kernel.cu").write_text(KERNEL_CU + "\n")  # CUDA sources, even CPU-only
    k4 = L.cache_key(cfg)
    (src / "cuda" / "kernel.cu").write_text(KERNEL_CU)

    assert len({k0, k1, k2, k3, k4}) == 5
    (src / ".ops.cpp.swp").write_text("editor junk")
    assert L.cache_key(cfg) == k0


def test_cache_key_follows_flags_archs_and_cpu_capabilities(isolated, monkeypatch):
    base = L.build_config(isolated)
    assert base.with_cuda is False and base.arch_desc == ""
    fewer = base.cpu_capabilities[:-1] or (L.config.CpuCapability("other", ("sse4.2",)),)
    variants = [
        dataclasses.replace(base, cflags=base.cflags + ("-DEXTRA",)),
        dataclasses.replace(base, cflags=L.config.OPT_FLAGS),
        dataclasses.replace(base, cuda_cflags=("-O2",)),
        dataclasses.replace(base, ldflags=()),
        dataclasses.replace(base, kernel_flags=base.kernel_flags + ("-DEXTRA",)),
        dataclasses.replace(base, cpu_capabilities=fewer),
        dataclasses.replace(base, with_cuda=True, arch_desc="8.0;9.0+PTX"),
        dataclasses.replace(base, with_cuda=True, arch_desc="8.0"),
    ]
    keys = {L.cache_key(base)} | {L.cache_key(v) for v in variants}
    assert len(keys) == len(variants) + 1
    # Not the CPU: a build carries every path and picks one when it loads, so one build in a
    # home directory serves nodes with different CPUs, whatever path each of them runs.
    key = L.cache_key(base)
    monkeypatch.setenv("FUSED_DROPOUT_CPU_CAPABILITY", "default")
    monkeypatch.setenv("FUSED_DROPOUT_CPU_HIDE", "avx2,avx512f")
    assert L.cache_key(L.build_config(isolated)) == key


@pytest.mark.skipif(not HAS_CUDA_TOOLKIT, reason="needs a CUDA build of torch and nvcc")
def test_cuda_config_and_arch_list(isolated, monkeypatch):
    monkeypatch.setenv("FUSED_DROPOUT_BUILD_CUDA", "1")
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    cfg = L.build_config(isolated)
    assert cfg.with_cuda and cfg.cuda_home == L.find_cuda_home()
    assert L.config.CUDA_DEFINE in cfg.cflags and L.config.CUDA_DEFINE in cfg.cuda_cflags
    assert "--use_fast_math" not in cfg.cuda_cflags
    if not torch.cuda.is_available():
        assert cfg.arch_list == cfg.arch_desc == L.config.DEFAULT_CUDA_ARCH_LIST
        wheel = L.build_config(isolated, wheel=True)
        assert wheel.arch_list == wheel.arch_desc == L.config.WHEEL_CUDA_ARCH_LIST
    keys = {L.cache_key(cfg)}
    for archs in ("8.0", "9.0", "8.0;9.0"):
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", archs)
        cfg = L.build_config(isolated)
        assert cfg.arch_desc == archs and cfg.arch_list is None  # honoured, env left alone
        keys.add(L.cache_key(cfg))
    assert len(keys) == 4


def test_flags(isolated):
    C = L.config
    for flag in ("-O3", "-ffp-contract=off"):
        assert flag in C.CXX_FLAGS and flag in C.KERNEL_FLAGS
    assert "-fopenmp" in C.CXX_FLAGS and "-fopenmp" in C.LD_FLAGS
    cfg = L.build_config(isolated)
    assert cfg.cflags == C.CXX_FLAGS and cfg.kernel_flags[: len(C.KERNEL_FLAGS)] == C.KERNEL_FLAGS
    # setuptools adds Python's CFLAGS (-g): the wheel's build drops the debug info again
    assert L.build_config(isolated, wheel=True).cflags == C.CXX_FLAGS + ("-g0",)
    every = cfg.cflags + cfg.kernel_flags + C.NVCC_FLAGS
    every += sum((c.flags for c in cfg.cpu_capabilities), ())
    assert not any("fast_math" in f or "fast-math" in f for f in every)
    # nothing is compiled for the build machine's CPU
    assert not any(f.startswith(("-march", "-mtune", "-mcpu")) for f in every)
    caps = {c.name: set(c.flags) for c in cfg.cpu_capabilities}
    assert list(caps) == (["default", "avx2", "avx512", "avx512bf16"] if X86 else ["default"])
    assert caps["default"] == {"-DFD_CPU_NS=cpu_default"}
    if X86:
        assert {"-mavx2", "-mfma", "-mbmi2", "-DFD_CPU_NS=cpu_avx2"} <= caps["avx2"]
        assert not any("avx512" in f for f in caps["avx2"])
        avx512 = {"-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mbmi2"}
        assert avx512 | {"-DFD_CPU_NS=cpu_avx512"} <= caps["avx512"]
        assert "-mavx512bf16" not in caps["avx512"]
        assert avx512 | {"-mavx512bf16", "-DFD_CPU_NS=cpu_avx512bf16"} <= caps["avx512bf16"]


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    assert L.cache_root() == tmp_path / "a"
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    assert L.cache_root() == tmp_path / "b" / "torch_extensions"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert L.cache_root() == tmp_path / "home" / ".cache" / "torch_extensions"


def test_source_files(isolated):
    src = isolated
    assert L.source_files(src, False) == [src / "ops.cpp"]
    assert L.source_files(src, True)[-1] == src / "cuda" / "kernel.cu"
    assert L.kernel_files(src) == [src / "cpu" / "marker.cpp"]


# ---------------------------------------------------------------------------------------------
# Errors name the fix
# ---------------------------------------------------------------------------------------------
def test_error_ninja_missing(isolated, monkeypatch):
    monkeypatch.setattr(L.checks, "find_ninja", lambda: None)
    with pytest.raises(L.BuildError, match="pip install ninja") as info:
        L.load(isolated)
    assert isinstance(info.value, RuntimeError)


def test_error_no_compiler(isolated, monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    with pytest.raises(L.BuildError, match=r"no C\+\+ compiler found .*set CXX"):
        L.load(isolated)


def test_error_cuda_forced_without_toolkit(isolated, monkeypatch, tmp_path):
    monkeypatch.setenv("FUSED_DROPOUT_BUILD_CUDA", "1")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "nowhere"))
    expected = "CUDA_HOME=.*nowhere has no bin/nvcc" if torch.version.cuda else "not a CUDA build"
    with pytest.raises(L.BuildError, match=f"FUSED_DROPOUT_BUILD_CUDA=1.*{expected}"):
        L.load(isolated)
    with pytest.raises(L.BuildError, match="FUSED_DROPOUT_BUILD_CUDA=0"):
        L.load(isolated)


def test_error_unknown_flag_value(isolated, monkeypatch):
    monkeypatch.setenv("FUSED_DROPOUT_BUILD_CUDA", "maybe")
    with pytest.raises(L.BuildError, match="FUSED_DROPOUT_BUILD_CUDA='maybe'"):
        L.load(isolated)


def test_error_clashing_object_names(isolated):
    (isolated / "ops").mkdir()
    (isolated / "ops" / "ops.cpp").write_text("// clashes with ../ops.cpp\n")
    with pytest.raises(L.BuildError, match="both compile to ops.o"):
        L.load(isolated)


def test_error_compile_failure_shows_the_tail(isolated):
    # a missing header stops gcc at once (an #error would still parse torch's headers)
    (isolated / "ops.cpp").write_text('#include "fdlt_compile_error_marker.h"\n' + OPS_CPP)
    with pytest.raises(L.BuildError) as info:
        L.load(isolated)
    msg = str(info.value)
    assert "fdlt_compile_error_marker" in msg
    assert len(msg.splitlines()) <= 40 + 5
    log = re.search(r"full log: (\S+)\)", msg).group(1)
    assert "fdlt_compile_error_marker" in Path(log).read_text()
    assert not list((Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "fused_dropout").glob("*/build"))


# ---------------------------------------------------------------------------------------------
# Builds in subprocesses
# ---------------------------------------------------------------------------------------------
def test_cold_build_says_what_it_does(cpu_build):
    src, cache, _, data, stderr = cpu_build
    m = BUILDING_RE.search(stderr)
    assert m, stderr
    assert m.group("what") == "CPU"
    assert Path(m.group("dir")).parent == cache / "fused_dropout"
    assert BUILT_RE.search(stderr), stderr
    assert data["twice"] == [2.0, 2.0] and data["cpu_markers"] == CPU_MARKERS[:RUNNABLE]
    assert data["with_cuda"] == 0 and data["built_with_cuda"] is False
    assert data["path"] == str(Path(m.group("dir")) / "build" / "fused_dropout_C.so")


def test_cached_import_is_silent_and_fast(cpu_build):
    src, _, env, first, _ = cpu_build
    r = subprocess.run(driver_cmd(src), env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    data = json.loads(r.stdout)
    assert data["path"] == first["path"]
    assert data["seconds"] < 1.0, data  # measured after `import torch`; typically ~10 ms


@pytest.mark.slow
def test_killed_build_does_not_block_the_next(tmp_path):
    src, cache = write_sources(tmp_path / "src"), tmp_path / "cache"
    env = child_env(cache)
    # Its own session: killing the builder leaves ninja and the compiler running as orphans,
    # as a real SIGKILL would; the group is cleaned up at the end.
    proc = subprocess.Popen(
        driver_cmd(src),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not list(cache.glob("fused_dropout/*/build-*/build.ninja")):
            assert proc.poll() is None, "the build ended before it could be killed"
            assert time.monotonic() < deadline, "the build did not start"
            time.sleep(0.05)
        time.sleep(1.0)  # the compiler is running now
        assert proc.poll() is None, "the build ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)

        (key_dir,) = cache.glob("fused_dropout/*")
        assert not (key_dir / "build").exists()  # nothing half-built was published
        assert (key_dir / "build.lock").exists()  # the lock file stays, and must not block
        data, stderr = run_driver(src, env)
        assert BUILDING_RE.search(stderr) and BUILT_RE.search(stderr), stderr
        assert data["twice"] == [2.0, 2.0]
        assert data["path"] == str(key_dir / "build" / "fused_dropout_C.so")
        data, stderr = run_driver(src, env)
        assert stderr == ""
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
def test_concurrent_first_imports_all_succeed(tmp_path):
    src, cache = write_sources(tmp_path / "src"), tmp_path / "cache"
    env = child_env(cache)
    procs = [
        subprocess.Popen(
            driver_cmd(src), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err
        results.append((json.loads(out), err))
    assert len({d["path"] for d, _ in results}) == 1
    assert all(d["twice"] == [2.0, 2.0] for d, _ in results)
    stderrs = "".join(err for _, err in results)
    assert len(BUILT_RE.findall(stderrs)) == 1, stderrs  # built once, the others waited


# ---------------------------------------------------------------------------------------------
# A damaged cache: each case rebuilds correctly or stops with an error that names the fix
# ---------------------------------------------------------------------------------------------
DAMAGED_RE = re.compile(
    r"^fused_dropout: the cached \S+ is damaged \((?P<why>.*)\); rebuilding it$", re.MULTILINE
)


def warm_copy(cpu_build, tmp_path):
    """A private copy of the warm throwaway cache: (src, cache, env, key_dir)."""
    src, cache, _, data, _ = cpu_build
    mine = tmp_path / "cache"
    shutil.copytree(cache, mine)
    key_dir = mine / Path(data["path"]).relative_to(cache).parents[1]
    return src, mine, child_env(mine), key_dir


def test_elf_check_finds_truncated_and_empty_libraries(cpu_build, tmp_path):
    so = Path(cpu_build[3]["path"])
    assert L.publish.elf_problem(so) is None
    bad = tmp_path / "bad.so"
    for size in (so.stat().st_size - 1, so.stat().st_size // 2, 100, 0):
        bad.write_bytes(so.read_bytes()[:size])
        assert L.publish.elf_problem(bad) is not None, size
    bad.write_bytes(b"not a library" * 100)
    assert "not an ELF file" in L.publish.elf_problem(bad)


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "zero_bytes"])
def test_damaged_cached_library_is_rebuilt(cpu_build, tmp_path, damage):
    src, cache, env, key_dir = warm_copy(cpu_build, tmp_path)
    so = key_dir / "build" / "fused_dropout_C.so"
    size = so.stat().st_size
    with open(so, "r+b") as f:
        f.truncate(size // 2 if damage == "truncated" else 0)
    data, stderr = run_driver(src, env)
    assert DAMAGED_RE.search(stderr) and BUILT_RE.search(stderr), stderr
    assert data["path"] == str(so) and data["twice"] == [2.0, 2.0]
    assert L.publish.elf_problem(so) is None
    data, stderr = run_driver(src, env)
    assert stderr == "" and data["twice"] == [2.0, 2.0]


@pytest.mark.slow
def test_leftover_partial_build_dirs_are_replaced(cpu_build, tmp_path):
    src, cache, env, key_dir = warm_copy(cpu_build, tmp_path)
    (key_dir / "build" / "fused_dropout_C.so").unlink()  # a build/ without its library
    (key_dir / "build" / "junk.o").write_bytes(b"half")
    leftover = key_dir / "build-12345-678"  # an attempt of a killed build
    (leftover / "sub").mkdir(parents=True)
    (leftover / "sub" / "x.o").write_bytes(b"half")
    data, stderr = run_driver(src, env)
    assert BUILT_RE.search(stderr), stderr
    assert data["twice"] == [2.0, 2.0]
    assert not leftover.exists() and not (key_dir / "build" / "junk.o").exists()
    assert sorted(p.name for p in key_dir.iterdir()) == ["build", "build.lock"]


@pytest.mark.slow
def test_source_change_under_a_warm_cache_rebuilds_and_never_loads_stale_code(cpu_build, tmp_path):
    src0, cache, env, key_dir = warm_copy(cpu_build, tmp_path)
    src = tmp_path / "src"
    shutil.copytree(src0, src)
    (src / "common.h").write_text(COMMON_H.replace("2", "3"))  # a header only
    data, stderr = run_driver(src, env)
    assert BUILT_RE.search(stderr), stderr
    assert data["twice"] == [3.0, 3.0] and not data["path"].startswith(str(key_dir))
    (src / "common.h").write_text(COMMON_H)  # back: the old build is still the right one
    data, stderr = run_driver(src, env)
    assert stderr == "" and data["twice"] == [2.0, 2.0] and data["path"].startswith(str(key_dir))


# Runs DRIVER with every write under the cache failing, as on a read-only file system (the
# tests run as root, for whom chmod does not make a directory read-only).
READ_ONLY_DRIVER = r"""
import errno, os, sys
cache = os.environ["TORCH_EXTENSIONS_DIR"]
real_open, real_mkdir = os.open, os.mkdir
def guarded(path):
    if os.path.abspath(os.fsdecode(path)).startswith(cache):
        raise OSError(errno.EROFS, "Read-only file system", os.fsdecode(path))
def ro_open(path, flags, *args, **kwargs):
    if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC):
        guarded(path)
    return real_open(path, flags, *args, **kwargs)
def ro_mkdir(path, *args, **kwargs):
    guarded(path)
    return real_mkdir(path, *args, **kwargs)
os.open, os.mkdir = ro_open, ro_mkdir
sys.argv = ["driver", *sys.argv[1:]]
exec(compile(DRIVER, "driver", "exec"))
"""


def run_read_only(src, env):
    code = f"DRIVER = {DRIVER!r}\n{READ_ONLY_DRIVER}"
    cmd = [sys.executable, "-c", code, *driver_cmd(src)[3:]]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_read_only_warm_cache_loads(cpu_build, tmp_path):
    src, cache, env, key_dir = warm_copy(cpu_build, tmp_path)
    r = run_read_only(src, env)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert json.loads(r.stdout)["twice"] == [2.0, 2.0]


@pytest.mark.parametrize("state", ["cold", "damaged"])
def test_read_only_cache_that_needs_a_build_names_the_fix(cpu_build, tmp_path, state):
    src, cache, env, key_dir = warm_copy(cpu_build, tmp_path)
    if state == "cold":
        shutil.rmtree(cache / "fused_dropout")
    else:
        (key_dir / "build" / "fused_dropout_C.so").write_bytes(b"")
    r = run_read_only(src, env)
    assert r.returncode != 0
    assert "BuildError: fused_dropout: cannot write to the build cache" in r.stderr, r.stderr
    assert "Fix: make it writable, or set TORCH_EXTENSIONS_DIR" in r.stderr


@pytest.mark.slow
def test_sources_edited_during_the_build_are_never_cached(tmp_path):
    src, cache = write_sources(tmp_path / "src"), tmp_path / "cache"
    env = child_env(cache)
    # The compiler finishes, then a source changes before the build is published.
    edited = COMMON_H.replace("2", "5")
    edit = (
        "import fdl_driver as L, pathlib\n"
        "real = L.jit._import_cpp_extension\n"
        "class Editing:\n"
        "    def __init__(self, m): self.m = m\n"
        "    def __getattr__(self, n): return getattr(self.m, n)\n"
        "    def load(self, **kw):\n"
        "        out = self.m.load(**kw)\n"
        f"        pathlib.Path({str(src / 'common.h')!r}).write_text({edited!r})\n"
        "        return out\n"
        "L.jit._import_cpp_extension = lambda verbose: Editing(real(verbose))\n"
    )
    code = DRIVER.replace("t0 = time.perf_counter()", edit + "t0 = time.perf_counter()")
    r = subprocess.run(
        [sys.executable, "-c", code, *driver_cmd(src)[3:]],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode != 0 and "changed while they were being compiled" in r.stderr, r.stderr
    assert not list(cache.glob("fused_dropout/*/build")), "a build of unknown sources was cached"
    data, stderr = run_driver(src, env)  # the edited sources, built and cached normally
    assert BUILT_RE.search(stderr) and data["twice"] == [5.0, 5.0]


@pytest.mark.slow
@pytest.mark.skipif(not HAS_CUDA_TOOLKIT, reason="needs a CUDA build of torch and nvcc")
def test_cuda_build_without_gpu(tmp_path):
    src, cache = write_sources(tmp_path / "src"), tmp_path / "cache"
    home = L.find_cuda_home()
    env = child_env(cache, FUSED_DROPOUT_BUILD_CUDA="1", CUDA_HOME=home)
    env.pop("TORCH_CUDA_ARCH_LIST", None)
    data, stderr = run_driver(src, env)
    m = BUILDING_RE.search(stderr)
    assert m, stderr
    if not torch.cuda.is_available():
        assert m.group("what") == "CPU+CUDA archs 8.0;9.0+PTX"
    assert data["with_cuda"] == 42 and data["built_with_cuda"] is True  # .cu linked, -D set
    assert data["twice"] == [2.0, 2.0]
    assert data["CUDA_HOME"] == home and data["cpp_extension_CUDA_HOME"] == home
    assert data["TORCH_CUDA_ARCH_LIST"] is None  # the default list is not left behind
    cuobjdump = shutil.which("cuobjdump") or next(
        iter(Path(torch.__file__).parent.parent.glob("triton/backends/nvidia/bin/cuobjdump")),
        None,
    )
    if cuobjdump and not torch.cuda.is_available():
        elf = subprocess.run(
            [str(cuobjdump), "--list-elf", data["path"]], capture_output=True, text=True
        ).stdout
        assert "sm_80" in elf and "sm_90" in elf, elf
    data, stderr = run_driver(src, env)  # cached
    assert stderr == "" and data["with_cuda"] == 42


# ---------------------------------------------------------------------------------------------
# The real package
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(
    not (REPO / "csrc" / "ops.cpp").is_file()
    or not (REPO / "fused_dropout" / "__init__.py").is_file(),
    reason="the package's sources are not there yet",
)
def test_package_import_once_built_is_silent_and_fast():
    code = (
        "import time, torch\n"
        "t = time.perf_counter()\n"
        "import fused_dropout\n"
        "print(time.perf_counter() - t)\n"
    )
    cmd = [sys.executable, "-c", code]
    # The session has normally built it already (conftest); if not, this builds it.
    first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert first.returncode == 0, first.stderr[-5000:]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-5000:]
    assert r.stderr == ""
    assert float(r.stdout.strip().splitlines()[-1]) < 2.0
