"""Tests of the fused adds ``functional.dropout_add`` / ``functional.bias_dropout_add`` and their
module forms ``DropoutAdd`` / ``BiasDropoutAdd``.

``dropout_add(x, r, p) = r + dropout(x)`` and ``bias_dropout_add(x, b, r, p) = r + dropout(x + b)``
(Megatron's), element-wise mask (``mask_ndim=-1``), one rounding. Outputs and gradients are
checked bit for bit (``.view(int16/32/64)``) against the independent reference
(tests/reference.py) under the RNG contract with an explicit ``seed_offset``.
"""

from __future__ import annotations

import copy
import importlib
import os
import re
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import fused_dropout
from fused_dropout import functional as FD

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
ref = importlib.import_module("reference")  # tests/reference.py, whatever the import mode
from helpers import assert_bitwise, bits, randn  # noqa: E402
from helpers import gen as _gen  # noqa: E402
from helpers import run_steps as _run_steps  # noqa: E402

OPS = torch.ops.fused_dropout

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
HALFS = (torch.float16, torch.bfloat16)

# one (seed, offset) pair per dtype: high words of seed and offset, seeds >= 2**63
PAIRS = {
    torch.float32: (17, 0),
    torch.float64: (2**63 + 5, 8),
    torch.float16: (987654321, 4 * (2**32 + 3)),
    torch.bfloat16: (2**64 - 2, 2**36),
}


@pytest.fixture(autouse=True)
def _isolate_global_rng():
    """Every test starts from the same global RNG state and leaves it untouched."""
    with torch.random.fork_rng():
        torch.manual_seed(20240602)
        yield


# ----------------------------------------------------------------------- helpers


def make(shape, layout: str, dtype, seed=0) -> torch.Tensor:
    """A tensor of logical ``shape`` stored in ``layout``.

    contiguous; channels_last (4-D); transposed: every dim reversed in memory;
    sliced: every other element of the last dim (non-contiguous, storage offset 1);
    expanded: stride 0 along dim 0.
    """
    shape = tuple(shape)
    if layout == "contiguous":
        return randn(shape, dtype, seed)
    if layout == "channels_last":
        assert len(shape) == 4
        return randn(shape, dtype, seed).contiguous(memory_format=torch.channels_last)
    if layout == "transposed":
        rev = tuple(reversed(shape))
        t = randn(rev, dtype, seed).permute(*reversed(range(len(shape))))
        assert t.shape == shape
        return t
    if layout == "sliced":
        t = randn(shape[:-1] + (2 * shape[-1] + 1,), dtype, seed)[..., 1::2]
        assert t.shape == shape
        return t
    if layout == "expanded":  # stride 0 along dim 0: every sample aliases the first
        return randn((1,) + shape[1:], dtype, seed).expand(shape)
    raise AssertionError(layout)


def torch_p_message(p: float) -> str:
    try:
        F.dropout(torch.ones(2), p)
    except ValueError as e:
        return str(e)
    raise AssertionError("torch accepted p")


def _bias_grad_tol(dtype):
    if dtype in HALFS:
        return {"rtol": 1e-2, "atol": 2e-2}
    return {"rtol": 1e-5, "atol": 1e-5}


# (id, shape, input layout, residual layout, bias layout)
CASES = [
    ("batch1", (1, 7), "contiguous", "contiguous", "contiguous"),
    ("three_samples", (3, 5), "contiguous", "contiguous", "contiguous"),
    ("1d", (3,), "contiguous", "contiguous", "contiguous"),
    ("1d_long", (4099,), "contiguous", "contiguous", "contiguous"),
    ("5d", (2, 3, 2, 3, 4), "contiguous", "contiguous", "contiguous"),
    ("3d_vit", (2, 5, 12), "contiguous", "contiguous", "contiguous"),
    ("channels_last", (2, 3, 4, 5), "channels_last", "channels_last", "contiguous"),
    ("channels_last_x_only", (2, 3, 4, 5), "channels_last", "contiguous", "contiguous"),
    ("channels_last_r_only", (2, 3, 4, 5), "contiguous", "channels_last", "contiguous"),
    ("transposed", (6, 9), "transposed", "transposed", "contiguous"),
    ("transposed_x_only", (6, 9), "transposed", "contiguous", "contiguous"),
    ("transposed_5d", (2, 3, 2, 3, 4), "transposed", "contiguous", "contiguous"),
    ("sliced", (4, 7), "sliced", "sliced", "sliced"),
    ("expanded_residual", (4, 7), "contiguous", "expanded", "contiguous"),
    ("expanded_input", (4, 7), "expanded", "contiguous", "contiguous"),
]
CASE_IDS = [c[0] for c in CASES]


def _operands(case, dtype, requires_grad=True):
    _, shape, xl, rl, bl = case
    x = make(shape, xl, dtype, seed=1).requires_grad_(requires_grad)
    r = make(shape, rl, dtype, seed=2).requires_grad_(requires_grad)
    b = make((shape[-1],), bl, dtype, seed=3).requires_grad_(requires_grad)
    g = make(shape, xl, dtype, seed=4)
    return x, r, b, g


# ---------------------------------------------------- bitwise equality with the reference


@pytest.mark.cpu_paths
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropout_add_bitwise(dtype, case):
    seed, offset = PAIRS[dtype]
    p = 0.3
    x, r, _, g = _operands(case, dtype)
    y = FD.dropout_add(x, r, p, seed_offset=(seed, offset))
    assert y.shape == x.shape and y.dtype == dtype
    assert_bitwise(y, ref.ref_dropout_add(x, r, None, p, seed, offset), "forward")
    gx, gr = torch.autograd.grad(y, (x, r), g)
    assert_bitwise(gx, ref.ref_dropout_backward(g, p, seed, offset), "grad input")
    assert_bitwise(gr, g, "grad residual")


@pytest.mark.cpu_paths
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bias_dropout_add_bitwise(dtype, case):
    seed, offset = PAIRS[dtype]
    p = 0.3
    x, r, b, g = _operands(case, dtype)
    y = FD.bias_dropout_add(x, b, r, p, seed_offset=(seed, offset))
    assert y.shape == x.shape and y.dtype == dtype
    assert_bitwise(y, ref.ref_dropout_add(x, r, b, p, seed, offset), "forward")
    gx, gb, gr = torch.autograd.grad(y, (x, b, r), g)
    assert_bitwise(gx, ref.ref_dropout_backward(g, p, seed, offset), "grad input")
    assert_bitwise(gr, g, "grad residual")
    assert gb.shape == b.shape and gb.dtype == dtype
    # the bias gradient is the input gradient summed over the leading dims
    exp_gb = gx.double().reshape(-1, x.shape[-1]).sum(0).to(dtype)
    torch.testing.assert_close(gb, exp_gb, **_bias_grad_tol(dtype))


@pytest.mark.cpu_paths
@pytest.mark.parametrize("p", [0.0, 1.0, 1e-7, 0.5, 0.9])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bitwise_various_p(dtype, with_bias, p):
    """p = 0 is the fused add alone (one rounding); p = 1 gives the residual exactly."""
    seed, offset = PAIRS[dtype]
    x, r, b, g = _operands(("x", (5, 33), "contiguous", "contiguous", "contiguous"), dtype)
    bb = b if with_bias else None
    if with_bias:
        y = FD.bias_dropout_add(x, b, r, p, seed_offset=(seed, offset))
    else:
        y = FD.dropout_add(x, r, p, seed_offset=(seed, offset))
    assert_bitwise(y, ref.ref_dropout_add(x, r, bb, p, seed, offset), "forward")
    if p == 1.0:
        assert_bitwise(y, r.detach(), "p=1 gives the residual")
    gx, gr = torch.autograd.grad(y, (x, r), g)
    assert_bitwise(gx, ref.ref_dropout_backward(g, p, seed, offset), "grad input")
    assert_bitwise(gr, g, "grad residual")


@pytest.mark.cpu_paths
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_inf_in_dropped_input_does_not_leak(dtype, with_bias):
    seed, offset = PAIRS[dtype]
    p = 0.5
    x = randn((8, 16), dtype, seed=1)
    x[::2, ::3] = float("nan")
    x[1::2, 1::3] = float("inf")
    r = randn((8, 16), dtype, seed=2)
    b = randn((16,), dtype, seed=3) if with_bias else None
    keep = ref.keep_mask(seed, offset, p, x.shape)
    if with_bias:
        y = FD.bias_dropout_add(x, b, r, p, seed_offset=(seed, offset))
    else:
        y = FD.dropout_add(x, r, p, seed_offset=(seed, offset))
    assert_bitwise(y[~keep], r[~keep], "dropped elements give the residual exactly")
    exp = ref.ref_dropout_add(x, r, b, p, seed, offset)
    # kept NaNs stay NaN (their payload is not part of the contract); the rest is exact
    assert torch.equal(y[keep].isnan(), exp[keep].isnan())
    finite = ~exp.isnan()
    assert_bitwise(y[finite], exp[finite])


@pytest.mark.cpu_paths
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_bf16_denormals_round_as_every_value(with_bias):
    """Results in the denormal range (kept values scaled by 1 / (1 - p)) round to nearest even
    as the reference does (the avx512bf16 path's vcvtneps2bf16 flushes denormals to zero: its
    vectors that hold one take the integer form)."""
    seed, offset = PAIRS[torch.bfloat16]
    p, tiny = 0.3, 2.0**-130
    x, r = (randn((16, 517), torch.bfloat16, s) * tiny for s in (1, 2))
    b = randn((517,), torch.bfloat16, seed=3) * tiny if with_bias else None
    if with_bias:
        y = FD.bias_dropout_add(x, b, r, p, seed_offset=(seed, offset))
    else:
        y = FD.dropout_add(x, r, p, seed_offset=(seed, offset))
    expected = ref.ref_dropout_add(x, r, b, p, seed, offset)
    assert_bitwise(y, expected, "dropout_add")
    d = FD.dropout(x, p, seed_offset=(seed, offset))
    assert_bitwise(d, ref.ref_dropout(x, p, seed, offset), "dropout")
    for name, t in (("dropout_add", y), ("dropout", d)):
        denormal = (t != 0) & (t.abs() < torch.finfo(torch.float32).tiny)
        assert denormal.float().mean() > 0.4, f"{name}: too few denormals to test"


# ------------------------------------------------------------ eval, p = 0, RNG use


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_eval_is_plain_fused_add_and_draws_nothing(dtype):
    x, r, b, _ = _operands(("x", (4, 9), "contiguous", "contiguous", "contiguous"), dtype, False)
    state = torch.get_rng_state()
    y = FD.dropout_add(x, r, 0.5, training=False)
    yb = FD.bias_dropout_add(x, b, r, 0.5, training=False)
    ym = fused_dropout.DropoutAdd(0.5).eval()(x, r)
    ybm = fused_dropout.BiasDropoutAdd(0.5).eval()(x, b, r)
    assert torch.equal(torch.get_rng_state(), state), "eval must not draw from the generator"
    assert_bitwise(y, r + x, "dropout_add eval")
    assert_bitwise(ym, r + x, "DropoutAdd eval")
    # the p = 0 kernel: the fused add, rounded once (for fp16/bf16 torch's r + (x + b)
    # rounds twice, so only the reference gives its bits)
    exp = ref.ref_dropout_add(x, r, b, 0.0, 0, 0)
    assert_bitwise(yb, exp, "bias_dropout_add eval")
    assert_bitwise(ybm, exp, "BiasDropoutAdd eval")
    if dtype not in HALFS:
        assert_bitwise(yb, r + (x + b), "bias_dropout_add eval vs torch")


def test_p0_draws_nothing():
    x, r, b, _ = _operands(("x", (4, 9), "contiguous", "contiguous", "contiguous"), torch.float32)
    state = torch.get_rng_state()
    FD.dropout_add(x, r, 0.0)
    FD.bias_dropout_add(x, b, r, 0.0)
    assert torch.equal(torch.get_rng_state(), state)


def test_seed_offset_given_draws_nothing():
    x, r, b, _ = _operands(("x", (4, 9), "contiguous", "contiguous", "contiguous"), torch.float32)
    state = torch.get_rng_state()
    FD.dropout_add(x, r, 0.5, seed_offset=(1, 4))
    FD.bias_dropout_add(x, b, r, 0.5, seed_offset=(1, 4))
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("which", ["dropout_add", "bias_dropout_add"])
def test_manual_seed_and_generator_reproduce(which):
    x = randn((64, 33), torch.float32, seed=1)
    r = randn((64, 33), torch.float32, seed=2)
    b = randn((33,), torch.float32, seed=3)

    def run(**kw):
        if which == "dropout_add":
            return FD.dropout_add(x, r, 0.5, **kw)
        return FD.bias_dropout_add(x, b, r, 0.5, **kw)

    torch.manual_seed(7)
    a1, a2 = run(), run()
    torch.manual_seed(7)
    assert_bitwise(run(), a1)
    assert_bitwise(run(), a2)
    assert not torch.equal(a1, a2), "consecutive calls must use fresh masks"
    state = torch.get_rng_state()
    g1 = run(generator=_gen(3))
    assert torch.equal(torch.get_rng_state(), state), "generator= must leave the global alone"
    assert_bitwise(run(generator=_gen(3)), g1)


# --------------------------------------------------------------------- modules


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_modules_match_functional(dtype):
    x, r, b, g = _operands(("x", (6, 10), "contiguous", "contiguous", "contiguous"), dtype)
    m = fused_dropout.DropoutAdd(0.25)
    mb = fused_dropout.BiasDropoutAdd(0.25)
    assert isinstance(m, torch.nn.Module) and m.training and m.p == 0.25
    assert "0.25" in repr(m) and "0.25" in repr(mb)
    assert m.state_dict() == {} and mb.state_dict() == {}
    torch.manual_seed(11)
    y = m(x, r)
    yb = mb(x, b, r)
    torch.manual_seed(11)
    assert_bitwise(y, FD.dropout_add(x, r, 0.25))
    assert_bitwise(yb, FD.bias_dropout_add(x, b, r, 0.25))
    gx, gb, gr = torch.autograd.grad(yb, (x, b, r), g)
    assert_bitwise(gr, g)
    assert gr.data_ptr() == g.data_ptr()


@pytest.mark.parametrize("cls", ["DropoutAdd", "BiasDropoutAdd"])
@pytest.mark.parametrize("p", [-0.1, 1.5])
def test_module_rejects_bad_p(p, cls):
    with pytest.raises(ValueError, match=re.escape(torch_p_message(p))):
        getattr(fused_dropout, cls)(p)


# --------------------------------------------------------------------- backward


@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_residual_grad_is_incoming_grad_itself(with_bias):
    x, r, b, g = _operands(("x", (8, 33), "contiguous", "contiguous", "contiguous"), torch.float32)
    if with_bias:
        y = FD.bias_dropout_add(x, b, r, 0.4, seed_offset=(5, 0))
    else:
        y = FD.dropout_add(x, r, 0.4, seed_offset=(5, 0))
    (gr,) = torch.autograd.grad(y, r, g)
    assert gr.data_ptr() == g.data_ptr(), "residual grad must be the incoming grad (no copy)"


@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 5), (1, 8), (2, 1, 2, 6)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bias_grad_is_sum_of_input_grad(dtype, shape):
    seed, offset = PAIRS[dtype]
    x = randn(shape, dtype, 1).requires_grad_()
    r = randn(shape, dtype, 2).requires_grad_()
    b = randn(shape[-1:], dtype, 3).requires_grad_()
    g = randn(shape, dtype, 4)
    y = FD.bias_dropout_add(x, b, r, 0.5, seed_offset=(seed, offset))
    gx, gb = torch.autograd.grad(y, (x, b), g)
    exp = ref.ref_dropout_backward(g, 0.5, seed, offset)
    assert_bitwise(gx, exp, "grad input")
    dims = tuple(range(len(shape) - 1))
    torch.testing.assert_close(gb, exp.double().sum(dims).to(dtype), **_bias_grad_tol(dtype))


def _seeded(which):
    so = (2**63 + 9, 4)
    if which == "dropout_add":
        return lambda x, r: FD.dropout_add(x, r, 0.4, seed_offset=so)
    return lambda x, b, r: FD.bias_dropout_add(x, b, r, 0.4, seed_offset=so)


@pytest.mark.parametrize("which", ["dropout_add", "bias_dropout_add"])
def test_gradcheck_gradgradcheck(which):
    x = randn((4, 6), torch.float64, 1).requires_grad_()
    r = randn((4, 6), torch.float64, 2).requires_grad_()
    b = randn((6,), torch.float64, 3).requires_grad_()
    args = (x, r) if which == "dropout_add" else (x, b, r)
    f = _seeded(which)
    assert gradcheck(f, args)
    assert gradgradcheck(f, args)


def _saved(fn):
    saved = []

    def pack(t):
        saved.append((t.numel() * t.element_size(), t.dtype, tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    out.sum().backward()
    return saved


@pytest.mark.parametrize(
    "which", ["dropout_add", "bias_dropout_add", "DropoutAdd", "BiasDropoutAdd"]
)
def test_saved_for_backward_at_most_64_bytes(which):
    x = torch.randn(1024, 1024, requires_grad=True)  # 1M elements
    r = torch.randn(1024, 1024, requires_grad=True)
    b = torch.randn(1024, requires_grad=True)
    fns = {
        "dropout_add": lambda: FD.dropout_add(x, r, 0.5),
        "bias_dropout_add": lambda: FD.bias_dropout_add(x, b, r, 0.5),
        "DropoutAdd": lambda: fused_dropout.DropoutAdd(0.5)(x, r),
        "BiasDropoutAdd": lambda: fused_dropout.BiasDropoutAdd(0.5)(x, b, r),
    }
    saved = _saved(fns[which])
    assert sum(s for s, _, _ in saved) <= 64, saved
    # nothing but the (seed, offset) pair(s)
    assert all(dt == torch.int64 and shape == (2,) for _, dt, shape in saved), saved
    assert x.grad is not None and r.grad is not None


# ---------------------------------------------------------------------- opcheck


def _opcheck_cases():
    def t(*shape, rg=False, dtype=torch.float32, seed=0):
        return randn(shape, dtype, seed).requires_grad_(rg)

    return {
        "bias": lambda: (t(4, 6, rg=True), t(4, 6, rg=True, seed=1), t(6, rg=True, seed=2)),
        "nobias": lambda: (t(4, 6, rg=True), t(4, 6, rg=True, seed=1), None),
        "nobias_nograd": lambda: (t(3, 5), t(3, 5, seed=1), None),
        "bias_3d_f64": lambda: (
            t(2, 3, 5, rg=True, dtype=torch.float64),
            t(2, 3, 5, rg=True, dtype=torch.float64, seed=1),
            t(5, rg=True, dtype=torch.float64, seed=2),
        ),
        "bias_bf16": lambda: (
            t(4, 8, dtype=torch.bfloat16, rg=True),
            t(4, 8, dtype=torch.bfloat16, seed=1),
            t(8, dtype=torch.bfloat16, seed=2, rg=True),
        ),
        "nobias_transposed": lambda: (
            t(5, 4).t().requires_grad_(),
            t(4, 5, seed=1).requires_grad_(),
            None,
        ),
        "nobias_channels_last": lambda: (
            t(2, 3, 4, 5).contiguous(memory_format=torch.channels_last).requires_grad_(),
            t(2, 3, 4, 5, seed=1).requires_grad_(),
            None,
        ),
    }


_OPCHECK = _opcheck_cases()


@pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("case", list(_OPCHECK), ids=list(_OPCHECK))
def test_opcheck_dropout_add(case, p):
    x, r, b = _OPCHECK[case]()
    torch.library.opcheck(OPS.dropout_add.default, (x, r, b, p, -1, True, 7, 8, None))


# ---------------------------------------------------------------- torch.compile


class _TransformerLayer(torch.nn.Module):
    """A pre-norm-free transformer-style layer: Megatron's bias_dropout_add after a projection
    whose bias is held back, then an MLP with dropout_add."""

    def __init__(self, d=16, p=0.3):
        super().__init__()
        self.p = p
        self.proj = torch.nn.Linear(d, d, bias=False)
        self.proj_bias = torch.nn.Parameter(torch.randn(d) * 0.1)
        self.fc1 = torch.nn.Linear(d, 2 * d)
        self.fc2 = torch.nn.Linear(2 * d, d)

    def forward(self, x):
        h = FD.bias_dropout_add(self.proj(x), self.proj_bias, x, self.p, self.training)
        return FD.dropout_add(self.fc2(torch.relu(self.fc1(h))), h, self.p, self.training)


def test_torch_compile_fullgraph_transformer_layer_matches_eager():
    # Two seeded ops, but the second consumes the first's output, so inductor cannot reorder
    # their draws: no fallback_random needed for the eager/compiled RNG streams to agree.
    torch.manual_seed(0)
    eager = _TransformerLayer().train()
    compiled = torch.compile(copy.deepcopy(eager), fullgraph=True)
    x = torch.randn(2, 5, 16, generator=_gen(1))
    gy = torch.randn(2, 5, 16, generator=_gen(2))
    e = _run_steps(eager, x, gy, seed=123)
    c = _run_steps(compiled, x, gy, seed=123)
    for step, ((ye, gxe, gpe), (yc, gxc, gpc)) in enumerate(zip(e, c)):
        assert_bitwise(yc, ye, f"step {step} output")
        assert_bitwise(gxc, gxe, f"step {step} input grad")
        assert gpc.keys() == gpe.keys()
        for name, b in gpe.items():
            # bias gradients are reductions; inductor's summation order may differ by an ulp
            torch.testing.assert_close(gpc[name], b, rtol=1e-6, atol=1e-6, msg=name)
    # the masks are drawn at run time (not baked into the graph): the two steps differ
    assert not torch.equal(e[0][0], e[1][0])


# ----------------------------------------------------------------------- errors


def _snapshot(*ts):
    return [None if t is None else bits(t).clone() for t in ts]


def _assert_unchanged(before, *ts):
    for i, (b, t) in enumerate(zip(before, ts)):
        if t is not None:
            assert torch.equal(bits(t), b), f"operand {i} was modified by a failing call"


def _call(which, x, b, r, p=0.5, training=True):
    if which == "dropout_add":
        return FD.dropout_add(x, r, p, training)
    if which == "bias_dropout_add":
        return FD.bias_dropout_add(x, b, r, p, training)
    if which == "DropoutAdd":
        return fused_dropout.DropoutAdd(p).train(training)(x, r)
    return fused_dropout.BiasDropoutAdd(p).train(training)(x, b, r)


ALL = ["dropout_add", "bias_dropout_add", "DropoutAdd", "BiasDropoutAdd"]
BAD_OPERANDS = [
    # (id, make x, make residual, make bias, regex of the message)
    (
        "shape_transposed",
        lambda: randn((3, 4), torch.float32),
        lambda: randn((4, 3), torch.float32),
        lambda: randn((4,), torch.float32),
        r"shape",
    ),
    (
        "shape_broadcastable",
        lambda: randn((3, 4), torch.float32),
        lambda: randn((1, 4), torch.float32),
        lambda: randn((4,), torch.float32),
        r"shape",
    ),
    (
        "shape_extra_dim",
        lambda: randn((3, 4), torch.float32),
        lambda: randn((3, 4, 1), torch.float32),
        lambda: randn((4,), torch.float32),
        r"shape",
    ),
    (
        "dtype_bf16_fp32",
        lambda: randn((3, 4), torch.bfloat16),
        lambda: randn((3, 4), torch.float32),
        lambda: randn((4,), torch.bfloat16),
        r"dtype",
    ),
    (
        "dtype_fp32_bf16",
        lambda: randn((3, 4), torch.float32),
        lambda: randn((3, 4), torch.bfloat16),
        lambda: randn((4,), torch.float32),
        r"dtype",
    ),
    (
        "dtype_fp16_fp64",
        lambda: randn((3, 4), torch.float16),
        lambda: randn((3, 4), torch.float64),
        lambda: randn((4,), torch.float16),
        r"dtype",
    ),
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("bad", BAD_OPERANDS, ids=[b[0] for b in BAD_OPERANDS])
@pytest.mark.parametrize("which", ALL)
def test_mismatched_operands_rejected_inputs_unchanged(which, bad, training):
    _, mx, mr, mb, msg = bad
    x, r, b = mx(), mr(), mb()
    before = _snapshot(x, r, b)
    state = torch.get_rng_state()
    with pytest.raises((RuntimeError, TypeError, ValueError), match=msg):
        _call(which, x, b, r, training=training)
    _assert_unchanged(before, x, r, b)
    assert torch.equal(torch.get_rng_state(), state), "a failing call must not draw"


@pytest.mark.parametrize(
    "bias_shape",
    [(5,), (3,), (1, 4), (3, 4), (), (4, 1)],
    ids=["size5", "size3", "rank2_1x4", "rank2_full", "rank0", "rank2_4x1"],
)
@pytest.mark.parametrize("which", ["bias_dropout_add", "BiasDropoutAdd"])
def test_bad_bias_rejected_inputs_unchanged(which, bias_shape):
    x, r = randn((3, 4), torch.float32, 1), randn((3, 4), torch.float32, 2)
    b = randn(bias_shape, torch.float32, 3)
    before = _snapshot(x, r, b)
    with pytest.raises((RuntimeError, ValueError), match="bias"):
        _call(which, x, b, r)
    _assert_unchanged(before, x, r, b)


@pytest.mark.parametrize("which", ["bias_dropout_add", "BiasDropoutAdd"])
def test_bias_dtype_mismatch_rejected(which):
    x, r = randn((3, 4), torch.bfloat16, 1), randn((3, 4), torch.bfloat16, 2)
    b = randn((4,), torch.float32, 3)
    before = _snapshot(x, r, b)
    with pytest.raises((RuntimeError, TypeError), match="dtype"):
        _call(which, x, b, r)
    _assert_unchanged(before, x, r, b)


@pytest.mark.parametrize(
    "which, operand",
    [
        ("dropout_add", "input"),
        ("dropout_add", "residual"),
        ("bias_dropout_add", "input"),
        ("bias_dropout_add", "residual"),
        ("bias_dropout_add", "bias"),
    ],
)
def test_device_mismatch_rejected(which, operand):
    """One operand on the meta device, the others on the CPU: a clear error, as torch.add gives."""
    ops = {
        "input": randn((3, 4), torch.float32, 1),
        "residual": randn((3, 4), torch.float32, 2),
        "bias": randn((4,), torch.float32, 3),
    }
    ops[operand] = ops[operand].to("meta")
    cpu = [t for k, t in ops.items() if k != operand]
    before = _snapshot(*cpu)
    with pytest.raises((RuntimeError, ValueError), match=r"device|meta"):
        _call(which, ops["input"], ops["bias"], ops["residual"])
    _assert_unchanged(before, *cpu)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("p", [-0.1, 1.1, 2.0, -1e-300, float("nan")], ids=str)
@pytest.mark.parametrize("which", ["dropout_add", "bias_dropout_add"])
def test_bad_p_valueerror_like_torch(which, p, training):
    if p != p:  # torch itself lets NaN through F.dropout's check; ours rejects it
        msg = "dropout probability has to be between 0 and 1, but got nan"
    else:
        msg = torch_p_message(p)
    x, r, b = (randn(s, torch.float32, i) for i, s in enumerate([(3, 4), (3, 4), (4,)]))
    before = _snapshot(x, r, b)
    with pytest.raises(ValueError) as ei:
        _call(which, x, b, r, p=p, training=training)
    assert str(ei.value) == msg
    _assert_unchanged(before, x, r, b)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64], ids=str)
def test_non_floating_dtype_clear_error(dtype):
    x = torch.ones(3, 4, dtype=dtype)
    r = torch.ones(3, 4, dtype=dtype)
    with pytest.raises((TypeError, RuntimeError), match=r"float|dtype"):
        FD.dropout_add(x, r, 0.5)
