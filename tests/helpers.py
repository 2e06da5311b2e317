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
