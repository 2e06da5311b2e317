"""Static report of the CUDA kernels, read from the machine code (no GPU needed).

    python bench/kernels.py [--arch sm_80 sm_90] [--src csrc] [--block 256] [--json FILE]

Compiles csrc/cuda/*.cu with nvcc to a cubin per arch (with the loader's nvcc flags),
then prints, per kernel: registers, spill bytes (ptxas -v), stack and shared memory
(cuobjdump --dump-resource-usage), the occupancy the register count allows, and from
the SASS (cuobjdump --dump-sass) the 128-bit global loads/stores (LDG.E.128 /
STG.E.128) against all global loads/stores, and the Philox rounds: each round is two
32x32->64-bit multiplies by the Philox constants ([U]IMAD.WIDE.U32 / [U]IMAD.HI).

A second table is a throughput model of every element-wise kernel (a lead, not a
measurement): SASS instructions and IMADs per element on the steady-state vector path
of the grid-stride loop, the issue-bound and memory-bound elements/s they imply on an
A100, H100, H200 and B200, and which bound each kernel hits (bench/README.md).

A third table does the same for csrc/cuda/norm.cu's LayerNorm kernels (forward and
backward, fp32/fp16/bf16), per hidden size from 768 to 8192: the instructions per element of
a row's turn on the vector path (one Philox call per 8 elements), against the bytes model of
norm_bytes_per_row on an H200.

``analyze``, ``read_library`` and ``check`` are importable, so a test can assert no spills and
vectorized I/O in the contiguous kernels: ``assert kernels.check(kernels.analyze("sm_80")) == []``,
or, without compiling again, on a CUDA build's library (tests/test_kernels_static.py):
``kernels.read_library(path)["sm_90"]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
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
from concurrent.futures import ThreadPoolExecutor
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
FALLBACK_NVCC_FLAGS = (
    "-O3",
    "-std=c++17",
    "--expt-relaxed-constexpr",
    "--fmad=false",
    "--threads=0",
)


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
    tile: int = 0  # elements per thread per loop turn (element-wise kernels; 0: not modelled)
    path_instrs: int = 0  # SASS instructions of one turn of the steady-state vector path
    path_imads: int = 0  # the IMADs among them (any IMAD.* form)
    path_calls: int = 0  # subroutine calls on it (uncounted instructions: check() rejects them)
    path_philox_muls: int = 0  # Philox multiplies on it
    path_draw_skips: int = 0  # its branches that could go round the loop without its draws
    # norm.cu kernels: hidden -> (instructions, IMADs) per element on the vector path
    norm_per_element: dict[int, tuple[float, float]] = dataclasses.field(default_factory=dict)

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

    @property
    def instrs_per_element(self) -> float:
        return self.path_instrs / self.tile if self.tile else math.nan

    @property
    def imads_per_element(self) -> float:
        return self.path_imads / self.tile if self.tile else math.nan

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
    """(nvcc flags, CUDA define) from fused_dropout/_loader/config.py, read without importing
    the package (whose import builds the extension)."""
    path = ROOT / "fused_dropout" / "_loader"
    try:
        spec = importlib.util.spec_from_file_location(
            "_fd_loader_for_bench", path / "__init__.py", submodule_search_locations=[str(path)]
        )
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        return tuple(mod.config.NVCC_FLAGS), mod.config.CUDA_DEFINE
    except Exception:  # noqa: BLE001 - any failure: use the flags known at the time of writing
        return FALLBACK_NVCC_FLAGS, "-DFUSED_DROPOUT_WITH_CUDA"
    finally:
        for name in [m for m in sys.modules if m.split(".")[0] == "_fd_loader_for_bench"]:
            del sys.modules[name]


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


def compile_cubin(
    source: Path, arch: str, out_dir: Path, src: Path, loader_flags=None
) -> tuple[Path, str]:
    """nvcc -cubin for one arch; returns the cubin and ptxas's -v report. ``loader_flags``:
    _loader_flags(), read once by a caller that compiles from several threads (reading them
    imports a module, which must not race with another thread doing the same)."""
    nvcc = find_tool("nvcc")
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (set CUDA_HOME)")
    flags, define = loader_flags or _loader_flags()
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


def sass_functions(text: str) -> dict[str, list[tuple[int, str]]]:
    """mangled name -> [(address, instruction)] (cuobjdump --dump-sass)."""
    out: dict[str, list[tuple[int, str]]] = {}
    current = None
    for line in text.splitlines():
        if m := re.search(r"Function : (\S+)", line):
            current = out.setdefault(m[1], [])
        elif current is not None and (m := re.search(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)):
            current.append((int(m[1], 16), m[2]))
    return out


def opcode(ins: str) -> str:
    """'@!P0 LDG.E.128 R4, [R2]' -> 'LDG.E.128'."""
    rest = re.sub(r"^@!?U?P\w+\s+", "", ins).split()
    return rest[0] if rest else ""


def parse_sass(text: str) -> dict[str, Counter]:
    """mangled name -> counts of ldg128, stg128, ldg, stg, philox_muls (cuobjdump --dump-sass)."""
    out: dict[str, Counter] = {}
    for name, instrs in sass_functions(text).items():
        counts = out[name] = Counter()
        for _, ins in instrs:
            op = opcode(ins)
            for kind in ("LDG", "STG"):
                if op.startswith(kind + "."):
                    counts[kind.lower()] += 1
                    counts[kind.lower() + "128"] += ".128" in op
            counts["philox_muls"] += _is_philox_mul(ins)
    return out


# ------------------------------------------------------------------ steady-state path


def _branch(ins: str) -> tuple[int | None, bool, bool]:
    """(target, conditional, ends the path) of a control-flow instruction."""
    op = opcode(ins)
    conditional = ins.startswith("@") and not ins.startswith("@PT ")
    if op.startswith("BRA"):
        m = re.search(r"(0x[0-9a-f]+)\s*$", ins)
        return (int(m[1], 16) if m else None), conditional, False
    if op in ("EXIT", "RET", "RET.REL", "RET.REL.NODEC") or op.startswith("BPT"):
        return None, conditional, not conditional
    return None, False, False


@dataclasses.dataclass
class _Block:
    """A basic block of a loop body: its instructions (no NOPs), tallies and successors."""

    text: list[str]
    philox: int  # Philox multiplies
    ldg128: int
    stg128: int
    succ: list[int]  # later blocks of the loop it can go on to
    back: bool  # it ends the loop turn (the back edge)


@dataclasses.dataclass
class SteadyPath:
    instrs: list[str]
    philox_muls: int
    draw_skips: int  # branches on it that could go round the loop without its draws


def _loop_blocks(instrs: list[tuple[int, str]], lo: int, hi: int) -> dict[int, _Block]:
    """The blocks of the loop from instruction lo to its back edge at hi, by first index;
    edges forward only (a path is one turn)."""
    index = {a: i for i, (a, _) in enumerate(instrs)}
    leaders = {lo}  # loop start, branch targets and instructions after a branch
    for i in range(lo, hi + 1):
        target, _, _ = _branch(instrs[i][1])
        if target is not None or opcode(instrs[i][1]).startswith(("BRA", "EXIT")):
            leaders.add(i + 1)
            if target is not None and target in index and lo <= index[target] <= hi:
                leaders.add(index[target])
    starts = sorted(x for x in leaders if x <= hi)
    blocks = {}
    for k, b in enumerate(starts):
        end = starts[k + 1] if k + 1 < len(starts) else hi + 1
        block = blocks[b] = _Block([], 0, 0, 0, [], False)
        for i in range(b, end):
            ins = instrs[i][1]
            if opcode(ins) == "NOP":
                continue
            op = opcode(ins)
            block.text.append(ins)
            block.philox += _is_philox_mul(ins)
            block.ldg128 += op.startswith("LDG.") and ".128" in op
            block.stg128 += op.startswith("STG.") and ".128" in op
            target, conditional, stops = _branch(ins)
            if i == hi:  # a conditional back edge can also fall out of the loop: a turn ends
                block.back = True
                break
            if stops:
                break
            if target is not None:
                if target in index and i < index[target] <= hi:
                    block.succ.append(index[target])
                if not conditional:
                    break
        else:
            if end <= hi:
                block.succ.append(end)
    return blocks


def loop_edges(instrs: list[tuple[int, str]]) -> list[tuple[int, int]]:
    """(header, back edge) addresses of the loops: the branches to an earlier instruction."""
    index = {a for a, _ in instrs}
    return [
        (target, addr)
        for addr, ins in instrs
        if (target := _branch(ins)[0]) is not None and target <= addr and target in index
    ]


def steady_state_path(
    instrs: list[tuple[int, str]],
    loads: int,
    stores: int,
    *,
    draws: bool = True,
    exact: bool = False,
    only: list[tuple[int, int]] | None = None,
    sure_loads: bool = False,
) -> SteadyPath | None:
    """The instructions one thread executes per iteration of the grid-stride loop on its
    common path: of the ways round the loop (header to back edge) that issue ``loads``
    128-bit loads and ``stores`` 128-bit stores and draw (run Philox multiplies), the
    shortest of those that draw least. So the scalar tail, the p == 0 path (no Philox) and
    the tie path (more calls) are excluded, without assuming what the path draws: for the
    first-draw calls of a tile (one per 8 elements) it has 19-20 multiplies each (the first
    round's multiply of the uniform counter word o_lo may be hoisted out of the loop). Also
    counts the branches on the path that could go round the loop, loads and stores
    included, without its draws: one in a correct kernel, its p == 0 test; a kernel that
    draws only in its tie branch has another, the tie test. None if no such loop.

    For the norm backward's loops: ``draws=False`` asks for a path with no Philox multiply,
    ``exact`` for exactly ``loads`` and ``stores`` (not at least); ``only``: these loops
    (loop_edges) alone, in this order; ``sure_loads``: a block's loads counted as _sure_loads
    does (a weight in fp32 or in the dtype is two predicated loads, of which one runs). (The
    norm forward has its own search: norm_forward_path.)"""
    index = {a: i for i, (a, _) in enumerate(instrs)}
    back_edges = loop_edges(instrs)
    need = (loads, stores)
    cap = (loads + exact, stores + exact)  # exact: one over the count shows as over
    enough = 1  # Philox multiplies that make a path a drawing one
    order = only if only is not None else sorted(back_edges, key=lambda e: e[0] - e[1])
    for head, tail in order:  # widest loop first
        lo, hi = index[head], index[tail]
        blocks = _loop_blocks(instrs, lo, hi)
        if sure_loads:
            for block in blocks.values():
                block.ldg128 = _sure_loads(block.text)
        # DP over the blocks in address order. State on entering a block: (Philox
        # multiplies capped at enough, capped loads, capped stores) -> the least (Philox
        # multiplies, instructions) that reaches it, and the state it came from. Both add up
        # along a path, so a suffix keeps their order and the least is all a state needs;
        # back pointers, not paths: the unrolled norm kernels have thousands of blocks.
        State = tuple[int, int, int]
        states: dict[int, dict[State, tuple[int, int, tuple | None]]] = {
            lo: {(0, 0, 0): (0, 0, None)}
        }
        best = None
        for b in sorted(blocks):
            block = blocks[b]
            for here, (ph, n, _) in states.get(b, {}).items():
                key = (
                    min(here[0] + block.philox, enough),
                    min(here[1] + block.ldg128, cap[0]),
                    min(here[2] + block.stg128, cap[1]),
                )
                if (exact and (key[1] > need[0] or key[2] > need[1])) or (key[0] and not draws):
                    continue  # past what the path may load, store or draw: tallies only grow
                cost = (ph + block.philox, n + len(block.text))
                if block.back:
                    drawn = key[0] == enough if draws else key[0] == 0
                    if key[1:] == need and drawn and (best is None or cost < best[0]):
                        best = (cost, (b, here))
                    continue
                for s in block.succ:
                    slot = states.setdefault(s, {})
                    if key not in slot or slot[key][:2] > cost:
                        slot[key] = (*cost, (b, here))
        if best is not None:
            (philox, _), at = best
            path = []
            while at is not None:
                path.append(at[0])
                at = states[at[0]][at[1]][2]
            path.reverse()
            text = [ins for b in path for ins in blocks[b].text]
            return SteadyPath(text, philox, _draw_skips(blocks, path, need))
    return None


def _draw_skips(blocks: dict[int, _Block], path: list[int], need: tuple[int, int]) -> int:
    """Branches on ``path`` whose other way goes round the loop, with the loads and stores,
    without a Philox multiply, while the path draws after them."""

    @functools.cache
    def drawless(b: int, ld: int, st: int) -> bool:
        block = blocks[b]
        if block.philox:
            return False
        ld, st = min(ld + block.ldg128, need[0]), min(st + block.stg128, need[1])
        if block.back:
            return (ld, st) == need
        return any(drawless(s, ld, st) for s in block.succ)

    skips, ld, st = 0, 0, 0
    for i, b in enumerate(path[:-1]):
        block = blocks[b]
        ld, st = min(ld + block.ldg128, need[0]), min(st + block.stg128, need[1])
        draws_later = any(blocks[later].philox for later in path[i + 1 :])
        others = [s for s in block.succ if s != path[i + 1]]
        skips += draws_later and any(drawless(s, ld, st) for s in others)
    return skips


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
    return analyze_archs((arch,), src, work)[arch]


def analyze_archs(
    archs: tuple[str, ...], src: Path = ROOT / "csrc", work: Path | None = None
) -> dict[str, list[Kernel]]:
    """analyze() for several archs, with nvcc running on every core at once (one nvcc is
    one core: each source and arch is minutes on a 2-core machine)."""
    pairs = [(arch, source) for arch in archs for source in cuda_sources(src)]
    flags = _loader_flags()
    with tempfile.TemporaryDirectory(prefix="fd_kernels_") as tmp:
        with ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as pool:
            built = list(
                pool.map(
                    lambda pair: compile_cubin(pair[1], pair[0], Path(work or tmp), src, flags),
                    pairs,
                )
            )
        out: dict[str, list[Kernel]] = {arch: [] for arch in archs}
        for (arch, _), (cubin, log) in zip(pairs, built):
            out[arch] += read_cubin(arch, cubin, log, src)
    return out


def read_cubin(
    arch: str, cubin: Path, ptxas_log: str = "", src: Path = ROOT / "csrc"
) -> list[Kernel]:
    """Each kernel's figures from a cubin of ``arch`` (and ptxas -v's report, if any)."""
    return _read_dumps(
        arch,
        _cuobjdump(cubin, "--dump-resource-usage"),
        _cuobjdump(cubin, "--dump-sass"),
        ptxas_log,
        src,
    )


def read_library(library: Path, src: Path = ROOT / "csrc") -> dict[str, list[Kernel]]:
    """Each kernel's figures, per arch, from a built extension's fatbin (its ELF code, not its
    PTX): what a CUDA build ships, read without compiling again. Spills show as local memory
    (there is no ptxas -v report to read)."""
    usage = _elf_sections(_cuobjdump(library, "--dump-resource-usage"))
    sass = _elf_sections(_cuobjdump(library, "--dump-sass"))
    return {arch: _read_dumps(arch, usage[arch], sass.get(arch, ""), "", src) for arch in usage}


def _elf_sections(dump: str) -> dict[str, str]:
    """arch -> the text of every 'Fatbin elf code' section of that arch in a cuobjdump dump."""
    out: dict[str, str] = {}
    for part in re.split(r"^Fatbin (?=(?:elf|ptx) code:)", dump, flags=re.MULTILINE)[1:]:
        arch = re.search(r"^arch = (\w+)", part, re.MULTILINE)
        if part.startswith("elf code:") and arch:
            out[arch[1]] = out.get(arch[1], "") + part
    return out


def _read_dumps(
    arch: str, usage_text: str, sass_text: str, ptxas_log: str, src: Path
) -> list[Kernel]:
    ptxas = parse_ptxas(ptxas_log)
    usage = parse_resource_usage(usage_text)
    sass, functions = parse_sass(sass_text), sass_functions(sass_text)
    short = demangle(list(usage), src)
    kernels = []
    for mangled, res in usage.items():
        k = Kernel(arch, short[mangled], mangled, **res)
        for key, value in ptxas.get(mangled, {}).items():
            setattr(k, key, value)
        for key, value in sass.get(mangled, Counter()).items():
            setattr(k, key, value)
        _model_path(k, functions.get(mangled, []))
        _model_norm(k, functions.get(mangled, []))
        kernels.append(k)
    return kernels


# ------------------------------------------------------------------ throughput model
# A lead, not a measurement: what the SASS of the steady-state loop implies.

# csrc/cuda/dropout.cu's kTile (elements per thread tile) and 16-byte vector widths.
ITEMSIZE = {"float": 4, "double": 8, "half": 2, "bfloat16": 2}
TILE = {dt: max(2 * 16 // size, 8) for dt, size in ITEMSIZE.items()}
MASK_PER_CALL = 8


def kernel_flags(name: str) -> tuple[str, bool, bool, bool, bool] | None:
    """'masked_kernel<half, 1, 1, 0, 0>' -> (dtype, element-wise, residual, bias, shift)."""
    m = re.match(r"masked_kernel<(\w+), ([01]), ([01]), ([01]), ([01])>$", name)
    return (m[1], *(m[i] == "1" for i in range(2, 6))) if m else None


def kernel_role(name: str) -> str:
    flags = kernel_flags(name)
    if flags is None:
        return "?"
    _, elementwise, residual, bias, shift = flags
    if not elementwise:
        return "broadcast mask"
    if shift:
        return "alpha_dropout fwd"
    return {
        (False, False): "dropout fwd, every bwd",
        (True, False): "dropout_add fwd",
        (True, True): "bias_dropout_add fwd",
    }[(residual, bias)]


def _model_path(k: Kernel, instrs: list[tuple[int, str]]) -> None:
    """Fill tile / path_instrs / path_imads of an element-wise kernel from its SASS."""
    flags = kernel_flags(k.name)
    if flags is None or not flags[1] or not instrs:
        return
    dtype, _, residual, bias, _ = flags
    tile, vectors = TILE[dtype], TILE[dtype] * ITEMSIZE[dtype] // 16
    # operands moved as 16-byte vectors: x, the residual, and a bias row whose length is a
    # multiple of the tile (every tile then lies in one row: dropout.cu's bias_tiled)
    operands = 1 + residual + bias
    path = steady_state_path(instrs, vectors * operands, vectors)
    if path is not None:
        k.tile, k.path_instrs = tile, len(path.instrs)
        k.path_imads = sum(opcode(i).startswith("IMAD") for i in path.instrs)
        k.path_calls = count_calls(path.instrs)
        k.path_philox_muls, k.path_draw_skips = path.philox_muls, path.draw_skips


def count_calls(path: list[str]) -> int:
    """Subroutine calls on a path, but for a predicated one just before the back edge: that
    is the loop's exit (sm_80 code leaves the loop to its tail through a call)."""
    calls = [i for i, ins in enumerate(path) if opcode(ins).split(".")[0] == "CALL"]
    exit_call = len(path) - 2
    return sum(1 for i in calls if not (i == exit_call and path[i].startswith("@")))


def bytes_per_element(k: Kernel) -> int:
    """The bytes-moved model (bench/bytes_model.py): each operand read once, the result
    written once; the bias (one row) is negligible."""
    dtype, _, residual, _, _ = kernel_flags(k.name)
    return ITEMSIZE[dtype] * (3 if residual else 2)


@dataclasses.dataclass(frozen=True)
class Gpu:
    name: str
    arch: str  # whose SASS models it
    sms: int
    clock_ghz: float  # boost
    bandwidth_tbs: float  # HBM, TB/s
    note: str = ""


# Datasheet figures (SXM parts).
GPUS = (
    Gpu("A100", "sm_80", 108, 1.410, 2.039, "A100 80GB SXM4"),
    Gpu("H100", "sm_90", 132, 1.980, 3.35, "H100 SXM5"),
    Gpu("H200", "sm_90", 132, 1.980, 4.8, "H200 SXM"),
    Gpu("B200", "sm_90", 148, 1.965, 8.0, "sm_100 modelled by the sm_90 SASS"),
)
# Per SM and clock: 4 schedulers issue one warp instruction each; IMAD goes to the
# half-rate fma-heavy pipe (16 lanes per scheduler), so at most 2 warp IMADs.
ISSUE_PER_SM_CLOCK = 4
IMAD_PER_SM_CLOCK = 2


@dataclasses.dataclass(frozen=True)
class Bounds:
    kernel: Kernel
    gpu: Gpu
    issue: float  # elements/s if instruction issue were the only limit
    imad: float  # elements/s if the IMAD pipe were the only limit
    memory: float  # elements/s at the datasheet bandwidth and the bytes model

    @property
    def compute(self) -> float:
        return min(self.issue, self.imad)

    @property
    def bound(self) -> str:
        return "memory" if self.memory <= self.compute else "compute"

    @property
    def headroom(self) -> float:
        """Compute-bound rate over memory-bound rate (> 1: memory-bound)."""
        return self.compute / self.memory


def rates(gpu: Gpu, instrs: float, imads: float, nbytes: float) -> tuple[float, float, float]:
    """(issue-bound, IMAD-bound, memory-bound) elements/s of a path of ``instrs`` and
    ``imads`` per element that moves ``nbytes`` per element."""
    warp_elements = 32 * gpu.sms * gpu.clock_ghz * 1e9
    return (
        ISSUE_PER_SM_CLOCK * warp_elements / instrs,
        IMAD_PER_SM_CLOCK * warp_elements / max(imads, 1e-9),
        gpu.bandwidth_tbs * 1e12 / nbytes,
    )


def bounds(k: Kernel, gpu: Gpu) -> Bounds:
    return Bounds(
        k, gpu, *rates(gpu, k.instrs_per_element, k.imads_per_element, bytes_per_element(k))
    )


def model_table(kernels: list[Kernel], block: int) -> str:
    modelled = [k for k in kernels if k.tile]
    width = max([len(k.name) for k in modelled] + [6])
    lines = [
        "Throughput model (a lead from the SASS, not a measurement): instructions per element",
        "on the steady-state vector path of each element-wise kernel's grid-stride loop (no",
        "tie, p > 0, full 16-byte tiles), issue-bound at 4 warp-instructions/clock/SM and",
        "IMAD-bound at 2/clock/SM, against the memory bound of the bytes model at the",
        "datasheet bandwidth; G elements/s, and compute/memory (> 1: memory-bound).",
        "",
        f"{'arch':<6} {'kernel':<{width}} {'role':<22} {'regs':>4} {'occ':>4} {'instr/el':>8} "
        f"{'IMAD/el':>7} {'B/el':>4}  "
        + "  ".join(f"{g.name + ' issue/mem':>17} {'bound':>6}" for g in GPUS),
    ]
    lines.append("-" * len(lines[-1]))
    for k in modelled:
        cells = []
        for g in GPUS:
            if g.arch != k.arch:
                cells.append(f"{'':>17} {'':>6}")
                continue
            b = bounds(k, g)
            cells.append(
                f"{b.compute / 1e9:>7.0f}/{b.memory / 1e9:<5.0f}{b.headroom:>4.1f}x "
                f"{b.bound[:6]:>6}"
            )
        lines.append(
            f"{k.arch:<6} {k.name:<{width}} {kernel_role(k.name):<22} {k.registers:>4} "
            f"{k.occupancy(block):>4.0%} {k.instrs_per_element:>8.1f} {k.imads_per_element:>7.1f} "
            f"{bytes_per_element(k):>4}  " + "  ".join(cells)
        )
    lines.append("")
    lines += [
        f"{g.name}: {g.sms} SMs, {g.clock_ghz} GHz, {g.bandwidth_tbs} TB/s ({g.note})" for g in GPUS
    ]
    return "\n".join(lines)


NORM_HIDDEN = (768, 1024, 2048, 4096, 8192)


def norm_bytes_per_row(dtype: str, cols: int, backward: bool = False, prenorm: bool = True) -> int:
    """The bytes model of csrc/cuda/norm.cu per row (weight, bias and the per-row statistics
    are negligible). Forward: x and the residual read once (h stays in registers up to 16384
    elements), y written, h written when prenorm (kept for backward). Backward: dy and the
    saved h (or y) read twice (the row constants first, then the gradients), grad_input and
    grad_h written."""
    size = ITEMSIZE[dtype]
    if backward:
        return cols * size * (2 * 2 + 2)
    return cols * size * (3 + prenorm)


def norm_kernel_flags(name: str) -> tuple[str, str, bool, bool, int] | None:
    """'norm_forward_kernel<float, 0, 0, 8>' -> ('forward', dtype, wide h, RMSNorm, cached
    chunks); the backward's last argument is kVector (1: rows of whole aligned chunks)."""
    m = re.match(r"norm_(forward|backward)_kernel<(\w+), ([01]), ([01])(?:, (\d+))?>$", name)
    return (m[1], m[2], m[3] == "1", m[4] == "1", int(m[5] or 0)) if m else None


# csrc/core/norm.h's reduction layout and csrc/cuda/norm.cu's geometry.
NORM_CHUNK, NORM_STRIPE, NORM_ROW_BLOCK = 8, 256, 16


def norm_groups(cols: int) -> int:
    """G: warps per row (core/norm.h's norm_groups)."""
    g = 1
    while g < 8 and g * 2048 < cols:
        g *= 2
    return g


@dataclasses.dataclass
class NormPaths:
    """SASS instructions (and IMADs) of the norm kernels' paths, per lane, on the vector path
    (16-byte rows, a residual, weight and bias in the dtype, p > 0, no tie, h stored)."""

    kernel: Kernel
    # forward: hidden -> (instructions, IMADs) of one turn of the row loop, per lane
    forward: dict[int, tuple[int, int]] = dataclasses.field(default_factory=dict)
    # backward: the loops' turns and their enclosing loops' turns, (instructions, IMADs)
    sums_chunk: tuple[int, int] = (0, 0)  # first pass: one chunk of a row (no draw)
    sums_row: tuple[int, int] = (0, 0)  # its enclosing turn: a row's trees, one chunk
    grad_row: tuple[int, int] = (0, 0)  # second pass: one row of a chunk (draws)
    grad_chunk: tuple[int, int] = (0, 0)  # its enclosing turn: one row, and the partials

    def per_element(self, cols: int) -> tuple[float, float]:
        """(instructions, IMADs) per element at hidden ``cols`` (a multiple of 256 * G)."""
        lanes_chunks = max(1, cols // (NORM_STRIPE * norm_groups(cols)))  # a lane's chunks
        if self.kernel.name.startswith("norm_forward"):
            ins, imad = self.forward[cols]
            per = NORM_CHUNK * lanes_chunks
            return ins / per, imad / per
        out = []
        for q in range(2):
            chunk, row = self.sums_chunk[q], self.sums_row[q] - self.sums_chunk[q]
            grad, partials = self.grad_row[q], self.grad_chunk[q] - self.grad_row[q]
            out.append(
                (row + lanes_chunks * chunk) / (NORM_CHUNK * lanes_chunks)
                + (grad + partials / NORM_ROW_BLOCK) / NORM_CHUNK
            )
        return out[0], out[1]


def _count(path: SteadyPath | None) -> tuple[int, int] | None:
    if path is None:
        return None
    return len(path.instrs), sum(opcode(i).startswith("IMAD") for i in path.instrs)


def _is_square(ins: str) -> bool:
    """FMUL Rd, Ra, Ra: a value times itself (the forward's squared deviations)."""
    ops = [o.strip().removesuffix(".reuse") for o in ins.split(None, 1)[-1].split(",")]
    return opcode(ins) == "FMUL" and len(ops) == 3 and ops[1] == ops[2] and ops[1] != "RZ"


def _sure_loads(text: list[str]) -> int:
    """The 16-byte loads of a block that run when the call has every operand: the
    unpredicated ones, those under a predicate with no load on its other side (an operand's
    load), and of those under @P and @!P of one predicate, the fewer (one side runs: a weight
    in fp32 or in the dtype)."""
    sure, guarded = 0, Counter()
    for ins in text:
        if not (opcode(ins).startswith("LDG.") and ".128" in opcode(ins)):
            continue
        m = re.match(r"@(!?)(P\d) ", ins)
        if m:
            guarded[(m[2], m[1] == "!")] += 1
        else:
            sure += 1
    sides = {p for p, _ in guarded}
    for p in sides:
        pos, neg = guarded[(p, False)], guarded[(p, True)]
        sure += min(pos, neg) if pos and neg else pos + neg
    return sure


def norm_forward_path(
    instrs: list[tuple[int, str]], chunks: int, vectors: int
) -> SteadyPath | None:
    """One turn of the forward's row loop (the widest loop) for rows of ``chunks`` chunks per
    lane, each operand chunk ``vectors`` 16-byte vectors. The kernel's three sweeps branch per
    chunk on whether the lane has it, and on which operands the call has, so the turn is pinned
    by what the contract makes it do, not by a shortest path (which skips the middle sweep):
      - one Philox call (19-20 multiplies) per chunk: the first sweep's draws, no tie and no
        per-sample draw;
      - one square (FMUL of a value by itself) per element: the middle sweep's deviations;
      - the chunks' h stored before the row's first shuffle (the first sweep), and its y after
        the last (the third sweep): ``chunks * vectors`` 16-byte stores each;
      - an input and a residual read per chunk of h: ``2 * chunks * vectors`` 16-byte loads
        issued before the first shuffle (the input bias's would be more);
      - a weight and a bias read per chunk of y: ``2 * chunks * vectors`` 16-byte loads after
        the last shuffle that run whatever the predicates (_sure_loads: of a weight in fp32 or
        in the dtype, predicated both ways, one);
    then the fewest instructions (so no input bias added, unless the compiler predicated it).
    Predicated instructions count whether or not they run: they issue either way. The
    residual's loads and adds are predicated, so counted."""
    back_edges = loop_edges(instrs)
    if not back_edges:
        return None
    head, tail = max(back_edges, key=lambda e: e[1] - e[0])  # the row loop: the widest
    index = {a: i for i, (a, _) in enumerate(instrs)}
    lo, hi = index[head], index[tail]
    shuffles = [i for i in range(lo, hi + 1) if opcode(instrs[i][1]).startswith("SHFL")]
    if not shuffles:
        return None
    first, last = shuffles[0], shuffles[-1]
    blocks = _loop_blocks(instrs, lo, hi)
    philox = (19 * chunks, 20 * chunks)
    squares, stores, loads = 8 * chunks, chunks * vectors, 2 * chunks * vectors
    # (Philox multiplies, stores before, loads before | squares | stores after, sure loads after)
    target = (philox[1], stores, loads, squares, stores, loads)
    # the tallies each region adds to: they are final once a path leaves it, which keeps the
    # states few (a region's own tallies are all a state of it varies in)
    settled = {0: 0, 1: 3, 2: 4}
    # DP over the blocks in address order, forward edges only. State on entering a block: the
    # tallies, each capped one past its target -> the fewest instructions reaching it and the
    # state it came from.
    states: dict[int, dict[tuple, tuple]] = {lo: {(0,) * len(target): (0, None)}}
    best = None
    for b in sorted(blocks):
        block = blocks[b]
        text = block.text
        before, after = b < first, b > last
        region = 0 if before else 2 if after else 1
        tallies = (
            block.philox,
            block.stg128 if before else 0,
            block.ldg128 if before else 0,
            sum(_is_square(i) for i in text),
            block.stg128 if after else 0,
            _sure_loads(text) if after else 0,
        )
        final = settled[region]  # the earlier regions' tallies: the targets, or no path
        for here, (n, _) in states.get(b, {}).items():
            if here[1:final] != target[1:final] or (final and here[0] < philox[0]):
                continue
            key = tuple(min(x + d, t + 1) for x, d, t in zip(here, tallies, target))
            if any(k > t for k, t in zip(key, target)):
                continue  # tallies only grow
            cost = n + len(text)
            if block.back:
                done = philox[0] <= key[0] and key[1:] == target[1:]
                if done and (best is None or cost < best[0]):
                    best = (cost, (b, here))
                continue
            for nxt in block.succ:
                slot = states.setdefault(nxt, {})
                if key not in slot or slot[key][0] > cost:
                    slot[key] = (cost, (b, here))
    if best is None:
        return None
    path, at = [], best[1]
    while at is not None:
        path.append(at[0])
        at = states[at[0]][at[1]][1]
    path.reverse()
    text = [ins for b in path for ins in blocks[b].text]
    return SteadyPath(text, sum(blocks[b].philox for b in path), 0)


def norm_paths(k: Kernel, instrs: list[tuple[int, str]]) -> NormPaths | None:
    """The norm kernel's paths from its SASS, or None if one is not found. Each operand of a
    chunk (8 elements) is ``v`` 16-byte vectors: 2 for fp32, 1 for 16-bit types."""
    flags = norm_kernel_flags(k.name)
    if not is_modelled_norm(k):
        return None
    kind, dtype, _, _, cache = flags
    v = NORM_CHUNK * ITEMSIZE[dtype] // 16
    out = NormPaths(k)
    if kind == "forward":
        if not cache:
            return None
        by_chunks: dict[int, tuple[int, int] | None] = {}  # 2048-8192: 8 chunks a lane
        for cols in NORM_HIDDEN:
            chunks = cols // (NORM_STRIPE * norm_groups(cols))
            if not 1 <= chunks <= cache:
                return None
            if chunks not in by_chunks:
                by_chunks[chunks] = _count(norm_forward_path(instrs, chunks, v))
            if by_chunks[chunks] is None:
                return None
            out.forward[cols] = by_chunks[chunks]
        return out
    # backward: pass 1 reads h, dy and the weight per chunk, writes nothing, draws nothing;
    # pass 2's row turn reads h, dy (and dh_in: a predicated load, counted) and writes grad_h
    # and grad_input and draws; its chunk turn also reads the weight and writes the weight's
    # and the bias's partials (fp32: 2 vectors each).
    edges = loop_edges(instrs)

    def inside(e, outer):
        return outer[0] <= e[0] and e[1] <= outer[1] and e != outer

    innermost = sorted(e for e in edges if not any(inside(o, e) for o in edges))
    # (inner loop, its enclosing turn): loads, stores of each, whether they draw
    passes = {
        ("sums_chunk", "sums_row"): ((3 * v, 0), (3 * v, 0), False),
        ("grad_row", "grad_chunk"): ((3 * v, 2 * v), (4 * v, 2 * v + 4), True),
    }
    for (inner_name, outer_name), (inner_io, outer_io, draws) in passes.items():
        for e in innermost:
            found = _count(
                steady_state_path(
                    instrs, *inner_io, draws=draws, exact=True, only=[e], sure_loads=True
                )
            )
            if found is None:
                continue
            setattr(out, inner_name, found)
            enclosing = sorted((o for o in edges if inside(e, o)), key=lambda o: o[1] - o[0])
            outer = enclosing[:1] and _count(
                steady_state_path(
                    instrs, *outer_io, draws=draws, exact=True, only=enclosing[:1], sure_loads=True
                )
            )
            if not outer:
                return None
            setattr(out, outer_name, outer)
            break
        else:
            return None
    return out


def is_modelled_norm(k: Kernel) -> bool:
    """The norm kernels the model covers: LayerNorm with h in the dtype (fp32, fp16, bf16),
    the forward that keeps h in registers, and the backward of rows of whole aligned chunks."""
    flags = norm_kernel_flags(k.name)
    return (
        flags is not None
        and not flags[2]
        and not flags[3]
        and flags[1] in ("float", "half", "bfloat16")
        and flags[4] > 0
    )


# The norm table models the H200, from the sm_90 code (a search is about a minute an arch).
NORM_ARCHS = ("sm_90",)


def _model_norm(k: Kernel, instrs: list[tuple[int, str]]) -> None:
    """Fill norm_per_element of a modelled norm kernel from its SASS (norm_paths)."""
    modelled = instrs and k.arch in NORM_ARCHS and is_modelled_norm(k)
    paths = norm_paths(k, instrs) if modelled else None
    if paths is not None:
        k.norm_per_element = {cols: paths.per_element(cols) for cols in NORM_HIDDEN}


def norm_bounds(k: Kernel, gpu: Gpu, cols: int) -> Bounds:
    """The model's rates of a norm kernel at hidden ``cols``, per element of the input."""
    kind, dtype, *_ = norm_kernel_flags(k.name)
    instrs, imads = k.norm_per_element[cols]
    nbytes = norm_bytes_per_row(dtype, cols, kind == "backward") / cols
    return Bounds(k, gpu, *rates(gpu, instrs, imads, nbytes))


def norm_model_table(kernels: list[Kernel], gpu_name: str = "H200") -> str:
    """Instructions per element of the norm kernels' vector paths and the headroom they
    leave on ``gpu_name`` (compute-bound rate over the memory-bound rate of the bytes model,
    norm_bytes_per_row; > 1: memory-bound), per hidden size."""
    g = next(g for g in GPUS if g.name == gpu_name)
    norms = [k for k in kernels if k.arch == g.arch and is_modelled_norm(k)]
    width = max([len(k.name) for k in norms] + [6]) + 1
    lines = [
        f"norm.cu model on {g.name} ({g.arch} SASS, a lead, not a measurement): LayerNorm, h "
        "in the dtype, weight and bias in the dtype, p > 0, h stored; per hidden size:",
        "instructions/element  compute/memory (> 1: memory-bound)",
        f"{'kernel':<{width}}" + "".join(f"{cols:>15}" for cols in NORM_HIDDEN),
    ]
    for k in norms:
        cells = []
        for cols in NORM_HIDDEN:
            if cols not in k.norm_per_element:
                cells.append(f"{'no path':>15}")
                continue
            cells.append(
                f"{k.norm_per_element[cols][0]:>8.1f} {norm_bounds(k, g, cols).headroom:>5.2f}x"
            )
        lines.append(f"{k.name:<{width}}" + "".join(cells))
    return "\n".join(lines)


def is_contiguous(k: Kernel) -> bool:
    """Kernels over contiguous memory, which must use 16-byte vector loads and stores: all of
    them (every tensor is streamed in one flat kernel order, DESIGN.md s.4) but any whose
    name says it is strided."""
    return "strided" not in k.name.lower()


def check(kernels: list[Kernel], contiguous=is_contiguous) -> list[str]:
    """Violations of DESIGN.md s.7: spills or a stack frame anywhere (from a library, with
    no ptxas report, a spill shows as local memory); scalar I/O in a contiguous kernel; an
    element-wise kernel without a steady-state path, or whose path does not run one Philox
    call per 8 elements (19-20 multiplies each: see steady_state_path) or can skip them
    otherwise than by the p == 0 test; a subroutine call (a 64-bit division, say) in a
    steady-state loop the model counts."""
    problems = []
    for k in kernels:
        if k.spill_bytes or k.local or k.stack:
            problems.append(
                f"{k.arch} {k.name}: {k.spill_bytes} B spilled, {k.local} B local, "
                f"{k.stack} B stack"
            )
        flags = kernel_flags(k.name)
        if flags and flags[1]:
            calls = TILE[flags[0]] // MASK_PER_CALL
            if not k.tile:
                problems.append(f"{k.arch} {k.name}: no steady-state path found")
            elif not 19 * calls <= k.path_philox_muls <= 20 * calls:
                problems.append(
                    f"{k.arch} {k.name}: {k.path_philox_muls} Philox multiplies on the "
                    f"steady-state path, not {calls} call(s) of 19-20 (one per 8 elements)"
                )
            elif k.path_draw_skips != 1:
                problems.append(
                    f"{k.arch} {k.name}: {k.path_draw_skips} branches skip the steady-state "
                    "path's Philox calls, not 1 (the p == 0 test)"
                )
        if k.path_calls:
            problems.append(
                f"{k.arch} {k.name}: {k.path_calls} subroutine call(s) on the steady-state path"
            )
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
    by_arch = analyze_archs(tuple(args.arch), args.src)
    kernels = [k for arch in args.arch for k in by_arch[arch]]
    print(table(kernels, args.block))
    print()
    print(model_table(kernels, args.block))
    print()
    print(norm_model_table(kernels))
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
                "instrs_per_element": k.instrs_per_element if k.tile else None,
                "imads_per_element": k.imads_per_element if k.tile else None,
                "model": {
                    g.name: {
                        "issue": (b := bounds(k, g)).issue,
                        "imad": b.imad,
                        "memory": b.memory,
                        "bound": b.bound,
                        "headroom": b.headroom,
                    }
                    for g in GPUS
                    if k.tile and g.arch == k.arch
                },
            }
            for k in kernels
        ]
        args.json.write_text(json.dumps(rows, indent=1))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
