"""A library built ahead of time into the package (``FUSED_DROPOUT_AOT=1``, setup.py).

It lies at ``fused_dropout/_C*.so``, with ``_C_build_info.json`` beside it: what it was built
with (build_info()). Found first by the loader, so an installed wheel compiles nothing.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from .checks import BuildError, say
from .config import BuildConfig

#: Written by setup.py next to a prebuilt _C.
INFO_FILE = "_C_build_info.json"


def build_info(cfg: BuildConfig) -> dict:
    """What setup.py records about its build (the loader and the report read it back)."""
    import torch

    return {
        "with_cuda": cfg.with_cuda,
        "cuda_archs": cfg.arch_desc,
        "cpu_capabilities": [c.name for c in cfg.cpu_capabilities],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
    }


def find(package_dir: Path) -> Path | None:
    for pattern in ("_C.so", "_C.*.so", "_C.*.pyd"):
        hits = sorted(package_dir.glob(pattern))
        if hits:
            return hits[0]
    return None


def read_info(path: Path) -> dict:
    """The build info beside a prebuilt library ({} when there is none)."""
    with contextlib.suppress(OSError, ValueError):
        return json.loads((path.parent / INFO_FILE).read_text())
    return {}


def load(path: Path) -> bool:
    """Load it; returns whether it has CUDA kernels."""
    import torch

    src = path.parent.parent / "csrc"  # an editable AOT install keeps the sources beside it
    if src.is_dir():
        built_at = path.stat().st_mtime
        if any(p.stat().st_mtime > built_at for p in src.rglob("*") if p.is_file()):
            say(
                f"warning: {path.name} is older than sources in {src}; rebuild it "
                f"(FUSED_DROPOUT_AOT=1 pip install --no-build-isolation -e .) or delete it "
                "to use the JIT build"
            )
    info = read_info(path)
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
        return bool(info["with_cuda"])
    return b"libc10_cuda.so" in path.read_bytes()  # a CUDAExtension links it, a CppExtension not
