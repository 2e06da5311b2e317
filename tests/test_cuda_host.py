"""The CUDA kernels, executed on the CPU through the host model of CUDA (tests/cuda_host.py).

Every kernel variant (dtype x element-wise/broadcast mask x residual x bias x shift) runs
through the real launcher, masked_op_cuda, under several launch geometries, in guarded buffers,
and must match the CPU op and tests/reference.py bit for bit; so must the (seed, offset) pair
the kernel writes. Compiled and host-executed, not run on a GPU: what the model cannot check
(memory model, occupancy, real launch limits) is for tests/test_cuda.py on a GPU.
"""

from __future__ import annotations

import dataclasses
import math
from concurrent.futures import ThreadPoolExecutor

import cuda_host
import pytest
import reference as ref
import torch
from helpers import assert_bf16_nans, assert_bitwise, bf16_with_nans, randn

from fused_dropout import ops

pytestmark = pytest.mark.skipif(
    cuda_host.unavailable_reason() is not None, reason=str(cuda_host.unavailable_reason())
)

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
SEED_OFFSET = (0xDEADBEEF12345678, 4 * 12345)
DECOY = (0x1234, 4 * 99)  # the Philox state of a backward call: pair_in must win over it
MASK64 = (1 << 64) - 1


@pytest.fixture(scope="module")
def host() -> cuda_host.HostCuda:
    return cuda_host.build()


@dataclasses.dataclass(frozen=True)
class Case:
    """One call of a masked op: the op, its operands' shape, dtype and layout, and the pair."""

    op: str  # dropout, dropout_, backward, alpha, alpha_backward, add, bias_add
    dtype: torch.dtype
    shape: tuple[int, ...]
    p: float = 0.5
    mask_ndim: int = -1
    # or channels_last, transposed, misaligned, residual_misaligned, bias_misaligned
    layout: str = "contiguous"
    seed_offset: tuple[int, int] = SEED_OFFSET
    captured: int | None = None  # graph-captured Philox state with this intragraph offset
    special: bool = False  # operands sprinkled with NaN, +-Inf, -0, subnormals and overflows

    def __str__(self) -> str:
        dims = "x".join(map(str, self.shape))
        dt = str(self.dtype).removeprefix("torch.")
        extra = f"-captured{self.captured}" if self.captured is not None else ""
        extra += "-special" if self.special else ""
        so = (
            ""
            if self.seed_offset == SEED_OFFSET
            else f"-so{self.seed_offset[0]:x}_{self.seed_offset[1]:x}"
        )
        return f"{self.op}-{dt}-{dims}-p{self.p}-k{self.mask_ndim}-{self.layout}{so}{extra}"


def _special_values(t: torch.Tensor, seed: int) -> torch.Tensor:
    """``t`` (contiguous) with every 5th element replaced, in turn, by NaN, +-Inf, -0, a
    subnormal, and finite values that overflow once scaled or added."""
    info = torch.finfo(t.dtype)
    specials = [math.nan, math.inf, -math.inf, -0.0, info.tiny / 4, info.max, -info.max]
    flat = t.clone().view(-1)
    where = torch.arange(seed % 5, flat.numel(), 5)
    flat[where] = torch.tensor(specials, dtype=t.dtype).repeat(len(where) // 7 + 1)[: len(where)]
    return flat.view(t.shape)


def _operand(case: Case, seed: int, layout: str) -> torch.Tensor:
    """Random values of the case's shape in ``layout`` (residual_misaligned: contiguous)."""
    n = int(torch.Size(case.shape).numel())
    if case.special:
        return _special_values(randn(case.shape, case.dtype, seed), seed)
    if layout == "misaligned":  # contiguous, not 16-byte aligned: the scalar path
        return randn((n + 1,), case.dtype, seed)[1:].view(case.shape)
    if layout == "channels_last":
        return randn(case.shape, case.dtype, seed).contiguous(memory_format=torch.channels_last)
    if layout == "transposed":  # every stride reversed
        dims = range(len(case.shape) - 1, -1, -1)
        return randn(case.shape[::-1], case.dtype, seed).permute(*dims)
    return randn(case.shape, case.dtype, seed)


def _assert_same(got: torch.Tensor, want: torch.Tensor, what: str, any_nan: bool) -> None:
    """Bit for bit; with ``any_nan``, NaNs only at the same places, of any pattern."""
    if any_nan:
        nan = got.isnan()
        assert torch.equal(nan, want.isnan()), f"{what}: NaN at other places"
        got, want = got.masked_fill(nan, 0), want.masked_fill(nan, 0)
    assert_bitwise(got, want, what)


def run_case(host: cuda_host.HostCuda, case: Case, geometry: cuda_host.Geometry) -> None:
    """Run ``case`` on the host-executed kernels; compare with the CPU op and the reference."""
    x = _operand(case, 1, case.layout)
    seed, offset = case.seed_offset
    k, p = case.mask_ndim, case.p
    what = f"{case} on {geometry.name}"
    run = dict(geometry=geometry, mask_ndim=k, seed_offset=case.seed_offset)
    if case.captured is not None:
        run["captured_intragraph"] = case.captured
    pair_cpu = None
    if case.op in ("dropout", "alpha", "dropout_"):
        alpha = case.op == "alpha"
        if case.op == "dropout_":
            want = x.clone()
            pair_cpu = ops.dropout_(want, p, k, seed_offset=case.seed_offset)
        else:
            want, pair_cpu = ops.dropout(x, p, k, True, alpha, seed_offset=case.seed_offset)
        expected = ref.ref_dropout(x, p, seed, offset, k, alpha=alpha)
        got = host.masked_op(x, p, alpha=alpha, inplace=case.op == "dropout_", **run)
    elif case.op in ("backward", "alpha_backward"):
        alpha = case.op == "alpha_backward"
        pair = torch.tensor([ref.seed_to_int64(seed), offset], dtype=torch.long)
        want = ops.dropout_backward(x, pair, p, k, True, alpha)
        expected = ref.ref_dropout_backward(x, p, seed, offset, k, alpha=alpha)
        run["seed_offset"] = DECOY
        got = host.masked_op(x, p, alpha=alpha, backward=True, pair_in=case.seed_offset, **run)
    else:
        r = _operand(case, 2, "misaligned" if case.layout == "residual_misaligned" else case.layout)
        b = None
        if case.op == "bias_add":  # bias_misaligned: a row not 16-byte aligned (element loads)
            cols = case.shape[-1]
            b = randn((cols + 1,), case.dtype, 3)[1 if case.layout == "bias_misaligned" else 0 :]
            b = _special_values(b[:cols], 3) if case.special else b[:cols]
        want, pair_cpu = ops.dropout_add(x, r, b, p, k, seed_offset=case.seed_offset)
        expected = ref.ref_dropout_add(x, r, b, p, seed, offset, k)
        got = host.masked_op(x, p, residual=r, bias=b, **run)

    # NaN bits are the hardware's (DESIGN.md s.3 covers values) but for bf16, whose NaN is
    # 0x7FC0 on every device; tests/reference.py keeps torch's own NaN patterns
    any_nan = case.special and case.dtype != torch.bfloat16
    _assert_same(got.out, want, f"{what}: host-executed CUDA vs the CPU op", any_nan)
    _assert_same(
        got.out, expected, f"{what}: host-executed CUDA vs tests/reference.py", case.special
    )
    if case.special and case.dtype == torch.bfloat16:
        assert_bf16_nans(got.out, expected, what)
    if case.op in ("backward", "alpha_backward"):
        assert got.pair is None
    else:
        assert got.pair == (seed & MASK64, offset), f"{what}: pair written {got.pair}"
        if pair_cpu is not None:
            assert tuple(v & MASK64 for v in pair_cpu.tolist()) == got.pair, what
    if geometry.grid_x:
        assert got.grid[0] == geometry.grid_x, what
    assert got.launches == 1, f"{what}: {got.launches} launches"


# ---------------------------------------------------------------- the matrix

SIZES = (1, 3, 4, 5, 1023, 4097, (1 << 20) + 3)
LAYOUTS = ("contiguous", "channels_last", "transposed", "misaligned")
EXTREME_PAIRS = (
    (MASK64, 0),  # the largest seed
    ((1 << 64) - (1 << 32) + 5, (1 << 62)),  # offset 2^62: o = 2^60, the high counter word
    (1 << 63, (1 << 63) - 4),  # the largest offset
    (0, (1 << 34) - 4),  # o = 2^32 - 1: the last offset whose high word is 0
)


def _tie_p(n: int, m: int, kept: bool) -> float:
    """The p under which mask element m (of n, at SEED_OFFSET) ties the threshold's high
    half (contract v2) and the tie draw keeps it (or not)."""
    u = int(ref.mask_numbers(*SEED_OFFSET, n)[m])
    v = int(ref.mask_numbers(*SEED_OFFSET, n, tie=True)[m])
    tl = v + 1 if kept else v
    assert 0 < tl <= 0xFFFF
    return 1.0 - ((u << 16) | tl) / 2.0**32


def _cases() -> list[Case]:
    cases = []
    for dt in DTYPES:
        # tests/test_cuda.py's matrix: sizes, layouts x mask dims, the fused adds, alpha
        for n in SIZES:
            for p in (0.1, 0.5, 0.9) if n < (1 << 20) else (0.5,):
                cases += [Case("dropout", dt, (n,), p), Case("backward", dt, (n,), p)]
        for layout in LAYOUTS:
            for k in (-1, 0, 1, 2):
                cases.append(Case("dropout", dt, (3, 5, 7, 9), 0.4, k, layout))
        for k in (-1, 1):
            for op in ("add", "bias_add"):
                cases.append(Case(op, dt, (4, 77, 96), 0.3, k))
            cases.append(Case("add", dt, (4, 77, 96), 0.3, k, "residual_misaligned"))
            cases.append(Case("bias_add", dt, (4, 77, 96), 0.3, k, "misaligned"))
            cases.append(Case("add", dt, (3, 5, 7, 9), 0.3, 2 if k == 1 else k, "channels_last"))
        for k in (-1, 2):
            cases += [Case(op, dt, (8, 16, 5, 5), 0.3, k) for op in ("alpha", "alpha_backward")]
        for layout in ("contiguous", "channels_last", "misaligned"):
            for k in (-1, 2):
                cases.append(Case("dropout_", dt, (3, 5, 7, 9), 0.5, k, layout))
        cases.append(Case("dropout_", dt, (5000,), 0.5))  # many blocks rewrite their own units
        # forced ties: element-wise (a vector tile and the tail), per-sample, per-channel
        cases += [
            Case("dropout", dt, (1000,), _tie_p(1000, m, kept))
            for m in (100, 995)
            for kept in (True, False)
        ]
        cases.append(Case("add", dt, (10, 100), _tie_p(1000, 100, True)))
        cases.append(Case("dropout", dt, (210, 3, 7), _tie_p(210, 5, True), 1))
        for layout in ("contiguous", "channels_last"):
            cases.append(Case("dropout", dt, (17, 60, 3, 5), _tie_p(1020, 9, True), 2, layout))
        # a bias row of a tile's multiple (vector loads), of none (element loads, wrapping
        # inside a tile), and an unaligned one; 1000 columns are 125 fp32 tiles, 62.5 fp16 ones
        for cols in (1000, 37):
            cases.append(Case("bias_add", dt, (7, cols), 0.3))
        cases.append(Case("bias_add", dt, (5, 96), 0.3, layout="bias_misaligned"))
        # NaN, Inf and overflow through every rounding (bf16: the GPU's NaN made the core's)
        cases += [
            Case(op, dt, (1029,), 0.3, special=True) for op in ("dropout", "backward", "alpha")
        ]
        cases += [Case(op, dt, (9, 112), 0.3, special=True) for op in ("add", "bias_add")]
        # p = 0 (nothing drawn) and p = 1 (zeros)
        for p in (0.0, 1.0):
            cases += [Case("dropout", dt, (1027,), p), Case("bias_add", dt, (6, 35), p)]
    # the pair: extreme values, and the graph-captured Philox state
    for so in EXTREME_PAIRS:
        for dt in (torch.float32, torch.float16):
            cases += [Case("dropout", dt, (1031,), 0.5, seed_offset=so)]
            cases += [Case("backward", dt, (1031,), 0.5, seed_offset=so)]
            cases += [Case("add", dt, (7, 13), 0.5, 1, seed_offset=so)]
    for dt in DTYPES:
        cases += [Case("dropout", dt, (1031,), 0.5, captured=8)]
        cases += [Case("add", dt, (7, 13), 0.5, 1, captured=0)]
    # empty tensors still report the pair they were given (issue 8's bug)
    cases += [Case(op, torch.float32, (0,), 0.5) for op in ("dropout", "add", "backward")]
    cases += [Case("bias_add", torch.float32, (3, 0), 0.5)]  # an empty bias row
    cases += [Case("dropout", torch.float16, (0, 3), 0.5, 1, captured=4)]
    return cases


CASES = _cases()


@pytest.mark.parametrize("geometry", cuda_host.GEOMETRIES, ids=lambda g: g.name)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_kernel_matches_cpu_op_and_reference(host, case, geometry):
    run_case(host, case, geometry)


@pytest.mark.parametrize("mask_ndim", [-1, 1])
@pytest.mark.parametrize("op", ["dropout", "dropout_", "backward", "alpha", "add", "bias_add"])
def test_bf16_nan_result_is_0x7fc0(host, op, mask_ndim):
    """A bf16 NaN result is 0x7FC0 (README) whatever NaN it came from (either sign, quiet or
    signalling, any payload) or inf - inf, on the vector path and the tail; the CPU op gives
    the same (tests/test_dropout.py)."""
    x, r, b = bf16_with_nans((9, 131), 1), bf16_with_nans((9, 131), 2), bf16_with_nans((131,), 3)
    so, p, k = SEED_OFFSET, 0.3, mask_ndim
    if op in ("add", "bias_add"):
        b = b if op == "bias_add" else None
        got = host.masked_op(x, p, mask_ndim=k, residual=r, bias=b, seed_offset=so)
        expected = ref.ref_dropout_add(x, r, b, p, *so, k)
    elif op == "backward":
        got = host.masked_op(x, p, mask_ndim=k, backward=True, seed_offset=DECOY, pair_in=so)
        expected = ref.ref_dropout_backward(x, p, *so, k)
    else:
        alpha = op == "alpha"
        got = host.masked_op(
            x, p, mask_ndim=k, alpha=alpha, inplace=op == "dropout_", seed_offset=so
        )
        expected = ref.ref_dropout(x, p, *so, k, alpha=alpha)
    assert_bf16_nans(got.out, expected, f"host-executed CUDA {op}, mask_ndim {k}")


def test_launcher_refuses_a_bias_without_a_residual(host):
    """No op adds a bias without a residual, so no kernel does: the launcher says so."""
    x = randn((4, 32), torch.float32, 1)
    with pytest.raises(cuda_host.KernelError, match=r"cudaError 1\b"):
        host.masked_op(x, 0.5, bias=randn((32,), torch.float32, 3))


def assert_grids_fill_the_device(build: cuda_host.HostCuda, tmp_path) -> None:
    """Every variant runs in turn on a tensor larger than the grid, whose size must be the
    SM count times the blocks of *that* kernel resident per SM. The model gives each kernel
    its own occupancy (as registers do on a GPU), so a cache shared by the variants of a
    dtype (issue 18: the first one launched fixed the others' grids) shows as a wrong grid.
    A fresh instance of the build, so the launcher's SM count is this one-SM device's."""
    host = build.fresh(tmp_path)
    device = cuda_host.Geometry("one_sm", sm_count=1)
    for dtype in DTYPES:
        x, r = randn((8, 4096), dtype, 1), randn((8, 4096), dtype, 2)
        b = randn((4096,), dtype, 3)
        occupancies = set()
        for k in (-1, 1):
            for op in ("dropout", "alpha", "add", "bias_add"):
                got = host.masked_op(
                    x,
                    0.5,
                    geometry=device,
                    mask_ndim=k,
                    alpha=op == "alpha",
                    residual=r if op in ("add", "bias_add") else None,
                    bias=b if op == "bias_add" else None,
                )
                assert got.grid[0] == device.sm_count * got.resident_blocks, (
                    f"{op} {dtype} mask_ndim={k}: a grid of {got.grid[0]} blocks for a kernel "
                    f"of which {got.resident_blocks} fit per SM"
                )
                occupancies.add(got.resident_blocks)
        assert len(occupancies) > 1, "the model gave every variant one occupancy: no test"


def test_each_variant_sizes_its_grid_by_its_own_occupancy(host, tmp_path):
    assert_grids_fill_the_device(host, tmp_path)


# ---------------------------------------------------------------- the model itself


def test_model_runs_cooperating_threads_as_a_gpu_does(host):
    """Shared memory, __syncthreads, warp shuffles and votes (csrc/testing/cooperation.cu)."""
    blocks, threads = 3, 256
    n = blocks * threads
    data = torch.arange(n, dtype=torch.int32)
    out = torch.zeros(n, dtype=torch.int32)
    cuda_host.cooperation(host, "reverse", blocks, threads, data, out)
    assert torch.equal(out, data.view(blocks, threads).flip(1).reshape(-1))

    values = torch.randint(-1000, 1000, (n,), generator=torch.Generator().manual_seed(0))
    sums = torch.zeros(blocks, dtype=torch.float32)
    cuda_host.cooperation(host, "block_sum", blocks, threads, values.float(), sums)
    assert torch.equal(sums, values.view(blocks, threads).sum(1).float())  # exact: integers

    predicate = (values > 0).int()
    votes = torch.zeros(n // 32, dtype=torch.int64)  # unsigned 32-bit words, two per element
    cuda_host.cooperation(host, "ballot", blocks, threads, predicate, votes)
    want = [sum(int(b) << i for i, b in enumerate(w)) for w in predicate.view(-1, 32).tolist()]
    got = votes.view(torch.int32).tolist()[: n // 32]
    assert [g & 0xFFFFFFFF for g in got] == want


def test_model_reports_a_barrier_not_every_thread_reaches(host):
    with pytest.raises(cuda_host.KernelError, match="__syncthreads"):
        cuda_host.cooperation(host, "divergent_barrier", 1, 64, None, torch.zeros(64).int())


def test_model_rejects_launches_beyond_cudas_limits(host):
    with pytest.raises(cuda_host.KernelError, match="launch failed"):
        cuda_host.cooperation(
            host, "reverse", 1, 2048, torch.zeros(2048).int(), torch.zeros(2048).int()
        )


def test_rewrite_of_launches_keeps_the_kernel_expression_and_lines():
    text = "  k<D, (2 > 1)><<<g,\n b, 0, s>>>(p);\n  ns::other<<<1, 2>>>(a, b);"
    got = cuda_host.rewrite_launches(text)
    assert "::cuda_host::launch(k<D, (2 > 1)>, ::cuda_host::LaunchConfig(g,\n b, 0, s))(p)" in got
    assert "::cuda_host::launch(ns::other, ::cuda_host::LaunchConfig(1, 2))(a, b)" in got
    assert got.count("\n") == text.count("\n")


# ---------------------------------------------------------------- the harness catches bugs

KERNEL = "cuda/dropout.cu"
# Bugs injected into the kernel source: each must make the matrix above fail. When the kernel
# is rewritten, a pattern that no longer occurs fails the build loudly: update it here.
MUTATIONS = (
    cuda_host.Mutation(
        "off-by-one tail store",
        KERNEL,
        "if (e0 + j < numel) dst[e0 + j] = src.e[j];",
        "if (e0 + j <= numel) dst[e0 + j] = src.e[j];",
    ),
    cuda_host.Mutation(
        "wrong channel start",
        KERNEL,
        "int64_t channel = map.period == 1 ? 0 : e0 % map.period;",
        "int64_t channel = 0;",
    ),
    cuda_host.Mutation(
        "grid-stride step of blockDim",
        KERNEL,
        "const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;",
        "const int64_t step = blockDim.x;",
    ),
    cuda_host.Mutation(
        "pair written by block 1",
        KERNEL,
        "blockIdx.x == 0 && threadIdx.x == 0",
        "blockIdx.x == 1 && threadIdx.x == 0",
    ),
    cuda_host.Mutation(
        "vector path ignores the residual's alignment",
        KERNEL,
        "aligned16(a.input) && aligned16(a.residual) && aligned16(a.out)",
        "aligned16(a.input) && aligned16(a.out)",
    ),
    cuda_host.Mutation(
        "vector loads and stores over the tail",
        KERNEL,
        "p.vectorized ? p.numel / N : 0;",
        "p.vectorized ? tiles : 0;",
    ),
    cuda_host.Mutation(
        "bias column not wrapped",
        KERNEL,
        "col = col + 1 == p.bias_len ? 0 : col + 1;",
        "col = col + 1;",
    ),
    cuda_host.Mutation(
        "bias column stepped past the row",
        KERNEL,
        "if (col >= p.bias_len) col -= p.bias_len;",
        "",
    ),
    cuda_host.Mutation(
        "bias vectors from a row of any length",
        KERNEL,
        "a.bias_len % kTile<D> == 0 && aligned16(a.bias)",
        "aligned16(a.bias)",
    ),
    cuda_host.Mutation(
        "bf16 NaN left as the hardware's",
        "cuda/pairs.h",
        "if (__builtin_expect(nan, 0)) {",
        "if (false) {",
    ),
    cuda_host.Mutation(
        "tie draw ignored",
        KERNEL,
        "if (__builtin_expect(!block_has_tie(b, p.rule), 1)) {",
        "if (true) {",
    ),
    cuda_host.Mutation(
        "grid of every variant sized by the dropout kernel's occupancy",
        KERNEL,
        "launch::grid_for<kernel, kThreads>",
        "launch::grid_for<masked_kernel<D, true, false, false, false>, kThreads>",
    ),
    cuda_host.Mutation(
        "pair_in ignored",
        KERNEL,
        "if (p.pair_in != nullptr) {",
        "if (false) {",
    ),
)
# The matrix without its largest tensors: enough to catch every bug above.
SMALL_CASES = [c for c in CASES if int(torch.Size(c.shape).numel()) < 100_000]


@pytest.fixture(scope="module")
def mutants(host) -> dict[str, cuda_host.HostCuda]:
    """Every mutant, built at once (two at a time); `host` first, so they share its objects."""
    with ThreadPoolExecutor(2) as pool:
        builds = pool.map(lambda m: cuda_host.build((m,), jobs=1), MUTATIONS)
        return {m.name: b for m, b in zip(MUTATIONS, builds)}


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda m: m.name.replace(" ", "_"))
def test_injected_bug_is_caught(mutants, mutation, tmp_path):
    mutant = mutants[mutation.name]
    for case in SMALL_CASES:
        for geometry in cuda_host.GEOMETRIES:
            try:
                run_case(mutant, case, geometry)
            except AssertionError as caught:  # includes KernelError and OutOfBounds
                print(f"{mutation.name}: caught by {case} on {geometry.name}: {caught}")
                return
    try:
        assert_grids_fill_the_device(mutant, tmp_path)
    except AssertionError as caught:
        print(f"{mutation.name}: caught by the grid sizes: {caught}")
        return
    pytest.fail(f"injected bug {mutation.name!r} passed every case")


def test_mutation_whose_pattern_is_gone_fails_loudly():
    gone = cuda_host.Mutation("gone", KERNEL, "no such kernel text", "")
    with pytest.raises(ValueError, match="occurs 0 times"):
        cuda_host.build((gone,))


def test_reference_keep_at_is_keep_mask_at_those_indices():
    """keep_at (below) must follow the contract wherever keep_mask does."""
    for seed, offset in (SEED_OFFSET, *EXTREME_PAIRS):
        for p in (0.0, 0.3, 0.9):
            want = ref.keep_mask(seed, offset, p, 1001).numpy()
            assert (ref.keep_at(seed, offset, p, range(1001)) == want).all()


def test_counter_groups_past_2_32_on_a_tensor_larger_than_memory(host):
    """fp16 dropout of 2^35 + 4099 elements (64 GiB, never allocated): the windows around
    elements 2^34 and 2^35 (where a counter group of 4 or 8 elements passes 2^32) and at the
    end run through the real launcher's kernel and match the reference."""
    numel = (1 << 35) + 4099
    windows = [((1 << 34) - 700, (1 << 34) + 700), ((1 << 35) - 700, (1 << 35) + 700)]
    windows.append((numel - 1500, numel))
    seed, offset = SEED_OFFSET
    p = 0.5
    scale = torch.tensor(1 / (1 - p), dtype=torch.float64).float()
    for (lo, hi), (x, got) in zip(
        windows, host.dropout_windows(torch.float16, numel, p, SEED_OFFSET, windows)
    ):
        keep = torch.from_numpy(ref.keep_at(seed, offset, p, range(lo, hi)))
        want = torch.where(keep, (x.float() * scale).half(), torch.zeros((), dtype=x.dtype))
        assert 0 < int(keep.sum()) < hi - lo
        assert_bitwise(got, want, f"elements {lo}..{hi - 1} of {numel}")
