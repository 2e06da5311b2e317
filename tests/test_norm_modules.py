"""The modules ``DropoutAddLayerNorm`` and ``DropoutAddRMSNorm``.

- They are torch's ``LayerNorm`` / ``RMSNorm`` (subclasses): the same parameters, ``state_dict``
  keys and initial values, so checkpoints load both ways; in eval, with ``p = 0`` or without a
  residual they normalize like torch's module (within the norm's rounding).
- In training, a call is the functional op with the pair the module drew: bitwise
  ``functional.dropout_add_layer_norm`` / ``dropout_add_rms_norm`` under the same seed, and
  ``h`` (``prenorm``) bitwise our ``dropout_add``.
- Arguments are checked, gradients reach the parameters. FX and TorchScript: see
  tests/test_fx_script.py.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_bitwise, randn
from torch import nn

import fused_dropout
from fused_dropout import functional as FD

MODULES = {
    "layer": (fused_dropout.DropoutAddLayerNorm, nn.LayerNorm),
    "rms": (fused_dropout.DropoutAddRMSNorm, nn.RMSNorm),
}


@pytest.fixture(autouse=True)
def _isolate_global_rng():
    with torch.random.fork_rng():
        torch.manual_seed(18)
        yield


def _functional(module, x, r):
    """The functional op with ``module``'s parameters and options."""
    options = dict(prenorm=module.prenorm, residual_in_fp32=module.residual_in_fp32)
    if isinstance(module, fused_dropout.DropoutAddRMSNorm):
        return FD.dropout_add_rms_norm(
            x, r, module.weight, module.p, module.training, module.eps, **options
        )
    return FD.dropout_add_layer_norm(
        x, r, module.weight, module.bias, module.p, module.training, module.eps, **options
    )


def _randomize(module: nn.Module) -> nn.Module:
    """Parameters away from their initial values, so that loading them is seen."""
    with torch.no_grad():
        for i, param in enumerate(module.parameters()):
            param.copy_(1 + 0.5 * randn(param.shape, param.dtype, 10 + i))
    return module


@pytest.mark.parametrize("kind", MODULES)
def test_is_torchs_norm_with_its_state_dict(kind):
    ours_cls, torch_cls = MODULES[kind]
    ours, theirs = ours_cls(16, 0.1), torch_cls(16)
    assert isinstance(ours, torch_cls)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for (name, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert_bitwise(a, b, f"initial {name}")
    assert repr(ours) == f"{ours_cls.__name__}({theirs.extra_repr()}, p=0.1)"
    # checkpoints load both ways
    _randomize(theirs)
    ours.load_state_dict(theirs.state_dict())
    back = torch_cls(16)
    back.load_state_dict(_randomize(ours_cls(16, 0.1)).state_dict())
    assert list(back.state_dict()) == list(ours.state_dict())
    for name, value in theirs.state_dict().items():
        assert_bitwise(ours.state_dict()[name], value, name)


@pytest.mark.parametrize("kind", MODULES)
def test_options_follow_torchs_arguments(kind):
    ours_cls, torch_cls = MODULES[kind]
    if kind == "layer":
        m = ours_cls([8], 0.2, eps=1e-3, elementwise_affine=True, bias=False, prenorm=True)
        assert m.bias is None and m.eps == 1e-3 and list(m.state_dict()) == ["weight"]
        assert list(m.state_dict()) == list(torch_cls(8, bias=False).state_dict())
        # torch's own repr of those options (torch 2.6's LayerNorm does not show bias=False)
        theirs = torch_cls([8], eps=1e-3, elementwise_affine=True, bias=False).extra_repr()
        assert repr(m) == f"{ours_cls.__name__}({theirs}, p=0.2, prenorm=True)"
    else:
        m = ours_cls(8, 0.2)
        assert m.eps is None  # the dtype's eps, as torch's RMSNorm
    m = ours_cls(8, 0.2, elementwise_affine=False, residual_in_fp32=True)
    assert m.state_dict() == {} and m.weight is None and "residual_in_fp32=True" in repr(m)
    m = ours_cls(8, 0.2, dtype=torch.float64)
    assert m.weight.dtype == torch.float64


@pytest.mark.parametrize("kind", MODULES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_eval_normalizes_like_torchs_module(kind, dtype):
    """FlashAttention's rule against torch's module in float64 (the sum rounded to ``dtype``
    first, as both compute it): ours errs at most twice as much as torch's module in ``dtype``,
    plus a few units of the dtype's rounding."""
    ours_cls, torch_cls = MODULES[kind]
    ours = _randomize(ours_cls(32, 0.5, dtype=dtype)).eval()
    theirs = torch_cls(32, dtype=dtype)
    theirs.load_state_dict(ours.state_dict())
    exact = torch_cls(32, dtype=torch.float64)
    exact.load_state_dict(ours.state_dict())
    exact.eps = torch.finfo(dtype).eps if ours.eps is None else ours.eps  # RMSNorm: the dtype's
    atol = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}[dtype]
    x, r = randn((4, 7, 32), dtype, 1), randn((4, 7, 32), dtype, 2)
    with torch.no_grad():
        for args, h in (((x, r), x + r), ((x,), x)):
            y = ours(*args)
            err = (y.double() - exact(h.double())).abs().max().item()
            base = (theirs(h).double() - exact(h.double())).abs().max().item()
            assert err <= 2 * base + atol, (err, base)
            ours.train().p = 0.0  # training with p = 0: nothing dropped, the same numbers
            assert_bitwise(ours(*args), y, "training at p = 0")
            ours.eval().p = 0.5


@pytest.mark.parametrize("kind", MODULES)
@pytest.mark.parametrize("prenorm", [False, True])
def test_training_call_is_the_functional_op(kind, prenorm):
    ours = _randomize(MODULES[kind][0](24, 0.3, prenorm=prenorm))
    x, r = randn((5, 24), torch.float32, 1), randn((5, 24), torch.float32, 2)
    torch.manual_seed(3)
    got = ours(x, r)
    state = torch.get_rng_state()
    torch.manual_seed(3)
    want = _functional(ours, x, r)
    assert torch.equal(torch.get_rng_state(), state)  # one pair drawn, as one op call draws
    if prenorm:
        assert isinstance(got, tuple) and len(got) == 2
        assert_bitwise(got[0], want[0], "y")
        assert_bitwise(got[1], want[1], "h")
        torch.manual_seed(3)
        assert_bitwise(got[1], FD.dropout_add(x, r, 0.3), "h against dropout_add")
    else:
        assert_bitwise(got, want, "y")
    y = got[0] if prenorm else got
    assert not torch.equal(y, ours.eval()(x, r)[0] if prenorm else ours.eval()(x, r))


def test_residual_in_fp32_gives_an_fp32_sum():
    m = fused_dropout.DropoutAddLayerNorm(16, 0.1, prenorm=True, residual_in_fp32=True)
    x, r = randn((3, 16), torch.bfloat16, 1), randn((3, 16), torch.bfloat16, 2)
    y, h = m.to(torch.bfloat16)(x, r)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32


@pytest.mark.parametrize("kind", MODULES)
def test_gradients_reach_every_parameter_and_input(kind):
    m = _randomize(MODULES[kind][0](12, 0.25))
    x = randn((6, 12), torch.float32, 1).requires_grad_()
    r = randn((6, 12), torch.float32, 2).requires_grad_()
    torch.manual_seed(4)
    m(x, r).square().sum().backward()
    x2, r2 = x.detach().clone().requires_grad_(), r.detach().clone().requires_grad_()
    params = [p.detach().clone().requires_grad_() for p in m.parameters()]
    torch.manual_seed(4)
    if kind == "layer":
        want = FD.dropout_add_layer_norm(x2, r2, params[0], params[1], 0.25)
    else:
        want = FD.dropout_add_rms_norm(x2, r2, params[0], 0.25)
    want.square().sum().backward()
    assert_bitwise(x.grad, x2.grad, "input grad")
    assert_bitwise(r.grad, r2.grad, "residual grad")
    for p, p2 in zip(m.parameters(), params):
        assert p.grad is not None and torch.equal(p.grad, p2.grad)


@pytest.mark.parametrize("kind", MODULES)
def test_bad_arguments(kind):
    cls = MODULES[kind][0]
    for p in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="dropout probability"):
            cls(8, p)
    with pytest.raises(ValueError, match="last dim only"):
        cls((4, 8), 0.1)
    m = cls(8, 0.1)
    with pytest.raises(RuntimeError):
        m(torch.randn(2, 8), torch.randn(2, 7))  # shapes differ: the op's error


def test_exported():
    assert {"DropoutAddLayerNorm", "DropoutAddRMSNorm"} <= set(fused_dropout.__all__)
    assert fused_dropout.DropoutAddLayerNorm is fused_dropout.modules.DropoutAddLayerNorm


@pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:FutureWarning")
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float32, torch.float64))
def test_dtype_eps_is_finfos(dtype):
    """RMSNorm's default eps, written without torch.finfo so that the modules script."""
    from fused_dropout import _impl

    assert _impl.dtype_eps(dtype) == torch.finfo(dtype).eps
    assert torch.jit.script(_impl.dtype_eps)(dtype) == torch.finfo(dtype).eps
