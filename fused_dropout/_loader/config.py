"""What gets built, and how: the sources, CPU-only or CPU+CUDA, the CUDA archs, the CPU
capabilities and every compiler flag (the one place they are defined: setup.py imports them).

Two kinds of C++ translation units:

- torch's: ``csrc/ops.cpp``, ``csrc/ops/*.cpp`` (and in a CUDA build ``csrc/cuda/*.cu`` and
  ``csrc/cuda/*.cpp``), compiled by ``torch.utils.cpp_extension`` with ``CXX_FLAGS`` (nvcc:
  ``NVCC_FLAGS``). No -std for them: torch adds the standard its own headers need (C++17 up to
  torch 2.9ish, C++20 in torch 2.14, whose ATen.h has `#error` under C++17). The .cu files
  include no torch headers, so nvcc gets C++17.
- the CPU kernel files ``csrc/cpu/*.cpp``: no torch headers; compiled by ``cpu_kernels.py``
  once per CPU capability of ``csrc/cpu/capability.h`` (``KERNEL_FLAGS`` plus the capability's
  ``-m`` flags), and linked into the same library, which runs the best one the CPU has.

No C++ code is compiled for the build machine's own CPU (no -march=native): a JIT build in a
home directory that cluster nodes share serves them all, and a wheel runs anywhere.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

from .checks import BuildError, cuda_home_problem, env_flag, is_file

#: Every C++ translation unit: optimised, and never an FMA contraction (the fused ops round
#: once per add and multiply, as the GPU code does with --fmad=false).
OPT_FLAGS = ("-O3", "-ffp-contract=off")
#: torch's translation units (at::parallel_for's OpenMP backend is inline in its headers).
CXX_FLAGS = OPT_FLAGS + ("-fopenmp",)
#: torch's translation units in the AOT build (setup.py): setuptools adds Python's own CFLAGS,
#: -g among them, and -g0 keeps debug info out of the wheel (16 MB of its 17), as in a JIT build.
AOT_CXX_FLAGS = CXX_FLAGS + ("-g0",)
#: The CPU kernel files, before their capability's -m flags.
KERNEL_FLAGS = OPT_FLAGS + ("-std=c++17", "-fPIC", "-Wno-psabi")
#: Never --use_fast_math. --fmad=false: no mul+add contraction into FMA in device code, so the
#: fused ops round like the CPU code (built with -ffp-contract=off); the kernels are memory-bound.
#: --threads=0: the archs of a .cu file compile in parallel (norm.cu, sm_80 + sm_90: 100 s -> 43 s).
NVCC_FLAGS = ("-O3", "-std=c++17", "--expt-relaxed-constexpr", "--fmad=false", "--threads=0")
LD_FLAGS = ("-fopenmp",)
CUDA_DEFINE = "-DFUSED_DROPOUT_WITH_CUDA"
#: Archs of a JIT build when TORCH_CUDA_ARCH_LIST is unset and no GPU is visible: A100 (sm_80)
#: and H100 (sm_90) code, plus sm_90 PTX that the driver JIT-compiles for newer GPUs.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"
#: Archs of a CUDA wheel (FUSED_DROPOUT_AOT=1) when TORCH_CUDA_ARCH_LIST is unset: A100, H100,
#: B200 (sm_100) and RTX 50xx / RTX PRO (sm_120) code, and sm_120 PTX for newer GPUs.
WHEEL_CUDA_ARCH_LIST = "8.0;9.0;10.0;12.0+PTX"

#: The file that lists the CPU capabilities (read by capabilities()).
CAPABILITY_HEADER = Path("cpu") / "capability.h"
_CAPABILITY_ROW = re.compile(r'^\s*X\((\w+), "([^"]*)", __VA_ARGS__\)', re.MULTILINE)


@dataclasses.dataclass(frozen=True)
class CpuCapability:
    """One row of FD_CPU_CAPABILITIES: a name, and the ISA extensions of its kernel objects."""

    name: str
    extensions: tuple[str, ...]

    @property
    def flags(self) -> tuple[str, ...]:
        """What a kernel file gets, besides KERNEL_FLAGS, when compiled for this capability."""
        return (*(f"-m{e}" for e in self.extensions), f"-DFD_CPU_NS=cpu_{self.name}")


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
    #: The CPU capabilities each kernel file is compiled for, lowest first.
    cpu_capabilities: tuple[CpuCapability, ...] = ()
    #: The kernel files' flags (KERNEL_FLAGS, and torch's C++ ABI for the standard library).
    kernel_flags: tuple[str, ...] = ()
    #: Why a visible GPU gets no CUDA kernels (said when building), or "".
    note: str = ""


def find_source_dir(package_dir: Path) -> Path | None:
    """The csrc directory: shipped inside the package, else at the repository root."""
    for cand in (package_dir / "csrc", package_dir.parent / "csrc"):
        if (cand / "ops.cpp").is_file():
            return cand
    return None


def source_files(source_dir: str | os.PathLike, with_cuda: bool) -> list[Path]:
    """torch's translation units of a build, in a fixed order."""
    src = Path(source_dir)
    files = [src / "ops.cpp", *sorted((src / "ops").glob("*.cpp"))]
    if with_cuda:
        files += sorted((src / "cuda").glob("*.cu")) + sorted((src / "cuda").glob("*.cpp"))
    return files


def kernel_files(source_dir: str | os.PathLike) -> list[Path]:
    """The CPU kernel files, each compiled once per CPU capability."""
    return sorted((Path(source_dir) / "cpu").glob("*.cpp"))


def capabilities(source_dir: str | os.PathLike) -> tuple[CpuCapability, ...]:
    """The CPU capabilities of csrc/cpu/capability.h that this machine builds: on x86-64 every
    row, elsewhere only the one without ISA extensions (the header's #if says the same)."""
    header = Path(source_dir) / CAPABILITY_HEADER
    try:
        rows = _CAPABILITY_ROW.findall(header.read_text())
    except OSError as e:
        raise BuildError(f"fused_dropout: cannot read the CPU capability table: {e}") from None
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    caps = tuple(CpuCapability(name, tuple(ext.split())) for name, ext in rows)
    caps = tuple(c for c in caps if x86 or not c.extensions)
    if not caps or caps[0].extensions:
        raise BuildError(f"fused_dropout: {header} lists no capability without ISA extensions")
    return caps


def find_cuda_home() -> str | None:
    """The CUDA toolkit: $CUDA_HOME (or $CUDA_PATH), /usr/local/cuda, or the nvcc on PATH.

    An explicit $CUDA_HOME without bin/nvcc gives None (it is a mistake to report, not to guess
    around).
    """
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env:
        return env if is_file(Path(env) / "bin" / "nvcc") else None
    if is_file(Path("/usr/local/cuda/bin/nvcc")):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    home = Path(os.path.realpath(nvcc)).parent.parent
    if is_file(home / "include" / "cuda_runtime.h"):
        return str(home)
    # nvcc on PATH may be a wrapper script: ask nvcc where it lives.
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "--version"], capture_output=True, text=True, timeout=30
        )
        m = re.search(r"^#\$ _HERE_=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    except (OSError, subprocess.SubprocessError):
        m = None
    if m and is_file(Path(m.group(1).strip()) / "nvcc"):
        return str(Path(m.group(1).strip()).parent)
    return None


def build_config(source_dir: str | os.PathLike, *, wheel: bool = False) -> BuildConfig:
    """Decide CPU-only vs CPU+CUDA, the archs and the flags, from torch and the environment.

    ``wheel=True`` (the AOT build) takes AOT_CXX_FLAGS, and WHEEL_CUDA_ARCH_LIST when
    TORCH_CUDA_ARCH_LIST is unset (also with a GPU visible: a wheel moves). Raises BuildError
    when FUSED_DROPOUT_BUILD_CUDA=1 cannot be honoured.
    """
    import torch

    src = Path(source_dir).resolve()
    forced = env_flag("FUSED_DROPOUT_BUILD_CUDA")
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
                    f"not found: {cuda_home_problem()}. Fix: install the CUDA toolkit and "
                    "set CUDA_HOME to it (e.g. export CUDA_HOME=/usr/local/cuda), or set "
                    "FUSED_DROPOUT_BUILD_CUDA=0 for a CPU-only build."
                )
            else:
                note = (
                    f"no CUDA kernels although a GPU is visible: {cuda_home_problem()}; "
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
        elif wheel:
            arch_list = arch_desc = WHEEL_CUDA_ARCH_LIST
        elif gpu:
            arch_desc = "native:" + ";".join(visible_gpu_archs())
        else:
            arch_list = arch_desc = DEFAULT_CUDA_ARCH_LIST

    cflags, cuda_cflags = (AOT_CXX_FLAGS if wheel else CXX_FLAGS), NVCC_FLAGS
    if with_cuda:
        cflags += (CUDA_DEFINE,)
        cuda_cflags += (CUDA_DEFINE,)
    # The kernel files share no standard-library type with torch's code, but their objects
    # join the same link: the same std:: ABI keeps any such symbol from clashing.
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
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
        cpu_capabilities=capabilities(src),
        kernel_flags=KERNEL_FLAGS + (abi,),
        note=note,
    )


def visible_gpu_archs() -> list[str]:
    """Compute capabilities of the visible GPUs, without initialising CUDA when possible."""
    caps: set[str] = set()
    if shutil.which("nvidia-smi") and not os.environ.get("CUDA_VISIBLE_DEVICES"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=60,
            ).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        caps = {c.strip() for c in out.splitlines() if re.fullmatch(r"\d+\.\d+", c.strip())}
    if not caps:
        import torch

        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            caps.add(f"{major}.{minor}")
    return sorted(caps)
