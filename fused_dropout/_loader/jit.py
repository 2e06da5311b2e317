"""The JIT build: compile ``csrc/`` into the cache (under the lock) and load it.

The CPU kernel files first (cpu_kernels.py), then torch's translation units and the link, with
ninja through ``torch.utils.cpp_extension``. A build whose sources changed while it compiled is
discarded, never cached under the old key; a read-only cache works when it holds the build,
else the error names TORCH_EXTENSIONS_DIR.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

from . import cache, publish
from .checks import BuildError, check_sources, check_toolchain, compile_failed, say, unwritable
from .config import BuildConfig, source_files
from .cpu_kernels import compile_cpu_kernels


def load(cfg: BuildConfig, key: str, verbose: bool) -> Path:
    """Load the build of ``cfg`` (key ``key``) from the cache, building it first if needed."""
    use_cuda_home(cfg)
    so = cache.library_path(key)
    if publish.load_cached(so):  # the fast path: no lock, no compiler, no output
        return so
    key_dir = so.parent.parent
    try:
        key_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise unwritable(key_dir, e) from None
    with publish.flock(key_dir / "build.lock", key_dir):
        if not publish.load_cached(so):  # else another process built it while we waited
            build(cfg, key_dir, so, verbose, key)
    return so


def use_cuda_home(cfg: BuildConfig) -> None:
    """Export the toolkit found, and patch torch's guess (made once, at its import)."""
    if cfg.with_cuda and cfg.cuda_home and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = cfg.cuda_home
        if "torch.utils.cpp_extension" in sys.modules:
            sys.modules["torch.utils.cpp_extension"].CUDA_HOME = cfg.cuda_home


def build(cfg: BuildConfig, key_dir: Path, so: Path, verbose: bool, key: str) -> None:
    """Compile into a fresh attempt directory, then publish it by renaming it to build/."""
    check_toolchain(cfg.cxx)
    sources = source_files(cfg.source_dir, cfg.with_cuda)
    check_sources(sources)
    attempt = publish.new_attempt(key_dir)

    what = "CPU" + (f"+CUDA archs {cfg.arch_desc}" if cfg.with_cuda else "")
    if cfg.note:
        what += f"; {cfg.note}"
    say(f"building the extension ({what}) in {key_dir}; first import only...")
    start = time.perf_counter()

    objects = compile_cpu_kernels(cfg, attempt, verbose)
    saved_arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if cfg.with_cuda:
        assert cfg.cuda_home is not None
        os.environ["CUDA_HOME"] = cfg.cuda_home
        if cfg.arch_list is not None:
            os.environ["TORCH_CUDA_ARCH_LIST"] = cfg.arch_list
    try:
        cpp_extension = _import_cpp_extension(verbose)
        if cfg.with_cuda:
            cpp_extension.CUDA_HOME = cfg.cuda_home
        built = cpp_extension.load(
            name=cache.EXT_NAME,
            sources=[str(s) for s in sources],
            extra_cflags=list(cfg.cflags),
            extra_cuda_cflags=list(cfg.cuda_cflags),
            # relative to the build directory, where ninja runs: no quoting needed
            extra_ldflags=[*cfg.ldflags, *(str(o.relative_to(attempt)) for o in objects)],
            extra_include_paths=[str(cfg.source_dir)],
            build_directory=str(attempt),
            verbose=verbose,
            with_cuda=cfg.with_cuda,
            is_python_module=False,
        )
    except Exception as e:  # torch raises RuntimeError with the whole ninja output
        raise compile_failed(str(e), attempt / "build.log", cfg.with_cuda) from None
    finally:
        if cfg.with_cuda and cfg.arch_list is not None:
            if saved_arch is None:
                os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = saved_arch

    if cache.cache_key(cfg) != key:  # what was compiled is not what the key says: never cache it
        shutil.rmtree(attempt, ignore_errors=True)
        raise BuildError(
            f"fused_dropout: the sources in {cfg.source_dir} changed while they were being "
            "compiled, so this build was discarded. Fix: import again (in a new process) once "
            "the sources stay unchanged."
        )
    built_path = Path(built) if isinstance(built, str) else attempt / so.name
    publish.publish(attempt, built_path, so)
    say(f"built in {time.perf_counter() - start:.1f} s")


def _import_cpp_extension(verbose: bool):
    """torch.utils.cpp_extension, without its import-time "No CUDA runtime is found" warning
    (it guesses CUDA_HOME at import; we set it ourselves right after)."""
    if "torch.utils.cpp_extension" not in sys.modules and not verbose:
        import logging

        logger = logging.getLogger("torch.utils.cpp_extension")
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            import torch.utils.cpp_extension as cpp_extension
        finally:
            logger.setLevel(level)
        return cpp_extension
    import torch.utils.cpp_extension as cpp_extension

    return cpp_extension
