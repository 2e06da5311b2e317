"""Drop-in replacements for the functional dropout family of torch, timm and torchvision.

Each function has the signature of the one it replaces plus two keywords:
``generator=`` (a ``torch.Generator`` to draw the seed from) and
``seed_offset=(seed, offset)`` (use exactly this pair; see the RNG contract).
Dropped elements are exactly 0 (or alpha dropout's constant), even where the
input is NaN or Inf: torch's CPU path multiplies, so NaN * 0 stays NaN there.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fused_dropout import _impl, ops

__all__ = [
    "alpha_dropout",
    "bias_dropout_add",
    "drop_path",
    "drop_path_add",
    "drop_path_residual",
    "dropout",
    "dropout1d",
    "dropout2d",
    "dropout3d",
    "dropout_add",
    "dropout_add_layer_norm",
    "dropout_add_rms_norm",
    "feature_alpha_dropout",
    "stochastic_depth",
]

Generator = Optional[torch.Generator]
SeedOffset = Optional[tuple[int, int]]


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
    seed, offset = ops.split_seed_offset(seed_offset)
    return _impl.dropout(input, p, training, inplace, seed, offset, generator)


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
    seed, offset = ops.split_seed_offset(seed_offset)
    return _impl.alpha_dropout(input, p, training, inplace, seed, offset, generator)


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
    seed, offset = ops.split_seed_offset(seed_offset)
    return _impl.dropout1d(input, p, training, inplace, seed, offset, generator)


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
    seed, offset = ops.split_seed_offset(seed_offset)
    return _impl.dropout2d(input, p, training, inplace, seed, offset, generator)


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
    seed, offset = ops.split_seed_offset(seed_offset)
    return _impl.dropout3d(input, p, training, inplace, seed, offset, generator)


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
    seed, offset = ops.split_seed_offset(seed_offset)
    return _impl.feature_alpha_dropout(input, p, training, inplace, seed, offset, generator)


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
    seed, offset = ops.split_seed_offset(seed_offset)
    return _impl.drop_path(input, drop_prob, training, scale_by_keep, seed, offset, generator)


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
    seed, offset = ops.split_seed_offset(seed_offset)
    return _impl.stochastic_depth(input, p, mode, training, seed, offset, generator)


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
    seed, offset = ops.split_seed_offset(seed_offset)
    return _impl.drop_path_add(
        residual, branch, drop_prob, training, scale_by_keep, seed, offset, generator
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
    seed, offset = ops.split_seed_offset(seed_offset)
    return _impl.dropout_add(input, residual, None, p, training, seed, offset, generator)


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
    seed, offset = ops.split_seed_offset(seed_offset)
    return _impl.dropout_add(input, residual, bias, p, training, seed, offset, generator)


def dropout_add_layer_norm(
    input: Tensor,
    residual: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    p: float,
    training: bool = True,
    eps: float = 1e-5,
    *,
    input_bias: Tensor | None = None,
    per_sample: bool = False,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
    memory_efficient: bool = False,
    generator: Generator = None,
    seed_offset: SeedOffset = None,
):
    """``layer_norm(h) * weight + bias`` of ``h = residual + dropout(input + input_bias)``
    (``drop_path``'s per-sample mask with ``per_sample``) in one pass; ``(y, h)`` with
    ``prenorm``. ``h`` is bitwise our ``dropout_add``; ``residual_in_fp32`` keeps it in fp32;
    ``memory_efficient`` saves ``y``, not ``h``, for backward (``weight`` without zeros)."""
    seed, offset = ops.split_seed_offset(seed_offset)
    y, h = _impl.dropout_add_norm(
        input,
        residual,
        weight,
        bias,
        input_bias,
        p,
        training,
        eps,
        False,
        per_sample,
        prenorm,
        residual_in_fp32,
        memory_efficient,
        seed,
        offset,
        generator,
    )
    return (y, h) if prenorm else y


def dropout_add_rms_norm(
    input: Tensor,
    residual: Tensor | None,
    weight: Tensor | None,
    p: float,
    training: bool = True,
    eps: float | None = None,
    *,
    input_bias: Tensor | None = None,
    per_sample: bool = False,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
    memory_efficient: bool = False,
    generator: Generator = None,
    seed_offset: SeedOffset = None,
):
    """``rms_norm(h) * weight`` of ``h = residual + dropout(input + input_bias)`` in one pass,
    as :func:`dropout_add_layer_norm`; ``eps=None`` is ``torch.finfo(h.dtype).eps``."""
    seed, offset = ops.split_seed_offset(seed_offset)
    y, h = _impl.dropout_add_norm(
        input,
        residual,
        weight,
        None,
        input_bias,
        p,
        training,
        eps,
        True,
        per_sample,
        prenorm,
        residual_in_fp32,
        memory_efficient,
        seed,
        offset,
        generator,
    )
    return (y, h) if prenorm else y


# FX: calls made through this module (``fused_dropout.functional.dropout(x)``) stay one graph
# node instead of being traced into (their data-dependent checks cannot be traced). Functions
# taking a callable (drop_path_residual) cannot be graph nodes and are skipped.
for _name in __all__:
    if _name != "drop_path_residual":
        torch.fx.wrap(_name)
del _name


# Lives with its sample-skipping machinery (which uses this module), so it is imported last.
from fused_dropout.skip import drop_path_residual  # noqa: E402
