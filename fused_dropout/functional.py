"""Drop-in replacements for the functional dropout family of torch, timm and torchvision.

Each function has the signature of the one it replaces plus two keywords:
``generator=`` (a ``torch.Generator`` to draw the seed from) and
``seed_offset=(seed, offset)`` (use exactly this pair; see the RNG contract).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fused_dropout import ops

__all__ = ["dropout"]


def _check_p(p: float, what: str = "dropout probability") -> None:
    if not 0.0 <= p <= 1.0:  # also rejects NaN
        raise ValueError(f"{what} has to be between 0 and 1, but got {p}")


def dropout(
    input: Tensor,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    generator: torch.Generator | None = None,
    seed_offset: tuple[int, int] | None = None,
) -> Tensor:
    """Like ``torch.nn.functional.dropout``; dropped elements are exactly 0, even NaN/Inf."""
    _check_p(p)
    if not training or p == 0.0 or input.numel() == 0:
        return input
    if inplace:
        ops.dropout_(input, p, generator=generator, seed_offset=seed_offset)
        return input
    return ops.dropout(input, p, generator=generator, seed_offset=seed_offset)[0]
