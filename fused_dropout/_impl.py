"""The bodies of the functionals, written so that TorchScript compiles them.

``functional`` (the Python API: keyword-only ``generator=``/``seed_offset=``, which TorchScript
cannot take) and the modules' ``forward`` (which ``torch.jit.script`` compiles) both call these,
so each rule (p's range, torch's rank rules and warnings, eval identity) lives here once.
Arguments are positional; ``seed``/``offset`` are the ops' signed int64 pair (both None: draw
from ``generator`` or the default generator). Warnings use ``stacklevel=3``: they point at the
caller of the public function.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from . import distributed as _distributed


def check_p(p: float, what: str = "dropout probability") -> None:
    if not 0.0 <= p <= 1.0:  # also rejects NaN
        raise ValueError(f"{what} has to be between 0 and 1, but got {p}")


def masked(
    input: Tensor,
    p: float,
    training: bool,
    inplace: bool,
    mask_ndim: int,
    alpha: bool,
    scale_by_keep: bool = True,
    seed: int | None = None,
    offset: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``input`` masked over its leading ``mask_ndim`` dims (-1: element-wise); inside
    ``distributed.batch_sharded`` (not under TorchScript), by its global batch positions."""
    if not training or p == 0.0 or input.numel() == 0:
        return input
    global_shape: list[int] | None = None
    global_offset: list[int] | None = None
    if not torch.jit.is_scripting():
        global_shape, global_offset = _distributed.current_box(input)
    if inplace:
        torch.ops.fused_dropout.dropout_(
            input,
            p,
            mask_ndim,
            scale_by_keep,
            alpha,
            seed,
            offset,
            generator,
            global_shape,
            global_offset,
        )
        return input
    return torch.ops.fused_dropout.dropout(
        input,
        p,
        mask_ndim,
        scale_by_keep,
        alpha,
        seed,
        offset,
        generator,
        global_shape,
        global_offset,
    )[0]


def feature_masked(
    input: Tensor,
    p: float,
    training: bool,
    inplace: bool,
    alpha: bool,
    seed: int | None = None,
    offset: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """torch's feature dropout: one decision per (sample, channel), dims 0 and 1."""
    if input.dim() < 2 and training and 0.0 < p < 1.0 and input.numel() > 0:
        raise RuntimeError("Feature dropout requires at least 2 dimensions in the input")
    # p == 1 zeros everything whatever the rank, as torch does.
    mask_ndim = 2 if input.dim() >= 2 else -1
    return masked(input, p, training, inplace, mask_ndim, alpha, True, seed, offset, generator)


def unbatched_feature_masked(
    input: Tensor,
    p: float,
    training: bool,
    inplace: bool,
    seed: int | None = None,
    offset: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Feature dropout of an input without batch dim: one of 1 added, as torch does."""
    input = input.unsqueeze_(0) if inplace else input.unsqueeze(0)
    result = feature_masked(input, p, training, inplace, False, seed, offset, generator)
    return result.squeeze_(0) if inplace else result.squeeze(0)


def warn_rank(name: str, rank: int, spatial: int, ranks: str) -> None:
    warnings.warn(
        f"{name}: Received a {rank}-D input to {name}, which is deprecated "
        "and will result in an error in a future release. To retain the behavior "
        f"and silence this warning, please use dropout instead. Note that {name} "
        f"exists to provide channel-wise dropout on inputs with {spatial} spatial dimensions, "
        f"a channel dimension, and an optional batch dimension (i.e. {ranks} inputs).",
        stacklevel=4,
    )


def dropout(
    input: Tensor,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    seed: int | None = None,
    offset: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    check_p(p)
    return masked(input, p, training, inplace, -1, False, True, seed, offset, generator)


def alpha_dropout(
    input: Tensor,
    p: float = 0.5,
    training: bool = False,
    inplace: bool = False,
    seed: int | None = None,
    offset: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    check_p(p)
    return masked(input, p, training, inplace, -1, True, True, seed, offset, generator)


def dropout1d(
    input: Tensor,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    seed: int | None = None,
    offset: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    check_p(p)
    rank = input.dim()
    if rank not in (2, 3):
        raise RuntimeError(
            f"dropout1d: Expected 2D or 3D input, but received a {rank}D input. "
            "Note that dropout1d exists to provide channel-wise dropout on inputs with 1 "
            "spatial dimension, a channel dimension, and an optional batch dimension "
            "(i.e. 2D or 3D inputs)."
        )
    if rank == 3:
        return feature_masked(input, p, training, inplace, False, seed, offset, generator)
    return unbatched_feature_masked(input, p, training, inplace, seed, offset, generator)


def dropout2d(
    input: Tensor,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    seed: int | None = None,
    offset: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    check_p(p)
    rank = input.dim()
    if rank not in (3, 4):
        warn_rank("dropout2d", rank, 2, "3D or 4D")
    if rank == 3:
        warnings.warn(
            "dropout2d: Received a 3D input to dropout2d and assuming that channel-wise "
            "1D dropout behavior is desired - input is interpreted as shape (N, C, L), where C "
            "is the channel dim. This behavior will change in a future release to interpret the "
            "input as one without a batch dimension, i.e. shape (C, H, W). To maintain the 1D "
            "channel-wise dropout behavior, please switch to using dropout1d instead.",
            stacklevel=3,
        )
    return feature_masked(input, p, training, inplace, False, seed, offset, generator)


def dropout3d(
    input: Tensor,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    seed: int | None = None,
    offset: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    check_p(p)
    rank = input.dim()
    if rank not in (4, 5):
        warn_rank("dropout3d", rank, 3, "4D or 5D")
    if rank == 5:
        return feature_masked(input, p, training, inplace, False, seed, offset, generator)
    return unbatched_feature_masked(input, p, training, inplace, seed, offset, generator)


def feature_alpha_dropout(
    input: Tensor,
    p: float = 0.5,
    training: bool = False,
    inplace: bool = False,
    seed: int | None = None,
    offset: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    check_p(p)
    return feature_masked(input, p, training, inplace, True, seed, offset, generator)


def drop_path(
    input: Tensor,
    drop_prob: float = 0.0,
    training: bool = False,
    scale_by_keep: bool = True,
    seed: int | None = None,
    offset: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    check_p(drop_prob, "drop probability")
    if input.dim() == 0:
        raise RuntimeError("drop_path: expected an input with a batch dimension, got a 0-D tensor")
    return masked(
        input, drop_prob, training, False, 1, False, scale_by_keep, seed, offset, generator
    )


def stochastic_depth(
    input: Tensor,
    p: float,
    mode: str,
    training: bool = True,
    seed: int | None = None,
    offset: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    check_p(p, "drop probability")
    if mode not in ["batch", "row"]:
        raise ValueError(f"mode has to be either 'batch' or 'row', but got {mode}")
    mask_ndim = 1 if mode == "row" else 0
    return masked(input, p, training, False, mask_ndim, False, True, seed, offset, generator)


def masked_add(
    input: Tensor,
    residual: Tensor,
    bias: Tensor | None,
    p: float,
    training: bool,
    mask_ndim: int,
    scale_by_keep: bool = True,
    seed: int | None = None,
    offset: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``residual + dropout(input + bias)``; outside training the same kernel with p = 0.
    Inside ``distributed.batch_sharded`` (not under TorchScript): by global batch positions."""
    global_shape: list[int] | None = None
    global_offset: list[int] | None = None
    if not torch.jit.is_scripting():
        global_shape, global_offset = _distributed.current_box(input)
    return torch.ops.fused_dropout.dropout_add(
        input,
        residual,
        bias,
        p if training else 0.0,
        mask_ndim,
        scale_by_keep,
        seed,
        offset,
        generator,
        global_shape,
        global_offset,
    )[0]


def drop_path_add(
    residual: Tensor,
    branch: Tensor,
    drop_prob: float,
    training: bool = True,
    scale_by_keep: bool = True,
    seed: int | None = None,
    offset: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    check_p(drop_prob, "drop probability")
    if branch.dim() == 0:
        raise RuntimeError("drop_path_add: expected tensors with a batch dimension, got 0-D")
    return masked_add(
        branch, residual, None, drop_prob, training, 1, scale_by_keep, seed, offset, generator
    )


def dropout_add(
    input: Tensor,
    residual: Tensor,
    bias: Tensor | None,
    p: float = 0.5,
    training: bool = True,
    seed: int | None = None,
    offset: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``residual + dropout(input + bias)`` (bias None: ``residual + dropout(input)``)."""
    check_p(p)
    return masked_add(input, residual, bias, p, training, -1, True, seed, offset, generator)


def dtype_eps(dtype: torch.dtype) -> float:
    """``torch.finfo(dtype).eps`` of a floating dtype, which TorchScript cannot call."""
    if dtype == torch.float64:
        return 2.220446049250313e-16
    if dtype == torch.float16:
        return 0.0009765625
    if dtype == torch.bfloat16:
        return 0.0078125
    return 1.1920928955078125e-07


def dropout_add_norm(
    input: Tensor,
    residual: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    input_bias: Tensor | None,
    p: float,
    training: bool,
    eps: float | None,
    rms: bool,
    per_sample: bool,
    prenorm: bool,
    residual_in_fp32: bool,
    memory_efficient: bool = False,
    seed: int | None = None,
    offset: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """``(y, h)``: ``h = residual + dropout(input + input_bias)`` and ``y`` its LayerNorm
    (``rms``: RMSNorm) over the last dim, times ``weight``, plus ``bias``. ``h`` is meaningful
    only with ``prenorm`` (else the op may leave it unwritten). ``memory_efficient``: backward
    keeps ``y`` instead of ``h`` (``weight`` must have no zeros)."""
    check_p(p)
    if eps is None:  # torch's RMSNorm: the eps of the normalized tensor's dtype (h's)
        wide = residual_in_fp32 and input.dtype in (torch.float16, torch.bfloat16)
        eps = dtype_eps(torch.float32 if wide else input.dtype)
    y, h, _, _, _ = torch.ops.fused_dropout.dropout_add_norm(
        input,
        residual,
        weight,
        bias,
        input_bias,
        p if training else 0.0,
        eps,
        rms,
        per_sample,
        residual_in_fp32,
        prenorm,
        memory_efficient,
        seed,
        offset,
        generator,
    )
    return y, h
