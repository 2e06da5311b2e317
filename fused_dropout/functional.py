"""Drop-in replacements for the functional dropout family of torch, timm and torchvision.

Each function has the signature of the one it replaces plus two keywords:
``generator=`` (a ``torch.Generator`` to draw the seed from) and
``seed_offset=(seed, offset)`` (use exactly this pair; see the RNG contract).
Dropped elements are exactly 0 (or alpha dropout's constant), even where the
input is NaN or Inf: torch's CPU path multiplies, so NaN * 0 stays NaN there.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from fused_dropout import ops

__all__ = [
    "alpha_dropout",
    "bias_dropout_add",
    "drop_path",
    "drop_path_add",
    "dropout",
    "dropout1d",
    "dropout2d",
    "dropout3d",
    "dropout_add",
    "feature_alpha_dropout",
    "stochastic_depth",
]

Generator = Optional[torch.Generator]
SeedOffset = Optional[tuple[int, int]]


def _check_p(p: float, what: str = "dropout probability") -> None:
    if not 0.0 <= p <= 1.0:  # also rejects NaN
        raise ValueError(f"{what} has to be between 0 and 1, but got {p}")


def _masked(
    input: Tensor,
    p: float,
    training: bool,
    inplace: bool,
    mask_ndim: int,
    alpha: bool,
    generator: Generator,
    seed_offset: SeedOffset,
    scale_by_keep: bool = True,
) -> Tensor:
    """``input`` masked over its leading ``mask_ndim`` dims (-1: element-wise)."""
    if not training or p == 0.0 or input.numel() == 0:
        return input
    if inplace:
        ops.dropout_(
            input, p, mask_ndim, scale_by_keep, alpha, generator=generator, seed_offset=seed_offset
        )
        return input
    return ops.dropout(
        input, p, mask_ndim, scale_by_keep, alpha, generator=generator, seed_offset=seed_offset
    )[0]


def dropout(
    input: Tensor,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    generator: Generator = None,
    seed_offset: SeedOffset = None,
) -> Tensor:
    """Like ``torch.nn.functional.dropout``."""
    _check_p(p)
    return _masked(input, p, training, inplace, -1, False, generator, seed_offset)


def alpha_dropout(
    input: Tensor,
    p: float = 0.5,
    training: bool = False,
    inplace: bool = False,
    *,
    generator: Generator = None,
    seed_offset: SeedOffset = None,
) -> Tensor:
    """Like ``torch.nn.functional.alpha_dropout`` (SELU-preserving, element-wise)."""
    _check_p(p)
    return _masked(input, p, training, inplace, -1, True, generator, seed_offset)


def _feature_masked(
    input: Tensor,
    p: float,
    training: bool,
    inplace: bool,
    alpha: bool,
    generator: Generator,
    seed_offset: SeedOffset,
) -> Tensor:
    """torch's feature dropout: one decision per (sample, channel), dims 0 and 1."""
    if input.dim() < 2 and training and 0.0 < p < 1.0 and input.numel() > 0:
        raise RuntimeError("Feature dropout requires at least 2 dimensions in the input")
    # p == 1 zeros everything whatever the rank, as torch does.
    mask_ndim = 2 if input.dim() >= 2 else -1
    return _masked(input, p, training, inplace, mask_ndim, alpha, generator, seed_offset)


def _unbatched(fn, input: Tensor, batched: bool, inplace: bool) -> Tensor:
    """Run ``fn`` on ``input`` with a batch dim of 1 added when it has none, as torch does."""
    if batched:
        return fn(input)
    input = input.unsqueeze_(0) if inplace else input.unsqueeze(0)
    result = fn(input)
    return result.squeeze_(0) if inplace else result.squeeze(0)


def _warn_rank(name: str, rank: int, spatial: int, ranks: str) -> None:
    warnings.warn(
        f"{name}: Received a {rank}-D input to {name}, which is deprecated "
        "and will result in an error in a future release. To retain the behavior "
        f"and silence this warning, please use dropout instead. Note that {name} "
        f"exists to provide channel-wise dropout on inputs with {spatial} spatial dimensions, "
        f"a channel dimension, and an optional batch dimension (i.e. {ranks} inputs).",
        stacklevel=3,
    )


def dropout1d(
    input: Tensor,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    generator: Generator = None,
    seed_offset: SeedOffset = None,
) -> Tensor:
    """Like ``torch.nn.functional.dropout1d``: whole channels of (N, C, L) or (C, L)."""
    _check_p(p)
    rank = input.dim()
    if rank not in (2, 3):
        raise RuntimeError(
            f"dropout1d: Expected 2D or 3D input, but received a {rank}D input. "
            "Note that dropout1d exists to provide channel-wise dropout on inputs with 1 "
            "spatial dimension, a channel dimension, and an optional batch dimension "
            "(i.e. 2D or 3D inputs)."
        )
    return _unbatched(
        lambda t: _feature_masked(t, p, training, inplace, False, generator, seed_offset),
        input,
        rank == 3,
        inplace,
    )


def dropout2d(
    input: Tensor,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    generator: Generator = None,
    seed_offset: SeedOffset = None,
) -> Tensor:
    """Like ``torch.nn.functional.dropout2d``, including its 3-D input quirk (read as N, C, L)."""
    _check_p(p)
    rank = input.dim()
    if rank not in (3, 4):
        _warn_rank("dropout2d", rank, 2, "3D or 4D")
    if rank == 3:
        warnings.warn(
            "dropout2d: Received a 3D input to dropout2d and assuming that channel-wise "
            "1D dropout behavior is desired - input is interpreted as shape (N, C, L), where C "
            "is the channel dim. This behavior will change in a future release to interpret the "
            "input as one without a batch dimension, i.e. shape (C, H, W). To maintain the 1D "
            "channel-wise dropout behavior, please switch to using dropout1d instead.",
            stacklevel=2,
        )
    return _feature_masked(input, p, training, inplace, False, generator, seed_offset)


def dropout3d(
    input: Tensor,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    generator: Generator = None,
    seed_offset: SeedOffset = None,
) -> Tensor:
    """Like ``torch.nn.functional.dropout3d``: whole channels of (N, C, D, H, W) or (C, D, H, W)."""
    _check_p(p)
    rank = input.dim()
    if rank not in (4, 5):
        _warn_rank("dropout3d", rank, 3, "4D or 5D")
    return _unbatched(
        lambda t: _feature_masked(t, p, training, inplace, False, generator, seed_offset),
        input,
        rank == 5,
        inplace,
    )


def feature_alpha_dropout(
    input: Tensor,
    p: float = 0.5,
    training: bool = False,
    inplace: bool = False,
    *,
    generator: Generator = None,
    seed_offset: SeedOffset = None,
) -> Tensor:
    """Like ``torch.nn.functional.feature_alpha_dropout``: alpha dropout of whole channels."""
    _check_p(p)
    return _feature_masked(input, p, training, inplace, True, generator, seed_offset)


def drop_path(
    input: Tensor,
    drop_prob: float = 0.0,
    training: bool = False,
    scale_by_keep: bool = True,
    *,
    generator: Generator = None,
    seed_offset: SeedOffset = None,
) -> Tensor:
    """Like ``timm.layers.drop_path``: drop whole samples (dim 0), scaling kept ones by 1/keep."""
    _check_p(drop_prob, "drop probability")
    if input.dim() == 0:
        raise RuntimeError("drop_path: expected an input with a batch dimension, got a 0-D tensor")
    return _masked(
        input, drop_prob, training, False, 1, False, generator, seed_offset, scale_by_keep
    )


def stochastic_depth(
    input: Tensor,
    p: float,
    mode: str,
    training: bool = True,
    *,
    generator: Generator = None,
    seed_offset: SeedOffset = None,
) -> Tensor:
    """Like ``torchvision.ops.stochastic_depth``: drop rows (``"row"``) or the whole batch."""
    _check_p(p, "drop probability")
    if mode not in ["batch", "row"]:
        raise ValueError(f"mode has to be either 'batch' or 'row', but got {mode}")
    return _masked(
        input, p, training, False, 1 if mode == "row" else 0, False, generator, seed_offset
    )


def _masked_add(
    input: Tensor,
    residual: Tensor,
    bias: Tensor | None,
    p: float,
    training: bool,
    mask_ndim: int,
    scale_by_keep: bool,
    generator: Generator,
    seed_offset: SeedOffset,
) -> Tensor:
    # Outside training the same kernel runs with p = 0: one pass, nothing drawn.
    return ops.dropout_add(
        input,
        residual,
        bias,
        p if training else 0.0,
        mask_ndim,
        scale_by_keep,
        generator=generator,
        seed_offset=seed_offset,
    )[0]


def drop_path_add(
    residual: Tensor,
    branch: Tensor,
    drop_prob: float,
    training: bool = True,
    scale_by_keep: bool = True,
    *,
    generator: Generator = None,
    seed_offset: SeedOffset = None,
) -> Tensor:
    """``residual + drop_path(branch)`` in one pass (the residual block of ViT/ConvNeXt/Swin)."""
    _check_p(drop_prob, "drop probability")
    if branch.dim() == 0:
        raise RuntimeError("drop_path_add: expected tensors with a batch dimension, got 0-D")
    return _masked_add(
        branch, residual, None, drop_prob, training, 1, scale_by_keep, generator, seed_offset
    )


def dropout_add(
    input: Tensor,
    residual: Tensor,
    p: float = 0.5,
    training: bool = True,
    *,
    generator: Generator = None,
    seed_offset: SeedOffset = None,
) -> Tensor:
    """``residual + dropout(input)`` in one pass."""
    _check_p(p)
    return _masked_add(input, residual, None, p, training, -1, True, generator, seed_offset)


def bias_dropout_add(
    input: Tensor,
    bias: Tensor,
    residual: Tensor,
    p: float,
    training: bool = True,
    *,
    generator: Generator = None,
    seed_offset: SeedOffset = None,
) -> Tensor:
    """``residual + dropout(input + bias)`` in one pass (Megatron's), bias over the last dim."""
    _check_p(p)
    return _masked_add(input, residual, bias, p, training, -1, True, generator, seed_offset)
