"""Static report of the CUDA kernels, read from the machine code (no GPU needed).

    python bench/kernels.py [--arch sm_80 sm_90] [--src csrc] [--block 256] [--json FILE]

Compiles csrc/cuda/*.cu with nvcc to a cubin per arch (with the loader's nvcc flags),
then prints, per kernel: registers, spill bytes (ptxas -v), stack and shared memory
(cuobjdump --dump-resource-usage), the occupancy the register count allows, and from
the SASS (cuobjdump --dump-sass) the 128-bit global loads/stores (LDG.E.128 /
STG.E.128) against all global loads/stores, and the Philox rounds: each round is two
32x32->64-bit multiplies by the Philox constants ([U]IMAD.WIDE.U32 / [U]IMAD.HI).

``analyze`` and ``check`` are importable, so a test can assert no spills and
vectorized I/O in the contiguous kernels: ``assert kernels.check(kernels.analyze("sm_80")) == []``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARCHS = ("sm_80", "sm_90")
PHILOX_MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
# Per-SM limits for the occupancy estimate: (registers, max warps, max blocks).
SM_LIMITS = {
    "sm_80": (65536, 64, 32),
    "sm_86": (65536, 48, 16),
    "sm_89": (65536, 48, 24),
    "sm_90": (65536, 64, 32),
}
FALLBACK_NVCC_FLAGS = ("-O3", "-std=c++17", "--expt-relaxed-constexpr", "--fmad=false")


@dataclasses.dataclass
class Kernel:
    arch: str
    name: str  # demangled, without namespace and parameters
    mangled: str
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    local: int = 0
    shared: int = 0
    ldg128: int = 0
    stg128: int = 0
    ldg: int = 0  # all global loads, any width
    stg: int = 0
    philox_muls: int = 0

    @property
    def spill_bytes(self) -> int:
        return self.spill_stores + self.spill_loads

    @property
    def philox_rounds(self) -> float:
        """Two multiplies per round. Calls that share a counter word may share the first
        round's multiply (common subexpression), so this can fall short by a half."""
        return self.philox_muls / 2

    @property
    def philox_calls(self) -> int:
        """Philox4x32-10 evaluations in the code (static: a call in a branch counts once)."""
        return round(self.philox_muls / 20)

    def occupancy(self, block: int = 256) -> float:
        """Resident warps / max warps per SM, limited by registers alone."""
        regs, max_warps, max_blocks = SM_LIMITS.get(self.arch, SM_LIMITS["sm_80"])
        warps_per_block = math.ceil(block / 32)
        regs_per_warp = math.ceil(max(self.registers, 1) * 32 / 256) * 256
        blocks = min(max_blocks, regs // regs_per_warp // warps_per_block)
        return min(max_warps, blocks * warps_per_block) / max_warps


# ------------------------------------------------------------------ tools and build


def find_tool(name: str) -> str | None:
    """cuobjdump / nvcc: the CUDA toolkit, PATH, Triton's copy, or the nvidia-cuda-* wheels."""
    cands = [Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / name]
    which = shutil.which(name)
    if which:
        cands.append(Path(which))
    for site in {sysconfig.get_paths()["purelib"], *sys.path}:
        cands += [
            Path(site) / "triton/backends/nvidia/bin" / name,
            Path(site) / "nvidia/cuda_cuobjdump/bin" / name,
            Path(site) / "nvidia/cuda_nvcc/bin" / name,
        ]
    return next((str(c) for c in cands if c.is_file() and os.access(c, os.X_OK)), None)


def _loader_flags() -> tuple[tuple[str, ...], str]:
    """(nvcc flags, CUDA define) from fused_dropout/_loader.py, read without importing the
    package (whose import builds the extension)."""
    path = ROOT / "fused_dropout" / "_loader.py"
    try:
        spec = importlib.util.spec_from_file_location("_fd_loader_for_bench", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        return tuple(mod.NVCC_FLAGS), mod.CUDA_DEFINE
    except Exception:  # noqa: BLE001 - any failure: use the flags known at the time of writing
        return FALLBACK_NVCC_FLAGS, "-DFUSED_DROPOUT_WITH_CUDA"
    finally:
        sys.modules.pop("_fd_loader_for_bench", None)


def _include_dirs(src: Path) -> list[str]:
    # Its import warns that no CUDA runtime is found, which is expected here.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils import cpp_extension

    try:
        torch_dirs = cpp_extension.include_paths(device_type="cuda")
    except TypeError:  # torch < 2.6
        torch_dirs = cpp_extension.include_paths(cuda=True)
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    return [str(src), *torch_dirs, str(Path(cuda_home) / "include")]


def compile_cubin(source: Path, arch: str, out_dir: Path, src: Path) -> tuple[Path, str]:
    """nvcc -cubin for one arch; returns the cubin and ptxas's -v report."""
    nvcc = find_tool("nvcc")
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (set CUDA_HOME)")
    flags, define = _loader_flags()
    cubin = out_dir / f"{source.stem}.{arch}.cubin"
    cmd = [
        nvcc,
        "-cubin",
        f"-arch={arch}",
        *flags,
        define,
        "-Xptxas",
        "-v",
        *(f"-I{d}" for d in _include_dirs(src)),
        str(source),
        "-o",
        str(cubin),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"nvcc failed on {source.name} ({arch}):\n{res.stderr[-4000:]}")
    return cubin, res.stdout + res.stderr


def _cuobjdump(cubin: Path, what: str) -> str:
    tool = find_tool("cuobjdump")
    if tool is None:
        raise FileNotFoundError("cuobjdump not found: pip install nvidia-cuda-cuobjdump")
    return subprocess.run(
        [tool, what, str(cubin)], capture_output=True, text=True, check=True
    ).stdout


# ------------------------------------------------------------------ parsers


def parse_ptxas(log: str) -> dict[str, dict[str, int]]:
    """mangled name -> registers, spill_stores, spill_loads, stack (from nvcc -Xptxas -v)."""
    out: dict[str, dict[str, int]] = {}
    current = None
    for line in log.splitlines():
        if m := re.search(
            r"(?:Compiling entry function|Function properties for) '?([\w$.]+)'?", line
        ):
            current = out.setdefault(m[1], {})
        elif current is None:
            continue
        elif m := re.search(
            r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
            r"(\d+) bytes spill loads",
            line,
        ):
            current.update(stack=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
        elif m := re.search(r"Used (\d+) registers", line):
            current["registers"] = int(m[1])
    return out


def parse_resource_usage(text: str) -> dict[str, dict[str, int]]:
    """mangled name -> registers, stack, shared, local (cuobjdump --dump-resource-usage)."""
    out, current = {}, None
    for line in text.splitlines():
        if m := re.match(r"\s*Function (\S+):", line):
            current = m[1]
        elif current and "REG:" in line:
            f = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line))
            out[current] = {
                "registers": int(f["REG"]),
                "stack": int(f.get("STACK", 0)),
                "shared": int(f.get("SHARED", 0)),
                "local": int(f.get("LOCAL", 0)),
            }
            current = None
    return out


def _is_philox_mul(ins: str) -> bool:
    if not re.search(r"\bU?IMAD\.(WIDE\.U32|HI\.U32|HI)\b", ins):
        return False
    for imm in re.findall(r"(-?)0x([0-9a-fA-F]+)\b", ins):
        value = int(imm[1], 16)
        if (-value if imm[0] else value) % (1 << 32) in PHILOX_MULTIPLIERS:
            return True
    return False


def parse_sass(text: str) -> dict[str, Counter]:
    """mangled name -> counts of ldg128, stg128, ldg, stg, philox_muls (cuobjdump --dump-sass)."""
    out: dict[str, Counter] = {}
    counts = None
    for line in text.splitlines():
        if m := re.search(r"Function : (\S+)", line):
            counts = out.setdefault(m[1], Counter())
            continue
        m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(.*?);", line)
        if counts is None or not m:
            continue
        ins = m[1]
        op = re.sub(r"^@!?U?P\w+\s+", "", ins).split()[0] if ins.split() else ""
        for kind in ("LDG", "STG"):
            if op.startswith(kind + "."):
                counts[kind.lower()] += 1
                counts[kind.lower() + "128"] += ".128" in op
        counts["philox_muls"] += _is_philox_mul(ins)
    return out


def demangle(names: list[str], src: Path = ROOT / "csrc") -> dict[str, str]:
    """mangled -> short name: c++filt, then without namespaces, 'void' and parameters,
    enum template arguments by name and bools as 1/0."""
    filt = shutil.which("c++filt") or shutil.which("cu++filt")
    full = names
    if filt and names:
        full = subprocess.run(
            [filt], input="\n".join(names), capture_output=True, text=True, check=True
        ).stdout.splitlines()
    enums = _enum_names(src)
    return dict(zip(names, (_shorten(n, enums) for n in full)))


def _enum_names(src: Path) -> dict[str, str]:
    """'(DType)0' -> 'kFloat', ... from the enums declared in csrc's headers."""
    out = {}
    for header in src.glob("**/*.h"):
        for name, body in re.findall(
            r"enum class (\w+)\s*(?::\s*\w+)?\s*\{([^}]*)\}", header.read_text(errors="replace")
        ):
            for i, item in enumerate(x.split("=")[0].strip() for x in body.split(",")):
                out[f"({name}){i}"] = item.removeprefix("k").lower()
    return out


def _shorten(name: str, enums: dict[str, str]) -> str:
    name = re.sub(r"\(anonymous namespace\)::|\b\w+::", "", name.removeprefix("void "))
    depth = 0
    for i, ch in enumerate(name):  # cut the parameter list: the first '(' outside <...>
        depth += (ch == "<") - (ch == ">")
        if ch == "(" and depth == 0:
            name = name[:i]
            break
    name = re.sub(r"\(\w+\)\d+", lambda m: enums.get(m[0], m[0]), name)
    return name.replace("true", "1").replace("false", "0")


# ------------------------------------------------------------------ analysis


def cuda_sources(src: Path = ROOT / "csrc") -> list[Path]:
    return sorted((src / "cuda").glob("*.cu"))


def analyze(
    arch: str = "sm_80", src: Path = ROOT / "csrc", work: Path | None = None
) -> list[Kernel]:
    """Compile every csrc/cuda/*.cu for ``arch`` and read back each kernel's figures."""
    kernels = []
    with tempfile.TemporaryDirectory(prefix="fd_kernels_") as tmp:
        for source in cuda_sources(src):
            cubin, log = compile_cubin(source, arch, Path(work or tmp), src)
            ptxas, usage = (
                parse_ptxas(log),
                parse_resource_usage(_cuobjdump(cubin, "--dump-resource-usage")),
            )
            sass = parse_sass(_cuobjdump(cubin, "--dump-sass"))
            short = demangle(list(usage), src)
            for mangled, res in usage.items():
                k = Kernel(arch, short[mangled], mangled, **res)
                for key, value in ptxas.get(mangled, {}).items():
                    setattr(k, key, value)
                for key, value in sass.get(mangled, Counter()).items():
                    setattr(k, key, value)
                kernels.append(k)
    return kernels


def is_contiguous(k: Kernel) -> bool:
    """Kernels over contiguous memory, which must use 16-byte vector loads and stores: all of
    them (every tensor is streamed in one flat kernel order, DESIGN.md s.4) but any whose
    name says it is strided."""
    return "strided" not in k.name.lower()


def check(kernels: list[Kernel], contiguous=is_contiguous) -> list[str]:
    """Violations of DESIGN.md s.7: spills anywhere; scalar I/O in a contiguous kernel."""
    problems = []
    for k in kernels:
        if k.spill_bytes or k.local:
            problems.append(f"{k.arch} {k.name}: {k.spill_bytes} B spilled, {k.local} B local")
        if contiguous(k) and not (k.ldg128 and k.stg128):
            problems.append(
                f"{k.arch} {k.name}: no 128-bit LDG/STG (LDG.128 {k.ldg128}, STG.128 {k.stg128})"
            )
    if not any(contiguous(k) for k in kernels):
        problems.append("no contiguous kernel found (see bench/kernels.py is_contiguous)")
    return problems


def table(kernels: list[Kernel], block: int) -> str:
    width = max([len(k.name) for k in kernels] + [6])
    head = (
        f"{'arch':<6} {'kernel':<{width}} {'regs':>4} {'spill B':>7} {'stack':>5} "
        f"{'smem':>5} {'occ@' + str(block):>7} {'LDG.128':>7} {'/LDG':>4} "
        f"{'STG.128':>7} {'/STG':>4} {'philox rounds':>13} {'calls':>5}"
    )
    lines = [head, "-" * len(head)]
    for k in kernels:
        lines.append(
            f"{k.arch:<6} {k.name:<{width}} {k.registers:>4} {k.spill_bytes:>7} {k.stack:>5} "
            f"{k.shared:>5} {k.occupancy(block):>6.0%} {k.ldg128:>7} {k.ldg:>4} "
            f"{k.stg128:>7} {k.stg:>4} {k.philox_rounds:>13g} {k.philox_calls:>5}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Static report of the CUDA kernels.")
    ap.add_argument("--arch", nargs="+", default=list(ARCHS))
    ap.add_argument("--src", type=Path, default=ROOT / "csrc", help="the csrc directory")
    ap.add_argument("--block", type=int, default=256, help="threads per block (occupancy)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    if not cuda_sources(args.src):
        print(f"no CUDA sources in {args.src / 'cuda'}", file=sys.stderr)
        return 1
    kernels = [k for arch in args.arch for k in analyze(arch, args.src)]
    print(table(kernels, args.block))
    problems = check(kernels)
    print(
        "\n".join(f"FAIL {p}" for p in problems)
        or "OK: no spills; 128-bit loads and stores in every contiguous kernel"
    )
    if args.json:
        rows = [
            dataclasses.asdict(k)
            | {
                "philox_rounds": k.philox_rounds,
                "philox_calls": k.philox_calls,
                "occupancy": k.occupancy(args.block),
            }
            for k in kernels
        ]
        args.json.write_text(json.dumps(rows, indent=1))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
