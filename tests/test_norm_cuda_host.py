"""The fused dropout + add + norm kernels of csrc/cuda/norm.cu, executed on the CPU through the
host model of CUDA (tests/cuda_host.py): forward and backward through the real launchers, under
several launch geometries, in guarded buffers, bit for bit against the CPU op (whose order of
every sum is the contract's, core/norm.h). Compiled and host-executed, not run on a GPU.
"""

from __future__ import annotations

import dataclasses

import cuda_host
import pytest
import reference as ref
import torch
from helpers import assert_bf16_nans, assert_bitwise, bf16_with_nans, randn

from fused_dropout import ops

pytestmark = pytest.mark.skipif(
    cuda_host.unavailable_reason() is not None, reason=str(cuda_host.unavailable_reason())
)

F32, F64, F16, BF16 = torch.float32, torch.float64, torch.float16, torch.bfloat16
SEED_OFFSET = (0xDEADBEEF12345678, 4 * 777)
GEOMETRIES = cuda_host.GEOMETRIES  # 132 SMs as the launcher picks, one block, a grid of 3


@dataclasses.dataclass(frozen=True)
class Case:
    dtype: torch.dtype
    shape: tuple[int, ...]
    rms: bool = False
    p: float = 0.3
    residual: bool = True
    weight: str = "dtype"  # or "fp32", "none"
    bias: bool = True
    input_bias: bool = False
    per_sample: bool = False
    residual_in_fp32: bool = False
    keep_h: bool = True  # prenorm: h stored
    misalign: int = 0  # bytes: input and residual off 16-byte alignment (element I/O)
    misalign_columns: bool = False  # weight, bias, input_bias one element off 16-byte alignment

    def __str__(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        flags = [
            "rms" if self.rms else "ln",
            f"p{self.p}",
            "" if self.residual else "nores",
            "" if self.weight == "dtype" else f"w{self.weight}",
            "" if self.bias else "nobias",
            "ib" if self.input_bias else "",
            "ps" if self.per_sample else "",
            "r32" if self.residual_in_fp32 else "",
            "" if self.keep_h else "noh",
            f"mis{self.misalign}" if self.misalign else "",
            "miscols" if self.misalign_columns else "",
        ]
        return "-".join([dt, "x".join(map(str, self.shape)), *filter(None, flags)])


def _tie_p(n: int, m: int, kept: bool) -> float:
    """The p under which mask element m (of n, at SEED_OFFSET) ties the threshold's high half
    (contract v2) and the tie draw keeps it (or not)."""
    u = int(ref.mask_numbers(*SEED_OFFSET, n)[m])
    v = int(ref.mask_numbers(*SEED_OFFSET, n, tie=True)[m])
    tl = v + 1 if kept else v
    assert 0 < tl <= 0xFFFF
    return 1.0 - ((u << 16) | tl) / 2.0**32


CASES = [
    # hidden sizes {1, 7, 768, 1000, 4096} in every dtype, LayerNorm and RMSNorm
    *(
        Case(dt, (3, n), rms=rms)
        for dt in (F32, F64, F16, BF16)
        for n in (1, 7, 768, 1000, 4096)
        for rms in (False, True)
    ),
    Case(F32, (2, 65536)),  # the swept path (rows longer than the register cache), G = 8
    Case(BF16, (1, 65536), rms=True, residual_in_fp32=True, weight="fp32"),
    Case(F32, (0, 768)),  # zero rows
    Case(F16, (2, 0, 64)),
    Case(F32, (37, 20)),  # 8 rows per block, a tail chunk inside vector-aligned rows
    Case(F64, (5, 1002)),  # fp64: a tail chunk inside vector-aligned rows
    Case(F32, (4, 16384)),  # the largest row the registers hold
    Case(F32, (2, 16392), rms=True),  # just past it: swept
    Case(F16, (3, 1000), weight="fp32"),
    Case(BF16, (3, 768), weight="fp32", rms=True),
    Case(F64, (3, 768), weight="fp32"),
    Case(F16, (3, 768), residual_in_fp32=True),
    Case(BF16, (3, 1000), residual_in_fp32=True, rms=True),
    Case(F32, (4, 5, 768), per_sample=True),
    Case(BF16, (3, 4, 1000), per_sample=True, rms=True, p=0.6),
    Case(F32, (3, 768), input_bias=True),
    Case(F16, (3, 1000), input_bias=True, rms=True),
    Case(F32, (3, 768), keep_h=False),
    Case(F16, (3, 4096), keep_h=False, rms=True),
    Case(F32, (3, 768), residual=False, weight="none", bias=False),
    Case(BF16, (3, 1000), p=0.0),
    Case(F32, (3, 768), p=1.0),
    Case(F32, (3, 768), misalign=4),
    Case(F16, (5, 1000), misalign=2, rms=True),
    # whole aligned rows, misaligned columns: neither the register cache nor kVector
    Case(F32, (3, 768), misalign_columns=True),
    Case(BF16, (3, 768), misalign_columns=True, input_bias=True),
    # forced ties: an element of row 1 on the register-cached vector path, and of a swept row
    *(
        Case(dt, (3, 768), p=_tie_p(3 * 768, 768 + 100, kept))
        for dt in (F16, F32)
        for kept in (True, False)
    ),
    Case(BF16, (2, 16392), p=_tie_p(2 * 16392, 16392 + 9000, True)),
]


def _operands(case: Case):
    cols = case.shape[-1]
    wdt = F32 if case.weight == "fp32" else case.dtype
    x = randn(case.shape, case.dtype, 1)
    r = randn(case.shape, F32 if case.residual_in_fp32 else case.dtype, 2)
    w = None if case.weight == "none" else randn((cols,), wdt, 3)
    b = randn((cols,), wdt, 4) if case.bias and not case.rms else None
    ib = randn((cols,), case.dtype, 5) if case.input_bias else None
    if case.misalign_columns:
        w, b, ib = (None if t is None else _one_element_off(t) for t in (w, b, ib))
    return x, (r if case.residual else None), w, b, ib


def _one_element_off(t: torch.Tensor) -> torch.Tensor:
    """t's values in a view one element past a 16-byte aligned allocation."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype)
    assert buf.data_ptr() % 16 == 0
    out = buf[1:]
    out.copy_(t)
    return out


def _forward_cpu(case: Case, x, r, w, b, ib):
    return ops.dropout_add_norm(
        x,
        r,
        w,
        b,
        ib,
        case.p,
        1e-5,
        case.rms,
        case.per_sample,
        case.residual_in_fp32,
        case.keep_h,
        seed_offset=SEED_OFFSET,
    )


def run_forward(host: cuda_host.HostCuda, case: Case, geometry: cuda_host.Geometry):
    x, r, w, b, ib = _operands(case)
    want = _forward_cpu(case, x, r, w, b, ib)
    got = host.norm_forward(
        x,
        r,
        w,
        b,
        ib,
        case.p,
        1e-5,
        rms=case.rms,
        per_sample=case.per_sample,
        residual_in_fp32=case.residual_in_fp32,
        keep_h=case.keep_h,
        seed_offset=SEED_OFFSET,
        geometry=geometry,
        misalign=case.misalign,
    )
    what = f"{case} on {geometry.name}"
    for name, g, e in zip(("y", "h", "mean", "rstd"), got.outputs, want[:4]):
        assert_bitwise(g, e, f"{name} of {what}")
    seed, offset = (v & ((1 << 64) - 1) for v in want[4].tolist())
    assert got.pair == (seed, offset), what
    return x, r, w, b, ib, want


def run_backward(host: cuda_host.HostCuda, case: Case, geometry: cuda_host.Geometry, saved_is_y):
    x, r, w, b, ib = _operands(case)
    y, h, mean, rstd, pair = _forward_cpu(dataclasses.replace(case, keep_h=True), x, r, w, b, ib)
    dy = randn(case.shape, case.dtype, 6)
    dh_in = randn(case.shape, h.dtype, 7) if case.keep_h else None
    saved = y if saved_is_y else h
    want_flags = (True, w is not None, b is not None, ib is not None)
    want = ops.dropout_add_norm_backward(
        dy,
        dh_in,
        saved,
        saved_is_y,
        w,
        b,
        mean,
        rstd,
        pair,
        case.p,
        case.rms,
        case.per_sample,
        case.residual_in_fp32,
        *want_flags,
    )
    got = host.norm_backward(
        dy,
        dh_in,
        saved,
        saved_is_y,
        w,
        b,
        mean,
        rstd,
        tuple(pair.tolist()),
        case.p,
        rms=case.rms,
        per_sample=case.per_sample,
        residual_in_fp32=case.residual_in_fp32,
        want=want_flags,
        geometry=geometry,
    )
    what = f"backward from {'y' if saved_is_y else 'h'} of {case} on {geometry.name}"
    names = ("grad_input", "grad_h", "grad_weight", "grad_bias", "grad_input_bias")
    for name, g, e in zip(names, got.outputs, want):
        assert_bitwise(g, e, f"{name} of {what}")


@pytest.fixture(scope="module")
def host() -> cuda_host.HostCuda:
    return cuda_host.build()


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: g.name)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_matches_cpu_op(host, case, geometry):
    run_forward(host, case, geometry)


BACKWARD_CASES = [
    c
    for c in CASES
    if c.p != 1.0 and c.misalign == 0 and int(torch.Size(c.shape).numel()) <= 20_000
] + [Case(F32, (40, 768)), Case(BF16, (33, 1000), rms=True, weight="fp32", input_bias=True)]


@pytest.mark.parametrize("saved_is_y", [False, True], ids=["from_h", "from_y"])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: g.name)
@pytest.mark.parametrize("case", BACKWARD_CASES, ids=str)
def test_backward_matches_cpu_op(host, case, geometry, saved_is_y):
    # xhat from y needs a weight with no zeros: randn draws none
    run_backward(host, case, geometry, saved_is_y)


def run_bf16_nans(host: cuda_host.HostCuda):
    case = Case(BF16, (4, 768))
    x, r = bf16_with_nans(case.shape, 1), bf16_with_nans(case.shape, 2)
    w, b = randn((768,), BF16, 3), randn((768,), BF16, 4)
    want = _forward_cpu(case, x, r, w, b, None)
    got = host.norm_forward(x, r, w, b, None, case.p, 1e-5, seed_offset=SEED_OFFSET)
    for name, g, e in zip(("y", "h"), got.outputs, want[:2]):
        assert_bf16_nans(g, e, f"{name} of host-executed CUDA")
        numbers = ~e.isnan()
        assert_bitwise(g[numbers], e[numbers], f"{name}'s numbers")


def test_bf16_nan_h_and_y_are_0x7fc0(host):
    """A bf16 NaN in h or y is 0x7FC0 (README) whatever NaN it came from, as from the CPU op:
    the register-cached forward stores a row's h again, fixed, when its sums show a NaN."""
    run_bf16_nans(host)


# ---------------------------------------------------------------- the tests catch planted bugs

KERNEL = "cuda/norm.cu"
MUTATIONS = (
    cuda_host.Mutation(
        "lane tree without its xor-16 step",
        KERNEL,
        "for (int half = kLanes / 2; half > 0; half /= 2) {",
        "for (int half = kLanes / 4; half > 0; half /= 2) {",
    ),
    cuda_host.Mutation(
        "group tree over half the groups",
        KERNEL,
        "halving_tree(per_group + s.slot * s.groups, s.groups)",
        "halving_tree(per_group + s.slot * s.groups, s.groups / 2)",
    ),
    cuda_host.Mutation(
        "vector over the tail of a row",
        KERNEL,
        "load_chunk(row.x, c0, n, kWhole || (p.vec_rows && c0 + kChunk <= n), x);",
        "load_chunk(row.x, c0, n, kWhole || p.vec_rows, x);",
    ),
    cuda_host.Mutation(
        "column partials added in reverse block order",
        KERNEL,
        "for (int64_t b = 0; b < p.blocks; ++b) total",
        "for (int64_t b = p.blocks - 1; b >= 0; --b) total",
    ),
    cuda_host.Mutation(
        "column partials over blocks of 8 rows",
        KERNEL,
        "static_cast<int>(left < kRowBlock ? left : kRowBlock);",
        "static_cast<int>(left < kRowBlock / 2 ? left : kRowBlock / 2);",
    ),
    cuda_host.Mutation(
        "tie draw ignored on the register-cached path",
        KERNEL,
        "if (__builtin_expect(!block_has_tie(b, rule), 1)) {",
        "if (true) {",
    ),
    cuda_host.Mutation(
        "a bf16 NaN h left as the hardware rounds it",
        KERNEL,
        "if (__builtin_expect(nan, 0) && row.h != nullptr) {",
        "if (false) {",
    ),
    cuda_host.Mutation(
        "backward's vector variant for misaligned columns",
        KERNEL,
        "if (p.vec_rows && p.vec_cols && p.whole_groups) {",
        "if (p.vec_rows && p.whole_groups) {",
    ),
    cuda_host.Mutation(
        "backward ignores the pair",
        KERNEL,
        "if (pair_in != nullptr) {",
        "if (false) {",
    ),
)
# What the mutants run: a small matrix that every bug above fails.
MUTANT_FORWARD = [
    Case(F32, (3, 4096)),
    Case(F32, (37, 20)),
    Case(F16, (3, 1000)),
    Case(F16, (3, 768), p=_tie_p(3 * 768, 768 + 100, True)),
]
MUTANT_BACKWARD = [
    Case(F32, (40, 768)),
    Case(F32, (37, 20)),
    Case(F32, (3, 768), misalign_columns=True),
]


@pytest.mark.slow
@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda m: m.name.replace(" ", "_"))
def test_planted_bug_is_caught(host, mutation):
    mutant = cuda_host.build((mutation,), jobs=1)
    failures = 0
    for geometry in GEOMETRIES:
        for case in MUTANT_FORWARD:
            try:
                run_forward(mutant, case, geometry)
            except AssertionError:  # a wrong bit, a fault or an out-of-bounds write
                failures += 1
        for case in MUTANT_BACKWARD:
            try:
                run_backward(mutant, case, geometry, False)
            except AssertionError:
                failures += 1
    try:
        run_bf16_nans(mutant)
    except AssertionError:
        failures += 1
    assert failures > 0, f"the planted bug {mutation.name!r} passed every case"
