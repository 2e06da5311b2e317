"""Helpers shared by the test files: bit-exact comparison and seeded inputs."""

from __future__ import annotations

import torch

_INT_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns of ``t`` as integers (on the CPU, contiguous)."""
    t = t.detach().cpu().contiguous()
    return t.view(_INT_VIEW[t.element_size()])


def assert_bitwise(actual: torch.Tensor, expected: torch.Tensor, what: str = "output"):
    """Same dtype, shape and bits; the message shows the first differing element."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    a, e = bits(actual), bits(expected)
    if not torch.equal(a, e):
        bad = (a != e).nonzero()
        i = tuple(bad[0].tolist())
        raise AssertionError(
            f"{what}: {bad.shape[0]} of {a.numel()} elements differ bitwise; first at {i}: "
            f"got {actual.detach()[i].item()!r} (0x{int(a[i]) & 0xFFFFFFFFFFFFFFFF:x}), "
            f"expected {expected[i].item()!r} (0x{int(e[i]) & 0xFFFFFFFFFFFFFFFF:x})"
        )


# A bf16 NaN result has this pattern on every device (README, "Differences from torch").
BF16_NAN = 0x7FC0
# bf16 NaNs of either sign, quiet and signalling, with and without payload
BF16_NAN_INPUTS = (0x7FC0, 0xFFC0, 0x7F81, 0xFFFF, 0x7FA5)


def bf16_with_nans(shape, seed=0) -> torch.Tensor:
    """A bf16 tensor (contiguous) of standard normal values, every 5th element a NaN of one
    of BF16_NAN_INPUTS in turn, every 7th +inf and -inf in turn (-inf first for an odd
    ``seed``: two operands of seeds of both parities add up to inf - inf)."""
    t = randn(shape, torch.bfloat16, seed).view(-1).view(torch.int16)
    nans = torch.tensor(BF16_NAN_INPUTS, dtype=torch.int32).to(torch.int16)
    where = torch.arange(0, t.numel(), 5)
    t[where] = nans.repeat(len(where) // len(nans) + 1)[: len(where)]
    where = torch.arange(0, t.numel(), 7)
    signs = torch.tensor([0x7F80, 0xFF80], dtype=torch.int32).to(torch.int16)
    t[where] = signs.roll(seed % 2).repeat(len(where) // 2 + 1)[: len(where)]
    return t.view(torch.bfloat16).view(shape)


def assert_bf16_nans(actual: torch.Tensor, expected: torch.Tensor, what: str = "output"):
    """``actual`` is NaN where ``expected`` is (at least once), and every NaN is BF16_NAN."""
    nan = actual.detach().cpu().isnan()
    assert torch.equal(nan, expected.isnan()), f"{what}: NaNs at other places"
    assert bool(nan.any()), f"{what}: no NaN result to check"
    patterns = sorted({v & 0xFFFF for v in bits(actual)[nan].tolist()})
    assert patterns == [BF16_NAN], f"{what}: bf16 NaN patterns {[hex(v) for v in patterns]}"


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(shape, dtype, seed=0) -> torch.Tensor:
    """Standard normal ``shape`` in ``dtype``, drawn from its own generator."""
    base = torch.float64 if dtype == torch.float64 else torch.float32
    return torch.randn(shape, generator=gen(seed), dtype=base).to(dtype)


def run_steps(model, x, gy, seed, steps=2):
    """``steps`` forward/backward passes from ``torch.manual_seed(seed)``: per step the
    output, the input's gradient and the parameters' gradients (torch.compile's
    ``_orig_mod.`` prefix removed), to compare an eager model with its compiled copy."""
    torch.manual_seed(seed)
    outs = []
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        xx = x.detach().clone().requires_grad_()
        y = model(xx)
        y.backward(gy)
        grads = {
            n.removeprefix("_orig_mod."): prm.grad.clone() for n, prm in model.named_parameters()
        }
        outs.append((y.detach(), xx.grad, grads))
    return outs


def random64_draw(gen: torch.Generator | None) -> int:
    """One random64() draw of a CPU generator, as int64 (the contract's CPU seed)."""
    t = torch.empty((), dtype=torch.int64)
    t.random_(-(2**63), None, generator=gen)  # full 64-bit range == random64()
    return int(t)
