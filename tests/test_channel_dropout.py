"""Channel-wise and alpha dropouts: dropout1d/2d/3d, alpha_dropout, feature_alpha_dropout.

Checked against the independent reference (tests/reference.py, ``ref_dropout`` with
``mask_ndim`` and ``alpha``) bit for bit, and against torch's own functions for ranks,
no-batch-dim handling, warnings and errors. Mask layout (API.md): batched input (N, C, ...)
uses ``mask_ndim=2`` (mask element ``n*C + c``), unbatched (C, ...) ``mask_ndim=1``; torch's
quirks are kept (dropout2d reads 3-D input as (N, C, L); feature_alpha_dropout always masks
dims 0 and 1).
"""

from __future__ import annotations

import importlib
import math
import os
import re
import sys
import warnings

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
from helpers import TORCH_2_6, assert_bitwise, randn, random64_draw  # noqa: E402
from helpers import gen as _gen  # noqa: E402

OPS = torch.ops.fused_dropout

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
ALPHA_SIG = 1e-4  # significance level of the statistical tests
FUNCS = ["dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout"]
MODULES = {
    "dropout1d": "Dropout1d",
    "dropout2d": "Dropout2d",
    "dropout3d": "Dropout3d",
    "alpha_dropout": "AlphaDropout",
    "feature_alpha_dropout": "FeatureAlphaDropout",
}
ALPHA = {"alpha_dropout", "feature_alpha_dropout"}

# one (seed, offset) pair per dtype, covering high words and seeds >= 2**63
PAIRS = {
    torch.float32: (0, 0),
    torch.float64: (2**63 + 7, 4),
    torch.float16: (123456789, 4 * (2**32 + 1)),
    torch.bfloat16: (2**64 - 1, 2**40),
}

# (function, shape, mask_ndim of the reference, batched)
CASES = [
    ("dropout1d", (4, 6, 9), 2, True),
    ("dropout1d", (6, 9), 1, False),
    ("dropout2d", (3, 5, 4, 6), 2, True),
    ("dropout2d", (3, 5, 7), 2, True),  # torch's quirk: 3-D is read as (N, C, L), with a warning
    ("dropout3d", (2, 4, 3, 4, 5), 2, True),
    ("dropout3d", (4, 3, 4, 5), 1, False),
    ("alpha_dropout", (5, 7, 3), -1, True),
    ("alpha_dropout", (37,), -1, True),
    ("feature_alpha_dropout", (3, 5, 4, 6), 2, True),
    ("feature_alpha_dropout", (5, 4, 6), 2, True),  # torch: always dims 0 and 1
]
CASE_IDS = [f"{f}-{'x'.join(map(str, s))}" for f, s, _, _ in CASES]


@pytest.fixture(autouse=True)
def _isolate_global_rng():
    """Every test starts from the same global RNG state and leaves it untouched."""
    with torch.random.fork_rng():
        torch.manual_seed(20240602)
        yield


# ----------------------------------------------------------------------- helpers


def channel_dim(fn: str, ndim: int, batched: bool) -> int:
    """The dim whose index is the mask's last coordinate (the channel dim)."""
    if fn == "alpha_dropout":
        return ndim - 1
    return 1 if batched else 0


def make(shape, dtype, layout: str, cdim: int, seed: int = 0) -> torch.Tensor:
    """``contiguous``, or ``channels_last``: the channel dim innermost in memory (torch's
    channels_last / channels_last_3d for 4-D / 5-D batched input)."""
    if layout == "contiguous" or len(shape) < 2:
        return randn(shape, dtype, seed)
    order = [d for d in range(len(shape)) if d != cdim] + [cdim]  # memory order, outer first
    x = randn(tuple(shape[d] for d in order), dtype, seed)
    inverse = [order.index(d) for d in range(len(shape))]
    x = x.permute(*inverse)
    if len(shape) == 4 and cdim == 1:
        assert x.is_contiguous(memory_format=torch.channels_last)
    if len(shape) == 5 and cdim == 1:
        assert x.is_contiguous(memory_format=torch.channels_last_3d)
    return x


def call(fn: str, x, p, **kw):
    """The fused function with torch's 3-D dropout2d warning silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="dropout2d: Received a 3D input")
        return getattr(FD, fn)(x, p, training=True, **kw)


def dropped_value(fn: str, p: float) -> float:
    """What a dropped fp32 element holds: 0, or alpha dropout's ``A*a*(p-1)``."""
    if fn not in ALPHA:
        return 0.0
    a = 1.0 / math.sqrt((ref.ALPHA * ref.ALPHA * p + 1.0) * (1.0 - p))
    return float(torch.tensor(ref.ALPHA * a * (p - 1.0), dtype=torch.float64).float())


# ---------------------------------------------------- bitwise equality with the reference


@pytest.mark.cpu_paths
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("fn, shape, mask_ndim, batched", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bitwise_forward_backward(dtype, fn, shape, mask_ndim, batched, layout):
    seed, offset = PAIRS[dtype]
    p, alpha = 0.3, fn in ALPHA
    x = make(shape, dtype, layout, channel_dim(fn, len(shape), batched), seed=len(shape))
    xg = x.detach().requires_grad_()
    y = call(fn, xg, p, seed_offset=(seed, offset))
    assert_bitwise(y, ref.ref_dropout(x, p, seed, offset, mask_ndim, alpha=alpha), "forward")
    g = randn(shape, dtype, seed=99)
    (gx,) = torch.autograd.grad(y, xg, g)
    exp = ref.ref_dropout_backward(g, p, seed, offset, mask_ndim, alpha=alpha)
    assert_bitwise(gx, exp, "gradient")


@pytest.mark.cpu_paths
@pytest.mark.parametrize("fn, shape, mask_ndim, batched", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bitwise_inplace(dtype, fn, shape, mask_ndim, batched):
    seed, offset = PAIRS[dtype]
    x = make(shape, dtype, "channels_last", channel_dim(fn, len(shape), batched), seed=3)
    exp = ref.ref_dropout(x, 0.6, seed, offset, mask_ndim, alpha=fn in ALPHA)
    strides = x.stride()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="dropout2d: Received a 3D input")
        y = getattr(FD, fn)(x, 0.6, True, True, seed_offset=(seed, offset))
    assert y is x and x.shape == shape and x.stride() == strides
    assert_bitwise(x, exp)


@pytest.mark.parametrize("fn, shape, mask_ndim, batched", CASES, ids=CASE_IDS)
def test_bitwise_with_generator_and_global_rng(fn, shape, mask_ndim, batched):
    """Without seed_offset the CPU seed is one random64() draw of the generator, offset 0."""
    x = randn(shape, torch.float32, seed=4)
    alpha = fn in ALPHA
    seed = random64_draw(_gen(11))
    y = call(fn, x, 0.5, generator=_gen(11))
    assert_bitwise(y, ref.ref_dropout(x, 0.5, seed, 0, mask_ndim, alpha=alpha), "generator")
    torch.manual_seed(12)
    seed = random64_draw(None)
    torch.manual_seed(12)
    y = call(fn, x, 0.5)
    assert_bitwise(y, ref.ref_dropout(x, 0.5, seed, 0, mask_ndim, alpha=alpha), "global RNG")


@pytest.mark.cpu_paths
@pytest.mark.parametrize("p", [1e-7, 0.1, 0.5, 0.9, 1 - 1e-7])
@pytest.mark.parametrize("fn", ["dropout2d", "feature_alpha_dropout"])
def test_bitwise_various_p(fn, p):
    x = randn((16, 64, 3, 3), torch.float32, seed=5)
    y = call(fn, x, p, seed_offset=(31337, 8))
    assert_bitwise(y, ref.ref_dropout(x, p, 31337, 8, 2, alpha=fn in ALPHA))


# ------------------------------------------------------------------- mask structure


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize(
    "fn, shape, batched",
    [
        ("dropout1d", (8, 16, 5), True),
        ("dropout1d", (16, 5), False),
        ("dropout2d", (8, 16, 3, 4), True),
        ("dropout2d", (8, 16, 7), True),
        ("dropout3d", (4, 16, 2, 3, 4), True),
        ("dropout3d", (16, 2, 3, 4), False),
        ("feature_alpha_dropout", (8, 16, 3, 4), True),
        ("feature_alpha_dropout", (16, 3, 4), True),
    ],
)
def test_whole_channels_are_dropped(fn, shape, batched, layout):
    cdim = channel_dim(fn, len(shape), batched)
    x = make(shape, torch.float32, layout, cdim, seed=6).abs() + 1  # never a dropped value
    p = 0.5
    y = call(fn, x, p)
    dropped = y == dropped_value(fn, p)
    lead = 2 if batched else 1
    per_channel = dropped.reshape(*shape[:lead], -1)
    assert (per_channel.all(-1) | ~per_channel.any(-1)).all(), "a channel was partly dropped"
    channels = per_channel.all(-1)
    assert channels.any() and not channels.all()
    # the kept ones are x * scale (or x * a + b), whole
    kept = ~dropped
    if fn not in ALPHA:
        assert torch.equal(y[kept], x[kept] * 2.0)


@pytest.mark.parametrize(
    "fn, batched_shape",
    [("dropout1d", (3, 8, 5)), ("dropout3d", (3, 8, 2, 3, 4))],
)
@pytest.mark.parametrize("via", ["functional", "module", "generator", "seed_offset"])
def test_batched_and_unbatched_agree(fn, batched_shape, via):
    """Mask element n*C + c: an unbatched (C, ...) input gets the mask of sample 0."""
    x = randn(batched_shape, torch.float32, seed=7)
    x0 = x[0].clone()

    def run(t):
        if via == "functional":
            return getattr(FD, fn)(t, 0.5)
        if via == "module":
            return getattr(fused_dropout, MODULES[fn])(0.5)(t)
        if via == "generator":
            return getattr(FD, fn)(t, 0.5, generator=_gen(3))
        return getattr(FD, fn)(t, 0.5, seed_offset=(2**63 + 1, 12))

    torch.manual_seed(8)
    yb = run(x)
    torch.manual_seed(8)
    yu = run(x0)
    assert yu.shape == x0.shape
    assert_bitwise(yu, yb[0])
    assert (yb[0] == 0).any() or (yb[1:] == 0).any()  # some channel was dropped somewhere


@pytest.mark.parametrize("fn", ["dropout1d", "dropout3d"])
def test_unbatched_inplace_restores_shape(fn):
    shape = (6, 9) if fn == "dropout1d" else (6, 2, 3, 4)
    x = randn(shape, torch.float32, seed=9)
    exp = ref.ref_dropout(x, 0.5, 5, 0, 1)
    y = getattr(FD, fn)(x, 0.5, True, True, seed_offset=(5, 0))
    assert y is x and x.shape == shape
    assert_bitwise(x, exp)


@pytest.mark.parametrize("fn, shape, mask_ndim, batched", CASES, ids=CASE_IDS)
def test_inplace_on_view_of_nonleaf_backward(fn, shape, mask_ndim, batched):
    """As torchvision's classifiers do (flatten, then an inplace dropout), with autograd."""
    leaf = randn((2, *shape), torch.float32, seed=15).requires_grad_()
    x = (leaf * 1)[1]  # a view of a non-leaf
    so = (4242, 4)
    y = call(fn, x, 0.5, inplace=True, seed_offset=so)
    assert y is x
    exp = ref.ref_dropout(leaf[1].detach(), 0.5, *so, mask_ndim, alpha=fn in ALPHA)
    assert_bitwise(y, exp)
    g = randn(shape, torch.float32, seed=16)
    y.backward(g)
    assert_bitwise(
        leaf.grad[1], ref.ref_dropout_backward(g, 0.5, *so, mask_ndim, alpha=fn in ALPHA)
    )
    assert not leaf.grad[0].any()


# ----------------------------------------------------- ranks, warnings, errors like torch


def _outcome(f, x, **kw):
    """What calling ``f`` did: ("raise", type, message) or ("ok", warnings, output, is-input)."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        try:
            y = f(x, **kw)
        except Exception as e:  # compared with torch's own exception
            return ("raise", type(e), str(e), [str(w.message) for w in rec])
    return ("ok", [(str(w.message), w.category, w.filename) for w in rec], y, y is x)


def _compare_with_torch(fn, shape, p, training, inplace):
    """Same exception (type and message), same warnings (message, category, and the caller as
    the warning's location), same shapes, and where the result is deterministic the same
    values and the same identity (input returned or not)."""
    xt, xf = torch.ones(shape), torch.ones(shape)
    kw = {"p": p, "training": training, "inplace": inplace}
    t = _outcome(getattr(F, fn), xt, **kw)
    f = _outcome(getattr(FD, fn), xf, **kw)
    what = f"{fn}(shape {shape}, p={p}, training={training}, inplace={inplace})"
    assert t[0] == f[0], f"{what}: torch {t[:3]}, fused {f[:3]}"
    if t[0] == "raise":
        assert (f[1], f[2]) == (t[1], t[2]), what
        assert f[3] == t[3], f"{what}: warnings before the error"
        return
    assert [w[:2] for w in f[1]] == [w[:2] for w in t[1]], what
    for w in f[1]:
        assert w[2] == __file__, f"{what}: warning attributed to {w[2]}"
    yt, yf = t[2], f[2]
    assert yf.shape == yt.shape, what
    assert f[3] == t[3], f"{what}: returns its input: torch {t[3]}, fused {f[3]}"
    if inplace:
        assert xf.shape == xt.shape, f"{what}: input shape changed"
    if p != 0.5 or not training:
        assert torch.equal(yf, yt), what


@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("rank", range(7))
@pytest.mark.parametrize("fn", FUNCS)
def test_ranks_warnings_errors_like_torch(fn, rank, p, training, inplace):
    """Every rank 0..6 (torch's errors for some ranks come only when the op would draw)."""
    _compare_with_torch(fn, (2, 3, 2, 1, 2, 1)[:rank], p, training, inplace)


@pytest.mark.parametrize("rank", range(1, 7))
@pytest.mark.parametrize("fn", FUNCS)
def test_empty_inputs_like_torch(fn, rank):
    for p in (0.0, 0.5, 1.0):
        _compare_with_torch(fn, (0, 3, 2, 1, 2, 1)[:rank], p, True, False)


@pytest.mark.parametrize("p", [-0.1, 1.5, -1e-30, 1 + 1e-12])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("fn", FUNCS)
def test_bad_p_valueerror_like_torch(fn, p, training):
    x = torch.ones(2, 3, 4, 5)
    with pytest.raises(ValueError) as expected:
        getattr(F, fn)(x, p, training)
    with pytest.raises(ValueError) as got:
        getattr(FD, fn)(x, p, training)
    assert str(got.value) == str(expected.value)
    with pytest.raises(ValueError) as expected:
        getattr(torch.nn, MODULES[fn])(p)
    with pytest.raises(ValueError) as got:
        getattr(fused_dropout, MODULES[fn])(p)
    assert str(got.value) == str(expected.value)


def test_dropout2d_on_3d_warns_like_torch():
    x = torch.ones(2, 3, 4)
    with pytest.warns(UserWarning, match="dropout2d: Received a 3D input") as expected:
        F.dropout2d(x)
    with pytest.warns(UserWarning, match="dropout2d: Received a 3D input") as got:
        FD.dropout2d(x)
    assert [str(w.message) for w in got] == [str(w.message) for w in expected]
    assert all(w.filename == __file__ for w in got)


def test_dropout1d_on_4d_raises_like_torch():
    x = torch.ones(2, 3, 4, 5)
    with pytest.raises(RuntimeError) as expected:
        F.dropout1d(x)
    with pytest.raises(RuntimeError) as got:
        FD.dropout1d(x)
    assert str(got.value) == str(expected.value)
    with pytest.raises(RuntimeError) as got:
        fused_dropout.Dropout1d()(x)
    assert str(got.value) == str(expected.value)


@pytest.mark.parametrize("fn", FUNCS)
def test_modules_are_torch_subclasses_and_match_repr(fn):
    name = MODULES[fn]
    ours, theirs = getattr(fused_dropout, name)(0.25, True), getattr(torch.nn, name)(0.25, True)
    assert isinstance(ours, type(theirs))
    assert repr(ours) == repr(theirs)
    assert ours.state_dict() == theirs.state_dict() == {}
    x = torch.randn(4, 3, 5, 2)  # 4-D: dropout1d raises, dropout3d reads it as unbatched
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for train in (False, True):
            ours.train(train), theirs.train(train)
            try:
                expected = theirs(x.clone()).shape
            except RuntimeError as e:
                with pytest.raises(RuntimeError, match=re.escape(str(e))):
                    ours(x.clone())
                continue
            assert ours(x.clone()).shape == expected
        ours.eval(), theirs.eval()
        if fn != "dropout1d":
            assert (ours(x) is x) == (theirs(x) is x)


@pytest.mark.parametrize("fn", FUNCS)
def test_default_training_flag_like_torch(fn):
    """alpha_dropout and feature_alpha_dropout default to training=False, as in torch."""
    x = torch.ones(4, 3, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = getattr(F, fn)(x)
        f = getattr(FD, fn)(x)
    assert torch.equal(t, x) == torch.equal(f, x)


# -------------------------------------------------------------------- statistics


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize(
    "fn, shape",
    [
        ("dropout1d", (100, 200, 3)),
        ("dropout2d", (200, 100, 2, 2)),
        ("dropout3d", (100, 200, 1, 2, 1)),
        ("alpha_dropout", (20000,)),
        ("feature_alpha_dropout", (200, 100, 2)),
    ],
)
def test_drop_rate(fn, shape, p):
    from scipy import stats

    x = torch.ones(shape)
    y = call(fn, x, p)
    dropped = y == dropped_value(fn, p)
    mask_shape = shape if fn == "alpha_dropout" else shape[:2]
    d = dropped.reshape(*mask_shape, -1)[..., 0]
    n, k = d.numel(), int(d.sum())
    assert stats.binomtest(k, n, p).pvalue > ALPHA_SIG, (k, n, p)


@pytest.mark.parametrize(
    "name, make",
    [
        ("AlphaDropout", lambda: torch.randn(5000)),
        ("FeatureAlphaDropout", lambda: torch.randn(1000, 3, 2, 4, 4)),
        ("FeatureAlphaDropout", lambda: torch.randn(50, 20, 16, 16)),  # no batch dim
    ],
)
def test_alpha_preserves_mean_and_std(name, make):
    """torch's test_nn._test_alpha_dropout, with its tolerances (0.1 on mean and std)."""
    for seed in range(3):
        torch.manual_seed(seed)
        input = make()
        mean, std = input.mean(), input.std()
        for p in [0.2, 0.5, 0.8]:
            module = getattr(fused_dropout, name)(p)
            input_var = input.detach().clone().requires_grad_()
            output = module(input_var)
            assert abs(output.data.mean() - mean) < 0.1, (seed, p)
            assert abs(output.data.std() - std) < 0.1, (seed, p)
            output.backward(input)


@pytest.mark.parametrize("fn", ["alpha_dropout", "feature_alpha_dropout"])
def test_alpha_p1_gives_zeros_like_torch(fn):
    x = torch.randn(4, 3, 5)
    assert torch.equal(getattr(FD, fn)(x, 1.0, True), getattr(F, fn)(x, 1.0, True))
    assert torch.equal(getattr(FD, fn)(x, 1.0, True), torch.zeros_like(x))


# ------------------------------------------------------------ autograd, opcheck, compile


@pytest.mark.parametrize("fn, shape, mask_ndim, batched", CASES, ids=CASE_IDS)
def test_gradcheck_gradgradcheck(fn, shape, mask_ndim, batched):
    x = randn(shape, torch.float64, seed=10).requires_grad_()

    def f(t):
        return call(fn, t, 0.4, seed_offset=(77, 4))

    assert gradcheck(f, (x,))
    assert gradgradcheck(f, (x,))


def _opcheck_cases():
    def t(*shape, rg=False, dtype=torch.float32, cl=False):
        x = randn(shape, dtype, seed=12)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        return x.requires_grad_(rg)

    so = torch.tensor([7, 8], dtype=torch.int64)
    return {
        "dropout-md2-alpha": lambda: (t(3, 5, 4, rg=True), 0.5, 2, True, True, 7, 8, None),
        "dropout-md2": lambda: (t(3, 5, 2, 2, rg=True, cl=True), 0.3, 2, True, False, -3, 0, None),
        "dropout-md1-f64": lambda: (
            t(5, 4, 3, rg=True, dtype=torch.float64),
            0.3,
            1,
            True,
            False,
            1,
            4,
            None,
        ),
        "dropout-md2-alpha-bf16": lambda: (
            t(4, 6, 3, dtype=torch.bfloat16, rg=True),
            0.2,
            2,
            True,
            True,
            9,
            16,
            None,
        ),
        "dropout_-md2-alpha": lambda: (t(3, 5, 4), 0.5, 2, True, True, 7, 8, None),
        "dropout_-md1": lambda: (t(5, 4, 3), 0.5, 1, True, False, 7, 8, None),
        "dropout_backward-md2-alpha": lambda: (t(3, 5, 4, rg=True), so.clone(), 0.5, 2, True, True),
    }


_OPCHECK = _opcheck_cases()


@pytest.mark.parametrize("case", list(_OPCHECK))
def test_opcheck(case):
    name = case.split("-")[0]
    torch.library.opcheck(getattr(OPS, name).default, _OPCHECK[case]())


def test_opcheck_with_generator():
    x = randn((3, 5, 4), torch.float32)
    torch.library.opcheck(
        OPS.dropout.default,
        (x, 0.5, 2, True, True, None, None, _gen(0)),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


class _Net(torch.nn.Module):
    """Conv -> Dropout2d -> FeatureAlphaDropout -> Dropout1d (unbatched) -> AlphaDropout."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.d2 = fused_dropout.Dropout2d(0.3)
        self.fa = fused_dropout.FeatureAlphaDropout(0.2)
        self.d1 = fused_dropout.Dropout1d(0.4)
        self.d3 = fused_dropout.Dropout3d(0.25)
        self.ad = fused_dropout.AlphaDropout(0.1)

    def forward(self, x):
        y = self.fa(self.d2(self.conv(x)))  # (N, 8, H, W)
        z = self.d1(y[0].flatten(1))  # unbatched (C, L)
        w = self.d3(y.unsqueeze(2))  # (N, C, 1, H, W)
        return self.ad(z).sum() + w.square().sum()


# Inductor may reorder independent extern kernels, and so which op gets which draw of the
# global generator, unless fallback_random chains the ops tagged nondeterministic_seeded
# (ours are). Each mask stays valid either way; the README documents this.
# torch 2.6's inductor reorders them even with fallback_random (aot_eager keeps the order).
INDUCTOR_REORDERS_DRAWS = pytest.mark.xfail(
    TORCH_2_6,
    reason="torch 2.6's inductor runs ops drawing from the global generator out of program "
    "order even with fallback_random: other seeds per op than eager (each mask still valid)",
    strict=True,
)


@INDUCTOR_REORDERS_DRAWS
@torch._inductor.config.patch(fallback_random=True)
def test_torch_compile_fullgraph_matches_eager():
    """Global-RNG path: the seeds are drawn at run time, so eager and compiled agree."""
    import copy

    torch.manual_seed(0)
    eager = _Net().train()
    compiled = torch.compile(copy.deepcopy(eager), fullgraph=True)
    x = randn((2, 3, 6, 6), torch.float32, seed=13)
    for step in range(2):
        res = []
        for model in (eager, compiled):
            torch.manual_seed(100 + step)
            xx = x.clone().requires_grad_()
            out = model(xx)
            out.backward()
            res.append((out.detach(), xx.grad))
        (oe, ge), (oc, gc) = res
        torch.testing.assert_close(oc, oe, rtol=1e-5, atol=1e-5)  # sums: inductor's order
        torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-6)


@INDUCTOR_REORDERS_DRAWS
@torch._inductor.config.patch(fallback_random=True)
def test_torch_compile_keeps_rng_draw_order():
    """Ops drawing from the global generator must run in program order in the compiled code,
    or each gets another op's seed (inductor may reorder independent extern kernels)."""

    def f(x):
        z = FD.dropout2d(x, 0.5)  # 1st draw
        w = FD.dropout2d(x + 1, 0.5)  # 2nd draw
        return FD.dropout2d(z, 0.5).sum() + w.sum()  # 3rd draw, depends only on the 1st

    x = torch.ones(4, 16, 1, 1)
    torch.manual_seed(0)
    eager = f(x)
    torch.manual_seed(0)
    compiled = torch.compile(f, fullgraph=True)(x)
    assert_bitwise(compiled, eager)


@pytest.mark.parametrize("fn, shape, mask_ndim, batched", [CASES[1], CASES[2], CASES[5], CASES[9]])
def test_torch_compile_functional_bitwise(fn, shape, mask_ndim, batched):
    x = randn(shape, torch.float32, seed=14)

    def f(t):
        return getattr(FD, fn)(t, 0.3, True, seed_offset=(2**64 - 5, 8))

    got = torch.compile(f, fullgraph=True)(x)
    assert_bitwise(got, f(x))
    assert_bitwise(got, ref.ref_dropout(x, 0.3, 2**64 - 5, 8, mask_ndim, alpha=fn in ALPHA))
