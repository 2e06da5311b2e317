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
