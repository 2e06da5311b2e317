"""What the loader says, and the checks whose errors name the fix."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path

#: Lines of a failed compiler's output quoted in the error (the whole of it goes to a log).
TAIL_LINES = 40


class BuildError(RuntimeError):
    """The extension could not be built or loaded; the message says how to fix it."""


def say(msg: str) -> None:
    print(f"fused_dropout: {msg}", file=sys.stderr, flush=True)


def env_flag(name: str) -> bool | None:
    """A 1/0 environment variable; None when unset (or "auto")."""
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise BuildError(f"fused_dropout: {name}={value!r} is not understood; use 1 or 0")


def is_file(p: Path) -> bool:
    try:
        return p.is_file()
    except OSError:
        return False


def find_ninja() -> str | None:
    """ninja on PATH, or the one of the `ninja` pip package (then PATH is extended for torch)."""
    found = shutil.which("ninja")
    if found:
        return found
    dirs = [Path(sys.executable).parent]
    with contextlib.suppress(Exception):
        import ninja  # the PyPI package

        dirs.insert(0, Path(ninja.BIN_DIR))
    for d in dirs:
        if is_file(d / "ninja"):
            os.environ["PATH"] = str(d) + os.pathsep + os.environ.get("PATH", "")
            return str(d / "ninja")
    return None


def check_toolchain(cxx: str) -> None:
    if find_ninja() is None:
        raise BuildError(
            "fused_dropout: the ninja build tool was not found, and the extension must be "
            "compiled on first import. Fix: pip install ninja"
        )
    if shutil.which(cxx) is None:
        raise BuildError(
            f"fused_dropout: no C++ compiler found (looked for {cxx!r}"
            f"{', from $CXX' if os.environ.get('CXX') else ''}). Fix: install g++ (e.g. "
            "apt-get install g++) or set CXX to a C++ compiler."
        )


def check_sources(sources: list[Path]) -> None:
    """torch's translation units: all there, and no two compiling to one object name."""
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


def compile_failed(output: str, log: Path, with_cuda: bool) -> BuildError:
    """The error of a failed compile: the tail of its output; the whole of it goes to `log`."""
    with contextlib.suppress(OSError):
        log.write_text(output + "\n")
    tail = "\n".join(output.rstrip().splitlines()[-TAIL_LINES:])
    return BuildError(
        f"fused_dropout: building the extension failed. Last {TAIL_LINES} lines of the build "
        f"output (full log: {log}):\n{tail}\n"
        "Rerun with FUSED_DROPOUT_VERBOSE=1 to see the compiler commands"
        + (", or set FUSED_DROPOUT_BUILD_CUDA=0 to build without CUDA." if with_cuda else ".")
    )


def unwritable(where: Path, e: OSError) -> BuildError:
    return BuildError(
        f"fused_dropout: cannot write to the build cache {where} ({e}), and the extension must "
        "be built there. Fix: make it writable, or set TORCH_EXTENSIONS_DIR to a writable "
        "directory."
    )


def cuda_home_problem() -> str:
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env:
        return f"CUDA_HOME={env} has no bin/nvcc"
    return "CUDA_HOME is unset, /usr/local/cuda/bin/nvcc does not exist and nvcc is not on PATH"
