"""Packaging for fused_dropout (metadata lives in pyproject.toml).

Default: a pure-Python install. The C++/CUDA sources (csrc/) are shipped inside the package
(fused_dropout/csrc) and compiled on first import (fused_dropout/_loader/).

Ahead of time: ``FUSED_DROPOUT_AOT=1 pip install --no-build-isolation .`` (or ``pip wheel``)
compiles the extension into ``fused_dropout/_C*.so``, which the loader then uses: a wheel that
imports with no compiler. It follows the loader's rules and flags (fused_dropout/_loader/
config.py, the one place they are defined) and carries every CPU path (the kernel files
compiled once per CPU capability, _loader/cpu_kernels.py), chosen when it loads. CUDA kernels
when torch is a CUDA build, nvcc is found (CUDA_HOME, /usr/local/cuda, PATH) and a GPU is
visible or FUSED_DROPOUT_BUILD_CUDA=1; TORCH_CUDA_ARCH_LIST is honoured, else the wheel's list
(config.WHEEL_CUDA_ARCH_LIST: sm_80, sm_90, sm_100, sm_120 and PTX).
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


def _loader_package():
    """fused_dropout/_loader/, imported without running the package's __init__ (which loads the
    library, or builds it)."""
    name = "_fused_dropout_loader_for_setup"
    path = ROOT / "fused_dropout" / "_loader"
    spec = importlib.util.spec_from_file_location(
        name, path / "__init__.py", submodule_search_locations=[str(path)]
    )
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
    loader = _loader_package()
    cfg = loader.build_config(ROOT / "csrc", wheel=True)  # the JIT build's rules
    if cfg.with_cuda:
        # before importing cpp_extension, which guesses CUDA_HOME once at import
        os.environ["CUDA_HOME"] = cfg.cuda_home
        if cfg.arch_list is not None:  # no TORCH_CUDA_ARCH_LIST: the wheel's list
            os.environ["TORCH_CUDA_ARCH_LIST"] = cfg.arch_list
    from torch.utils import cpp_extension

    if cfg.with_cuda:
        cpp_extension.CUDA_HOME = cfg.cuda_home
    sources = [str(p.relative_to(ROOT)) for p in loader.source_files(cfg.source_dir, cfg.with_cuda)]
    kind = cpp_extension.CUDAExtension if cfg.with_cuda else cpp_extension.CppExtension
    compile_args = {"cxx": list(cfg.cflags)}
    if cfg.with_cuda:
        compile_args["nvcc"] = list(cfg.cuda_cflags)
    caps = ", ".join(c.name for c in cfg.cpu_capabilities)
    print(
        f"fused_dropout: AOT build of fused_dropout._C (CPU paths {caps}"
        f"{'; CUDA archs ' + cfg.arch_desc if cfg.with_cuda else ''})",
        file=sys.stderr,
    )
    ext = kind(
        "fused_dropout._C",
        sources,
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args=compile_args,
        extra_link_args=list(cfg.ldflags),
    )

    class BuildExtWithKernels(cpp_extension.BuildExtension):
        """Also compiles the CPU kernel files once per CPU capability (linked into _C), and
        writes the build's configuration next to _C (the loader and the report read it)."""

        def build_extension(self, extension):
            objects = loader.cpu_kernels.compile_cpu_kernels(
                cfg, Path(self.build_temp), verbose=bool(self.verbose)
            )
            extension.extra_objects = [str(o) for o in objects]
            super().build_extension(extension)

        def run(self):
            super().run()
            out = Path(self.get_ext_fullpath(ext.name)).parent / loader.prebuilt.INFO_FILE
            out.write_text(json.dumps(loader.prebuilt.build_info(cfg), indent=1) + "\n")

    return ext, BuildExtWithKernels


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
