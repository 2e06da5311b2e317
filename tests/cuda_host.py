"""The CUDA kernels of csrc/cuda, built by the host C++ compiler and executed on the CPU.

``build()`` compiles every ``csrc/cuda/*.cu`` and ``csrc/testing/*.{cu,cpp}`` as C++ with
``csrc/testing/cuda_host.h`` (a small model of CUDA's execution) force-included. The sources are
used as they are, except that each ``kernel<<<config>>>(args)`` launch is rewritten into a call of
the model (``rewrite_launches``), and a test may apply a ``Mutation`` (an injected bug).
The build also traps misaligned and out-of-bounds typed accesses (``-fsanitize=alignment,bounds``
with traps), as the GPU faults on them.

``HostCuda.masked_op`` runs one op through the real launcher, ``masked_op_cuda``: the operands are
copied into guarded buffers (``Guarded``: a PROT_NONE page after the data, canary bytes around it)
with their own alignment kept, and the op's mask map is chosen as ``csrc/ops.cpp`` chooses it.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import mmap
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
CSRC = REPO / "csrc"
CXX_FLAGS = (
    "-std=c++17",
    "-O1",
    "-ffp-contract=off",  # every add and multiply rounded on its own, as on the GPU
    "-fPIC",
    "-fvisibility=hidden",
    "-fsanitize=alignment,bounds",
    "-fsanitize-undefined-trap-on-error",  # no runtime library: a trap (SIGILL)
    "-Wall",
    "-Wno-unknown-pragmas",  # #pragma unroll
)
DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
PAGE = mmap.PAGESIZE
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Linux's value
CANARY = 0xFF  # every float dtype reads 0xFF.. bytes as NaN: a read of it shows in the result


def cuda_include() -> Path | None:
    """The CUDA toolkit's include directory, if it has the headers the model needs."""
    home = Path(os.environ.get("CUDA_HOME") or "/usr/local/cuda")
    inc = home / "include"
    ok = all((inc / h).is_file() for h in ("cuda_fp16.h", "cuda_runtime_api.h"))
    return inc if ok else None


def unavailable_reason() -> str | None:
    if cuda_include() is None:
        return "needs the CUDA toolkit headers (cuda_fp16.h, cuda_runtime_api.h) under $CUDA_HOME"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "needs a host C++ compiler"
    return None


# ---------------------------------------------------------------- the build


@dataclasses.dataclass(frozen=True)
class Mutation:
    """An injected bug: in ``path`` (relative to csrc/), ``old`` replaced by ``new``."""

    name: str
    path: str
    old: str
    new: str

    def apply(self, text: str) -> str:
        count = text.count(self.old)
        if count != 1:
            raise ValueError(
                f"mutation {self.name!r}: {self.old!r} occurs {count} times in csrc/{self.path} "
                "(expected once); the kernel changed, update the mutation in tests/"
            )
        return text.replace(self.old, self.new)


_LAUNCH = re.compile(r"<<<(.*?)>>>", re.S)


def rewrite_launches(text: str) -> str:
    """``k<args...><<<cfg>>>(...)`` -> ``::cuda_host::launch(k<args...>, LaunchConfig(cfg))(...)``.

    The kernel expression is the identifier (with ``::`` and template arguments) just before
    ``<<<``. Lines are kept, so compiler messages point at the original source.
    """
    out, pos = [], 0
    for m in _LAUNCH.finditer(text):
        end = m.start()  # scan back over balanced <...> (and (...) inside them), then the name
        i, angles, parens = end, 0, 0
        while i > 0:
            c = text[i - 1]
            if c in ")(":
                parens += 1 if c == ")" else -1
            elif parens == 0 and c == ">":
                angles += 1
            elif parens == 0 and c == "<" and angles:
                angles -= 1
            elif angles == 0 and parens == 0 and not (c.isalnum() or c in "_:"):
                break
            i -= 1
        if i == end:
            raise ValueError(f"cannot find the kernel of the launch at offset {end}")
        out += [
            text[pos:i],
            f"::cuda_host::launch({text[i:end]}, ::cuda_host::LaunchConfig({m.group(1)}))",
        ]
        pos = m.end()
    out.append(text[pos:])
    return "".join(out)


def _sources() -> list[Path]:
    return sorted((CSRC / "cuda").glob("*.cu")) + sorted(
        p for p in (CSRC / "testing").iterdir() if p.suffix in (".cu", ".cpp")
    )


def _cache() -> Path:
    from fused_dropout import _loader

    return _loader.cache_root() / "fused_dropout_cuda_host"


def _digest(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()[:20]


def _publish(tmp: Path, final: Path) -> None:
    os.replace(tmp, final)  # atomic: a concurrent build of the same file is harmless


def build(mutations: tuple[Mutation, ...] = (), jobs: int = 2) -> HostCuda:
    """Compile (or reuse) the host build of the CUDA sources with ``mutations`` applied.

    Objects are cached by content, so a mutant recompiles only the file it changes.
    """
    sources = _sources()
    header_paths = sorted(CSRC.rglob("*.h")) + sorted(CSRC.rglob("*.cuh"))
    # A mutated header is written to an overlay directory searched before csrc/ (the units
    # are compiled from the cache, so no quoted include finds the original first).
    header_text = {str(p.relative_to(CSRC)): p.read_text() for p in header_paths}
    mutated_headers: dict[str, str] = {}
    for m in mutations:
        if m.path in header_text:
            mutated_headers[m.path] = m.apply(mutated_headers.get(m.path, header_text[m.path]))
    built = {str(s.relative_to(CSRC)) for s in sources}
    unknown = {m.path for m in mutations} - built - set(header_text)
    if unknown:
        raise ValueError(
            f"mutations of files that are neither built nor headers: {sorted(unknown)}"
        )
    cxx = os.environ.get("CXX", "c++")
    root = _cache()
    overlay = []
    if mutated_headers:
        items = sorted(mutated_headers.items())
        overlay_dir = root / f"overlay-{_digest(*(part for item in items for part in item))}"
        for rel, text in items:
            path = overlay_dir / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(text)
            _publish(tmp, path)
        overlay = [f"-I{overlay_dir}"]
    include = [
        *overlay,
        f"-I{CSRC}",
        f"-I{cuda_include()}",
        f"-I{Path(torch.__file__).parent / 'include'}",
        "-include",
        "testing/cuda_host.h",
    ]
    headers = "".join(
        f"{p}{mutated_headers.get(rel, text)}"
        for (rel, text), p in zip(header_text.items(), header_paths)
    )
    env = repr((CXX_FLAGS, include, cxx, torch.__version__))
    (root / "objects").mkdir(parents=True, exist_ok=True)

    def compile_unit(src: Path) -> Path:
        rel = str(src.relative_to(CSRC))
        text = src.read_text()
        for m in mutations:
            if m.path == rel:
                text = m.apply(text)
        text = f'#line 1 "{src}"\n' + rewrite_launches(text)
        obj = root / "objects" / f"{src.stem}-{_digest(env, headers, rel, text)}.o"
        if not obj.is_file():
            unit = obj.with_suffix(f".{os.getpid()}.cpp")
            unit.write_text(text)
            tmp = obj.with_suffix(f".{os.getpid()}.o")
            _run([cxx, *CXX_FLAGS, *include, "-c", str(unit), "-o", str(tmp)])
            unit.unlink()
            _publish(tmp, obj)
        return obj

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        objects = list(pool.map(compile_unit, sources))
    lib = root / f"cuda_host-{_digest(*map(str, objects))}.so"
    if not lib.is_file():
        tmp = lib.with_suffix(f".{os.getpid()}.so")
        _run([cxx, "-shared", *CXX_FLAGS, *map(str, objects), "-o", str(tmp)])
        _publish(tmp, lib)
    return HostCuda(lib)


def _run(cmd: list[str]) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"host build of the CUDA sources failed:\n{' '.join(cmd)}\n{r.stderr}")


# ---------------------------------------------------------------- guarded memory

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


class Guarded:
    """``nbytes`` of memory at an address that is ``misalign`` bytes past a multiple of 16.

    The data ends as close to a PROT_NONE page as that alignment allows; the rest of its pages
    holds canary bytes. An access past the end faults; a write anywhere outside the data shows
    in ``check()``; a read of the canary shows as NaN in the result.
    """

    def __init__(self, name: str, nbytes: int, misalign: int = 0, sparse: bool = False):
        """``sparse``: reserve no memory and fill nothing (pages stay zero until written), for
        tensors larger than the machine's memory of which a kernel touches a window."""
        self.name, self.nbytes, self.sparse = name, nbytes, sparse
        data_pages = (nbytes + misalign + 16 + PAGE - 1) // PAGE
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | (_MAP_NORESERVE if sparse else 0)
        self._map = mmap.mmap(-1, (data_pages + 1) * PAGE, flags=flags)
        if not sparse:
            self._map.write(bytes([CANARY]) * (data_pages * PAGE))
        base = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        guard = base + data_pages * PAGE
        if _libc.mprotect(guard, PAGE, 0) != 0:
            raise OSError(ctypes.get_errno(), "mprotect of a guard page failed")
        self.address = (guard - nbytes - misalign) // 16 * 16 + misalign
        self.end = self.address + nbytes
        self._start = self.address - base  # offsets inside the accessible pages
        self._accessible = data_pages * PAGE

    def write(self, data: bytes, at: int = 0) -> None:
        assert 0 <= at and at + len(data) <= self.nbytes
        self._map[self._start + at : self._start + at + len(data)] = data

    def read(self, at: int = 0, size: int | None = None) -> bytes:
        size = self.nbytes - at if size is None else size
        return self._map[self._start + at : self._start + at + size]

    def check(self) -> None:
        """Raise if a byte outside the data changed (an out-of-bounds write)."""
        if self.sparse:  # only the guard page behind it
            return
        for lo, hi in ((0, self._start), (self._start + self.nbytes, self._accessible)):
            region = self._map[lo:hi]
            if region.count(CANARY) != len(region):
                at = next(i for i, b in enumerate(region) if b != CANARY) + lo - self._start
                where = (
                    f"{-at} bytes before its start"
                    if at < 0
                    else f"{at - self.nbytes} bytes past its end"
                )
                raise OutOfBounds(f"out-of-bounds write to {self.name!r}: {where}")

    def describe(self, address: int) -> str:
        if self.address - PAGE <= address < self.end + PAGE:
            delta = address - self.address
            if delta < 0:
                return f"{-delta} bytes before {self.name!r}"
            return f"{delta - self.nbytes} bytes past the end of {self.name!r}"
        return ""


def guarded_tensor(name: str, t: torch.Tensor) -> Guarded:
    """A guarded copy of ``t``'s elements (row-major), at ``t``'s own alignment mod 16."""
    # clone, not contiguous(): an empty tensor counts as contiguous with any strides, and
    # a byte view needs a unit stride (found by the property tests)
    flat = t.detach().cpu().clone(memory_format=torch.contiguous_format).view(-1)
    g = Guarded(name, flat.numel() * flat.element_size(), t.data_ptr() % 16)
    g.write(flat.view(torch.uint8).numpy().tobytes())
    return g


def tensor_of(g: Guarded, dtype: torch.dtype) -> torch.Tensor:
    return (
        torch.frombuffer(bytearray(g.read()), dtype=dtype)
        if g.nbytes
        else torch.empty(0, dtype=dtype)
    )


class OutOfBounds(AssertionError):
    """A write outside a guarded buffer's data."""


class KernelError(AssertionError):
    """The host-executed kernel broke a rule of CUDA (or the model caught a fault)."""


# ---------------------------------------------------------------- running an op


@dataclasses.dataclass(frozen=True)
class Geometry:
    """How a launch is shaped: the device's SM count, and optionally a forced grid size."""

    name: str
    sm_count: int = 132
    grid_x: int = 0  # > 0: replaces the launcher's grid (valid for grid-stride kernels)
    first_block: int = 0  # with block_count > 0: run only these blocks (a window of the grid)
    block_count: int = 0


GEOMETRIES = (
    Geometry("h100_132sm"),  # what the launcher picks on a 132-SM device
    Geometry("one_block", grid_x=1),  # one block strides over everything
    Geometry("odd_grid_3", grid_x=3),  # a small odd grid: the grid-stride loop runs many times
)


class _HostOp(ctypes.Structure):
    _fields_ = [
        ("dtype", ctypes.c_int),
        ("input", ctypes.c_void_p),
        ("residual", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        ("numel", ctypes.c_int64),
        ("bias_len", ctypes.c_int64),
        ("run", ctypes.c_int64),
        ("stride", ctypes.c_int64),
        ("period", ctypes.c_int64),
        ("mask_numel", ctypes.c_int64),
        ("boxed", ctypes.c_int),
        ("base", ctypes.c_int64),
        ("seg", ctypes.c_int64),
        ("seg_stride", ctypes.c_int64),
        ("p", ctypes.c_double),
        ("scale_by_keep", ctypes.c_int),
        ("alpha", ctypes.c_int),
        ("backward", ctypes.c_int),
        ("captured", ctypes.c_int),
        ("seed", ctypes.c_uint64),
        ("offset", ctypes.c_uint64),
        ("seed_ptr", ctypes.c_void_p),
        ("offset_ptr", ctypes.c_void_p),
        ("offset_intragraph", ctypes.c_uint32),
        ("pair_in", ctypes.c_void_p),
        ("pair_out", ctypes.c_void_p),
        ("sm_count", ctypes.c_int),
        ("grid_x", ctypes.c_int),
        ("first_block", ctypes.c_int64),
        ("block_count", ctypes.c_int64),
        ("launches", ctypes.c_int),
        ("grid", ctypes.c_uint * 3),
        ("block", ctypes.c_uint * 3),
        ("resident_blocks", ctypes.c_int),
    ]


@dataclasses.dataclass
class Result:
    out: torch.Tensor  # in the input's logical shape (contiguous)
    pair: tuple[int, int] | None  # what the kernel wrote to pair_out (unsigned), or None
    launches: int
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    resident_blocks: int  # the occupancy the model gives the kernel launched (per kernel)


def _kernel_order(x: torch.Tensor, k: int, has_bias: bool, same_strides: bool):
    """(permutation to memory order or None, MaskMap fields): ops.cpp's direct_map."""
    inner = x[(0,) * k].numel() if x.numel() else 1
    mask_numel = x.shape[:k].numel()
    contiguous = (1 if mask_numel == 0 else x.numel() // mask_numel, 1, 1, mask_numel)
    if not same_strides:
        return None, contiguous
    if x.is_contiguous():
        return tuple(range(x.dim())), contiguous
    if has_bias or contiguous[0] == 1 or k > 2 or x.dim() not in (4, 5):
        return None, contiguous
    fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    if not x.is_contiguous(memory_format=fmt):
        return None, contiguous
    order = (0, *range(2, x.dim()), 1)
    if k == 2:
        c = x.shape[1]
        return order, (inner * c, c, c, mask_numel)
    return order, (inner, 1, 1, mask_numel)


class _HostNorm(ctypes.Structure):
    """csrc/testing/norm_host.cpp's HostNorm."""

    _fields_ = [
        ("backward", ctypes.c_int),
        ("dtype", ctypes.c_int),
        ("wide_h", ctypes.c_int),
        ("weight_fp32", ctypes.c_int),
        ("rms", ctypes.c_int),
        ("saved_is_y", ctypes.c_int),
        *(
            (name, ctypes.c_void_p)
            for name in (
                "input residual input_bias weight bias y h mean rstd dy dh_in saved grad_input "
                "grad_h grad_weight grad_bias grad_input_bias partials"
            ).split()
        ),
        ("rows", ctypes.c_int64),
        ("cols", ctypes.c_int64),
        ("rows_per_sample", ctypes.c_int64),
        ("eps", ctypes.c_double),
        ("p", ctypes.c_double),
        ("seed", ctypes.c_uint64),
        ("offset", ctypes.c_uint64),
        ("pair_out", ctypes.c_void_p),
        ("pair_in", ctypes.c_void_p),
        ("sm_count", ctypes.c_int),
        ("grid_x", ctypes.c_int),
        ("first_block", ctypes.c_int64),
        ("block_count", ctypes.c_int64),
        ("launches", ctypes.c_int),
        ("grid", ctypes.c_uint * 3),
        ("block", ctypes.c_uint * 3),
    ]


@dataclasses.dataclass
class NormResult:
    outputs: tuple  # forward: y, h, mean, rstd; backward: grad_input, grad_h, and the sums
    pair: tuple[int, int] | None  # what the forward kernel wrote to pair_out (unsigned)
    launches: int
    grid: tuple[int, int, int]
    block: tuple[int, int, int]


class HostCuda:
    """One host build of the CUDA sources (see ``build``)."""

    def __init__(self, lib: Path):
        self.path = lib
        self._lib = ctypes.CDLL(str(lib))
        self._lib.fdh_masked_op.argtypes = (ctypes.POINTER(_HostOp), ctypes.c_char_p, ctypes.c_int)
        self._lib.fdh_norm.argtypes = (ctypes.POINTER(_HostNorm), ctypes.c_char_p, ctypes.c_int)

    def fresh(self, where: Path) -> HostCuda:
        """Another instance of this build (a copy of the library under ``where``), whose
        launchers have cached nothing yet (SM counts, occupancies): a first launch there
        sees the geometry it is given."""
        copy = Path(where) / f"fresh-{self.path.name}"
        shutil.copyfile(self.path, copy)
        return HostCuda(copy)

    def masked_op(
        self,
        x: torch.Tensor,
        p: float,
        *,
        geometry: Geometry = GEOMETRIES[0],
        mask_ndim: int = -1,
        residual: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        scale_by_keep: bool = True,
        alpha: bool = False,
        backward: bool = False,
        inplace: bool = False,
        seed_offset: tuple[int, int] = (0, 0),
        pair_in: tuple[int, int] | None = None,
        captured_intragraph: int | None = None,
        global_shape: list[int] | None = None,
        global_offset: list[int] | None = None,
    ) -> Result:
        """Run one masked op as ops.cpp would on a GPU and return its result.

        The (seed, offset) pair comes from ``pair_in`` if given (backward), else from a
        PhiloxCudaState holding ``seed_offset``: plain, or, with ``captured_intragraph``, the
        graph-captured form (seed and offset read through pointers, plus that increment).
        ``global_shape``/``global_offset``: ``x`` is that box of a larger tensor, whose mask it
        takes (the MaskMap's box, from ``fused_dropout.ops.mask_box``, as ops.cpp sets it).
        """
        k = x.dim() if mask_ndim == -1 else mask_ndim
        same = residual is None or residual.stride() == x.stride()
        order, (run, stride, period, mask_numel) = _kernel_order(x, k, bias is not None, same)

        def kernel_view(t: torch.Tensor) -> torch.Tensor:  # memory order, alignment kept
            if order is None:
                return t.contiguous()
            return t.permute(order)

        buffers: dict[str, Guarded] = {}

        def put(name: str, t: torch.Tensor | None) -> int | None:
            if t is None:
                return None
            buffers[name] = g = guarded_tensor(name, t if name == "bias" else kernel_view(t))
            return g.address

        op = _HostOp()
        op.dtype = DTYPE_CODE[x.dtype]
        op.input = put("input", x)
        op.residual = put("residual", residual)
        op.bias = put("bias", None if bias is None else bias.contiguous())
        if inplace:
            op.out = op.input
        else:  # a fresh tensor: aligned, as torch's allocators give it
            buffers["out"] = Guarded("out", x.numel() * x.element_size())
            op.out = buffers["out"].address
        op.numel = x.numel()
        op.bias_len = 0 if bias is None else bias.numel()
        op.run, op.stride, op.period, op.mask_numel = run, stride, period, mask_numel
        if global_shape is not None:
            from fused_dropout.ops import mask_box

            box = mask_box(list(x.shape), mask_ndim, global_shape, global_offset)
            op.boxed, op.base, op.seg, op.seg_stride = box
        op.p = p
        op.scale_by_keep, op.alpha, op.backward = scale_by_keep, alpha, backward
        seed, offset = (v & 0xFFFFFFFFFFFFFFFF for v in seed_offset)
        if captured_intragraph is None:
            op.seed, op.offset = seed, offset
        else:  # graph capture: torch keeps the seed and the base offset in device memory
            buffers["seed_ptr"] = _int64_buffer("seed_ptr", [seed])
            buffers["offset_ptr"] = _int64_buffer("offset_ptr", [offset - captured_intragraph])
            op.captured = 1
            op.seed_ptr = buffers["seed_ptr"].address
            op.offset_ptr = buffers["offset_ptr"].address
            op.offset_intragraph = captured_intragraph
        if pair_in is not None:
            buffers["pair_in"] = _int64_buffer("pair_in", pair_in)
            op.pair_in = buffers["pair_in"].address
        else:
            buffers["pair_out"] = Guarded("pair_out", 16)
            op.pair_out = buffers["pair_out"].address
        op.sm_count, op.grid_x = geometry.sm_count, geometry.grid_x
        op.first_block, op.block_count = geometry.first_block, geometry.block_count

        self._call(op, buffers)
        out_buf = buffers["input" if inplace else "out"]
        flat = tensor_of(out_buf, x.dtype)
        if order is None:
            out = flat.view(x.shape)
        else:
            shape = [x.shape[d] for d in order]
            inverse = sorted(range(len(order)), key=order.__getitem__)
            out = flat.view(shape).permute(inverse).contiguous()
        pair = None
        if "pair_out" in buffers:
            raw = buffers["pair_out"].read()
            pair = (int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:], "little"))
        return Result(out, pair, op.launches, tuple(op.grid), tuple(op.block), op.resident_blocks)

    def norm_forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        input_bias: torch.Tensor | None,
        p: float,
        eps: float,
        *,
        rms: bool = False,
        per_sample: bool = False,
        residual_in_fp32: bool = False,
        keep_h: bool = True,
        seed_offset: tuple[int, int] = (0, 0),
        geometry: Geometry = GEOMETRIES[0],
        misalign: int = 0,
    ) -> NormResult:
        """One forward call of csrc/cuda/norm.cu through norm_forward_cuda, with the operands
        as ops/fused_norm.cpp hands them over (contiguous; the residual in h's dtype), in
        guarded buffers; ``misalign`` bytes shift the input and residual off 16-byte alignment,
        and the [cols] vectors keep their own alignment mod 16 (as norm_backward's operands).
        Returns ``(y, h, mean, rstd, pair)`` as the CPU op does (h empty unless keep_h)."""
        wide = residual_in_fp32 and x.dtype in (torch.float16, torch.bfloat16)
        h_type = torch.float32 if wide else x.dtype
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        cols = x.shape[-1]
        rows = x.numel() // cols if cols else 0
        buffers: dict[str, Guarded] = {}

        def put(name: str, t: torch.Tensor | None, shift: int = 0) -> int | None:
            if t is None:
                return None
            flat = t.detach().contiguous().view(-1)
            g = Guarded(name, flat.numel() * flat.element_size(), shift)
            g.write(flat.view(torch.uint8).numpy().tobytes())
            buffers[name] = g
            return g.address

        def out(name: str, numel: int, dtype: torch.dtype) -> int:
            buffers[name] = Guarded(name, numel * torch.empty(0, dtype=dtype).element_size())
            return buffers[name].address

        def own(t: torch.Tensor | None) -> int:  # a tensor's alignment mod 16
            return 0 if t is None else t.data_ptr() % 16

        op = _HostNorm()
        op.dtype = DTYPE_CODE[x.dtype]
        op.wide_h, op.rms = wide, rms
        wb = weight if weight is not None else bias
        op.weight_fp32 = wb is not None and wb.dtype == torch.float32 and x.dtype != torch.float32
        op.input = put("input", x, misalign)
        op.residual = put("residual", None if residual is None else residual.to(h_type), misalign)
        op.input_bias = put("input_bias", input_bias, own(input_bias))
        op.weight = put("weight", weight, own(weight))
        op.bias = put("bias", bias, own(bias))
        op.y = out("y", x.numel(), x.dtype)
        op.h = out("h", x.numel(), h_type) if keep_h else None
        op.mean = None if rms else out("mean", rows, acc)
        op.rstd = out("rstd", rows, acc)
        op.rows, op.cols = rows, cols
        op.rows_per_sample = (
            max(1, int(torch.Size(x.shape[1:-1]).numel())) if per_sample and x.dim() >= 2 else 0
        )
        op.eps, op.p = eps, p
        op.seed, op.offset = (v & 0xFFFFFFFFFFFFFFFF for v in seed_offset)
        op.pair_out = out("pair_out", 2, torch.int64)
        self._norm_call(op, geometry, buffers)

        def read(name: str, dtype: torch.dtype, shape) -> torch.Tensor:
            return tensor_of(buffers[name], dtype).view(shape) if name in buffers else None

        raw = buffers["pair_out"].read()
        pair = (int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:], "little"))
        h = read("h", h_type, x.shape) if keep_h else torch.empty(0, dtype=h_type)
        mean = read("mean", acc, (rows,)) if not rms else torch.empty(0, dtype=acc)
        return NormResult(
            (read("y", x.dtype, x.shape), h, mean, read("rstd", acc, (rows,))),
            pair,
            op.launches,
            tuple(op.grid),
            tuple(op.block),
        )

    def norm_backward(
        self,
        dy: torch.Tensor,
        dh_in: torch.Tensor | None,
        saved: torch.Tensor,
        saved_is_y: bool,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        mean: torch.Tensor,
        rstd: torch.Tensor,
        pair: tuple[int, int],
        p: float,
        *,
        rms: bool = False,
        per_sample: bool = False,
        residual_in_fp32: bool = False,
        want: tuple[bool, bool, bool, bool] = (True, True, True, True),
        geometry: Geometry = GEOMETRIES[0],
    ) -> NormResult:
        """One backward call through norm_backward_cuda (operands as ops/fused_norm.cpp hands
        them over). ``want``: grad_h, grad_weight, grad_bias, grad_input_bias. Returns
        ``(grad_input, grad_h, grad_weight, grad_bias, grad_input_bias)`` as the CPU op does."""
        wide = residual_in_fp32 and dy.dtype in (torch.float16, torch.bfloat16)
        h_type = torch.float32 if wide else dy.dtype
        acc = torch.float64 if dy.dtype == torch.float64 else torch.float32
        cols = dy.shape[-1]
        rows = dy.numel() // cols if cols else 0
        blocks = (rows + 15) // 16
        buffers: dict[str, Guarded] = {}

        def put(name: str, t: torch.Tensor | None) -> int | None:
            if t is None:
                return None
            buffers[name] = guarded_tensor(name, t.contiguous())
            return buffers[name].address

        def out(name: str, numel: int, dtype: torch.dtype) -> int:
            buffers[name] = Guarded(name, numel * torch.empty(0, dtype=dtype).element_size())
            return buffers[name].address

        op = _HostNorm()
        op.backward = 1
        op.dtype = DTYPE_CODE[dy.dtype]
        op.wide_h, op.rms, op.saved_is_y = wide, rms, saved_is_y
        wb = weight if weight is not None else bias
        op.weight_fp32 = wb is not None and wb.dtype == torch.float32 and dy.dtype != torch.float32
        op.dy = put("dy", dy)
        op.dh_in = put("dh_in", dh_in)
        op.saved = put("saved", saved)
        op.weight = put("weight", weight)
        op.bias = put("bias", bias if saved_is_y else None)
        op.mean = put("mean", mean if not (rms or saved_is_y) else None)
        op.rstd = put("rstd", rstd)
        op.grad_input = out("grad_input", dy.numel(), dy.dtype)
        want_h, *sums = want
        op.grad_h = out("grad_h", dy.numel(), h_type) if want_h else None
        op.grad_weight = out("grad_weight", cols, acc) if sums[0] else None
        op.grad_bias = out("grad_bias", cols, acc) if sums[1] else None
        op.grad_input_bias = out("grad_input_bias", cols, acc) if sums[2] else None
        op.partials = out("partials", sum(sums) * blocks * cols, acc)
        op.rows, op.cols = rows, cols
        op.rows_per_sample = (
            max(1, int(torch.Size(dy.shape[1:-1]).numel())) if per_sample and dy.dim() >= 2 else 0
        )
        op.p = p
        op.pair_in = _int64_buffer_into(buffers, "pair_in", pair)
        self._norm_call(op, geometry, buffers)

        def read(name: str, dtype: torch.dtype, shape) -> torch.Tensor:
            if name not in buffers:
                return torch.empty(0, dtype=dtype)
            return tensor_of(buffers[name], dtype).view(shape)

        return NormResult(
            (
                read("grad_input", dy.dtype, dy.shape),
                read("grad_h", h_type, dy.shape),
                read("grad_weight", acc, (cols,)),
                read("grad_bias", acc, (cols,)),
                read("grad_input_bias", acc, (cols,)),
            ),
            None,
            op.launches,
            tuple(op.grid),
            tuple(op.block),
        )

    def _norm_call(self, op: _HostNorm, geometry: Geometry, buffers: dict[str, Guarded]) -> None:
        op.sm_count, op.grid_x = geometry.sm_count, geometry.grid_x
        op.first_block, op.block_count = geometry.first_block, geometry.block_count
        self._call(op, buffers, self._lib.fdh_norm)

    def _call(self, op, buffers: dict[str, Guarded], entry=None) -> None:
        """Run ``op``; raise if the kernel faulted, broke a CUDA rule or wrote out of bounds."""
        error = ctypes.create_string_buffer(512)
        entry = self._lib.fdh_masked_op if entry is None else entry
        if entry(ctypes.byref(op), error, len(error)):
            text = error.value.decode()
            found = re.search(r"address (0x[0-9a-f]+)", text)
            if found:
                where = [g.describe(int(found.group(1), 16)) for g in buffers.values()]
                text += "".join(f" ({w})" for w in where if w)
            raise KernelError(text)
        for g in buffers.values():
            g.check()

    def elements_per_block(self, dtype: torch.dtype) -> int:
        """The run of consecutive elements one block covers when each thread does one step of
        its loop: block 1 of a huge grid is run alone on a small tensor, and what it wrote
        is read back (the rest of the output keeps its NaN canary)."""
        x = torch.ones(1 << 16, dtype=dtype)
        probe = Geometry("probe", grid_x=1 << 20, first_block=1, block_count=1)
        written = torch.nonzero(~self.masked_op(x, 0.0, geometry=probe).out.isnan())
        lo, hi = int(written[0]), int(written[-1]) + 1
        if written.numel() != hi - lo or lo != hi - lo:
            raise AssertionError(
                f"block 1 wrote elements {lo}..{hi - 1}, not one run after block 0"
            )
        return hi - lo

    def dropout_windows(
        self,
        dtype: torch.dtype,
        numel: int,
        p: float,
        seed_offset: tuple[int, int],
        windows: list[tuple[int, int]],
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Dropout of a tensor of ``numel`` elements, far larger than memory: only the blocks
        that cover each window ``[lo, hi)`` run (on a grid with one step per thread), on
        memory that is reserved but never touched elsewhere. Returns (input, output) of each
        window; the input is random there and zero elsewhere."""
        size = torch.finfo(dtype).bits // 8
        per_block = self.elements_per_block(dtype)
        x = Guarded("input", numel * size, sparse=True)
        out = Guarded("out", numel * size, sparse=True)
        inputs = []
        for i, (lo, hi) in enumerate(windows):
            xw = torch.randn(hi - lo, generator=torch.Generator().manual_seed(i)).to(dtype)
            x.write(xw.view(torch.uint8).numpy().tobytes(), lo * size)
            inputs.append(xw)
        results = []
        for (lo, hi), xw in zip(windows, inputs):
            op = _HostOp()
            op.dtype = DTYPE_CODE[dtype]
            op.input, op.out, op.numel = x.address, out.address, numel
            op.run, op.stride, op.period, op.mask_numel = 1, 1, 1, numel
            op.p, op.scale_by_keep = p, 1
            op.seed, op.offset = seed_offset
            op.sm_count = 132
            op.grid_x = (numel + per_block - 1) // per_block
            op.first_block = lo // per_block
            op.block_count = (hi - 1) // per_block - op.first_block + 1
            self._call(op, {"input": x, "out": out})
            got = torch.frombuffer(bytearray(out.read(lo * size, (hi - lo) * size)), dtype=dtype)
            results.append((xw, got))
        return results


def _int64_buffer_into(buffers: dict[str, Guarded], name: str, values) -> int:
    buffers[name] = _int64_buffer(name, values)
    return buffers[name].address


def _int64_buffer(name: str, values) -> Guarded:
    g = Guarded(name, 8 * len(values))
    g.write(b"".join((v & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little") for v in values))
    return g


def cooperation(host: HostCuda, kernel: str, blocks: int, threads: int, inp, out) -> None:
    """Run one of csrc/testing/cooperation.cu's kernels on CPU tensors ``inp`` -> ``out``."""
    fn = host._lib.fdh_cooperation
    fn.argtypes = (
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_char_p,
        ctypes.c_int,
    )
    error = ctypes.create_string_buffer(512)
    if fn(
        kernel.encode(),
        blocks,
        threads,
        None if inp is None else inp.data_ptr(),
        out.data_ptr(),
        error,
        len(error),
    ):
        raise KernelError(error.value.decode())
