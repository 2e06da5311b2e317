"""Find or build (just in time), and load, the fused_dropout C++/CUDA extension.

``load()`` is called once by ``fused_dropout/__init__.py``. It loads, in this order:

1. a prebuilt ``fused_dropout/_C*.so`` inside the package (``FUSED_DROPOUT_AOT=1 pip install
   --no-build-isolation .`` or a wheel builds it: prebuilt.py);
2. the JIT-built library from the cache, if one matches this machine and these sources
   (cache.py);
3. otherwise it compiles ``csrc/`` (jit.py, cpu_kernels.py) under an OS file lock and publishes
   the result into the cache (publish.py), saying what it does and how long it took.

Then it asks the library which CPU path it runs, so that a FUSED_DROPOUT_CPU_CAPABILITY this
CPU cannot honour fails the import with the reason. The sources are looked up inside the package
(``fused_dropout/csrc``, what a non-editable install ships) and then at the repository root
(``<repo>/csrc``).

The modules, by concern: config (what is built, with which flags, the CPU capabilities),
cpu_kernels (the kernel files, once per capability), cache (where, under which key), publish
(the lock, attempt directories, damaged caches), jit (a cold build), prebuilt (a library built
into the package), checks (messages, and errors that name the fix), report (``python -m
fused_dropout``).

Environment variables:

``FUSED_DROPOUT_BUILD_CUDA``
    ``1``: compile the CUDA kernels even without a visible GPU (needs a CUDA build of torch and
    nvcc); ``0``: CPU only. Unset: CUDA kernels are compiled when torch is a CUDA build, nvcc is
    found and a GPU is visible.
``CUDA_HOME``
    The CUDA toolkit. Unset: ``/usr/local/cuda`` if it has ``bin/nvcc``, else the toolkit of the
    ``nvcc`` on ``PATH``. The loader exports it and patches ``torch.utils.cpp_extension.CUDA_HOME``
    (which torch guesses once, at import, sometimes wrongly).
``TORCH_CUDA_ARCH_LIST``
    Honoured. Unset with a visible GPU: torch builds for the visible GPUs. Unset without a GPU:
    ``DEFAULT_CUDA_ARCH_LIST`` (JIT) or ``WHEEL_CUDA_ARCH_LIST`` (AOT), see config.py.
``FUSED_DROPOUT_CPU_CAPABILITY``
    ``default``, ``avx2``, ``avx512`` or ``avx512bf16``: the CPU path to run instead of the best
    one this CPU has (read when the library loads; csrc/ops/cpu_dispatch.cpp).
``FUSED_DROPOUT_CPU_HIDE``
    Comma-separated ISA extensions (``avx512bw,...``) to treat as absent, as on an older CPU.
``FUSED_DROPOUT_VERBOSE=1``
    Show torch's build log and the compiler commands.
``CXX``, ``MAX_JOBS``
    As for torch: the C++ compiler (default ``c++``) and the parallelism of the build.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
from pathlib import Path

from . import jit, prebuilt
from .cache import cache_key, cache_root, library_path
from .checks import BuildError, env_flag
from .config import (
    BuildConfig,
    build_config,
    find_cuda_home,
    find_source_dir,
    kernel_files,
    source_files,
)

__all__ = [
    "BuildConfig",
    "BuildError",
    "Loaded",
    "Plan",
    "build_config",
    "built_with_cuda",
    "cache_key",
    "cache_root",
    "find_cuda_home",
    "find_source_dir",
    "kernel_files",
    "load",
    "loaded",
    "plan",
    "running_env_report",
    "source_files",
]

PACKAGE_DIR = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Plan:
    """What load() does: load the prebuilt library at ``path``, or the JIT build of ``cfg``,
    whose library is (or will be) at ``path``."""

    kind: str  # "prebuilt" or "jit"
    path: Path
    cfg: BuildConfig | None = None
    key: str | None = None


@dataclasses.dataclass(frozen=True)
class Loaded:
    plan: Plan
    with_cuda: bool


_lock = threading.Lock()
_loaded: dict[str, Loaded] = {}  # load(source_dir=...): resolved source dir -> what was loaded
_default: Loaded | None = None  # the package's own library, once loaded


def plan(source_dir: str | os.PathLike | None = None) -> Plan:
    """What load() would do, without doing it (no compiler runs, nothing is loaded)."""
    if source_dir is None:
        found = prebuilt.find(PACKAGE_DIR)
        if found is not None:
            return Plan("prebuilt", found)
        src = find_source_dir(PACKAGE_DIR)
        if src is None:
            raise BuildError(
                "fused_dropout: neither a prebuilt fused_dropout/_C*.so nor the C++ sources "
                f"(csrc/) were found next to {PACKAGE_DIR}. Reinstall the package (pip install "
                "fused_dropout, or pip install -e . in a clone)."
            )
    else:
        src = Path(source_dir).resolve()
    cfg = build_config(src)
    key = cache_key(cfg)
    return Plan("jit", library_path(key), cfg, key)


def load(source_dir: str | os.PathLike | None = None, *, verbose: bool | None = None) -> str:
    """Build the extension if needed, load it into torch, and return the .so's path.

    ``source_dir`` overrides the ``csrc`` directory (tests build throwaway sources this way; a
    prebuilt library is then ignored). Loading is done once per process and source directory.
    """
    global _default
    if verbose is None:
        verbose = env_flag("FUSED_DROPOUT_VERBOSE") is True
    with _lock:
        if source_dir is None and _default is not None:
            return str(_default.plan.path)
        if source_dir is not None and str(Path(source_dir).resolve()) in _loaded:
            return str(_loaded[str(Path(source_dir).resolve())].plan.path)
        p = plan(source_dir)
        if p.kind == "prebuilt":
            result = Loaded(p, prebuilt.load(p.path))
        else:
            assert p.cfg is not None and p.key is not None
            jit.load(p.cfg, p.key, verbose)
            result = Loaded(p, p.cfg.with_cuda)
        if source_dir is None:
            _check_cpu_capability()
            _default = result
        else:
            _loaded[str(p.cfg.source_dir)] = result
        return str(p.path)


def loaded() -> Loaded | None:
    """The package's own library, if load() has loaded it in this process."""
    return _default


def built_with_cuda(source_dir: str | os.PathLike | None = None) -> bool:
    """Whether the loaded library has CUDA kernels (loads it first if needed)."""
    load(source_dir)
    if source_dir is None:
        assert _default is not None
        return _default.with_cuda
    return _loaded[str(Path(source_dir).resolve())].with_cuda


def running_env_report() -> bool:
    """Whether this process is ``python -m fused_dropout``, which loads the library itself
    (after saying whether it must build it) instead of the package's import."""
    if sys.argv[:1] != ["-m"]:  # what Python sets while it locates the -m module
        return False
    argv = getattr(sys, "orig_argv", None)  # Python 3.10+
    if argv is None:
        return True
    for i, arg in enumerate(argv[1:], 1):
        if arg.startswith("-m"):
            module = arg[2:] or (argv[i + 1] if i + 1 < len(argv) else "")
            return module in ("fused_dropout", "fused_dropout.__main__")
    return False


def _check_cpu_capability() -> None:
    """The first call chooses the CPU path: an impossible FUSED_DROPOUT_CPU_CAPABILITY fails
    here, at import, with the reason, rather than at the first op."""
    import torch

    try:
        torch.ops.fused_dropout.cpu_capability()
    except RuntimeError as e:
        raise BuildError(str(e).strip()) from None
