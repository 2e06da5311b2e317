"""Tests of ``functional.drop_path``, ``functional.drop_path_add``, ``functional.stochastic_depth``
and the modules ``DropPath``, ``StochasticDepth``, ``DropPathAdd``.

Masks: drop_path, drop_path_add and stochastic_depth(mode="row") decide per sample (a mask over
dim 0, ``mask_ndim=1``); stochastic_depth(mode="batch") makes one decision (``mask_ndim=0``).
Under the RNG contract (explicit ``seed_offset``) outputs and gradients are compared bit for bit
with tests/reference.py. Parity with timm and torchvision is exact where the result does not
depend on the RNG (p = 0, p = 1, eval) and statistical otherwise.
"""

from __future__ import annotations

import copy
import importlib
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from scipy import stats
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
ALPHA_SIG = 1e-4  # significance level of every statistical test

# one (seed, offset) pair per dtype: high words of seed and offset, seeds >= 2**63
PAIRS = {
    torch.float32: (3, 0),
    torch.float64: (2**63 + 1, 12),
    torch.float16: (55555, 4 * (2**32 + 5)),
    torch.bfloat16: (2**64 - 3, 2**40 + 4),
}


@pytest.fixture(autouse=True)
def _isolate_global_rng():
    """Every test starts from the same global RNG state and leaves it untouched."""
    with torch.random.fork_rng():
        torch.manual_seed(20240603)
        yield


def _timm():
    return pytest.importorskip("timm.layers")


def _tv():
    return pytest.importorskip("torchvision.ops")


# ----------------------------------------------------------------------- helpers


def positive(shape, dtype, seed=0) -> torch.Tensor:
    """Values in [0.5, 1.5): never zero, so a zero in the output means dropped."""
    return (torch.rand(shape, generator=_gen(seed), dtype=torch.float64) + 0.5).to(dtype)


def make(shape, layout: str, dtype, seed=0) -> torch.Tensor:
    """A tensor of logical ``shape`` stored in ``layout``.

    contiguous; channels_last (4-D); channels_last_3d (5-D); transposed: every dim reversed in
    memory (the sample dim is the innermost one); sliced: every other element of dim 0;
    expanded: stride 0 along dim 0.
    """
    shape = tuple(shape)
    if layout == "contiguous":
        return randn(shape, dtype, seed)
    if layout == "channels_last":
        return randn(shape, dtype, seed).contiguous(memory_format=torch.channels_last)
    if layout == "channels_last_3d":
        return randn(shape, dtype, seed).contiguous(memory_format=torch.channels_last_3d)
    if layout == "transposed":
        t = randn(tuple(reversed(shape)), dtype, seed).permute(*reversed(range(len(shape))))
        assert t.shape == shape
        return t
    if layout == "sliced":
        t = randn((2 * shape[0] + 1,) + shape[1:], dtype, seed)[1::2]
        assert t.shape == shape
        return t
    if layout == "expanded":  # stride 0 along dim 0: every sample aliases the first
        return randn((1,) + shape[1:], dtype, seed).expand(shape)
    raise AssertionError(layout)


# (id, shape, layout of the input / branch, layout of the residual)
CASES = [
    ("batch1", (1, 7), "contiguous", "contiguous"),
    ("batch1_4d", (1, 3, 4, 5), "contiguous", "contiguous"),
    ("three_samples", (3, 5), "contiguous", "contiguous"),
    ("1d", (3,), "contiguous", "contiguous"),
    ("1d_long", (1031,), "contiguous", "contiguous"),
    ("3d_vit", (6, 5, 12), "contiguous", "contiguous"),
    ("5d", (3, 2, 2, 3, 4), "contiguous", "contiguous"),
    ("channels_last", (5, 3, 4, 6), "channels_last", "channels_last"),
    ("channels_last_branch_only", (5, 3, 4, 6), "channels_last", "contiguous"),
    ("channels_last_residual_only", (5, 3, 4, 6), "contiguous", "channels_last"),
    ("channels_last_3d", (3, 2, 2, 3, 4), "channels_last_3d", "channels_last_3d"),
    ("transposed", (7, 9), "transposed", "transposed"),
    ("transposed_branch_only", (7, 9), "transposed", "contiguous"),
    ("transposed_5d", (3, 2, 2, 3, 4), "transposed", "contiguous"),
    ("sliced", (5, 4, 3), "sliced", "sliced"),
    ("expanded", (4, 3, 2), "expanded", "contiguous"),
    ("expanded_residual", (4, 3, 2), "contiguous", "expanded"),
]
CASE_IDS = [c[0] for c in CASES]


# ---------------------------------------------------- bitwise equality with the reference


@pytest.mark.cpu_paths
@pytest.mark.parametrize("scale_by_keep", [True, False], ids=["scale", "noscale"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_drop_path_bitwise(dtype, case, scale_by_keep):
    _, shape, layout, _ = case
    seed, offset = PAIRS[dtype]
    p = 0.5
    x = make(shape, layout, dtype, seed=1).requires_grad_()
    y = FD.drop_path(x, p, True, scale_by_keep, seed_offset=(seed, offset))
    kw = {"mask_ndim": 1, "scale_by_keep": scale_by_keep}
    assert_bitwise(y, ref.ref_dropout(x, p, seed, offset, **kw), "forward")
    g = make(shape, layout, dtype, seed=2)
    (gx,) = torch.autograd.grad(y, x, g)
    assert_bitwise(gx, ref.ref_dropout_backward(g, p, seed, offset, **kw), "gradient")


@pytest.mark.cpu_paths
@pytest.mark.parametrize("scale_by_keep", [True, False], ids=["scale", "noscale"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_drop_path_add_bitwise(dtype, case, scale_by_keep):
    _, shape, branch_layout, res_layout = case
    seed, offset = PAIRS[dtype]
    p = 0.5
    branch = make(shape, branch_layout, dtype, seed=1).requires_grad_()
    residual = make(shape, res_layout, dtype, seed=2).requires_grad_()
    y = FD.drop_path_add(residual, branch, p, True, scale_by_keep, seed_offset=(seed, offset))
    kw = {"mask_ndim": 1, "scale_by_keep": scale_by_keep}
    assert_bitwise(y, ref.ref_dropout_add(branch, residual, None, p, seed, offset, **kw))
    g = make(shape, branch_layout, dtype, seed=3)
    gb, gr = torch.autograd.grad(y, (branch, residual), g)
    assert_bitwise(gb, ref.ref_dropout_backward(g, p, seed, offset, **kw), "grad branch")
    assert_bitwise(gr, g, "grad residual")


@pytest.mark.cpu_paths
@pytest.mark.parametrize("mode", ["row", "batch"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_stochastic_depth_bitwise(dtype, case, mode):
    _, shape, layout, _ = case
    seed, offset = PAIRS[dtype]
    p = 0.5
    x = make(shape, layout, dtype, seed=1).requires_grad_()
    y = FD.stochastic_depth(x, p, mode, seed_offset=(seed, offset))
    kw = {"mask_ndim": 1 if mode == "row" else 0}
    assert_bitwise(y, ref.ref_dropout(x, p, seed, offset, **kw), "forward")
    g = make(shape, layout, dtype, seed=2)
    (gx,) = torch.autograd.grad(y, x, g)
    assert_bitwise(gx, ref.ref_dropout_backward(g, p, seed, offset, **kw), "gradient")


@pytest.mark.cpu_paths
@pytest.mark.parametrize("p", [0.0, 1e-7, 0.1, 0.9, 1.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bitwise_various_p(dtype, p):
    seed, offset = PAIRS[dtype]
    x = randn((257, 3), dtype, seed=1).requires_grad_()
    r = randn((257, 3), dtype, seed=2).requires_grad_()
    so = (seed, offset)
    kw = {"mask_ndim": 1}
    assert_bitwise(FD.drop_path(x, p, True, seed_offset=so), ref.ref_dropout(x, p, *so, **kw))
    assert_bitwise(
        FD.stochastic_depth(x, p, "row", seed_offset=so), ref.ref_dropout(x, p, *so, **kw)
    )
    y = FD.drop_path_add(r, x, p, seed_offset=so)
    assert_bitwise(y, ref.ref_dropout_add(x, r, None, p, *so, **kw))
    g = randn((257, 3), dtype, seed=3)
    gx, gr = torch.autograd.grad(y, (x, r), g)
    assert_bitwise(gx, ref.ref_dropout_backward(g, p, *so, **kw))
    assert_bitwise(gr, g)


@pytest.mark.parametrize("which", ["drop_path", "stochastic_depth", "drop_path_add"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty_batch(dtype, which):
    x = torch.empty((0, 4), dtype=dtype, requires_grad=True)
    r = torch.empty((0, 4), dtype=dtype, requires_grad=True)
    if which == "drop_path":
        y = FD.drop_path(x, 0.5, True)
    elif which == "stochastic_depth":
        y = FD.stochastic_depth(x, 0.5, "row")
    else:
        y = FD.drop_path_add(r, x, 0.5)
    assert y.shape == (0, 4) and y.dtype == dtype
    y.sum().backward()
    assert x.grad.shape == (0, 4)


@pytest.mark.cpu_paths
@pytest.mark.parametrize("which", ["drop_path", "stochastic_depth", "drop_path_add"])
def test_nan_inf_in_dropped_samples_do_not_leak(which):
    p = 0.5
    seed, offset = 1234, 0
    keep = ref.keep_mask(seed, offset, p, (16,))
    assert keep.any() and not keep.all()
    x = randn((16, 8), torch.float32, seed=1)
    x[:, 0] = float("nan")
    x[:, 1] = float("inf")
    r = randn((16, 8), torch.float32, seed=2)
    if which == "drop_path":
        y, rest = FD.drop_path(x, p, True, seed_offset=(seed, offset)), torch.zeros_like(x)
    elif which == "stochastic_depth":
        y, rest = FD.stochastic_depth(x, p, "row", seed_offset=(seed, offset)), torch.zeros_like(x)
    else:
        y, rest = FD.drop_path_add(r, x, p, seed_offset=(seed, offset)), r
    assert_bitwise(y[~keep], rest[~keep], "dropped samples")
    assert y[keep][:, 0].isnan().all() and y[keep][:, 1].isinf().all()


# -------------------------------------------------------------- whole samples


@pytest.mark.parametrize(
    "shape, layout",
    [((64, 3), "contiguous"), ((32, 3, 4, 5), "channels_last"), ((40, 6), "transposed")],
    ids=["2d", "channels_last", "transposed"],
)
@pytest.mark.parametrize("which", ["drop_path", "stochastic_depth", "drop_path_add"])
def test_whole_samples_all_kept_or_all_zero(which, shape, layout):
    x = positive(shape, torch.float32, seed=1)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":
        x = x.t().contiguous().t()
    torch.manual_seed(5)
    if which == "drop_path":
        y = FD.drop_path(x, 0.5, True)
    elif which == "stochastic_depth":
        y = FD.stochastic_depth(x, 0.5, "row")
    else:
        y = FD.drop_path_add(torch.zeros_like(x), x, 0.5)
    flat = y.reshape(shape[0], -1)
    dropped = (flat == 0).all(1)
    kept = (flat != 0).all(1)
    assert bool((dropped | kept).all()), "a sample is partly dropped"
    assert dropped.any() and kept.any()
    assert_bitwise(y[kept], x[kept] * 2.0, "kept samples scaled by 1/keep")


@pytest.mark.parametrize("seed, kept", [(0, False), (1, True), (2, True), (4, False)])
def test_batch_mode_drops_all_or_nothing(seed, kept):
    assert bool(ref.keep_mask(seed, 0, 0.5, ())) is kept
    x = positive((8, 3), torch.float32)
    y = FD.stochastic_depth(x, 0.5, "batch", seed_offset=(seed, 0))
    assert_bitwise(y, x * 2.0 if kept else torch.zeros_like(x))


# ---------------------------------------------------------------- eval, p=0, defaults


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_identity_cases_return_input_itself_and_draw_nothing(dtype):
    x = randn((4, 5), dtype)
    state = torch.get_rng_state()
    assert FD.drop_path(x, 0.5) is x, "drop_path's training defaults to False, as timm's"
    assert FD.drop_path(x, 0.5, training=False) is x
    assert FD.drop_path(x, 0.0, training=True) is x
    assert FD.stochastic_depth(x, 0.5, "row", training=False) is x
    assert FD.stochastic_depth(x, 0.0, "batch") is x
    assert fused_dropout.DropPath(0.5).eval()(x) is x
    assert fused_dropout.DropPath()(x) is x
    assert fused_dropout.StochasticDepth(0.5, "row").eval()(x) is x
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_drop_path_add_eval_and_p0_is_plain_add(dtype):
    x, r = randn((4, 5), dtype, 1), randn((4, 5), dtype, 2)
    state = torch.get_rng_state()
    assert_bitwise(FD.drop_path_add(r, x, 0.5, training=False), r + x)
    assert_bitwise(FD.drop_path_add(r, x, 0.0), r + x)
    assert_bitwise(fused_dropout.DropPathAdd(0.5).eval()(r, x), r + x)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("which", ["drop_path", "stochastic_depth", "drop_path_add"])
def test_manual_seed_and_generator_reproduce(which):
    x = randn((64, 5), torch.float32, 1)
    r = randn((64, 5), torch.float32, 2)

    def run(**kw):
        if which == "drop_path":
            return FD.drop_path(x, 0.5, True, **kw)
        if which == "stochastic_depth":
            return FD.stochastic_depth(x, 0.5, "row", **kw)
        return FD.drop_path_add(r, x, 0.5, **kw)

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
    assert_bitwise(run(seed_offset=(9, 4)), run(seed_offset=(9, 4)))


# ------------------------------------------------------------------ parity with timm


@pytest.mark.parametrize("scale_by_keep", [True, False], ids=["scale", "noscale"])
@pytest.mark.parametrize(
    "p, training", [(0.0, True), (0.0, False), (0.5, False), (1.0, True), (1.0, False)]
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_timm_exact_where_deterministic(dtype, p, training, scale_by_keep):
    timm_layers = _timm()
    x = randn((6, 3, 4), dtype, seed=1)
    ours = FD.drop_path(x, p, training, scale_by_keep)
    theirs = timm_layers.drop_path(x, p, training, scale_by_keep)
    # timm computes x * 0 at p = 1 (-0.0 for negative x); ours selects +0: equal as values
    assert torch.equal(ours, theirs)
    if p == 1.0 and training:
        assert not bits(ours).any(), "p = 1 gives +0 everywhere"
    else:
        assert ours is x and theirs is x
    m_ours = fused_dropout.DropPath(p, scale_by_keep).train(training)
    m_theirs = timm_layers.DropPath(p, scale_by_keep).train(training)
    assert torch.equal(m_ours(x), m_theirs(x))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_timm_scale_by_keep_false_kept_samples_exact(dtype):
    timm_layers = _timm()
    x = positive((64, 5), dtype, seed=1)
    torch.manual_seed(1)
    ours = FD.drop_path(x, 0.5, True, False)
    theirs = timm_layers.drop_path(x, 0.5, True, False)
    for y in (ours, theirs):
        kept = (y != 0).all(1)
        assert bool((kept | (y == 0).all(1)).all())
        assert_bitwise(y[kept], x[kept], "kept samples are the input unscaled")


def _per_sample_drop_rate(fn, p, seed, n=4000):
    x = positive((n, 2), torch.float32, seed=seed)
    torch.manual_seed(seed)
    y = fn(x, p)
    dropped = (y == 0).all(1)
    assert bool((dropped | (y != 0).all(1)).all()), "partly dropped sample"
    return int(dropped.sum()), n, x, y


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
@pytest.mark.parametrize(
    "impl",
    ["fused_drop_path", "fused_stochastic_depth_row", "fused_drop_path_add", "timm", "torchvision"],
)
def test_per_sample_drop_rate_binomtest(impl, p, seed):
    """The drop rate of whole samples is p (the same test passes for timm and torchvision)."""
    fns = {
        "fused_drop_path": lambda x, p: FD.drop_path(x, p, True),
        "fused_stochastic_depth_row": lambda x, p: FD.stochastic_depth(x, p, "row"),
        "fused_drop_path_add": lambda x, p: FD.drop_path_add(torch.zeros_like(x), x, p),
    }
    if impl == "timm":
        timm_layers = _timm()
        fns[impl] = lambda x, p: timm_layers.drop_path(x, p, True)
    elif impl == "torchvision":
        tv = _tv()
        fns[impl] = lambda x, p: tv.stochastic_depth(x, p, "row")
    k, n, _, _ = _per_sample_drop_rate(fns[impl], p, seed)
    pv = stats.binomtest(k, n, p).pvalue
    assert pv > ALPHA_SIG, f"{impl}: {k}/{n} samples dropped at p={p} (p-value {pv:.2e})"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_timm_kept_values_match(dtype):
    """Samples kept by both implementations hold the same values: bitwise for fp32/fp64 (timm
    scales by 1/keep rounded to the dtype, as we do); within an ulp for fp16/bf16, where timm
    rounds 1/keep to the half type first (we round it to fp32)."""
    timm_layers = _timm()
    x = randn((256, 3, 4), dtype, seed=3)
    torch.manual_seed(0)
    ours = FD.drop_path(x, 0.3, True)
    theirs = timm_layers.drop_path(x, 0.3, True)
    both = (ours.reshape(256, -1) != 0).any(1) & (theirs.reshape(256, -1) != 0).any(1)
    assert both.sum() > 64
    if dtype in HALFS:
        a, b = ours[both].float(), theirs[both].float()
        ulp = torch.finfo(dtype).eps * 2.0 ** torch.floor(torch.log2(b.abs()))
        assert bool(((a - b).abs() <= ulp).all()), (a - b).abs().div(ulp).max()
        assert not torch.equal(a, b)  # the scales differ, so some products do
    else:
        assert_bitwise(ours[both], theirs[both])


# ----------------------------------------------------------- parity with torchvision


@pytest.mark.parametrize("mode", ["row", "batch"])
@pytest.mark.parametrize("p, training", [(0.0, True), (0.5, False), (1.0, True), (1.0, False)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torchvision_exact_where_deterministic(dtype, p, training, mode):
    tv = _tv()
    x = randn((6, 3, 4), dtype, seed=1)
    ours = FD.stochastic_depth(x, p, mode, training)
    theirs = tv.stochastic_depth(x, p, mode, training)
    assert torch.equal(ours, theirs)
    if p == 1.0 and training:
        assert not bits(ours).any(), "p = 1 gives +0 everywhere"
    else:
        assert ours is x and theirs is x
    m_ours = fused_dropout.StochasticDepth(p, mode).train(training)
    m_theirs = tv.StochasticDepth(p, mode).train(training)
    assert torch.equal(m_ours(x), m_theirs(x))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("p", [0.2, 0.7])
@pytest.mark.parametrize("impl", ["fused", "torchvision"])
def test_batch_mode_drop_rate_binomtest(impl, p, seed):
    """mode="batch": every call drops the whole batch with probability p, fresh per call."""
    fn = FD.stochastic_depth if impl == "fused" else _tv().stochastic_depth
    x = positive((2, 3), torch.float32)
    torch.manual_seed(seed)
    n = 1000
    outs = [fn(x, p, "batch") for _ in range(n)]
    dropped = [bool((y == 0).all()) for y in outs]
    assert all(d or bool((y != 0).all()) for d, y in zip(dropped, outs))
    k = sum(dropped)
    pv = stats.binomtest(k, n, p).pvalue
    assert pv > ALPHA_SIG, f"{impl}: {k}/{n} batches dropped at p={p} (p-value {pv:.2e})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_torchvision_kept_values_match(dtype):
    tv = _tv()
    x = randn((256, 6), dtype, seed=4)
    torch.manual_seed(0)
    ours = FD.stochastic_depth(x, 0.3, "row")
    theirs = tv.stochastic_depth(x, 0.3, "row")
    both = (ours != 0).any(1) & (theirs != 0).any(1)
    assert both.sum() > 64
    assert_bitwise(ours[both], theirs[both])


# --------------------------------------------------------------------- modules


def test_drop_path_extra_repr_like_timm():
    m = fused_dropout.DropPath(0.1)
    assert m.extra_repr() == "drop_prob=0.100"
    assert repr(m) == "DropPath(drop_prob=0.100)"
    assert fused_dropout.DropPath().extra_repr() == "drop_prob=0.000"
    assert fused_dropout.DropPath(0.12345).extra_repr() == "drop_prob=0.123"
    assert m.drop_prob == 0.1 and m.scale_by_keep is True
    assert fused_dropout.DropPath(0.2, False).scale_by_keep is False
    assert m.state_dict() == {}


@pytest.mark.parametrize("drop_prob", [0.0, 0.1, 0.25, 1.0])
def test_drop_path_is_a_timm_drop_path(drop_prob):
    """The package never imports timm, so its DropPath only mirrors timm's; the one
    convert() swaps into a model is a subclass of timm's as well."""
    timm_layers = _timm()
    t = timm_layers.DropPath(drop_prob)
    m = fused_dropout.convert(torch.nn.Sequential(t))[0][0]
    assert isinstance(m, timm_layers.DropPath) and isinstance(m, fused_dropout.DropPath)
    assert not issubclass(fused_dropout.DropPath, timm_layers.DropPath)
    assert repr(m) == repr(t)
    assert m.extra_repr() == t.extra_repr()
    assert m.state_dict().keys() == t.state_dict().keys()


@pytest.mark.parametrize("p, mode", [(0.2, "row"), (0.5, "batch"), (0.0, "row")])
def test_stochastic_depth_is_a_torchvision_stochastic_depth(p, mode):
    """As for DropPath: the module convert() swaps in subclasses torchvision's too."""
    tv = _tv()
    t = tv.StochasticDepth(p, mode)
    m = fused_dropout.convert(torch.nn.Sequential(t))[0][0]
    assert isinstance(m, tv.StochasticDepth) and isinstance(m, fused_dropout.StochasticDepth)
    assert repr(m) == repr(t) == f"StochasticDepth(p={p}, mode={mode})"
    assert m.p == p and m.mode == mode


def test_stochastic_depth_repr_without_torchvision_check():
    m = fused_dropout.StochasticDepth(0.2, "row")
    assert repr(m) == "StochasticDepth(p=0.2, mode=row)"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_modules_match_functional(dtype):
    x = randn((16, 3, 4), dtype, 1)
    r = randn((16, 3, 4), dtype, 2)
    dp, sd = fused_dropout.DropPath(0.4), fused_dropout.StochasticDepth(0.4, "row")
    dpa = fused_dropout.DropPathAdd(0.4)
    dpa_noscale = fused_dropout.DropPathAdd(0.4, scale_by_keep=False)
    assert dpa.drop_prob == 0.4 and dpa.training
    assert dpa.extra_repr() == "drop_prob=0.400"
    torch.manual_seed(3)
    outs = [dp(x), sd(x), dpa(r, x), dpa_noscale(r, x)]
    torch.manual_seed(3)
    exps = [
        FD.drop_path(x, 0.4, True),
        FD.stochastic_depth(x, 0.4, "row"),
        FD.drop_path_add(r, x, 0.4),
        FD.drop_path_add(r, x, 0.4, scale_by_keep=False),
    ]
    for a, e in zip(outs, exps):
        assert_bitwise(a, e)


FALLBACK_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["timm"] = None          # import timm -> ImportError
    sys.modules["torchvision"] = None
    import torch
    import fused_dropout
    m = fused_dropout.DropPath(0.1)
    s = fused_dropout.StochasticDepth(0.2, "row")
    assert isinstance(m, torch.nn.Module) and isinstance(s, torch.nn.Module)
    assert m.extra_repr() == "drop_prob=0.100", m.extra_repr()
    assert repr(m) == "DropPath(drop_prob=0.100)", repr(m)
    assert repr(s) == "StochasticDepth(p=0.2, mode=row)", repr(s)
    x = torch.ones(8, 3)
    torch.manual_seed(0)
    y = m.train()(x)
    assert y.shape == x.shape and s(x).shape == x.shape
    assert m.eval()(x) is x
    print("OK")
    """
)


def test_modules_work_without_timm_and_torchvision():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(_HERE), env.get("PYTHONPATH", "")])
    res = subprocess.run(
        [sys.executable, "-c", FALLBACK_SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr


# --------------------------------------------------------------------- backward


def test_drop_path_add_residual_grad_is_incoming_grad_itself():
    branch = randn((8, 33), torch.float32, 1).requires_grad_()
    residual = randn((8, 33), torch.float32, 2).requires_grad_()
    g = randn((8, 33), torch.float32, 3)
    y = FD.drop_path_add(residual, branch, 0.5, seed_offset=(5, 0))
    gr, gb = torch.autograd.grad(y, (residual, branch), g)
    assert gr.data_ptr() == g.data_ptr(), "residual grad must be the incoming grad (no copy)"
    assert_bitwise(gb, ref.ref_dropout_backward(g, 0.5, 5, 0, mask_ndim=1))
    # through the module as well
    y = fused_dropout.DropPathAdd(0.5)(residual, branch)
    (gr,) = torch.autograd.grad(y, residual, g)
    assert gr.data_ptr() == g.data_ptr()


def _seeded(which, so):
    if which == "drop_path":
        return lambda x: FD.drop_path(x, 0.5, True, seed_offset=so)
    if which == "drop_path_noscale":
        return lambda x: FD.drop_path(x, 0.5, True, False, seed_offset=so)
    if which == "stochastic_depth_row":
        return lambda x: FD.stochastic_depth(x, 0.5, "row", seed_offset=so)
    if which == "stochastic_depth_batch":
        return lambda x: FD.stochastic_depth(x, 0.5, "batch", seed_offset=so)
    return lambda x, r: FD.drop_path_add(r, x, 0.5, seed_offset=so)


@pytest.mark.parametrize(
    "so, batch_kept", [((1, 0), True), ((0, 0), False)], ids=["batch_kept", "batch_dropped"]
)
@pytest.mark.parametrize(
    "which",
    [
        "drop_path",
        "drop_path_noscale",
        "stochastic_depth_row",
        "stochastic_depth_batch",
        "drop_path_add",
    ],
)
def test_gradcheck_gradgradcheck(which, so, batch_kept):
    """Each pair keeps some of the 6 samples and drops others; in batch mode the first keeps
    the batch and the second drops it."""
    mask = ref.keep_mask(*so, 0.5, (6,))
    assert mask.any() and not mask.all()
    assert bool(ref.keep_mask(*so, 0.5, ())) == batch_kept
    x = randn((6, 3), torch.float64, 1).requires_grad_()
    r = randn((6, 3), torch.float64, 2).requires_grad_()
    args = (x, r) if which == "drop_path_add" else (x,)
    f = _seeded(which, so)
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


SAVED_CASES = [
    "drop_path",
    "drop_path_add",
    "stochastic_depth_row",
    "stochastic_depth_batch",
    "DropPath",
    "DropPathAdd",
    "StochasticDepth",
]


@pytest.mark.parametrize("which", SAVED_CASES)
def test_saved_for_backward_at_most_64_bytes(which):
    x = torch.randn(1024, 1024, requires_grad=True)  # 1M elements
    r = torch.randn(1024, 1024, requires_grad=True)
    fns = {
        "drop_path": lambda: FD.drop_path(x, 0.5, True),
        "drop_path_add": lambda: FD.drop_path_add(r, x, 0.5),
        "stochastic_depth_row": lambda: FD.stochastic_depth(x, 0.5, "row"),
        "stochastic_depth_batch": lambda: FD.stochastic_depth(x, 0.5, "batch"),
        "DropPath": lambda: fused_dropout.DropPath(0.5)(x),
        "DropPathAdd": lambda: fused_dropout.DropPathAdd(0.5)(r, x),
        "StochasticDepth": lambda: fused_dropout.StochasticDepth(0.5, "row")(x),
    }
    saved = _saved(fns[which])
    assert sum(s for s, _, _ in saved) <= 64, saved
    assert all(dt == torch.int64 and shape == (2,) for _, dt, shape in saved), saved
    assert x.grad is not None


# ---------------------------------------------------------------------- opcheck


def _opcheck_cases():
    def t(*shape, rg=False, dtype=torch.float32, seed=0):
        return randn(shape, dtype, seed).requires_grad_(rg)

    cl = torch.channels_last
    return {
        # drop_path / stochastic_depth(row): dropout with mask_ndim=1
        "dropout-drop_path": ("dropout", lambda: (t(5, 3, 4, rg=True), 0.5, 1, True, False)),
        "dropout-drop_path_noscale_f16": (
            "dropout",
            lambda: (t(5, 7, dtype=torch.float16, rg=True), 0.5, 1, False, False),
        ),
        "dropout-drop_path_channels_last": (
            "dropout",
            lambda: (
                t(3, 2, 4, 5).contiguous(memory_format=cl).requires_grad_(),
                0.5,
                1,
                True,
                False,
            ),
        ),
        "dropout-batch_mode": ("dropout", lambda: (t(4, 6, rg=True), 0.5, 0, True, False)),
        # drop_path_add: dropout_add with mask_ndim=1, no bias
        "dropout_add-drop_path_add": (
            "dropout_add",
            lambda: (t(5, 3, 4, rg=True), t(5, 3, 4, rg=True, seed=1), None, 0.5, 1, True),
        ),
        "dropout_add-drop_path_add_noscale_bf16": (
            "dropout_add",
            lambda: (
                t(4, 6, dtype=torch.bfloat16, rg=True),
                t(4, 6, dtype=torch.bfloat16, seed=1),
                None,
                0.5,
                1,
                False,
            ),
        ),
    }


_OPCHECK = _opcheck_cases()


@pytest.mark.parametrize("case", list(_OPCHECK), ids=list(_OPCHECK))
def test_opcheck(case):
    name, make_args = _OPCHECK[case]
    torch.library.opcheck(getattr(OPS, name).default, make_args() + (7, 8, None))


# ---------------------------------------------------------------- torch.compile


class _ResidualBlock(torch.nn.Module):
    """``x + drop_path(mlp(x))`` as timm writes it, computed by drop_path_add. ReLU, not GELU:
    inductor's GELU differs from aten's by an ulp, which is not what this test is about."""

    def __init__(self, d=16, p=0.5):
        super().__init__()
        self.p = p
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(d, 2 * d), torch.nn.ReLU(), torch.nn.Linear(2 * d, d)
        )

    def forward(self, x):
        return FD.drop_path_add(x, self.mlp(x), self.p, self.training)


def test_torch_compile_fullgraph_residual_block_matches_eager():
    torch.manual_seed(0)
    eager = _ResidualBlock().train()
    compiled = torch.compile(copy.deepcopy(eager), fullgraph=True)
    x = torch.randn(8, 4, 16, generator=_gen(1))
    gy = torch.randn(8, 4, 16, generator=_gen(2))
    e = _run_steps(eager, x, gy, seed=321)
    c = _run_steps(compiled, x, gy, seed=321)
    for step, ((ye, gxe, gpe), (yc, gxc, gpc)) in enumerate(zip(e, c)):
        assert_bitwise(yc, ye, f"step {step} output")
        assert_bitwise(gxc, gxe, f"step {step} input grad")
        assert gpc.keys() == gpe.keys()
        for name, b in gpe.items():
            # weight/bias gradients are reductions; inductor's order may differ by an ulp
            torch.testing.assert_close(gpc[name], b, rtol=1e-6, atol=1e-6, msg=name)
    # the masks are drawn at run time (not baked into the graph): the two steps differ
    assert not torch.equal(e[0][0], e[1][0])


# ----------------------------------------------------------------------- errors


def _snapshot(*ts):
    return [bits(t).clone() for t in ts]


def _assert_unchanged(before, *ts):
    for i, (b, t) in enumerate(zip(before, ts)):
        assert torch.equal(bits(t), b), f"operand {i} was modified by a failing call"


BAD_PAIRS = [
    # (id, residual, branch, regex of the message)
    ("shape", lambda: randn((3, 4), torch.float32), lambda: randn((4, 3), torch.float32), "shape"),
    (
        "shape_broadcastable",
        lambda: randn((3, 4), torch.float32),
        lambda: randn((3, 1), torch.float32),
        "shape",
    ),
    (
        "shape_per_sample_residual",
        lambda: randn((3, 1), torch.float32),
        lambda: randn((3, 4), torch.float32),
        "shape",
    ),
    (
        "dtype_bf16_branch_fp32_residual",
        lambda: randn((3, 4), torch.float32),
        lambda: randn((3, 4), torch.bfloat16),
        "dtype",
    ),
    (
        "dtype_fp32_branch_bf16_residual",
        lambda: randn((3, 4), torch.bfloat16),
        lambda: randn((3, 4), torch.float32),
        "dtype",
    ),
    (
        "dtype_fp16_fp64",
        lambda: randn((3, 4), torch.float64),
        lambda: randn((3, 4), torch.float16),
        "dtype",
    ),
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("bad", BAD_PAIRS, ids=[b[0] for b in BAD_PAIRS])
@pytest.mark.parametrize("which", ["drop_path_add", "DropPathAdd"])
def test_drop_path_add_mismatched_operands_rejected(which, bad, training):
    _, mr, mb, msg = bad
    r, b = mr(), mb()
    before = _snapshot(r, b)
    state = torch.get_rng_state()
    with pytest.raises((RuntimeError, TypeError, ValueError), match=msg):
        if which == "drop_path_add":
            FD.drop_path_add(r, b, 0.5, training)
        else:
            fused_dropout.DropPathAdd(0.5).train(training)(r, b)
    _assert_unchanged(before, r, b)
    assert torch.equal(torch.get_rng_state(), state), "a failing call must not draw"


@pytest.mark.parametrize("on_meta", ["residual", "branch"])
def test_drop_path_add_device_mismatch_rejected(on_meta):
    r, b = randn((3, 4), torch.float32, 1), randn((3, 4), torch.float32, 2)
    before = _snapshot(r if on_meta == "branch" else b)
    if on_meta == "residual":
        r = r.to("meta")
    else:
        b = b.to("meta")
    with pytest.raises((RuntimeError, ValueError), match=r"device|meta"):
        FD.drop_path_add(r, b, 0.5)
    _assert_unchanged(before, b if on_meta == "residual" else r)


@pytest.mark.parametrize("p", [-0.1, 1.1, float("nan")], ids=str)
@pytest.mark.parametrize("which", ["drop_path", "drop_path_add", "DropPath", "DropPathAdd"])
def test_drop_path_bad_p_valueerror(which, p):
    x, r = randn((3, 4), torch.float32, 1), randn((3, 4), torch.float32, 2)
    before = _snapshot(x, r)
    with pytest.raises(ValueError, match=r"between 0 and 1, but got " + re.escape(str(p))):
        if which == "drop_path":
            FD.drop_path(x, p, True)
        elif which == "drop_path_add":
            FD.drop_path_add(r, x, p)
        elif which == "DropPath":
            fused_dropout.DropPath(p)(x)
        else:
            fused_dropout.DropPathAdd(p)(r, x)
    _assert_unchanged(before, x, r)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("p", [-0.1, 1.1, 2.0], ids=str)
@pytest.mark.parametrize("which", ["functional", "module"])
def test_stochastic_depth_bad_p_message_like_torchvision(which, p, training):
    x = randn((3, 4), torch.float32)
    before = _snapshot(x)
    msg = f"drop probability has to be between 0 and 1, but got {p}"
    with pytest.raises(ValueError) as ei:
        if which == "functional":
            FD.stochastic_depth(x, p, "row", training)
        else:
            fused_dropout.StochasticDepth(p, "row").train(training)(x)
    assert str(ei.value) == msg
    _assert_unchanged(before, x)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("mode", ["rows", "Batch", "", "element"])
@pytest.mark.parametrize("which", ["functional", "module"])
def test_stochastic_depth_bad_mode_message_like_torchvision(which, mode, training):
    x = randn((3, 4), torch.float32)
    before = _snapshot(x)
    msg = f"mode has to be either 'batch' or 'row', but got {mode}"
    with pytest.raises(ValueError) as ei:
        if which == "functional":
            FD.stochastic_depth(x, 0.5, mode, training)
        else:
            fused_dropout.StochasticDepth(0.5, mode).train(training)(x)
    assert str(ei.value) == msg
    _assert_unchanged(before, x)


@pytest.mark.parametrize(
    "p, mode", [(-0.1, "row"), (1.5, "batch"), (0.5, "rows"), (0.5, "")], ids=str
)
def test_stochastic_depth_errors_identical_to_torchvision(p, mode):
    tv = _tv()
    x = randn((3, 4), torch.float32)
    with pytest.raises(ValueError) as theirs:
        tv.stochastic_depth(x, p, mode)
    with pytest.raises(ValueError) as ours:
        FD.stochastic_depth(x, p, mode)
    assert str(ours.value) == str(theirs.value)
