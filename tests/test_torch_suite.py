"""torch's own dropout test suite (test/nn/test_dropout.py: TestDropoutNN and
TestDropoutNNDeviceType), re-expressed for pytest and run on the CPU against both
``torch.nn.X`` and ``fused_dropout.X``, so every check shows that torch and we agree.

The project does not run upstream's file itself (torch's wheel does not ship it); this file is
what it runs. Upstream seeds ``torch`` and ``random`` with 1234 at the start of every test
method (``TestCase.setUp``); the autouse fixture below does the same. Some of its checks are
statistical with a small margin (Dropout1d: mean of 100-225 channel decisions within 0.05,
1.3-1.9 standard deviations; torch's own modules fail it for about one seed in four: 70 of
the seeds 0-299), so their outcome depends on the exact RNG draws. ``TestUpstreamReplay``
therefore replays each upstream test method step by step, in its order, from the same seed:
the draws upstream's file would make with our modules swapped in. The other tests split the
same checks into small cases, for readable failures.
"""

from __future__ import annotations

import itertools
import random
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_dropout
from fused_dropout import functional as FD

UPSTREAM_SEED = 1234  # torch.testing._internal.common_utils.SEED
IMPLS = ["torch", "ours"]
MODULE_NAMES = [
    "Dropout",
    "Dropout1d",
    "Dropout2d",
    "Dropout3d",
    "AlphaDropout",
    "FeatureAlphaDropout",
]
FUNCTION_NAMES = [
    "dropout",
    "dropout1d",
    "dropout2d",
    "dropout3d",
    "alpha_dropout",
    "feature_alpha_dropout",
]
CL = torch.channels_last
CF = torch.contiguous_format


def module_cls(impl: str, name: str) -> type[nn.Module]:
    return getattr(nn if impl == "torch" else fused_dropout, name)


def function(impl: str, name: str):
    return getattr(F if impl == "torch" else FD, name)


@pytest.fixture(autouse=True)
def _upstream_seed():
    """Seed like torch's TestCase.setUp (torch and random: 1234); restore both afterwards."""
    py_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(UPSTREAM_SEED)
        random.seed(UPSTREAM_SEED)
        yield
    random.setstate(py_state)


@pytest.fixture
def float64_default():
    """torch.set_default_dtype(torch.double) for the test, as upstream's Dropout1d test."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.double)
    yield
    torch.set_default_dtype(saved)


# ------------------------------------------------------------------ the suite's checks


def check_alpha_stats(cls, x: torch.Tensor) -> None:
    """Alpha dropout keeps the mean and standard deviation (within 0.1); backward runs."""
    mean, std = x.mean(), x.std()
    for p in (0.2, 0.5, 0.8):
        leaf = x.detach().clone().requires_grad_()
        out = cls(p)(leaf)
        got_mean, got_std = out.detach().mean(), out.detach().std()
        assert abs(got_mean - mean) < 0.1, f"p={p}: mean {got_mean} vs input mean {mean}"
        assert abs(got_std - std) < 0.1, f"p={p}: std {got_std} vs input std {std}"
        out.backward(x)
        assert leaf.grad is not None and leaf.grad.shape == x.shape


def check_generic(cls, base: torch.Tensor, memory_format=CF) -> None:
    """Upstream's _test_dropout: layout kept, mean kept, the same for the gradient; the
    in-place module on a non-leaf; eval mode is the identity; repr and str work."""
    p = 0.2
    base.fill_(1 - p)
    for inplace in (False, True):
        module = cls(p, inplace)
        leaf = base.clone(memory_format=memory_format).requires_grad_()
        out = module(leaf + 0) if inplace else module(leaf)
        what = f"{cls.__module__}.{cls.__name__}(inplace={inplace}), {memory_format}"
        assert out.is_contiguous(memory_format=memory_format), f"{what}: {out.stride()}"
        err = (out.detach().mean() - (1 - p)).abs()
        assert err < 0.05, f"{what}: output mean off by {err}"
        out.backward(base)
        grad = leaf.grad
        assert grad.is_contiguous(memory_format=memory_format), f"{what}: grad {grad.stride()}"
        err = (grad.mean() - (1 - p)).abs()
        assert err < 0.05, f"{what}: grad mean off by {err}"
    for inplace in (True, False):
        module = cls(p, inplace).eval()
        torch.testing.assert_close(module(base), base)
    assert isinstance(repr(module), str) and str(module) == repr(module)


def check_discontiguous(cls, memory_format=CF) -> None:
    """Every other element of the last dim, in a contiguous or channels_last buffer: for p=0
    and p=1e-10 the values are unchanged, and for p=1e-10 the output is dense in the
    input's memory format (pytorch/pytorch#47176)."""
    for p in (0, 1e-10):
        x = torch.empty(2, 3, 3, 6, memory_format=memory_format)[..., ::2]
        x.copy_(torch.ones(2, 3, 3, 3))
        out = cls(p=p)(x)
        if p != 0:
            assert out.is_contiguous(memory_format=memory_format), (
                f"p={p}, {memory_format}: input strides {x.stride()}, output {out.stride()}"
            )
        assert torch.equal(out, x), f"p={p}, {memory_format}: values changed"


def _inverse(perm: tuple[int, ...]) -> tuple[int, ...]:
    inv = [0] * len(perm)
    for i, d in enumerate(perm):
        inv[d] = i
    return tuple(inv)


def check_stride_and_mean(cls) -> None:
    """Any dim order, also sliced (not dense): the output is dense in that dim order, its
    mean near 1; p=1e-10 changes nothing, larger p changes something."""
    ones = torch.ones(2, 3, 4, 5)
    for perm in itertools.permutations(range(4)):
        for shift in ((0, 0), (1, 0), (0, 1), (1, 1)):
            for p in (1e-10, 0.3, 0.5, 0.7):
                x = ones.permute(perm).contiguous().permute(_inverse(perm))
                x = x[shift[0] :, shift[1] :]
                out = cls(p=p)(x)
                what = f"perm={perm}, shift={shift}, p={p}: in {x.stride()}, out {out.stride()}"
                assert out.permute(perm).is_contiguous(), what
                # upstream: assertEqual(inp.mean(), out.mean(), rtol=0.5, atol=0.5)
                torch.testing.assert_close(ones.mean(), out.mean(), rtol=0.5, atol=0.5)
                if p == 1e-10:
                    assert torch.equal(out, x), what
                else:  # upstream: assertNotEqual, i.e. not close at float32's defaults
                    assert not torch.allclose(out, x, rtol=1.3e-6, atol=1e-5), what


def check_no_batch(module: nn.Module, x: torch.Tensor) -> None:
    """An input without its batch dim gives what the same input with a batch dim of 1 gives,
    from the same RNG state."""
    x_copy = x.clone()
    shape = x.shape
    with torch.random.fork_rng(devices=[]):
        unbatched = module(x)
    with torch.random.fork_rng(devices=[]):
        batched = module(x_copy.unsqueeze(0)).squeeze(0)
    assert torch.equal(unbatched, batched)
    assert x.shape == shape  # an in-place call must not leave the batch dim on the input
    if module.inplace:
        assert unbatched is x


def check_whole_channels(module: nn.Module, x: torch.Tensor) -> None:
    """On a tensor of ones each (sample, channel) is either all zero or all nonzero."""
    numel = x[0, 0].numel()
    out = module(x)
    nonzero = out.reshape(x.shape[0], x.shape[1], -1).count_nonzero(dim=2)
    assert bool(((nonzero == 0) | (nonzero == numel)).all()), nonzero
    # beyond upstream: with 40 channels at p=0.5 both outcomes occur (fails w.p. 2**-39)
    assert bool((nonzero == 0).any()) and bool((nonzero == numel).any()), nonzero


# ------------------------------------------------------------------ TestDropoutNN


@pytest.mark.parametrize("impl", IMPLS)
def test_alpha_dropout_mean_std(impl):
    check_alpha_stats(module_cls(impl, "AlphaDropout"), torch.randn(5000))


@pytest.mark.parametrize("impl", IMPLS)
def test_feature_alpha_dropout_mean_std(impl):
    b, w, h = random.randint(1, 5), random.randint(1, 5), random.randint(1, 5)
    d = random.randint(1, 2)
    cls = module_cls(impl, "FeatureAlphaDropout")
    check_alpha_stats(cls, torch.randn(1000, b, d, w, h))


@pytest.mark.parametrize("impl", IMPLS)
def test_feature_alpha_dropout_mean_std_no_batch(impl):
    check_alpha_stats(module_cls(impl, "FeatureAlphaDropout"), torch.randn(50, 20, 64, 64))


@pytest.mark.parametrize("p", [-0.1, 1.1])
@pytest.mark.parametrize("name", MODULE_NAMES)
@pytest.mark.parametrize("impl", IMPLS)
def test_invalid_p_module(impl, name, p):
    with pytest.raises(ValueError, match="dropout probability has to be between 0 and 1"):
        module_cls(impl, name)(p)


@pytest.mark.parametrize("p", [-0.1, 1.1])
@pytest.mark.parametrize("name", FUNCTION_NAMES)
@pytest.mark.parametrize("impl", IMPLS)
def test_invalid_p_function(impl, name, p):
    x = torch.ones(1, 1, 1, 1) if name != "dropout" else torch.ones(1)  # upstream: ones(1)
    with pytest.raises(ValueError, match="dropout probability has to be between 0 and 1"):
        function(impl, name)(x, p)


# ------------------------------------------------------------------ TestDropoutNNDeviceType


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "name, dtype, memory_format",
    [
        ("Dropout", torch.float32, CF),
        ("Dropout", torch.bfloat16, CF),
        ("Dropout1d", torch.float64, CF),
        ("Dropout2d", torch.float32, CF),
        ("Dropout2d", torch.float32, CL),
        ("Dropout3d", torch.float32, CF),
    ],
    ids=["Dropout", "Dropout-bf16", "Dropout1d-f64", "Dropout2d", "Dropout2d-cl", "Dropout3d"],
)
def test_generic(impl, name, dtype, memory_format):
    """Upstream sizes: 1000 elements; (N, C, L) in 10..15 (double, set as default dtype
    upstream); (1000, b, w, h); (1000, b, d, w, h), with b, w, h in 1..5, d in 1..2."""
    if name == "Dropout":
        shape = (1000,)
    elif name == "Dropout1d":
        shape = tuple(random.randint(10, 15) for _ in range(3))
    else:
        b, w, h = random.randint(1, 5), random.randint(1, 5), random.randint(1, 5)
        if name == "Dropout2d":
            shape = (1000, b, w, h)
        else:
            shape = (1000, b, random.randint(1, 2), w, h)
    check_generic(module_cls(impl, name), torch.empty(shape, dtype=dtype), memory_format)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("memory_format", [CF, CL], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("name", ["Dropout", "Dropout2d", "Dropout3d"])
def test_discontiguous(impl, name, memory_format):
    if name == "Dropout3d":  # a 4-D input to Dropout3d is one sample (C, D, H, W): no warning
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            check_discontiguous(module_cls(impl, name), memory_format)
    else:
        check_discontiguous(module_cls(impl, name), memory_format)


@pytest.mark.parametrize("impl", IMPLS)
def test_stride_and_mean_preserved(impl):
    check_stride_and_mean(module_cls(impl, "Dropout"))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape, rank", [((1, 2, 2, 2), 4), ((2,), 1)])
def test_dropout1d_rank_error(impl, shape, rank):
    msg = f"Expected 2D or 3D input, but received a {rank}D input"
    with pytest.raises(RuntimeError, match=msg):
        module_cls(impl, "Dropout1d")(p=0.5)(torch.rand(shape))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "name, shape, msg",
    [
        ("Dropout2d", (1, 2, 2, 2, 2), "Received a 5-D input to dropout2d"),
        ("Dropout2d", (1, 2), "Received a 2-D input to dropout2d"),
        ("Dropout2d", (1, 2, 2), "assuming that channel-wise 1D dropout behavior is desired"),
        ("Dropout3d", (1, 2, 2, 2, 2, 2), "Received a 6-D input to dropout3d"),
        ("Dropout3d", (1, 2, 2), "Received a 3-D input to dropout3d"),
    ],
    ids=["2d-5D", "2d-2D", "2d-3D", "3d-6D", "3d-3D"],
)
def test_rank_warning(impl, name, shape, msg):
    with pytest.warns(UserWarning, match=msg):
        module_cls(impl, name)(p=0.5)(torch.rand(shape))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "name, shape",
    [("Dropout1d", (3, 2, 2)), ("Dropout2d", (3, 2, 2, 2)), ("Dropout3d", (3, 2, 2, 2, 2))],
)
def test_no_warning_for_supported_ranks(impl, name, shape):
    """Beyond upstream: the ranks each layer is made for warn nowhere (also without batch)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module_cls(impl, name)(p=0.5)(torch.rand(shape))
        if name != "Dropout2d":  # 3-D input to Dropout2d warns (see test_rank_warning)
            module_cls(impl, name)(p=0.5)(torch.rand(shape[1:]))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("inplace", [False, True], ids=["out-of-place", "inplace"])
@pytest.mark.parametrize("name, shape", [("Dropout1d", (50, 2)), ("Dropout3d", (50, 2, 2, 2))])
def test_no_batch_dim(impl, name, shape, inplace):
    check_no_batch(module_cls(impl, name)(p=0.5, inplace=inplace), torch.rand(shape))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("inplace", [False, True], ids=["out-of-place", "inplace"])
@pytest.mark.parametrize(
    "name, shape",
    [("Dropout1d", (10, 4, 2)), ("Dropout2d", (10, 4, 2, 2)), ("Dropout3d", (10, 4, 2, 2, 2))],
)
def test_whole_channels(impl, name, shape, inplace):
    check_whole_channels(module_cls(impl, name)(p=0.5, inplace=inplace), torch.ones(shape))


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_input(impl):
    x = torch.tensor([])
    out = function(impl, "dropout")(x)
    assert out.size() == x.size()
    leaf = x.clone().requires_grad_()
    out = module_cls(impl, "Dropout")(0.5)(leaf)  # beyond upstream: module and backward
    out.sum().backward()
    assert out.shape == (0,) and leaf.grad.shape == (0,)


# ------------------------------------------------------------------ beyond upstream


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "name, shape",
    [
        ("dropout", (4, 5)),
        ("dropout1d", (2, 3, 4)),
        ("dropout2d", (2, 3, 4, 4)),
        ("dropout3d", (2, 3, 2, 2, 2)),
        ("alpha_dropout", (4, 5)),
        ("feature_alpha_dropout", (2, 3, 4)),
    ],
)
def test_identity_returns_input_itself(impl, name, shape):
    """training=False (in place or not), and p=0 in training, return the input object."""
    x = torch.randn(shape)
    assert function(impl, name)(x, 0.5, training=False) is x
    assert function(impl, name)(x, 0.5, False, True) is x
    assert function(impl, name)(x, 0.0, True) is x
    assert function(impl, name)(x, 0.0, True, True) is x


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "name, shape",
    [
        ("Dropout", (2, 3)),
        ("Dropout1d", (2, 3, 4)),
        ("Dropout2d", (2, 3, 2, 2)),
        ("Dropout3d", (2, 3, 2, 2, 2)),
        ("AlphaDropout", (2, 3)),
        ("FeatureAlphaDropout", (2, 3, 4)),
    ],
)
def test_eval_module_returns_input_itself(impl, name, shape):
    x = torch.randn(shape)
    assert module_cls(impl, name)(0.3).eval()(x) is x


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("name", MODULE_NAMES)
def test_state_dict_and_repr_match_torch(name, inplace):
    theirs, ours = getattr(nn, name)(0.3, inplace), getattr(fused_dropout, name)(0.3, inplace)
    assert isinstance(ours, getattr(nn, name))
    assert repr(ours) == repr(theirs) and str(ours) == str(theirs)
    assert ours.extra_repr() == theirs.extra_repr()
    assert ours.state_dict() == theirs.state_dict()
    assert type(ours.state_dict()) is type(theirs.state_dict())
    assert (ours.p, ours.inplace, ours.training) == (theirs.p, theirs.inplace, theirs.training)
    ours.load_state_dict(theirs.state_dict())  # strict: no missing or unexpected keys
    theirs.load_state_dict(ours.state_dict())


# ------------------------------------------------------------------ upstream order, replayed


@pytest.mark.parametrize("impl", IMPLS)
class TestUpstreamReplay:
    """Each upstream test method, step for step in its order, from upstream's seed (set by the
    autouse fixture): the RNG draws, and so the outcome, that upstream's file would have with
    our modules swapped in (that file is not run here)."""

    def test_AlphaDropout(self, impl):
        check_alpha_stats(module_cls(impl, "AlphaDropout"), torch.randn(5000))

    def test_FeatureAlphaDropout(self, impl):
        cls = module_cls(impl, "FeatureAlphaDropout")
        b, w, h = random.randint(1, 5), random.randint(1, 5), random.randint(1, 5)
        d = random.randint(1, 2)
        check_alpha_stats(cls, torch.randn(1000, b, d, w, h))
        check_alpha_stats(cls, torch.randn(50, 20, 64, 64))

    def test_Dropout(self, impl):
        cls = module_cls(impl, "Dropout")
        x = torch.empty(1000)
        check_generic(cls, x)
        check_discontiguous(cls)
        check_discontiguous(cls, CL)
        check_stride_and_mean(cls)
        check_generic(cls, x.bfloat16())

    def test_Dropout1d(self, impl, float64_default):
        cls = module_cls(impl, "Dropout1d")
        n, c, length = random.randint(10, 15), random.randint(10, 15), random.randint(10, 15)
        check_generic(cls, torch.empty(n, c, length))
        for shape, rank in (((1, 2, 2, 2), 4), ((2,), 1)):
            with pytest.raises(RuntimeError, match=f"but received a {rank}D input"):
                cls(p=0.5)(torch.rand(shape))
        x = torch.rand(50, 2)
        check_no_batch(cls(p=0.5), x)
        check_no_batch(cls(p=0.5, inplace=True), x)
        x = torch.ones(10, 4, 2)
        check_whole_channels(cls(p=0.5), x)
        check_whole_channels(cls(p=0.5, inplace=True), x)

    def test_Dropout2d(self, impl):
        cls = module_cls(impl, "Dropout2d")
        b, w, h = random.randint(1, 5), random.randint(1, 5), random.randint(1, 5)
        x = torch.empty(1000, b, w, h)
        check_generic(cls, x)
        check_generic(cls, x, CL)
        check_discontiguous(cls)
        check_discontiguous(cls, CL)
        with pytest.warns(UserWarning, match="Received a 5-D input to dropout2d"):
            cls(p=0.5)(torch.rand(1, 2, 2, 2, 2))
        with pytest.warns(UserWarning, match="Received a 2-D input to dropout2d"):
            cls(p=0.5)(torch.rand(1, 2))
        with pytest.warns(UserWarning, match="assuming that channel-wise 1D dropout"):
            cls(p=0.5)(torch.rand(1, 2, 2))
        x = torch.ones(10, 4, 2, 2)
        check_whole_channels(cls(p=0.5), x)
        check_whole_channels(cls(p=0.5, inplace=True), x)

    def test_Dropout3d(self, impl):
        cls = module_cls(impl, "Dropout3d")
        b, w, h = random.randint(1, 5), random.randint(1, 5), random.randint(1, 5)
        d = random.randint(1, 2)
        check_generic(cls, torch.empty(1000, b, d, w, h))
        check_discontiguous(cls)
        check_discontiguous(cls, CL)
        with pytest.warns(UserWarning, match="Received a 6-D input to dropout3d"):
            cls(p=0.5)(torch.rand(1, 2, 2, 2, 2, 2))
        with pytest.warns(UserWarning, match="Received a 3-D input to dropout3d"):
            cls(p=0.5)(torch.rand(1, 2, 2))
        x = torch.rand(50, 2, 2, 2)
        check_no_batch(cls(p=0.5), x)
        check_no_batch(cls(p=0.5, inplace=True), x)
        x = torch.ones(10, 4, 2, 2, 2)
        check_whole_channels(cls(p=0.5), x)
        check_whole_channels(cls(p=0.5, inplace=True), x)

    def test_empty_dropout(self, impl):
        x = torch.tensor([])
        assert function(impl, "dropout")(x).size() == x.size()
