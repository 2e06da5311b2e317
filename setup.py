"""Packaging for fused_dropout (metadata lives in pyproject.toml).

Default: a pure-Python install. The C++/CUDA sources (csrc/) are shipped inside the package
(fused_dropout/csrc) and compiled on first import (fused_dropout/_loader.py).

Ahead of time: ``FUSED_DROPOUT_AOT=1 pip install --no-build-isolation .`` compiles the extension
into ``fused_dropout/_C*.so`` with torch.utils.cpp_extension, which the loader then uses. It
follows the loader's rules and flags (imported from _loader.py, the one place they are
defined), without -march=native since a built wheel may run on another CPU: CUDA kernels when
torch is a CUDA build, nvcc is found (CUDA_HOME, /usr/local/cuda, PATH) and a GPU is visible or
FUSED_DROPOUT_BUILD_CUDA=1; TORCH_CUDA_ARCH_LIST is honoured, default "8.0;9.0+PTX" with no GPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _loader_module():
    """fused_dropout/_loader.py, imported without running the package's __init__."""
    name = "_fused_dropout_loader_for_setup"
    spec = importlib.util.spec_from_file_location(name, ROOT / "fused_dropout" / "_loader.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class BuildPyWithSources(build_py):
    """Copy csrc/ into the built package so a non-editable install can compile it on import."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install compiles <repo>/csrc in place
        dst = Path(self.build_lib) / "fused_dropout" / "csrc"
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(
            ROOT / "csrc",
            dst,
            ignore=shutil.ignore_patterns(".*", "__pycache__", "*~", "*.o", "*.so"),
        )


def _aot_extension():
    loader = _loader_module()
    cfg = loader.build_config(ROOT / "csrc", native=False)  # same CUDA rules as the JIT build
    if cfg.with_cuda:
        # before importing cpp_extension, which guesses CUDA_HOME once at import
        os.environ["CUDA_HOME"] = cfg.cuda_home
        if cfg.arch_list is not None:  # no TORCH_CUDA_ARCH_LIST and no GPU: the default list
            os.environ["TORCH_CUDA_ARCH_LIST"] = cfg.arch_list
    from torch.utils import cpp_extension

    if cfg.with_cuda:
        cpp_extension.CUDA_HOME = cfg.cuda_home
    sources = [str(p.relative_to(ROOT)) for p in loader.source_files(cfg.source_dir, cfg.with_cuda)]
    kind = cpp_extension.CUDAExtension if cfg.with_cuda else cpp_extension.CppExtension
    compile_args = {"cxx": list(cfg.cflags)}
    if cfg.with_cuda:
        compile_args["nvcc"] = list(cfg.cuda_cflags)
    print(
        f"fused_dropout: AOT build of fused_dropout._C "
        f"(CPU{'+CUDA archs ' + cfg.arch_desc if cfg.with_cuda else ''})",
        file=sys.stderr,
    )
    ext = kind(
        "fused_dropout._C",
        sources,
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args=compile_args,
        extra_link_args=list(cfg.ldflags),
    )
    import torch

    info = {
        "with_cuda": cfg.with_cuda,
        "cuda_archs": cfg.arch_desc,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
    }

    class BuildExtWithInfo(cpp_extension.BuildExtension):
        """Also writes the build's configuration next to _C (the loader reads it)."""

        def run(self):
            super().run()
            out = Path(self.get_ext_fullpath(ext.name)).parent / loader.PREBUILT_INFO
            out.write_text(json.dumps(info, indent=1) + "\n")

    return ext, BuildExtWithInfo


def _readme() -> dict:
    """pyproject.toml declares the readme dynamic: it must be set, README.md or not."""
    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8") if readme.is_file() else "fused_dropout"
    return {"long_description": text, "long_description_content_type": "text/markdown"}


cmdclass = {"build_py": BuildPyWithSources}
ext_modules = []
if os.environ.get("FUSED_DROPOUT_AOT", "").strip() == "1":
    extension, build_ext = _aot_extension()
    ext_modules.append(extension)
    cmdclass["build_ext"] = build_ext

setup(ext_modules=ext_modules, cmdclass=cmdclass, **_readme())
