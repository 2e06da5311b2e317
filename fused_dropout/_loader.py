"""Build (just in time) and load the fused_dropout C++/CUDA extension.

``load()`` is called once by ``fused_dropout/__init__.py``. It loads, in this order:

1. a prebuilt ``fused_dropout/_C*.so`` inside the package (``FUSED_DROPOUT_AOT=1 pip install
   --no-build-isolation .`` builds it);
2. the JIT-built library from the cache, if one matches this machine and these sources;
3. otherwise it compiles ``csrc/`` with ninja through ``torch.utils.cpp_extension``, under an OS
   file lock, and caches the result.

Sources: ``csrc/ops.cpp`` (the schemas), ``csrc/ops/*.cpp`` (checks, RNG, launch, autograd) and
``csrc/cpu/*.cpp``; in a CUDA build also ``csrc/cuda/*.cu`` and
``csrc/cuda/*.cpp``, with ``-DFUSED_DROPOUT_WITH_CUDA`` for every C++ and CUDA source. ``csrc/`` is
the include directory. It is looked up inside the package (``fused_dropout/csrc``, what a
non-editable install ships) and then at the repository root (``<repo>/csrc``).

Cache: ``$TORCH_EXTENSIONS_DIR``, else ``$XDG_CACHE_HOME/torch_extensions``, else
``~/.cache/torch_extensions``; then ``fused_dropout/<key>/build/fused_dropout_C.so``. The key
hashes the torch, CUDA and Python versions, the C++ compiler's version, the host CPU's ISA (the
C++ code is built with ``-march=native``), nvcc's version and the CUDA arch list in a CUDA build,
every compiler flag, and the content of every file under ``csrc/``. A cached import runs no
compiler and prints nothing.

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
    ``DEFAULT_CUDA_ARCH_LIST`` = ``"8.0;9.0+PTX"`` (sm_80 and sm_90 code, PTX for newer GPUs).
``FUSED_DROPOUT_VERBOSE=1``
    Show torch's build log and the compiler commands.
``CXX``, ``MAX_JOBS``
    As for torch: the C++ compiler (default ``c++``) and ninja's parallelism.

A build that is killed leaves nothing that blocks the next one: the lock is an ``flock`` (the
kernel drops it with the process), each build attempt has its own directory, and the finished
build is published by an atomic rename. A cached library that is truncated or empty (checked
against its ELF headers before dlopen, which could crash on it) or fails to load is rebuilt; a
build whose sources changed while it compiled is discarded, never cached under the old key; a
read-only cache works when it holds the build, else the error names TORCH_EXTENSIONS_DIR.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

__all__ = [
    "BuildError",
    "BuildConfig",
    "load",
    "built_with_cuda",
    "build_config",
    "cache_key",
    "cache_root",
    "find_cuda_home",
    "find_source_dir",
    "source_files",
    "CXX_FLAGS",
    "JIT_CXX_FLAGS",
    "NVCC_FLAGS",
    "LD_FLAGS",
    "CUDA_DEFINE",
    "DEFAULT_CUDA_ARCH_LIST",
]

# ---------------------------------------------------------------------------------------------
# Compiler flags: the single place they are defined (setup.py imports them for the AOT build).
# No -std for C++: torch adds the standard its own headers need (C++17 up to torch 2.9ish,
# C++20 in torch 2.14, whose ATen.h has `#error` under C++17). The .cu files include no torch
# headers, so nvcc gets C++17.
# ---------------------------------------------------------------------------------------------
CXX_FLAGS = ("-O3", "-ffp-contract=off", "-fopenmp")
#: The JIT build runs on the machine that uses it, so it may target the host's ISA.
JIT_CXX_FLAGS = CXX_FLAGS + ("-march=native",)
#: Never --use_fast_math. --fmad=false: no mul+add contraction into FMA in device code, so the
#: fused ops round like the CPU code (built with -ffp-contract=off); the kernels are memory-bound.
NVCC_FLAGS = ("-O3", "-std=c++17", "--expt-relaxed-constexpr", "--fmad=false")
LD_FLAGS = ("-fopenmp",)
CUDA_DEFINE = "-DFUSED_DROPOUT_WITH_CUDA"
#: Archs built when TORCH_CUDA_ARCH_LIST is unset and no GPU is visible: A100 (sm_80) and H100
#: (sm_90) code, plus sm_90 PTX that the driver JIT-compiles for newer GPUs.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"

EXT_NAME = "fused_dropout_C"  # the ninja target and TORCH_EXTENSION_NAME
#: Written by setup.py next to a prebuilt _C: {"with_cuda", "cuda_archs", "torch", "torch_cuda"}.
PREBUILT_INFO = "_C_build_info.json"
_KEY_VERSION = 1  # bump when the loader changes how it builds
_PACKAGE_DIR = Path(__file__).resolve().parent
_TAIL_LINES = 40


class BuildError(RuntimeError):
    """The extension could not be built or loaded; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    """Everything that decides what gets compiled (and so the cache key, with the sources)."""

    source_dir: Path
    with_cuda: bool
    cuda_home: str | None
    #: Value to export as TORCH_CUDA_ARCH_LIST during the build; None: leave the environment.
    arch_list: str | None
    #: The archs as they go into the cache key and the messages ("" for a CPU-only build).
    arch_desc: str
    cflags: tuple[str, ...]
    cuda_cflags: tuple[str, ...]
    ldflags: tuple[str, ...]
    cxx: str
    #: Why a visible GPU gets no CUDA kernels (said when building), or "".
    note: str = ""


@dataclasses.dataclass(frozen=True)
class _Loaded:
    path: str
    with_cuda: bool


_lock = threading.Lock()
_loaded: dict[str, _Loaded] = {}  # load(source_dir=...): resolved source dir -> what was loaded
_default: _Loaded | None = None  # the package's own library, once loaded


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------
def load(source_dir: str | os.PathLike | None = None, *, verbose: bool | None = None) -> str:
    """Build the extension if needed, load it into torch, and return the .so's path.

    ``source_dir`` overrides the ``csrc`` directory (tests build throwaway sources this way; a
    prebuilt library is then ignored). Loading is done once per process and source directory.
    """
    global _default
    if verbose is None:
        verbose = _env_flag("FUSED_DROPOUT_VERBOSE") is True
    with _lock:
        if source_dir is None:
            if _default is not None:
                return _default.path
            prebuilt = _find_prebuilt()
            if prebuilt is not None:
                result = _load_prebuilt(prebuilt)
            else:
                found = find_source_dir()
                if found is None:
                    raise BuildError(
                        "fused_dropout: neither a prebuilt fused_dropout/_C*.so nor the C++ "
                        f"sources (csrc/) were found next to {_PACKAGE_DIR}. Reinstall the "
                        "package (pip install fused_dropout, or pip install -e . in a clone)."
                    )
                result = _load_jit(found, verbose)
            _default = result
            return result.path
        src = Path(source_dir).resolve()
        cached = _loaded.get(str(src))
        if cached is None:
            cached = _loaded[str(src)] = _load_jit(src, verbose)
        return cached.path


def built_with_cuda(source_dir: str | os.PathLike | None = None) -> bool:
    """Whether the loaded library has CUDA kernels (loads it first if needed)."""
    load(source_dir)
    if source_dir is None:
        assert _default is not None
        return _default.with_cuda
    return _loaded[str(Path(source_dir).resolve())].with_cuda


def find_source_dir() -> Path | None:
    """The csrc directory: shipped inside the package, else at the repository root."""
    for cand in (_PACKAGE_DIR / "csrc", _PACKAGE_DIR.parent / "csrc"):
        if (cand / "ops.cpp").is_file():
            return cand
    return None


def source_files(source_dir: str | os.PathLike, with_cuda: bool) -> list[Path]:
    """The translation units of a build, in a fixed order."""
    src = Path(source_dir)
    files = [
        src / "ops.cpp",
        *sorted((src / "ops").glob("*.cpp")),
        *sorted((src / "cpu").glob("*.cpp")),
    ]
    if with_cuda:
        files += sorted((src / "cuda").glob("*.cu")) + sorted((src / "cuda").glob("*.cpp"))
    return files


def cache_root() -> Path:
    """Base directory of torch extension builds (the fused_dropout cache is a subfolder)."""
    base = os.environ.get("TORCH_EXTENSIONS_DIR")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg) / "torch_extensions"
    return Path.home() / ".cache" / "torch_extensions"


def find_cuda_home() -> str | None:
    """The CUDA toolkit: $CUDA_HOME (or $CUDA_PATH), /usr/local/cuda, or the nvcc on PATH.

    An explicit $CUDA_HOME without bin/nvcc gives None (it is a mistake to report, not to guess
    around).
    """
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env:
        return env if _is_file(Path(env) / "bin" / "nvcc") else None
    if _is_file(Path("/usr/local/cuda/bin/nvcc")):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    home = Path(os.path.realpath(nvcc)).parent.parent
    if _is_file(home / "include" / "cuda_runtime.h"):
        return str(home)
    # nvcc on PATH may be a wrapper script: ask nvcc where it lives.
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "--version"], capture_output=True, text=True, timeout=30
        )
        m = re.search(r"^#\$ _HERE_=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    except (OSError, subprocess.SubprocessError):
        m = None
    if m and _is_file(Path(m.group(1).strip()) / "nvcc"):
        return str(Path(m.group(1).strip()).parent)
    return None


def build_config(
    source_dir: str | os.PathLike | None = None, *, native: bool = True
) -> BuildConfig:
    """Decide CPU-only vs CPU+CUDA, the archs and the flags, from torch and the environment.

    ``native=False`` drops ``-march=native`` (the AOT build, whose wheel may move machines).
    Raises BuildError when FUSED_DROPOUT_BUILD_CUDA=1 cannot be honoured.
    """
    import torch

    src = Path(source_dir).resolve() if source_dir is not None else find_source_dir()
    if src is None:
        raise BuildError("fused_dropout: the C++ sources (csrc/) were not found")
    forced = _env_flag("FUSED_DROPOUT_BUILD_CUDA")
    with_cuda, cuda_home, gpu, note = False, None, False, ""
    if forced is not False and torch.version.cuda:
        gpu = torch.cuda.is_available()
        if forced or gpu:
            cuda_home = find_cuda_home()
            if cuda_home is not None:
                with_cuda = True
            elif forced:
                raise BuildError(
                    "fused_dropout: FUSED_DROPOUT_BUILD_CUDA=1 but the CUDA toolkit (nvcc) was "
                    f"not found: {_cuda_home_problem()}. Fix: install the CUDA toolkit and "
                    "set CUDA_HOME to it (e.g. export CUDA_HOME=/usr/local/cuda), or set "
                    "FUSED_DROPOUT_BUILD_CUDA=0 for a CPU-only build."
                )
            else:
                note = (
                    f"no CUDA kernels although a GPU is visible: {_cuda_home_problem()}; "
                    "set CUDA_HOME to a CUDA toolkit"
                )
    elif forced:
        raise BuildError(
            f"fused_dropout: FUSED_DROPOUT_BUILD_CUDA=1 but torch {torch.__version__} is not a "
            "CUDA build. Fix: install a CUDA build of torch, or unset FUSED_DROPOUT_BUILD_CUDA."
        )

    arch_list, arch_desc = None, ""
    if with_cuda:
        env_arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
        if env_arch:
            arch_desc = env_arch
        elif gpu:
            arch_desc = "native:" + ";".join(_visible_gpu_archs())
        else:
            arch_list = arch_desc = DEFAULT_CUDA_ARCH_LIST

    cflags = JIT_CXX_FLAGS if native else CXX_FLAGS
    cuda_cflags = NVCC_FLAGS
    if with_cuda:
        cflags += (CUDA_DEFINE,)
        cuda_cflags += (CUDA_DEFINE,)
    return BuildConfig(
        source_dir=src,
        with_cuda=with_cuda,
        cuda_home=cuda_home,
        arch_list=arch_list,
        arch_desc=arch_desc,
        cflags=cflags,
        cuda_cflags=cuda_cflags if with_cuda else (),
        ldflags=LD_FLAGS,
        cxx=os.environ.get("CXX") or "c++",
        note=note,
    )


def cache_key(cfg: BuildConfig) -> str:
    """A short hash of everything that changes the built library (see the module doc)."""
    import torch

    parts = {
        "loader": _KEY_VERSION,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": [sys.implementation.name, *sys.version_info[:2]],
        "machine": platform.machine(),
        "cxx": _first_line([cfg.cxx, "--version"]),
        "isa": _host_isa(),
        "with_cuda": cfg.with_cuda,
        "nvcc": _nvcc_version(cfg.cuda_home) if cfg.with_cuda else None,
        "arch": cfg.arch_desc,
        "cflags": list(cfg.cflags),
        "cuda_cflags": list(cfg.cuda_cflags),
        "ldflags": list(cfg.ldflags),
        "sources": _hash_tree(cfg.source_dir),
    }
    blob = json.dumps(parts, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
def _load_jit(source_dir: Path, verbose: bool) -> _Loaded:
    cfg = build_config(source_dir)
    if cfg.with_cuda and cfg.cuda_home and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = cfg.cuda_home
        if "torch.utils.cpp_extension" in sys.modules:
            sys.modules["torch.utils.cpp_extension"].CUDA_HOME = cfg.cuda_home
    key = cache_key(cfg)
    key_dir = cache_root() / "fused_dropout" / key
    so = key_dir / "build" / f"{EXT_NAME}.so"
    if _load_cached(so):  # the fast path: no lock, no compiler, no output
        return _Loaded(str(so), cfg.with_cuda)
    try:
        key_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _unwritable(key_dir, e) from None
    with _flock(key_dir / "build.lock", key_dir):
        if not _load_cached(so):  # else another process built it while we waited
            _build(cfg, key_dir, so, verbose, key)
    return _Loaded(str(so), cfg.with_cuda)


def _load_cached(so: Path) -> bool:
    """Load a cached library; False (after saying why) when there is none or it is damaged,
    so that the caller rebuilds it."""
    import torch

    if not so.is_file():
        return False
    problem = _elf_problem(so)
    if problem is None:
        try:
            torch.ops.load_library(str(so))
            return True
        except OSError as e:
            problem = str(e)
    _say(f"the cached {so} is damaged ({problem}); rebuilding it")
    return False


def _elf_problem(path: Path) -> str | None:
    """Why ``path`` is not a whole 64-bit ELF file (a truncated or empty copy), or None.

    dlopen maps a truncated library and can crash (SIGBUS) on the missing pages instead of
    failing, so its size is checked against its own headers first."""
    import struct

    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(64)
            if len(head) < 64 or head[:4] != b"\x7fELF":
                return f"not an ELF file, {size} bytes"
            if head[4] != 2:  # ELFCLASS32: not checked further
                return None
            end = "<" if head[5] == 1 else ">"
            phoff, shoff = struct.unpack_from(end + "QQ", head, 0x20)
            phentsize, phnum, shentsize, shnum = struct.unpack_from(end + "HHHH", head, 0x36)
            if shoff + shentsize * shnum > size or phoff + phentsize * phnum > size:
                return f"truncated to {size} bytes"
            f.seek(phoff)
            for _ in range(phnum):
                ph = f.read(phentsize)
                p_offset, _, _, p_filesz = struct.unpack_from(end + "QQQQ", ph, 8)
                if p_offset + p_filesz > size:
                    return f"truncated to {size} bytes"
    except (OSError, struct.error) as e:
        return str(e)
    return None


def _build(cfg: BuildConfig, key_dir: Path, so: Path, verbose: bool, key: str) -> None:
    """Compile into a fresh attempt directory, then publish it by renaming it to build/."""
    _check_toolchain(cfg)
    sources = source_files(cfg.source_dir, cfg.with_cuda)
    _check_sources(cfg, sources)
    # Attempts of killed builds: nothing holds the lock for them any more. (A compiler orphaned
    # by a killed build may still write there; that is why each attempt has its own directory.)
    for stale in key_dir.glob("build-*"):
        shutil.rmtree(stale, ignore_errors=True)
    attempt = key_dir / f"build-{os.getpid()}-{time.monotonic_ns()}"
    try:
        attempt.mkdir()
    except OSError as e:
        raise _unwritable(key_dir, e) from None
    # torch < 2.9 guards its build dir with a lock file that outlives a killed build
    # (FileBaton); ours is new and we hold the flock, so such a file can only be stale.
    with contextlib.suppress(FileNotFoundError):
        (attempt / "lock").unlink()

    what = "CPU" + (f"+CUDA archs {cfg.arch_desc}" if cfg.with_cuda else "")
    if cfg.note:
        what += f"; {cfg.note}"
    _say(f"building the extension ({what}) in {key_dir}; first import only...")
    start = time.perf_counter()

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
            name=EXT_NAME,
            sources=[str(s) for s in sources],
            extra_cflags=list(cfg.cflags),
            extra_cuda_cflags=list(cfg.cuda_cflags),
            extra_ldflags=list(cfg.ldflags),
            extra_include_paths=[str(cfg.source_dir)],
            build_directory=str(attempt),
            verbose=verbose,
            with_cuda=cfg.with_cuda,
            is_python_module=False,
        )
    except Exception as e:  # torch raises RuntimeError with the whole ninja output
        log = attempt / "build.log"
        text = str(e)
        with contextlib.suppress(OSError):
            log.write_text(text + "\n")
        tail = "\n".join(text.rstrip().splitlines()[-_TAIL_LINES:])
        raise BuildError(
            f"fused_dropout: building the extension failed ({type(e).__name__}). Last "
            f"{_TAIL_LINES} lines of the build output (full log: {log}):\n{tail}\n"
            "Rerun with FUSED_DROPOUT_VERBOSE=1 to see the compiler commands"
            + (
                ", or set FUSED_DROPOUT_BUILD_CUDA=0 to build without CUDA."
                if cfg.with_cuda
                else "."
            )
        ) from None
    finally:
        if cfg.with_cuda and cfg.arch_list is not None:
            if saved_arch is None:
                os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = saved_arch

    if cache_key(cfg) != key:  # what was compiled is not what the key says: never cache it
        shutil.rmtree(attempt, ignore_errors=True)
        raise BuildError(
            f"fused_dropout: the sources in {cfg.source_dir} changed while they were being "
            "compiled, so this build was discarded. Fix: import again (in a new process) once "
            "the sources stay unchanged."
        )
    # Publish. torch names the library <name>_v<N>.so if this process built another source
    # tree before; the published name is fixed.
    built_path = Path(built) if isinstance(built, str) else attempt / f"{EXT_NAME}.so"
    if built_path.name != so.name:
        os.replace(built_path, attempt / so.name)
    with contextlib.suppress(FileNotFoundError):
        (attempt / "lock").unlink()
    if so.parent.exists():  # a build/ without the .so: not ours to keep
        shutil.rmtree(so.parent, ignore_errors=True)
    os.rename(attempt, so.parent)
    _say(f"built in {time.perf_counter() - start:.1f} s")


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


def _find_prebuilt() -> Path | None:
    for pattern in ("_C.so", "_C.*.so", "_C.*.pyd"):
        hits = sorted(_PACKAGE_DIR.glob(pattern))
        if hits:
            return hits[0]
    return None


def _load_prebuilt(path: Path) -> _Loaded:
    import torch

    src = _PACKAGE_DIR.parent / "csrc"  # an editable AOT install keeps the sources beside it
    if src.is_dir():
        built_at = path.stat().st_mtime
        if any(p.stat().st_mtime > built_at for p in src.rglob("*") if p.is_file()):
            _say(
                f"warning: {path.name} is older than sources in {src}; rebuild it "
                f"(FUSED_DROPOUT_AOT=1 pip install --no-build-isolation -e .) or delete it "
                "to use the JIT build"
            )
    info: dict = {}
    with contextlib.suppress(OSError, ValueError):
        info = json.loads((path.parent / PREBUILT_INFO).read_text())
    try:
        torch.ops.load_library(str(path))
    except OSError as e:
        raise BuildError(
            f"fused_dropout: the prebuilt {path} does not load ({e}); it was built for torch "
            f"{info.get('torch', '?')}, this is torch {torch.__version__}. Fix: rebuild it "
            "(FUSED_DROPOUT_AOT=1 pip install --no-build-isolation .), or delete it to compile "
            "on import."
        ) from None
    if "with_cuda" in info:
        with_cuda = bool(info["with_cuda"])
    else:  # a CUDAExtension links libc10_cuda, a CppExtension does not
        with_cuda = b"libc10_cuda.so" in path.read_bytes()
    return _Loaded(str(path), with_cuda)


# ---------------------------------------------------------------------------------------------
# Checks with errors that name the fix
# ---------------------------------------------------------------------------------------------
def _find_ninja() -> str | None:
    """ninja on PATH, or the one of the `ninja` pip package (then PATH is extended for torch)."""
    found = shutil.which("ninja")
    if found:
        return found
    dirs = [Path(sys.executable).parent]
    with contextlib.suppress(Exception):
        import ninja  # the PyPI package

        dirs.insert(0, Path(ninja.BIN_DIR))
    for d in dirs:
        if _is_file(d / "ninja"):
            os.environ["PATH"] = str(d) + os.pathsep + os.environ.get("PATH", "")
            return str(d / "ninja")
    return None


def _check_toolchain(cfg: BuildConfig) -> None:
    if _find_ninja() is None:
        raise BuildError(
            "fused_dropout: the ninja build tool was not found, and the extension must be "
            "compiled on first import. Fix: pip install ninja"
        )
    if shutil.which(cfg.cxx) is None:
        raise BuildError(
            f"fused_dropout: no C++ compiler found (looked for {cfg.cxx!r}"
            f"{', from $CXX' if os.environ.get('CXX') else ''}). Fix: install g++ (e.g. "
            "apt-get install g++) or set CXX to a C++ compiler."
        )


def _check_sources(cfg: BuildConfig, sources: list[Path]) -> None:
    missing = [s for s in sources if not s.is_file()]
    if missing:
        raise BuildError(f"fused_dropout: source files missing: {missing}")
    # torch names objects by file stem (.cu -> stem.cuda.o), so two .cpp with one stem clash.
    seen: dict[str, Path] = {}
    for s in sources:
        obj = s.stem + (".cuda" if s.suffix == ".cu" else "")
        if obj in seen:
            raise BuildError(
                f"fused_dropout: {seen[obj]} and {s} would both compile to {obj}.o; rename one"
            )
        seen[obj] = s


def _unwritable(where: Path, e: OSError) -> BuildError:
    return BuildError(
        f"fused_dropout: cannot write to the build cache {where} ({e}), and the extension must "
        "be built there. Fix: make it writable, or set TORCH_EXTENSIONS_DIR to a writable "
        "directory."
    )


def _cuda_home_problem() -> str:
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env:
        return f"CUDA_HOME={env} has no bin/nvcc"
    return "CUDA_HOME is unset, /usr/local/cuda/bin/nvcc does not exist and nvcc is not on PATH"


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------
def _say(msg: str) -> None:
    print(f"fused_dropout: {msg}", file=sys.stderr, flush=True)


def _env_flag(name: str) -> bool | None:
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise BuildError(f"fused_dropout: {name}={value!r} is not understood; use 1 or 0")


def _is_file(p: Path) -> bool:
    try:
        return p.is_file()
    except OSError:
        return False


@contextlib.contextmanager
def _flock(path: Path, where: Path):
    """An exclusive advisory lock that dies with its holder (never deleted: deleting races)."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # O_CLOEXEC: ninja does not inherit it
    except OSError as e:
        raise _unwritable(where, e) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(f"waiting for another process that is building in {where}...")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return ""
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0].strip() if lines else ""


def _nvcc_version(cuda_home: str | None) -> str:
    if not cuda_home:
        return ""
    try:
        out = subprocess.run(
            [str(Path(cuda_home) / "bin" / "nvcc"), "--version"],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return " ".join(line for line in out.splitlines() if "release" in line or "Build" in line)


def _host_isa() -> str:
    """Hash of the CPU's feature flags (what -march=native compiles for)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return hashlib.sha256(line.split(":", 1)[-1].strip().encode()).hexdigest()[:16]
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _visible_gpu_archs() -> list[str]:
    """Compute capabilities of the visible GPUs, without initialising CUDA when possible."""
    caps: set[str] = set()
    if shutil.which("nvidia-smi") and not os.environ.get("CUDA_VISIBLE_DEVICES"):
        out = _run_quiet(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"])
        caps = {c.strip() for c in out.splitlines() if re.fullmatch(r"\d+\.\d+", c.strip())}
    if not caps:
        import torch

        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            caps.add(f"{major}.{minor}")
    return sorted(caps)


def _run_quiet(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _hash_tree(root: Path) -> dict[str, str]:
    """sha256 of every file under root (sources and headers), by relative path."""
    hashes: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        for name in sorted(filenames):
            if name.startswith(".") or name.endswith(("~", ".swp", ".pyc")):
                continue
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            hashes[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes
