"""Core CPU test suite of fused_dropout.functional.dropout, fused_dropout.Dropout and
torch.ops.fused_dropout.*, checked bit for bit against tests/reference.py.

Outputs and gradients are compared by bit pattern (``.view(int16/32/64)``): the contract
(DESIGN.md s.2-3) fixes every bit. A tolerance only where it does not: a bias gradient (a sum,
in an order of its own), a Linear bias gradient of inductor's (its own reduction), and the
alpha map checked also against torch's formula evaluated in double.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import inspect
import math
import os
import re
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch.autograd import gradcheck, gradgradcheck
from torch.utils.checkpoint import checkpoint

import fused_dropout
from fused_dropout import functional as FD
from fused_dropout import ops

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
ref = importlib.import_module("reference")  # tests/reference.py, whatever the import mode
from helpers import (  # noqa: E402
    assert_bf16_nans,
    assert_bitwise,
    bf16_with_nans,
    bits,
    randn,
    random64_draw,
)
from helpers import gen as _gen  # noqa: E402
from helpers import run_steps as _run_steps  # noqa: E402

OPS = torch.ops.fused_dropout

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SIZES = [0, 1, 3, 4, 5, 1023, 4097, 2**20 + 3]
LAYOUTS = ["contiguous", "transposed", "strided", "offset", "channels_last"]
ALPHA_SIG = 1e-4  # significance level of every statistical test

# one (seed, offset) pair per dtype, covering seed/offset high words and seeds >= 2**63
PAIRS = {
    torch.float32: (0, 0),
    torch.float64: (2**63 + 7, 4),
    torch.float16: (123456789, 4 * (2**32 + 1)),
    torch.bfloat16: (2**64 - 1, 2**40),
}


@pytest.fixture(autouse=True)
def _isolate_global_rng():
    """Every test starts from the same global RNG state and leaves it untouched."""
    with torch.random.fork_rng():
        torch.manual_seed(20240601)
        yield


# ----------------------------------------------------------------------- helpers


def assert_layout_like_empty_like(out: torch.Tensor, inp: torch.Tensor):
    """``out`` has the strides torch.empty_like(inp) would have (dims of size > 1)."""
    if inp.numel() == 0:
        return
    want = torch.empty_like(inp)
    for d in range(inp.dim()):
        if inp.shape[d] > 1:
            assert out.stride(d) == want.stride(d), (
                f"strides {out.stride()} != empty_like's {want.stride()} for input "
                f"strides {inp.stride()} shape {tuple(inp.shape)}"
            )


def make_input(n: int, layout: str, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """A tensor whose layout is ``layout``, built around ``n``.

    contiguous: (n,); transposed: (2, n) view of an (n, 2) tensor; strided: every
    other element of a 1-D tensor, storage offset 1; offset: contiguous view with
    storage offset 3; channels_last: (1, 2, 1, n) in channels_last format.
    """
    if layout == "contiguous":
        return randn((n,), dtype, seed)
    if layout == "transposed":
        return randn((n, 2), dtype, seed).t()
    if layout == "strided":
        return randn((2 * n + 1,), dtype, seed)[1::2]
    if layout == "offset":
        return randn((n + 3,), dtype, seed)[3:]
    if layout == "channels_last":
        return randn((1, 2, 1, n), dtype, seed).contiguous(memory_format=torch.channels_last)
    raise AssertionError(layout)


def i64(seed: int) -> int:
    return ref.seed_to_int64(seed)


def torch_p_message(p: float) -> str:
    try:
        torch.nn.Dropout(p)
    except ValueError as e:
        return str(e)
    raise AssertionError("torch accepted p")


# ---------------------------------------------------- bitwise equality, all layouts


@pytest.mark.cpu_paths
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n", SIZES, ids=[f"n{n}" for n in SIZES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bitwise_forward_backward(dtype, n, layout):
    seed, offset = PAIRS[dtype]
    p = 0.3
    x = make_input(n, layout, dtype, seed=n).detach().requires_grad_()
    y = FD.dropout(x, p, training=True, seed_offset=(seed, offset))
    assert_bitwise(y, ref.ref_dropout(x, p, seed, offset), "forward")
    assert_layout_like_empty_like(y, x)
    g = randn(tuple(x.shape), dtype, seed=n + 1)
    (gx,) = torch.autograd.grad(y, x, g)
    assert_bitwise(gx, ref.ref_dropout_backward(g, p, seed, offset), "gradient")


@pytest.mark.cpu_paths
@pytest.mark.parametrize("layout", LAYOUTS[1:])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_mask_of_noncontiguous_equals_mask_of_contiguous_copy(dtype, layout):
    x = make_input(4097, layout, dtype, seed=3)
    assert not x.is_contiguous() or x.storage_offset() != 0
    so = (987654321, 16)
    a = FD.dropout(x, 0.5, seed_offset=so)
    b = FD.dropout(x.contiguous(), 0.5, seed_offset=so)
    assert_bitwise(a.contiguous(), b)


@pytest.mark.cpu_paths
@pytest.mark.parametrize(
    "make",
    [
        pytest.param(
            lambda d: randn((2, 3, 5, 7), d).contiguous(memory_format=torch.channels_last),
            id="cl_2x3x5x7",
        ),
        pytest.param(
            lambda d: randn((4, 16, 9, 9), d).contiguous(memory_format=torch.channels_last),
            id="cl_4x16x9x9",
        ),
        pytest.param(
            lambda d: randn((2, 0, 3, 3), d).contiguous(memory_format=torch.channels_last),
            id="cl_empty",
        ),
        pytest.param(lambda d: randn((3, 5, 7, 2), d).permute(3, 0, 2, 1), id="permuted"),
        pytest.param(lambda d: randn((6, 10), d)[1:5, 2:9:3], id="slice2d"),
        pytest.param(lambda d: randn((1, 7), d).expand(5, 7), id="expanded"),
    ],
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bitwise_multidim_layouts(dtype, make):
    x = make(dtype)
    seed, offset = PAIRS[dtype]
    y = FD.dropout(x, 0.4, seed_offset=(seed, offset))
    assert_bitwise(y, ref.ref_dropout(x, 0.4, seed, offset))
    assert_layout_like_empty_like(y, x)
    xg = x.detach().requires_grad_()
    g = randn(tuple(x.shape), dtype, seed=9)
    (gx,) = torch.autograd.grad(FD.dropout(xg, 0.4, seed_offset=(seed, offset)), xg, g)
    assert_bitwise(gx, ref.ref_dropout_backward(g, 0.4, seed, offset), "gradient")


@pytest.mark.cpu_paths
@pytest.mark.parametrize(
    "p", [1e-20, 2.0**-33, 1e-7, 0.1, 0.25, 0.5, 0.7, 0.9, 1 - 1e-7, 1 - 2.0**-34]
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bitwise_various_p(dtype, p):
    x = randn((4097,), dtype, seed=5)
    y = FD.dropout(x, p, seed_offset=(31337, 8))
    assert_bitwise(y, ref.ref_dropout(x, p, 31337, 8))


@pytest.mark.cpu_paths
def test_result_independent_of_thread_count():
    x = randn((2**20 + 3,), torch.float32, seed=6)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = FD.dropout(x, 0.5, seed_offset=(1, 0))
        torch.set_num_threads(max(2, old))
        b = FD.dropout(x, 0.5, seed_offset=(1, 0))
    finally:
        torch.set_num_threads(old)
    assert_bitwise(a, b)
    assert_bitwise(a, ref.ref_dropout(x, 0.5, 1, 0))


# ---------------------------------------------------------- torch.ops.fused_dropout


def _op_input(shape, layout, dtype, seed=0):
    if layout == "contiguous" or len(shape) < 2:
        return randn(shape, dtype, seed)
    # same logical shape, reversed memory order
    return randn(tuple(reversed(shape)), dtype, seed).permute(*reversed(range(len(shape))))


@pytest.mark.cpu_paths
@pytest.mark.parametrize("layout", ["contiguous", "permuted"])
@pytest.mark.parametrize(
    "shape, mask_ndim",
    [
        ((4, 5, 6), 0),
        ((4, 5, 6), 1),
        ((4, 5, 6), 2),
        ((4, 5, 6), 3),
        ((4, 5, 6), -1),
        ((3, 1001), 1),
        ((0, 5), 1),
        ((), -1),
        ((), 0),
    ],
)
@pytest.mark.parametrize("scale_by_keep", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_op_dropout_bitwise(dtype, scale_by_keep, shape, mask_ndim, layout):
    seed, offset = PAIRS[dtype]
    p = 0.35
    x = _op_input(shape, layout, dtype, seed=1)
    out, so = OPS.dropout(x, p, mask_ndim, scale_by_keep, False, i64(seed), offset, None)
    assert so.dtype == torch.int64 and so.shape == (2,) and so.device == x.device
    assert so.tolist() == [i64(seed), offset]
    kw = {"mask_ndim": mask_ndim, "scale_by_keep": scale_by_keep}
    assert_bitwise(out, ref.ref_dropout(x, p, seed, offset, **kw))
    assert_layout_like_empty_like(out, x)

    g = _op_input(shape, layout, dtype, seed=2)
    gb = OPS.dropout_backward(g, so, p, mask_ndim, scale_by_keep, False)
    assert_bitwise(gb, ref.ref_dropout_backward(g, p, seed, offset, **kw), "dropout_backward")

    xi = x.clone()
    so2 = OPS.dropout_(xi, p, mask_ndim, scale_by_keep, False, i64(seed), offset, None)
    assert so2.tolist() == [i64(seed), offset]
    assert_bitwise(xi, ref.ref_dropout(x, p, seed, offset, **kw), "dropout_")


@pytest.mark.cpu_paths
@pytest.mark.parametrize("p", [0.2, 0.5])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_op_alpha_dropout(dtype, p):
    """alpha=True: kept x*a + A*a*p, dropped A*a*(p-1), backward grad*a / 0.

    The plan does not spell out the rounding of the alpha path; the reference's choice
    (constants computed in double and rounded once to the compute type, kept value
    ``(x*a) + b`` as two separately rounded compute-type ops, no FMA, one rounding to
    the dtype) is the same as the fused adds' rule, and the extension matches it.
    """
    seed, offset = PAIRS[dtype]
    x = randn((33, 17), dtype, seed=4)
    out, so = OPS.dropout(x, p, -1, True, True, i64(seed), offset, None)
    mask = ref.keep_mask(seed, offset, p, x.shape)
    assert_bitwise(out, ref.ref_dropout(x, p, seed, offset, alpha=True), "alpha forward")
    g = randn((33, 17), dtype, seed=5)
    gb = OPS.dropout_backward(g, so, p, -1, True, True)
    assert_bitwise(gb, ref.ref_dropout_backward(g, p, seed, offset, alpha=True), "alpha backward")
    assert (bits(gb)[~mask] == 0).all()
    # and the values are torch's alpha_dropout affine maps (independent of the reference)
    pd = float(p)
    a = 1.0 / math.sqrt((ref.ALPHA**2 * pd + 1) * (1 - pd))
    xd = x.double()
    exp = torch.where(
        mask,
        xd * a + ref.ALPHA * a * pd,
        torch.tensor(ref.ALPHA * a * (pd - 1), dtype=torch.float64),
    )
    torch.testing.assert_close(out.double(), exp, **_tol(dtype))


def _tol(dtype):
    return {
        torch.float64: {"atol": 1e-12, "rtol": 1e-12},
        torch.float32: {"atol": 1e-5, "rtol": 1e-5},
        torch.float16: {"atol": 2e-3, "rtol": 2e-3},
        torch.bfloat16: {"atol": 2e-2, "rtol": 1.6e-2},
    }[dtype]


@pytest.mark.cpu_paths
@pytest.mark.parametrize(
    "shape, mask_ndim, res_layout",
    [
        ((8, 33), -1, "contiguous"),
        ((4097,), -1, "contiguous"),
        ((2, 3, 16), 1, "contiguous"),
        ((2, 3, 16), 2, "contiguous"),
        ((16, 24), -1, "transposed"),
        ((0, 4), -1, "contiguous"),
    ],
)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_op_dropout_add_bitwise(dtype, with_bias, shape, mask_ndim, res_layout):
    seed, offset = PAIRS[dtype]
    p = 0.3
    x = randn(shape, dtype, seed=1)
    if res_layout == "transposed":
        r = randn(tuple(reversed(shape)), dtype, seed=2).t()
    else:
        r = randn(shape, dtype, seed=2)
    b = randn((shape[-1],), dtype, seed=3) if with_bias else None
    out, so = OPS.dropout_add(x, r, b, p, mask_ndim, True, i64(seed), offset, None)
    assert so.tolist() == [i64(seed), offset]
    assert_bitwise(out, ref.ref_dropout_add(x, r, b, p, seed, offset, mask_ndim=mask_ndim))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_functional_dropout_add_and_bias_dropout_add(dtype):
    seed, offset = PAIRS[dtype]
    p = 0.25
    x = randn((8, 64), dtype, seed=1).requires_grad_()
    r = randn((8, 64), dtype, seed=2).requires_grad_()
    b = randn((64,), dtype, seed=3).requires_grad_()
    y = FD.dropout_add(x, r, p, seed_offset=(seed, offset))
    assert_bitwise(y, ref.ref_dropout_add(x, r, None, p, seed, offset))
    g = randn((8, 64), dtype, seed=4)
    gx, gr = torch.autograd.grad(y, (x, r), g)
    assert_bitwise(gx, ref.ref_dropout_backward(g, p, seed, offset), "grad input")
    assert_bitwise(gr, g, "grad residual")

    y = FD.bias_dropout_add(x, b, r, p, seed_offset=(seed, offset))
    assert_bitwise(y, ref.ref_dropout_add(x, r, b, p, seed, offset))
    gx, gb, gr = torch.autograd.grad(y, (x, b, r), g)
    assert_bitwise(gx, ref.ref_dropout_backward(g, p, seed, offset), "grad input")
    assert_bitwise(gr, g, "grad residual")
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype in (torch.float32, torch.float64) else {}
    torch.testing.assert_close(
        gb, ref.ref_dropout_backward(g, p, seed, offset).float().sum(0).to(dtype), **tol
    )


# -------------------------------------------------------------------- statistics


@pytest.mark.parametrize("seed", [0, 1, 2**63 + 3, "generator"])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_and_mean(p, seed):
    n = 1 << 20
    x = torch.ones(n)
    if seed == "generator":
        y = FD.dropout(x, p)
    else:
        y = FD.dropout(x, p, seed_offset=(seed, 0))
    kept = y != 0
    k = int(kept.sum())
    assert stats.binomtest(k, n, 1.0 - p).pvalue > ALPHA_SIG, (k, n, p)
    # kept values are exactly fl32(1/(1-p)); the mean is preserved
    scale = torch.tensor(1.0 / (1.0 - p), dtype=torch.float64).float()
    assert bool((y[kept] == scale).all())
    sd = math.sqrt(p / (1.0 - p) / n)
    z = stats.norm.isf(ALPHA_SIG / 2)
    assert abs(float(y.double().mean()) - 1.0) < z * sd


def _agreement_pvalue(a: torch.Tensor, b: torch.Tensor, p: float) -> float:
    """Binomial test that masks a, b are independent (agreement rate p^2 + (1-p)^2)."""
    n = a.numel()
    agree = int((a == b).sum())
    return stats.binomtest(agree, n, p * p + (1 - p) * (1 - p)).pvalue


@pytest.mark.parametrize("source", ["global", "generator", "module"])
def test_consecutive_calls_give_fresh_masks(source):
    n, p = 1 << 16, 0.5
    x = torch.ones(n)
    g = _gen(77)
    m = fused_dropout.Dropout(p)
    masks = []
    for _ in range(4):
        if source == "global":
            y = FD.dropout(x, p)
        elif source == "generator":
            y = FD.dropout(x, p, generator=g)
        else:
            y = m(x)
        masks.append(y != 0)
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.equal(masks[i], masks[j])
            assert _agreement_pvalue(masks[i], masks[j], p) > ALPHA_SIG


@pytest.mark.parametrize("lag", [1, 4])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_no_neighbour_correlation(p, lag):
    n = 1 << 20
    m = (FD.dropout(torch.ones(n), p, seed_offset=(4242, 0)) != 0).numpy()
    idx = np.arange(n - lag)
    idx = idx[(idx // lag) % 2 == 0]  # disjoint pairs (i, i + lag)
    a, b = m[idx], m[idx + lag]
    table = np.array(
        [[np.sum(a & b), np.sum(a & ~b)], [np.sum(~a & b), np.sum(~a & ~b)]],
        dtype=np.int64,
    )
    assert stats.chi2_contingency(table).pvalue > ALPHA_SIG, table


def test_no_correlation_between_offsets_and_seeds():
    n, p = 1 << 18, 0.5
    x = torch.ones(n)
    base = FD.dropout(x, p, seed_offset=(5, 0)) != 0
    for so in [(5, 4), (6, 0), (5 + 2**32, 0)]:
        other = FD.dropout(x, p, seed_offset=so) != 0
        assert _agreement_pvalue(base, other, p) > ALPHA_SIG, so


# -------------------------------------------------- identities and special values


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_p0_returns_input_itself(dtype):
    x = randn((5, 7), dtype)
    assert FD.dropout(x, 0.0) is x
    assert FD.dropout(x, 0.0, seed_offset=(1, 0)) is x
    assert FD.dropout(x, 0.0, inplace=True) is x
    assert fused_dropout.Dropout(0.0)(x) is x
    assert FD.dropout(x, 0) is x  # an int p, as torch allows
    xg = x.clone().requires_grad_()
    y = FD.dropout(xg, 0.0)
    assert y is xg


def test_p0_draws_nothing():
    state = torch.get_rng_state()
    g = _gen(3)
    gstate = g.get_state()
    FD.dropout(torch.ones(10), 0.0)
    FD.dropout(torch.ones(10), 0.0, generator=g)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(g.get_state(), gstate)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_p1_gives_zeros(dtype):
    x = randn((64, 3), dtype)
    x[0, 0], x[1, 1], x[2, 2] = float("nan"), float("inf"), -float("inf")
    x = x.requires_grad_()
    y = FD.dropout(x, 1.0)
    assert y.shape == x.shape and y.dtype == dtype
    assert bool((bits(y) == 0).all()), "p=1 must give +0 everywhere, even for NaN/Inf"
    g = torch.full((64, 3), float("nan"), dtype=dtype)
    (gx,) = torch.autograd.grad(y, x, g)
    assert bool((bits(gx) == 0).all())
    assert bool((bits(fused_dropout.Dropout(1.0)(x)) == 0).all())
    assert bool((bits(FD.dropout(x, 1)) == 0).all())  # an int p, as torch allows


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_training_false_returns_input_itself(dtype, inplace):
    x = randn((5, 7), dtype)
    before = bits(x).clone()
    assert FD.dropout(x, 0.5, training=False, inplace=inplace) is x
    assert FD.dropout(x, 0.5, False, inplace) is x
    m = fused_dropout.Dropout(0.5, inplace=inplace).eval()
    assert m(x) is x
    assert torch.equal(bits(x), before)


def test_training_false_draws_nothing():
    state = torch.get_rng_state()
    FD.dropout(torch.ones(10), 0.5, training=False)
    fused_dropout.Dropout(0.5).eval()(torch.ones(10))
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.cpu_paths
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_inf_in_dropped_elements_give_zero(dtype):
    seed, offset, p = 55, 0, 0.5
    n = 4096
    vals = torch.tensor([float("nan"), float("inf"), -float("inf"), -float("nan")])
    x = vals.repeat(n // 4).to(dtype).requires_grad_()
    mask = ref.keep_mask(seed, offset, p, (n,))
    assert 0 < int(mask.sum()) < n
    y = FD.dropout(x, p, seed_offset=(seed, offset))
    yb = bits(y)
    assert bool((yb[~mask] == 0).all()), "dropped NaN/Inf must give +0"
    xd = x.detach()
    assert bool((y.detach()[mask].isnan() == xd[mask].isnan()).all())
    fin = mask & xd.isinf()
    assert torch.equal(y.detach()[fin], xd[fin])  # inf * scale == inf, sign kept
    g = vals.repeat(n // 4).to(dtype)
    (gx,) = torch.autograd.grad(y, x, g)
    assert bool((bits(gx)[~mask] == 0).all()), "backward: dropped NaN/Inf grads must give +0"
    assert bool(gx[mask].isnan().eq(g[mask].isnan()).all())


def _bf16_nan_cases():
    """name -> call() -> (output, reference): every op whose bf16 result can be NaN, through
    every CPU path: whole blocks and the tail, runs sharing a flag (mask over samples), the
    channels of a channels-last tensor, the alpha map, in place, backward, the fused adds (a
    kept NaN, a NaN residual, inf - inf with the residual or the bias), p = 0's fused add, the
    fused norm's y and h (rows of 517: scalar rows; of 192: vector rows)."""
    so, p = (77, 8), 0.3
    # rows of 517: whole blocks inside a row (bias), a row's tail of 5 (per-sample runs)
    x, r, b = bf16_with_nans((40, 517), 1), bf16_with_nans((40, 517), 2), bf16_with_nans((517,), 3)
    cl = torch.channels_last
    xc, rc = (bf16_with_nans((6, 8, 5, 7), s).contiguous(memory_format=cl) for s in (4, 5))
    pair = torch.tensor([so[0], so[1]])
    xv, rv = bf16_with_nans((6, 192), 6), bf16_with_nans((6, 192), 7)

    def norm(x, r, i):  # output i (0: y, 1: h) of the fused dropout + add + LayerNorm
        w = torch.ones(x.shape[-1], dtype=x.dtype)
        out = torch.ops.fused_dropout.dropout_add_norm(
            x, r, w, None, None, p, 1e-5, False, False, False, True, False,
            ref.seed_to_int64(so[0]), so[1], None,
        )  # fmt: skip
        return out[i], ref.ref_norm(x, r, w, None, None, p, *so, 1e-5)[i]

    def dropout_(t):
        out = t.clone()
        ops.dropout_(out, p, seed_offset=so)
        return out

    return {
        "dropout": lambda: (ops.dropout(x, p, seed_offset=so)[0], ref.ref_dropout(x, p, *so)),
        "dropout_samples": lambda: (
            ops.dropout(x, p, 1, seed_offset=so)[0],
            ref.ref_dropout(x, p, *so, 1),
        ),
        "dropout_channels_last": lambda: (
            ops.dropout(xc, p, 2, seed_offset=so)[0],
            ref.ref_dropout(xc, p, *so, 2),
        ),
        "alpha_dropout": lambda: (
            ops.dropout(x, p, alpha=True, seed_offset=so)[0],
            ref.ref_dropout(x, p, *so, alpha=True),
        ),
        "dropout_": lambda: (dropout_(x), ref.ref_dropout(x, p, *so)),
        "backward": lambda: (
            ops.dropout_backward(x, pair, p),
            ref.ref_dropout_backward(x, p, *so),
        ),
        "backward_samples": lambda: (
            ops.dropout_backward(x, pair, p, 1),
            ref.ref_dropout_backward(x, p, *so, 1),
        ),
        "dropout_add": lambda: (
            ops.dropout_add(x, r, None, p, seed_offset=so)[0],
            ref.ref_dropout_add(x, r, None, p, *so),
        ),
        "dropout_add_channels_last": lambda: (
            ops.dropout_add(xc, rc, None, p, 2, seed_offset=so)[0],
            ref.ref_dropout_add(xc, rc, None, p, *so, 2),
        ),
        "bias_dropout_add": lambda: (
            ops.dropout_add(x, r, b, p, seed_offset=so)[0],
            ref.ref_dropout_add(x, r, b, p, *so),
        ),
        "bias_dropout_add_samples": lambda: (
            ops.dropout_add(x, r, b, p, 1, seed_offset=so)[0],
            ref.ref_dropout_add(x, r, b, p, *so, 1),
        ),
        "dropout_add_p0": lambda: (
            ops.dropout_add(x, r, None, 0.0, seed_offset=so)[0],
            ref.ref_dropout_add(x, r, None, 0.0, *so),
        ),
        "bias_dropout_add_p0": lambda: (
            ops.dropout_add(x, r, b, 0.0, seed_offset=so)[0],
            ref.ref_dropout_add(x, r, b, 0.0, *so),
        ),
        "dropout_add_layer_norm_y": lambda: norm(x, r, 0),
        "dropout_add_layer_norm_h": lambda: norm(x, r, 1),
        "dropout_add_layer_norm_vector_rows_y": lambda: norm(xv, rv, 0),
        "dropout_add_layer_norm_vector_rows_h": lambda: norm(xv, rv, 1),
    }


@pytest.mark.parametrize("case", list(_bf16_nan_cases()))
def test_bf16_nan_result_is_0x7fc0(case):
    """A bf16 NaN result is 0x7FC0 (README), whatever NaN, if any, it came from."""
    out, expected = _bf16_nan_cases()[case]()
    assert_bf16_nans(out, expected, case)


@pytest.mark.parametrize("shape", [(0,), (0, 3), (2, 0, 5)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty_tensors(dtype, shape):
    x = torch.empty(shape, dtype=dtype, requires_grad=True)
    y = FD.dropout(x, 0.5)
    assert y.shape == x.shape and y.dtype == dtype
    y.sum().backward()
    assert x.grad.shape == x.shape
    z = torch.empty(shape, dtype=dtype)
    assert FD.dropout(z, 0.5, inplace=True) is z
    assert fused_dropout.Dropout(0.5)(z).shape == shape
    out, so = OPS.dropout(z, 0.5, -1, True, False, 1, 0, None)
    assert out.shape == shape
    assert OPS.dropout_backward(z, so, 0.5, -1, True, False).shape == shape


# ---------------------------------------------------------------------- errors


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("p", [-0.1, 1.1, -1e-300, 2.0])
def test_bad_p_valueerror_like_torch(p, training):
    msg = torch_p_message(p)
    x = torch.ones(4)
    with pytest.raises(ValueError) as ei:
        FD.dropout(x, p, training=training)
    assert str(ei.value) == msg
    with pytest.raises(ValueError) as ei:
        fused_dropout.Dropout(p)
    assert str(ei.value) == msg


@pytest.mark.parametrize("training", [True, False])
def test_nan_p_valueerror(training):
    with pytest.raises(
        ValueError,
        match=re.escape("dropout probability has to be between 0 and 1, but got nan"),
    ):
        FD.dropout(torch.ones(4), float("nan"), training=training)


@pytest.mark.parametrize(
    "dtype",
    [
        torch.int64,
        torch.int32,
        torch.uint8,
        torch.bool,
        torch.complex64,
        torch.complex128,
    ],
    ids=str,
)
def test_non_floating_dtype_clear_error(dtype):
    x = torch.ones(8, dtype=dtype)
    with pytest.raises((TypeError, ValueError, RuntimeError)) as ei:
        FD.dropout(x, 0.5)
    assert re.search(
        r"float|dtype|Long|Int|Byte|Bool|Complex|type", str(ei.value), re.IGNORECASE
    ), str(ei.value)
    with pytest.raises((TypeError, ValueError, RuntimeError)):
        OPS.dropout(x, 0.5, -1, True, False, 1, 0, None)


def test_inplace_on_leaf_requiring_grad_errors_like_torch():
    x = torch.ones(4, requires_grad=True)
    with pytest.raises(RuntimeError) as tei:
        F.dropout(x, 0.5, inplace=True)
    with pytest.raises(RuntimeError) as ei:
        FD.dropout(x, 0.5, inplace=True)
    assert str(ei.value) == str(tei.value)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        fused_dropout.Dropout(0.5, inplace=True)(x)


@pytest.mark.parametrize("layout", ["contiguous", "strided", "transposed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inplace_modifies_input_and_returns_it(dtype, layout):
    seed, offset = PAIRS[dtype]
    x = make_input(1023, layout, dtype, seed=8)
    x0 = x.clone()
    base_before = bits(x._base).clone() if x._base is not None else None
    v0 = x._version
    y = FD.dropout(x, 0.3, inplace=True, seed_offset=(seed, offset))
    assert y is x
    assert x._version > v0
    assert_bitwise(x, ref.ref_dropout(x0, 0.3, seed, offset))
    if base_before is not None and layout == "strided":
        # elements of the base outside the view are untouched
        assert torch.equal(bits(x._base)[0::2], base_before[0::2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_inplace_on_nonleaf_backward(dtype):
    seed, offset = PAIRS[dtype]
    a = randn((257,), dtype, seed=1).requires_grad_()
    h = a * 2.0
    y = FD.dropout(h, 0.4, inplace=True, seed_offset=(seed, offset))
    assert y is h
    g = randn((257,), dtype, seed=2)
    (ga,) = torch.autograd.grad(y, a, g)
    exp = ref.ref_dropout_backward(g, 0.4, seed, offset) * 2.0
    assert_bitwise(ga, exp)


def test_module_inplace():
    x = randn((100,), torch.float32)
    torch.manual_seed(3)
    exp = FD.dropout(x.clone(), 0.5)
    torch.manual_seed(3)
    y = fused_dropout.Dropout(0.5, inplace=True)(x)
    assert y is x
    assert_bitwise(x, exp)


# ------------------------------------------------------------ autograd checks


def _seeded_dropout(mode):
    p = 0.4
    if mode == "seed_offset":
        return lambda x: FD.dropout(x, p, seed_offset=(2**63 + 11, 8))
    if mode == "generator":
        return lambda x: FD.dropout(x, p, generator=_gen(11))

    def f(x):
        torch.manual_seed(11)
        return FD.dropout(x, p)

    return f


@pytest.mark.parametrize("mode", ["seed_offset", "generator", "global"])
def test_gradcheck_gradgradcheck(mode):
    x = torch.randn(4, 7, dtype=torch.float64, generator=_gen(0), requires_grad=True)
    f = _seeded_dropout(mode)
    assert gradcheck(f, (x,))
    assert gradgradcheck(f, (x,))


def test_backward_uses_forward_mask_with_generator_seed():
    x = (torch.rand(4097, generator=_gen(1)) + 0.5).requires_grad_()
    y = FD.dropout(x, 0.5)
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert torch.equal(gx != 0, y.detach() != 0)
    # and again after the global generator moved on
    torch.rand(10)
    (gx2,) = torch.autograd.grad(FD.dropout(x, 0.5, seed_offset=(3, 4)), x, torch.ones_like(y))
    assert_bitwise(gx2, ref.ref_dropout_backward(torch.ones(4097), 0.5, 3, 4))


def _saved_bytes(fn) -> int:
    sizes = []

    def pack(t):
        sizes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    out.sum().backward()
    return sum(sizes)


@pytest.mark.parametrize("which", ["functional", "module", "inplace_nonleaf", "dropout_add"])
def test_saved_for_backward_at_most_64_bytes(which):
    n = 1 << 20
    x = torch.randn(n, requires_grad=True)
    r = torch.randn(n, requires_grad=True)
    fns = {
        "functional": lambda: FD.dropout(x, 0.5),
        "module": lambda: fused_dropout.Dropout(0.5)(x),
        "inplace_nonleaf": lambda: FD.dropout(x + 0.0, 0.5, inplace=True),
        "dropout_add": lambda: FD.dropout_add(x, r, 0.5),
    }
    assert _saved_bytes(fns[which]) <= 64


# ------------------------------------------------------------------- opcheck


def _opcheck_cases():
    def t(*shape, rg=False, dtype=torch.float32, seed=0):
        return randn(shape, dtype, seed).requires_grad_(rg)

    so = torch.tensor([7, 8], dtype=torch.int64)
    return [
        (
            "dropout",
            "basic",
            lambda: (t(3, 5, rg=True), 0.5, -1, True, False, 7, 8, None),
        ),
        ("dropout", "nograd", lambda: (t(3, 5), 0.5, -1, True, False, 7, 8, None)),
        (
            "dropout",
            "mask_ndim1_f64",
            lambda: (
                t(3, 5, 2, rg=True, dtype=torch.float64),
                0.3,
                1,
                True,
                False,
                -5,
                0,
                None,
            ),
        ),
        (
            "dropout",
            "noscale_f16",
            lambda: (t(4, 9, dtype=torch.float16), 0.3, -1, False, False, 1, 4, None),
        ),
        (
            "dropout",
            "alpha_bf16",
            lambda: (
                t(4, 9, dtype=torch.bfloat16, rg=True),
                0.3,
                -1,
                True,
                True,
                1,
                4,
                None,
            ),
        ),
        (
            "dropout",
            "noncontig",
            lambda: (t(5, 3).t().requires_grad_(), 0.5, -1, True, False, 7, 8, None),
        ),
        ("dropout_", "basic", lambda: (t(3, 5), 0.5, -1, True, False, 7, 8, None)),
        (
            "dropout_",
            "mask_ndim1",
            lambda: (t(3, 5, 4), 0.5, 1, True, False, 7, 8, None),
        ),
        (
            "dropout_backward",
            "basic",
            lambda: (t(3, 5, rg=True), so.clone(), 0.5, -1, True, False),
        ),
        (
            "dropout_backward",
            "alpha",
            lambda: (t(3, 5), so.clone(), 0.5, 2, True, True),
        ),
        (
            "dropout_add",
            "bias",
            lambda: (
                t(4, 6, rg=True),
                t(4, 6, rg=True, seed=1),
                t(6, rg=True, seed=2),
                0.5,
                -1,
                True,
                7,
                8,
                None,
            ),
        ),
        (
            "dropout_add",
            "nobias",
            lambda: (
                t(4, 6, rg=True),
                t(4, 6, seed=1),
                None,
                0.5,
                -1,
                True,
                7,
                8,
                None,
            ),
        ),
        (
            "dropout_add",
            "mask_ndim1_f16",
            lambda: (
                t(2, 3, 8, dtype=torch.float16),
                t(2, 3, 8, dtype=torch.float16),
                None,
                0.5,
                1,
                True,
                7,
                8,
                None,
            ),
        ),
    ]


_OPCHECK = _opcheck_cases()


@pytest.mark.parametrize("name, case, make", _OPCHECK, ids=[f"{a}-{b}" for a, b, _ in _OPCHECK])
def test_opcheck(name, case, make):
    torch.library.opcheck(getattr(OPS, name).default, make())


@pytest.mark.parametrize("name", ["dropout", "dropout_", "dropout_add"])
def test_opcheck_with_generator(name):
    # with a generator the op is not deterministic across calls: skip the aot comparison
    x = randn((3, 5), torch.float32)
    if name == "dropout_add":
        args = (
            x,
            randn((3, 5), torch.float32, 1),
            None,
            0.5,
            -1,
            True,
            None,
            None,
            _gen(0),
        )
    else:
        args = (x, 0.5, -1, True, False, None, None, _gen(0))
    torch.library.opcheck(
        getattr(OPS, name).default,
        args,
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


# ---------------------------------------------------------------- torch.compile


class _MLP(torch.nn.Sequential):
    def __init__(self):
        super().__init__(
            torch.nn.Linear(16, 32),
            torch.nn.ReLU(),
            fused_dropout.Dropout(0.5),
            torch.nn.Linear(32, 8),
        )


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    eager = _MLP().train()
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(8, 16, generator=_gen(1))
    gy = torch.randn(8, 8, generator=_gen(2))
    e = _run_steps(eager, x, gy, seed=123)
    c = _run_steps(compiled, x, gy, seed=123)
    for step, ((ye, gxe, gpe), (yc, gxc, gpc)) in enumerate(zip(e, c)):
        assert_bitwise(yc, ye, f"step {step} output")
        assert_bitwise(gxc, gxe, f"step {step} input grad")
        for name, b in gpe.items():
            a = gpc[name]
            if name.endswith("bias"):
                # Linear's bias gradient is a sum over the batch; inductor generates its own
                # reduction loop, whose summation order differs from aten's sum by an ulp.
                # That is not dropout's business: compare with a 1-ulp-level tolerance.
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
            else:
                assert_bitwise(a, b, f"step {step} grad of {name}")
    # the two steps used different masks (the seed is drawn at run time, not traced)
    assert not torch.equal(e[0][0], e[1][0])


# ---------------------------------------------------------------- RNG plumbing


def test_manual_seed_reproduces():
    x = torch.ones(4097)
    torch.manual_seed(5)
    a = FD.dropout(x, 0.5)
    b = fused_dropout.Dropout(0.5)(x)
    torch.manual_seed(5)
    assert_bitwise(FD.dropout(x, 0.5), a)
    assert_bitwise(fused_dropout.Dropout(0.5)(x), b)
    assert not torch.equal(a, b)
    torch.manual_seed(6)
    assert not torch.equal(FD.dropout(x, 0.5), a)


@pytest.mark.parametrize("source", ["global", "generator"])
@pytest.mark.parametrize("op", ["dropout", "dropout_", "dropout_add", "functional"])
def test_cpu_seed_is_one_random64_draw_offset_zero(op, source):
    """CPU contract: seed = one random64() draw of the generator, offset = 0."""
    x = randn((1000,), torch.float32)
    r = randn((1000,), torch.float32, seed=1)
    gen = torch.default_generator if source == "global" else _gen(99)
    state = gen.get_state()
    expected_seed = random64_draw(gen)
    after_one_draw = gen.get_state()
    gen.set_state(state)
    g = None if source == "global" else gen
    if op == "dropout":
        out, so = OPS.dropout(x, 0.5, -1, True, False, None, None, g)
    elif op == "dropout_":
        out = x.clone()
        so = OPS.dropout_(out, 0.5, -1, True, False, None, None, g)
    elif op == "dropout_add":
        out, so = OPS.dropout_add(x, r, None, 0.5, -1, True, None, None, g)
    else:
        out, so = FD.dropout(x, 0.5, generator=g), None
    if so is not None:
        assert so.tolist() == [expected_seed, 0]
    assert torch.equal(gen.get_state(), after_one_draw), "op must consume exactly one random64"
    if op == "dropout_add":
        assert_bitwise(out, ref.ref_dropout_add(x, r, None, 0.5, expected_seed, 0))
    else:
        assert_bitwise(out, ref.ref_dropout(x, 0.5, expected_seed, 0))


def test_generator_reproduces_and_leaves_global_alone():
    x = torch.ones(4097)
    state = torch.get_rng_state()
    a = FD.dropout(x, 0.5, generator=_gen(5))
    b = FD.dropout(x, 0.5, generator=_gen(5))
    assert torch.equal(torch.get_rng_state(), state), "generator= must not advance the global RNG"
    assert_bitwise(a, b)
    assert not torch.equal(a, FD.dropout(x, 0.5, generator=_gen(6)))
    g = _gen(5)
    first = FD.dropout(x, 0.5, generator=g)
    second = FD.dropout(x, 0.5, generator=g)
    assert_bitwise(first, a)
    assert not torch.equal(first, second)


def test_fork_rng():
    x = torch.ones(4097)
    with torch.random.fork_rng():
        a = FD.dropout(x, 0.5)
    b = FD.dropout(x, 0.5)
    assert_bitwise(a, b)


def test_get_set_rng_state():
    x = torch.ones(4097)
    s = torch.get_rng_state()
    a = FD.dropout(x, 0.5)
    c = FD.dropout(x, 0.5)
    torch.set_rng_state(s)
    assert_bitwise(FD.dropout(x, 0.5), a)
    assert_bitwise(FD.dropout(x, 0.5), c)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing(use_reentrant):
    torch.manual_seed(0)
    lin1, lin2 = torch.nn.Linear(16, 64), torch.nn.Linear(64, 4)
    drop = fused_dropout.Dropout(0.5)

    def block(h):
        return lin2(FD.dropout(torch.relu(lin1(h)), 0.3) + drop(h.repeat(1, 4)))

    x = torch.randn(8, 16, generator=_gen(1))

    def run(ckpt):
        for m in (lin1, lin2):
            m.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_()
        torch.manual_seed(42)
        y = checkpoint(block, xx, use_reentrant=use_reentrant) if ckpt else block(xx)
        # something random between forward and backward
        torch.rand(3)
        y.backward(torch.ones_like(y))
        return (
            y.detach(),
            xx.grad,
            [p.grad for p in (*lin1.parameters(), *lin2.parameters())],
        )

    y0, gx0, gp0 = run(False)
    y1, gx1, gp1 = run(True)
    assert_bitwise(y1, y0, "output")
    assert_bitwise(gx1, gx0, "input grad")
    for a, b in zip(gp1, gp0):
        assert_bitwise(a, b, "param grad")


# -------------------------------------------------------------------- module


@pytest.mark.parametrize("kwargs", [{}, {"p": 0.3}, {"p": 0.3, "inplace": True}, {"p": 1.0}])
def test_module_is_a_torch_dropout(kwargs):
    m = fused_dropout.Dropout(**kwargs)
    t = torch.nn.Dropout(**kwargs)
    assert isinstance(m, torch.nn.Dropout)
    assert repr(m) == repr(t)
    assert m.extra_repr() == t.extra_repr()
    assert m.p == t.p and m.inplace == t.inplace
    assert m.state_dict() == t.state_dict()
    m.load_state_dict(t.state_dict())
    t.load_state_dict(m.state_dict())
    assert m.training


def test_module_positional_args_and_eval_identity():
    m = fused_dropout.Dropout(0.2, False)
    assert m.p == 0.2 and m.inplace is False
    x = torch.ones(100)
    m.eval()
    assert m(x) is x
    m.train()
    torch.manual_seed(1)
    y = m(x)
    torch.manual_seed(1)
    assert_bitwise(y, FD.dropout(x, 0.2))
    assert bool((y == 0).any())


def test_module_in_sequential_state_dict_roundtrip():
    tm = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.1), torch.nn.Linear(4, 2))
    fm = torch.nn.Sequential(
        torch.nn.Linear(4, 4), fused_dropout.Dropout(0.1), torch.nn.Linear(4, 2)
    )
    assert tm.state_dict().keys() == fm.state_dict().keys()
    fm.load_state_dict(tm.state_dict())
    tm.eval()
    fm.eval()
    x = torch.randn(3, 4)
    assert_bitwise(fm(x), tm(x))


def test_functional_signature_like_torch():
    ours = inspect.signature(FD.dropout).parameters
    theirs = inspect.signature(F.dropout).parameters
    names = list(theirs)
    assert list(ours)[: len(names)] == names
    for n in names:
        assert ours[n].default == theirs[n].default, n
    for n in ("generator", "seed_offset"):
        assert ours[n].kind is inspect.Parameter.KEYWORD_ONLY and ours[n].default is None


# ------------------------------------------------------------ seed_offset values


@pytest.mark.parametrize(
    "so",
    [
        (0, 1),
        (0, 2),
        (0, 3),
        (0, 6),
        (0, -4),
        (-1, 0),
        (-(2**63), 0),
        (2**64, 0),
        (2**70, 4),
        (0, 2**64),
    ],
    ids=str,
)
def test_seed_offset_validation(so):
    with pytest.raises(ValueError):
        FD.dropout(torch.ones(8), 0.5, seed_offset=so)


@pytest.mark.parametrize("seed", [2**63, 2**63 + 1, 0xDEADBEEFCAFEBABE, 2**64 - 1, 2**63 - 1])
@pytest.mark.parametrize("offset", [0, 4, 2**62])
def test_large_seeds_and_offsets_match_reference(seed, offset):
    x = randn((1027,), torch.float32)
    y = FD.dropout(x, 0.5, seed_offset=(seed, offset))
    assert_bitwise(y, ref.ref_dropout(x, 0.5, seed, offset))
    out, so = OPS.dropout(x, 0.5, -1, True, False, i64(seed), offset, None)
    assert so.tolist() == [i64(seed), offset]
    assert_bitwise(out, y)


def test_seed_offset_given_means_no_draw():
    state = torch.get_rng_state()
    FD.dropout(torch.ones(10), 0.5, seed_offset=(1, 0))
    assert torch.equal(torch.get_rng_state(), state)


def test_torch_export_keeps_the_op_and_matches_eager():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), fused_dropout.Dropout(0.5)).train()
    x = torch.randn(4, 8)
    exported = torch.export.export(model, (x,))
    targets = [n.target for n in exported.graph.nodes if n.op == "call_function"]
    assert torch.ops.fused_dropout.dropout.default in targets
    torch.manual_seed(0)
    got = exported.module()(x)
    torch.manual_seed(0)
    assert_bitwise(got, model(x))


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
        ),
    ],
)
def test_ops_follow_a_megatron_style_rng_tracker_fork(device):
    """Megatron's ``CudaRNGStatesTracker.fork()`` swaps the default generator's state for a
    tracked one around a region, saves it back and restores the default (issue 17). Our ops
    draw from whatever state is current: inside the fork they continue the tracked stream,
    outside it the default one, untouched."""
    rng = torch.cuda if device == "cuda" else torch
    x = torch.randn(4099, device=device)

    @contextlib.contextmanager
    def fork(states: dict, name: str):
        default = rng.get_rng_state()
        rng.set_rng_state(states[name])
        try:
            yield
        finally:
            states[name] = rng.get_rng_state()
            rng.set_rng_state(default)

    rng.manual_seed(1234)
    states = {"model-parallel-rng": rng.get_rng_state()}
    rng.manual_seed(0)
    default = rng.get_rng_state()
    with fork(states, "model-parallel-rng"):
        a = FD.dropout(x, 0.5)
    with fork(states, "model-parallel-rng"):
        b = FD.dropout(x, 0.5)
    assert torch.equal(rng.get_rng_state(), default)  # the default stream did not move
    assert not torch.equal(a, b)  # the tracked state advanced inside the first fork
    rng.manual_seed(1234)  # the tracked stream, replayed without any fork
    assert torch.equal(FD.dropout(x, 0.5), a)
    assert torch.equal(FD.dropout(x, 0.5), b)
