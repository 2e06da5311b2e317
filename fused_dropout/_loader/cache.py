"""Where JIT builds are cached, and the key that names one.

``$TORCH_EXTENSIONS_DIR``, else ``$XDG_CACHE_HOME/torch_extensions``, else
``~/.cache/torch_extensions``; then ``fused_dropout/<key>/build/fused_dropout_C.so``. The key
hashes what the built library depends on: the torch, CUDA and Python versions, the machine's
architecture, the C++ compiler's version, nvcc's version and the CUDA arch list in a CUDA build,
every compiler flag (the CPU capabilities' too), and the content of every file under ``csrc/``.
Not the build machine's CPU: nothing is compiled for it (config.py), so nodes of different CPUs
that share a home directory share one build, which runs the best path on each.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from .config import BuildConfig

#: Bump when the loader changes how it builds.
KEY_VERSION = 2
#: The library's name inside a key's directory (and the ninja target).
EXT_NAME = "fused_dropout_C"


def cache_root() -> Path:
    """Base directory of torch extension builds (the fused_dropout cache is a subfolder)."""
    base = os.environ.get("TORCH_EXTENSIONS_DIR")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg) / "torch_extensions"
    return Path.home() / ".cache" / "torch_extensions"


def key_dir(key: str) -> Path:
    """The directory of one build: its lock, its attempts, and build/ once published."""
    return cache_root() / "fused_dropout" / key


def library_path(key: str) -> Path:
    return key_dir(key) / "build" / f"{EXT_NAME}.so"


def cache_key(cfg: BuildConfig) -> str:
    """A short hash of everything that changes the built library (see the module doc)."""
    import torch

    parts = {
        "loader": KEY_VERSION,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": [sys.implementation.name, *sys.version_info[:2]],
        "machine": platform.machine(),
        "cxx": compiler_version(cfg.cxx),
        "with_cuda": cfg.with_cuda,
        "nvcc": nvcc_version(cfg.cuda_home) if cfg.with_cuda else None,
        "arch": cfg.arch_desc,
        "cflags": list(cfg.cflags),
        "cuda_cflags": list(cfg.cuda_cflags),
        "ldflags": list(cfg.ldflags),
        "kernel_flags": list(cfg.kernel_flags),
        "cpu_capabilities": [dataclasses.astuple(c) for c in cfg.cpu_capabilities],
        "sources": _hash_tree(cfg.source_dir),
    }
    blob = json.dumps(parts, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def compiler_version(cxx: str) -> str:
    """The first line of ``cxx --version`` ("" when it does not run)."""
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return ""
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0].strip() if lines else ""


def nvcc_version(cuda_home: str | None) -> str:
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
