"""``python -m fused_dropout``: what a bug report needs to know about this installation.

The package, Python, torch and CUDA versions; whether the extension is prebuilt or JIT-built,
its library, sources and cache key; the CPU path in use and what the CPU supports; the CUDA
archs built, the toolkit and the GPUs visible. As torch's ``collect_env``, it only reads: on a
cold cache it says that nothing is built and how to build it, and builds only with ``--build``,
after saying so (the loader announces a build before it starts).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
from pathlib import Path

from . import PACKAGE_DIR, Plan, load, loaded, plan, prebuilt
from .cache import cache_root, compiler_version, nvcc_version
from .checks import BuildError, env_flag, find_ninja
from .config import find_cuda_home
from .publish import elf_problem

#: Environment variables that change what is built or run, shown when set.
ENV_VARS = (
    "FUSED_DROPOUT_BUILD_CUDA",
    "FUSED_DROPOUT_CPU_CAPABILITY",
    "FUSED_DROPOUT_CPU_HIDE",
    "FUSED_DROPOUT_AOT",
    "FUSED_DROPOUT_VERBOSE",
    "TORCH_CUDA_ARCH_LIST",
    "CUDA_HOME",
    "CUDA_PATH",
    "CUDA_VISIBLE_DEVICES",
    "TORCH_EXTENSIONS_DIR",
    "XDG_CACHE_HOME",
    "CXX",
    "MAX_JOBS",
)
#: /proc/cpuinfo's names of the ISA extensions of csrc/cpu/capability.h, where they differ.
_CPUINFO_NAMES = {"bmi": "bmi1"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m fused_dropout",
        description="Print what a bug report needs about this fused_dropout installation.",
    )
    ap.add_argument(
        "--build",
        action="store_true",
        help="if the extension is not built yet, build it first (1-5 minutes; said first)",
    )
    args = ap.parse_args(argv)
    import torch

    print(f"fused_dropout {_version()}: {PACKAGE_DIR}")
    print(f"Python {platform.python_version()} ({sys.executable}), {platform.platform()}")
    print(
        f"torch {torch.__version__} (CUDA {torch.version.cuda}), {torch.get_num_threads()} "
        f"threads: {Path(torch.__file__).parent}"
    )
    print()
    try:
        p = plan()
    except BuildError as e:
        print(f"extension: cannot be built here: {e}")
        p = None
    ready = p is not None and _library_ready(p)
    if p is not None:
        _extension(p, ready)
    error = None
    if p is not None and (ready or args.build):
        try:
            load()
        except (BuildError, OSError, RuntimeError) as e:
            error = f"{type(e).__name__}: {e}"
            print(f"  LOAD FAILED: {error}")
    print()
    _cpu(loaded() is not None)
    print()
    _cuda(p)
    print()
    set_vars = [f"{k}={os.environ[k]}" for k in ENV_VARS if os.environ.get(k) is not None]
    print("environment: " + (", ".join(set_vars) if set_vars else "none of the variables set"))
    return 1 if error else 0


def _version() -> str:
    return getattr(sys.modules.get("fused_dropout"), "__version__", "?")


def _library_ready(p: Plan) -> bool:
    """Whether loading the library would compile nothing."""
    return p.path.is_file() and (p.kind == "prebuilt" or elf_problem(p.path) is None)


def _extension(p: Plan, ready: bool) -> None:
    if p.kind == "prebuilt":
        info = prebuilt.read_info(p.path)
        built_for = f"torch {info.get('torch', '?')} (CUDA {info.get('torch_cuda', '?')})"
        print(f"extension: prebuilt (FUSED_DROPOUT_AOT=1 build or wheel) for {built_for}")
        print(f"  library: {p.path}")
        return
    cfg = p.cfg
    assert cfg is not None
    print("extension: JIT (compiled on the first import, then cached)")
    print(f"  sources: {cfg.source_dir}")
    print(f"  cache: {cache_root()}, key {p.key}")
    if ready:
        print(f"  library: {p.path}")
    else:
        state = "damaged, will be rebuilt" if p.path.exists() else "not built yet"
        print(f"  library: {state} ({p.path})")
        print(
            "  to build it: python -c 'import fused_dropout' (1-5 minutes, once), or "
            "python -m fused_dropout --build"
        )
    ninja = find_ninja()
    print(f"  compiler: {cfg.cxx}: {compiler_version(cfg.cxx) or 'NOT FOUND'}; ninja: {ninja}")


def _cpu(library_loaded: bool) -> None:
    print(f"CPU: {_cpu_model()} ({os.cpu_count()} logical cores)")
    if not library_loaded:
        print("  path: chosen when the library loads (the best one this CPU runs)")
        print(f"  ISA extensions (/proc/cpuinfo): {' '.join(_cpuinfo_extensions()) or '?'}")
        return
    from fused_dropout import ops

    forced = os.environ.get("FUSED_DROPOUT_CPU_CAPABILITY")
    why = f"forced by FUSED_DROPOUT_CPU_CAPABILITY={forced}" if forced else "the best it runs"
    print(f"  path in use: {ops.cpu_capability()} ({why})")
    built = ops.cpu_capabilities()
    print(f"  paths built: {', '.join(built)}")
    for cap in built:
        missing = ops.cpu_capability_missing(cap)
        print(f"    {cap}: {'runs here' if not missing else 'lacks ' + ', '.join(missing)}")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpuinfo_extensions() -> list[str]:
    """The extensions of the CPU capability table that /proc/cpuinfo lists."""
    from .config import capabilities, find_source_dir

    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
        src = find_source_dir(PACKAGE_DIR)
        wanted = dict.fromkeys(e for c in capabilities(src) for e in c.extensions) if src else {}
    except (OSError, BuildError):
        return []
    return [e for e in wanted if _CPUINFO_NAMES.get(e, e) in flags]


def _why_no_cuda(note: str) -> str:
    """Why a JIT build has no CUDA kernels (config.build_config's rules)."""
    import torch

    if env_flag("FUSED_DROPOUT_BUILD_CUDA") is False:
        return "FUSED_DROPOUT_BUILD_CUDA=0"
    if not torch.version.cuda:
        return f"torch {torch.__version__} is a CPU build"
    return note or "no GPU visible (FUSED_DROPOUT_BUILD_CUDA=1 builds them anyway)"


def _cuda(p: Plan | None) -> None:
    import torch

    current = loaded()
    if current is not None:
        built = "yes" if current.with_cuda else "no"
    elif p is not None and p.cfg is not None:
        built = f"not built yet (would be: {'yes' if p.cfg.with_cuda else 'no'})"
    else:
        built = "?"
    if p is not None and p.kind == "prebuilt":
        archs = prebuilt.read_info(p.path).get("cuda_archs") or "-"
    else:
        archs = (p.cfg.arch_desc if p is not None and p.cfg is not None else "") or "-"
    print(f"CUDA kernels built: {built}; archs: {archs}")
    if p is not None and p.cfg is not None and not p.cfg.with_cuda:
        print(f"  why not: {_why_no_cuda(p.cfg.note)}")
    home = find_cuda_home()
    release = re.search(r"release [\d.]+, V[\d.]+", nvcc_version(home)) if home else None
    print(f"  toolkit: {home or 'not found'}" + (f" (nvcc {release.group()})" if release else ""))
    if not torch.cuda.is_available():
        print("  GPUs visible: none")
        return
    for i in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(i)
        print(f"  GPU {i}: {torch.cuda.get_device_name(i)} (sm_{major}{minor})")
