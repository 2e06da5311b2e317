"""Typed wrappers of the registered ops (``torch.ops.fused_dropout``) and their fake kernels.

Every op returns the ``(seed, offset)`` pair it used as an int64[2] tensor on the input's
device; backward regenerates the mask from that pair alone.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["dropout", "dropout_", "dropout_add", "dropout_backward", "split_seed_offset"]

_UINT64 = 1 << 64


def split_seed_offset(seed_offset: tuple[int, int] | None) -> tuple[int | None, int | None]:
    """Validate ``seed_offset=(seed, offset)`` and return it as the ops' signed int64 pair."""
    if seed_offset is None:
        return None, None
    seed, offset = (int(v) for v in seed_offset)
    if not 0 <= seed < _UINT64:
        raise ValueError(f"seed_offset: seed must be in [0, 2**64), got {seed}")
    if offset < 0 or offset % 4 != 0 or offset >= _UINT64 // 2:
        raise ValueError(f"seed_offset: offset must be a non-negative multiple of 4, got {offset}")
    return (seed - _UINT64 if seed >= _UINT64 // 2 else seed), offset


def dropout(
    input: Tensor,
    p: float,
    mask_ndim: int = -1,
    scale_by_keep: bool = True,
    alpha: bool = False,
    *,
    generator: torch.Generator | None = None,
    seed_offset: tuple[int, int] | None = None,
) -> tuple[Tensor, Tensor]:
    """Masked copy of ``input`` (mask over its leading ``mask_ndim`` dims) and the pair used."""
    seed, offset = split_seed_offset(seed_offset)
    return torch.ops.fused_dropout.dropout(
        input, p, mask_ndim, scale_by_keep, alpha, seed, offset, generator
    )


def dropout_(
    input: Tensor,
    p: float,
    mask_ndim: int = -1,
    scale_by_keep: bool = True,
    alpha: bool = False,
    *,
    generator: torch.Generator | None = None,
    seed_offset: tuple[int, int] | None = None,
) -> Tensor:
    """Mask ``input`` in place and return the pair used."""
    seed, offset = split_seed_offset(seed_offset)
    return torch.ops.fused_dropout.dropout_(
        input, p, mask_ndim, scale_by_keep, alpha, seed, offset, generator
    )


def dropout_backward(
    grad: Tensor,
    seed_offset: Tensor,
    p: float,
    mask_ndim: int = -1,
    scale_by_keep: bool = True,
    alpha: bool = False,
) -> Tensor:
    """Gradient of :func:`dropout`'s output, the mask regenerated from ``seed_offset``."""
    return torch.ops.fused_dropout.dropout_backward(
        grad, seed_offset, p, mask_ndim, scale_by_keep, alpha
    )


def dropout_add(
    input: Tensor,
    residual: Tensor,
    bias: Tensor | None,
    p: float,
    mask_ndim: int = -1,
    scale_by_keep: bool = True,
    *,
    generator: torch.Generator | None = None,
    seed_offset: tuple[int, int] | None = None,
) -> tuple[Tensor, Tensor]:
    """``residual + dropout(input + bias)`` in one pass, and the pair used."""
    seed, offset = split_seed_offset(seed_offset)
    return torch.ops.fused_dropout.dropout_add(
        input, residual, bias, p, mask_ndim, scale_by_keep, seed, offset, generator
    )


def _fake_pair(t: Tensor) -> Tensor:
    return t.new_empty((2,), dtype=torch.int64)


@torch.library.register_fake("fused_dropout::dropout")
def _dropout_fake(input, p, mask_ndim, scale_by_keep, alpha, seed, offset, generator):
    return torch.empty_like(input), _fake_pair(input)


@torch.library.register_fake("fused_dropout::dropout_")
def _dropout_inplace_fake(input, p, mask_ndim, scale_by_keep, alpha, seed, offset, generator):
    return _fake_pair(input)


@torch.library.register_fake("fused_dropout::dropout_backward")
def _dropout_backward_fake(grad, seed_offset, p, mask_ndim, scale_by_keep, alpha):
    return torch.empty_like(grad)


@torch.library.register_fake("fused_dropout::dropout_add")
def _dropout_add_fake(input, residual, bias, p, mask_ndim, scale_by_keep, seed, offset, generator):
    # The kernel's checks, so that fake and meta tensors fail the same way.
    torch._check(residual.shape == input.shape, lambda: "residual must have input's shape")
    torch._check(residual.dtype == input.dtype, lambda: "residual must have input's dtype")
    torch._check(residual.device == input.device, lambda: "residual must be on input's device")
    if bias is not None:
        torch._check(
            bias.dim() == 1 and input.dim() >= 1 and bias.shape[0] == input.shape[-1],
            lambda: "bias must be 1-D with input.size(-1) elements",
        )
        torch._check(bias.dtype == input.dtype, lambda: "bias must have input's dtype")
        torch._check(bias.device == input.device, lambda: "bias must be on input's device")
    return torch.empty_like(input), _fake_pair(input)
