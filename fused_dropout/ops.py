"""Typed wrappers of the registered ops (``torch.ops.fused_dropout``) and their fake kernels.

Every op returns the ``(seed, offset)`` pair it used as an int64[2] tensor on the input's
device; backward regenerates the mask from that pair alone.
"""

from __future__ import annotations

import math
import operator

import torch
from torch import Tensor

__all__ = [
    "cpu_capabilities",
    "cpu_capability",
    "cpu_capability_missing",
    "dropout",
    "dropout_",
    "dropout_add",
    "dropout_add_norm",
    "dropout_add_norm_backward",
    "dropout_backward",
    "mask_box",
    "set_cpu_capability",
    "split_seed_offset",
]

_UINT64 = 1 << 64


def split_seed_offset(seed_offset: tuple[int, int] | None) -> tuple[int | None, int | None]:
    """Validate ``seed_offset=(seed, offset)`` and return it as the ops' signed int64 pair."""
    if seed_offset is None:
        return None, None
    try:
        seed, offset = (operator.index(v) for v in seed_offset)
    except (TypeError, ValueError):
        raise TypeError(
            f"seed_offset must be a pair of integers (seed, offset), got {seed_offset!r}"
        ) from None
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
    global_shape: list[int] | None = None,
    global_offset: list[int] | None = None,
) -> tuple[Tensor, Tensor]:
    """Masked copy of ``input`` (mask over its leading ``mask_ndim`` dims) and the pair used.

    ``global_shape``/``global_offset``: ``input`` is the slice ``[global_offset, global_offset +
    input.shape)`` of a logical tensor of ``global_shape`` (a shard, a data-parallel rank's
    rows), and gets that tensor's mask at its global positions (see :func:`mask_box`)."""
    seed, offset = split_seed_offset(seed_offset)
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
    global_shape: list[int] | None = None,
    global_offset: list[int] | None = None,
) -> Tensor:
    """Mask ``input`` in place and return the pair used."""
    seed, offset = split_seed_offset(seed_offset)
    return torch.ops.fused_dropout.dropout_(
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


def dropout_backward(
    grad: Tensor,
    seed_offset: Tensor,
    p: float,
    mask_ndim: int = -1,
    scale_by_keep: bool = True,
    alpha: bool = False,
    *,
    global_shape: list[int] | None = None,
    global_offset: list[int] | None = None,
) -> Tensor:
    """Gradient of :func:`dropout`'s output, the mask regenerated from ``seed_offset``."""
    return torch.ops.fused_dropout.dropout_backward(
        grad, seed_offset, p, mask_ndim, scale_by_keep, alpha, global_shape, global_offset
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
    global_shape: list[int] | None = None,
    global_offset: list[int] | None = None,
) -> tuple[Tensor, Tensor]:
    """``residual + dropout(input + bias)`` in one pass, and the pair used."""
    seed, offset = split_seed_offset(seed_offset)
    return torch.ops.fused_dropout.dropout_add(
        input,
        residual,
        bias,
        p,
        mask_ndim,
        scale_by_keep,
        seed,
        offset,
        generator,
        global_shape,
        global_offset,
    )


def dropout_add_norm(
    input: Tensor,
    residual: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    input_bias: Tensor | None,
    p: float,
    eps: float,
    rms: bool = False,
    per_sample: bool = False,
    residual_in_fp32: bool = False,
    keep_h: bool = True,
    memory_efficient: bool = False,
    *,
    generator: torch.Generator | None = None,
    seed_offset: tuple[int, int] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(y, h, mean, rstd, pair)`` of ``norm(residual + dropout(input + input_bias))``."""
    seed, offset = split_seed_offset(seed_offset)
    return torch.ops.fused_dropout.dropout_add_norm(
        input,
        residual,
        weight,
        bias,
        input_bias,
        p,
        eps,
        rms,
        per_sample,
        residual_in_fp32,
        keep_h,
        memory_efficient,
        seed,
        offset,
        generator,
    )


def dropout_add_norm_backward(
    grad_y: Tensor,
    grad_h: Tensor | None,
    saved: Tensor,
    saved_is_y: bool,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    seed_offset: Tensor,
    p: float,
    rms: bool = False,
    per_sample: bool = False,
    residual_in_fp32: bool = False,
    want_grad_h: bool = True,
    want_grad_weight: bool = True,
    want_grad_bias: bool = True,
    want_grad_input_bias: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`dropout_add_norm` from h or y: input, h, and the column sums."""
    return torch.ops.fused_dropout.dropout_add_norm_backward(
        grad_y,
        grad_h,
        saved,
        saved_is_y,
        weight,
        bias,
        mean,
        rstd,
        seed_offset,
        p,
        rms,
        per_sample,
        residual_in_fp32,
        want_grad_h,
        want_grad_weight,
        want_grad_bias,
        want_grad_input_bias,
    )


def cpu_capability() -> str:
    """The CPU path the kernels run: ``"default"``, ``"avx2"``, ``"avx512"`` or ``"avx512bf16"``."""
    return torch.ops.fused_dropout.cpu_capability()


def cpu_capabilities() -> list[str]:
    """The CPU paths built into the loaded library, lowest first."""
    return list(torch.ops.fused_dropout.cpu_capabilities())


def cpu_capability_missing(capability: str) -> list[str]:
    """The ISA extensions this CPU lacks for ``capability`` (empty: it can run that path)."""
    return list(torch.ops.fused_dropout.cpu_capability_missing(capability))


def set_cpu_capability(capability: str) -> str:
    """Run the CPU path ``capability`` from now on in this process; returns the previous one."""
    return torch.ops.fused_dropout.set_cpu_capability(capability)


def _fake_pair(t: Tensor) -> Tensor:
    return t.new_empty((2,), dtype=torch.int64)


_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check_like_kernel(input, p, mask_ndim, seed, offset, op):
    """csrc/ops/checks.cpp's check_op, so that fake and meta tensors fail as real ones do:
    same exception types, same messages."""
    where = f"fused_dropout.{op}"
    torch._check_value(
        0.0 <= p <= 1.0, lambda: f"dropout probability has to be between 0 and 1, but got {p}"
    )
    expected = "expected a floating-point tensor (float32, float64, float16 or bfloat16)"
    torch._check_not_implemented(
        not input.dtype.is_complex, lambda: f"{where}: {expected}, but got {input.dtype}"
    )
    torch._check(input.dtype in _FLOATS, lambda: f"{where}: {expected}, but got {input.dtype}")
    torch._check_value(
        (seed is None) == (offset is None),
        lambda: f"{where}: seed and offset must be given together",
    )
    torch._check_value(
        offset is None or (offset >= 0 and offset % 4 == 0),
        lambda: f"{where}: offset must be a non-negative multiple of 4, got {offset}",
    )
    torch._check(
        -1 <= mask_ndim <= input.dim(),
        lambda: (
            f"{where}: mask_ndim must be -1 (element-wise) or in [0, {input.dim()}], "
            f"got {mask_ndim}"
        ),
    )


def mask_box(
    shape: list[int], mask_ndim: int, global_shape: list[int], global_offset: list[int]
) -> tuple[bool, int, int, int]:
    """The mask indexing of a tensor of ``shape`` at ``global_offset`` in one of
    ``global_shape``, mask over its leading ``mask_ndim`` dims (-1: all): ``(boxed, base, seg,
    seg_stride)``, local mask index ``q`` -> global ``base + (q // seg) * seg_stride + q % seg``
    (boxed False: ``q`` itself). csrc/ops/checks.cpp's check_box, with its errors."""
    ndim = len(shape)
    k = ndim if mask_ndim == -1 else mask_ndim
    return _box(list(shape), k, list(global_shape), list(global_offset), "mask_box")


def _box(local, k, shape, start, op):
    where = f"fused_dropout.{op}"
    ndim = len(local)
    torch._check_value(
        len(shape) == ndim and len(start) == ndim,
        lambda: (
            f"{where}: global_shape and global_offset must have one entry per dim of the input "
            f"({ndim}), got {shape} and {start}"
        ),
    )
    for d in range(ndim):
        torch._check_value(
            start[d] >= 0 and shape[d] >= 0 and start[d] + local[d] <= shape[d],
            lambda d=d: (
                f"{where}: the input (shape {local}) at global_offset {start} is not inside "
                f"global_shape {shape} (dim {d})"
            ),
        )
    if math.prod(local) == 0:
        return False, 0, 1, 1
    stride, s = [0] * k, 1
    for d in range(k - 1, -1, -1):
        stride[d], s = s, s * shape[d]
    base, dims = 0, []  # (local size, global stride), inner first, merged
    for d in range(k - 1, -1, -1):
        base += start[d] * stride[d]
        if local[d] == 1:
            continue
        if dims and stride[d] == dims[-1][0] * dims[-1][1]:
            dims[-1][0] *= local[d]
        else:
            dims.append([local[d], stride[d]])
    if not dims:
        seg, seg_stride = 1, 0
    elif len(dims) == 1:
        seg, seg_stride = (dims[0][0],) * 2 if dims[0][1] == 1 else (1, dims[0][1])
    else:
        torch._check_not_implemented(
            len(dims) == 2 and dims[0][1] == 1,
            lambda: (
                f"{where}: the box of shape {local} at {start} in {shape} is sharded along more "
                f"than one dim of the mask (over the leading {k} dims); only one sharded mask "
                "dim (and dims of local size 1) is supported"
            ),
        )
        seg, seg_stride = dims[0][0], dims[1][1]
    return not (base == 0 and seg_stride == seg), base, seg, seg_stride


def _check_box_fake(input, mask_ndim, global_shape, global_offset, op):
    torch._check_value(
        (global_shape is None) == (global_offset is None),
        lambda: f"fused_dropout.{op}: global_shape and global_offset must be given together",
    )
    if global_shape is not None and -1 <= mask_ndim <= input.dim():
        k = input.dim() if mask_ndim == -1 else mask_ndim
        _box(list(input.shape), k, list(global_shape), list(global_offset), op)


@torch.library.register_fake("fused_dropout::dropout")
def _dropout_fake(
    input,
    p,
    mask_ndim,
    scale_by_keep,
    alpha,
    seed,
    offset,
    generator,
    global_shape=None,
    global_offset=None,
):
    _check_like_kernel(input, p, mask_ndim, seed, offset, "dropout")
    _check_box_fake(input, mask_ndim, global_shape, global_offset, "dropout")
    return torch.empty_like(input), _fake_pair(input)


@torch.library.register_fake("fused_dropout::dropout_")
def _dropout_inplace_fake(
    input,
    p,
    mask_ndim,
    scale_by_keep,
    alpha,
    seed,
    offset,
    generator,
    global_shape=None,
    global_offset=None,
):
    _check_like_kernel(input, p, mask_ndim, seed, offset, "dropout_")
    _check_box_fake(input, mask_ndim, global_shape, global_offset, "dropout_")
    return _fake_pair(input)


@torch.library.register_fake("fused_dropout::dropout_backward")
def _dropout_backward_fake(
    grad, seed_offset, p, mask_ndim, scale_by_keep, alpha, global_shape=None, global_offset=None
):
    _check_like_kernel(grad, p, mask_ndim, None, None, "dropout_backward")
    _check_box_fake(grad, mask_ndim, global_shape, global_offset, "dropout_backward")
    return torch.empty_like(grad)


@torch.library.register_fake("fused_dropout::dropout_add")
def _dropout_add_fake(
    input,
    residual,
    bias,
    p,
    mask_ndim,
    scale_by_keep,
    seed,
    offset,
    generator,
    global_shape=None,
    global_offset=None,
):
    _check_like_kernel(input, p, mask_ndim, seed, offset, "dropout_add")
    _check_box_fake(input, mask_ndim, global_shape, global_offset, "dropout_add")
    where = "fused_dropout.dropout_add"

    def same_device_and_dtype(name, t):
        torch._check(
            t.device == input.device,
            lambda: f"{where}: {name} is on {t.device} but input is on {input.device}",
        )
        torch._check_type(
            t.dtype == input.dtype,
            lambda: f"{where}: {name} has dtype {t.dtype} but input has dtype {input.dtype}",
        )

    same_device_and_dtype("residual", residual)
    torch._check(
        residual.shape == input.shape,
        lambda: (
            f"{where}: residual has shape {list(residual.shape)} but input has shape "
            f"{list(input.shape)}"
        ),
    )
    if bias is not None:
        torch._check(
            bias.dim() == 1 and input.dim() >= 1 and bias.shape[0] == input.shape[-1],
            lambda: (
                f"{where}: bias must be 1-D with input.size(-1) elements, got shape "
                f"{list(bias.shape)}"
            ),
        )
        same_device_and_dtype("bias", bias)
    return torch.empty_like(input), _fake_pair(input)


def _wide_h(input: Tensor, residual_in_fp32: bool) -> bool:
    return residual_in_fp32 and input.dtype in (torch.float16, torch.bfloat16)


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _check_row_vector(input, v, name, fp32_ok, where):
    """csrc/ops/checks.cpp's check_row_vector."""
    torch._check(
        v.dim() == 1 and input.dim() >= 1 and v.shape[0] == input.shape[-1],
        lambda: (
            f"{where}: {name} must be 1-D with input.size(-1) = {input.shape[-1]} elements, "
            f"got shape {list(v.shape)}"
        ),
    )
    torch._check(
        v.device == input.device,
        lambda: f"{where}: {name} is on {v.device} but input is on {input.device}",
    )
    extra = " (it may be float32 or the input's dtype)" if fp32_ok else ""
    torch._check_type(
        v.dtype == input.dtype or (fp32_ok and v.dtype == torch.float32),
        lambda: f"{where}: {name} has dtype {v.dtype} but input has dtype {input.dtype}{extra}",
    )


@torch.library.register_fake("fused_dropout::dropout_add_norm")
def _dropout_add_norm_fake(
    input,
    residual,
    weight,
    bias,
    input_bias,
    p,
    eps,
    rms,
    per_sample,
    residual_in_fp32,
    keep_h,
    memory_efficient,
    seed,
    offset,
    generator,
):
    _check_like_kernel(input, p, -1, seed, offset, "dropout_add_norm")
    where = "fused_dropout.dropout_add_norm"
    torch._check(
        input.dim() >= 1,
        lambda: f"{where}: input must have at least one dimension (the normalized one)",
    )
    wide = _wide_h(input, residual_in_fp32)
    if residual is not None:
        torch._check(
            residual.device == input.device,
            lambda: f"{where}: residual is on {residual.device} but input is on {input.device}",
        )
        extra = " (with residual_in_fp32 it may also be float32)" if residual_in_fp32 else ""
        torch._check_type(
            residual.dtype == input.dtype or (residual_in_fp32 and residual.dtype == torch.float32),
            lambda: (
                f"{where}: residual has dtype {residual.dtype} but input has dtype "
                f"{input.dtype}{extra}"
            ),
        )
        torch._check(
            residual.shape == input.shape,
            lambda: (
                f"{where}: residual has shape {list(residual.shape)} but input has shape "
                f"{list(input.shape)}"
            ),
        )
    if weight is not None:
        _check_row_vector(input, weight, "weight", True, where)
    if bias is not None:
        _check_row_vector(input, bias, "bias", True, where)
        torch._check_type(
            weight is None or bias.dtype == weight.dtype,
            lambda: f"{where}: bias has dtype {bias.dtype} but weight has dtype {weight.dtype}",
        )
    if input_bias is not None:
        _check_row_vector(input, input_bias, "input_bias", False, where)
    rows = input.numel() // input.shape[-1] if input.shape[-1] else math.prod(input.shape[:-1])
    acc = _compute_dtype(input)
    h_dtype = torch.float32 if wide else input.dtype
    h = input.new_empty(input.shape if keep_h else (0,), dtype=h_dtype)
    mean = input.new_empty((0 if rms else rows,), dtype=acc)
    rstd = input.new_empty((rows,), dtype=acc)
    return (
        torch.empty_like(input, memory_format=torch.contiguous_format),
        h,
        mean,
        rstd,
        _fake_pair(input),
    )


@torch.library.register_fake("fused_dropout::dropout_add_norm_backward")
def _dropout_add_norm_backward_fake(
    grad_y,
    grad_h,
    saved,
    saved_is_y,
    weight,
    bias,
    mean,
    rstd,
    seed_offset,
    p,
    rms,
    per_sample,
    residual_in_fp32,
    want_grad_h,
    want_grad_weight,
    want_grad_bias,
    want_grad_input_bias,
):
    _check_like_kernel(grad_y, p, -1, None, None, "dropout_add_norm_backward")
    cols = grad_y.shape[-1]
    acc = _compute_dtype(grad_y)

    def column(want):
        return grad_y.new_empty((cols if want else 0,), dtype=acc)

    return (
        torch.empty_like(grad_y, memory_format=torch.contiguous_format),
        grad_y.new_empty(
            grad_y.shape if want_grad_h else (0,),
            dtype=torch.float32 if _wide_h(grad_y, residual_in_fp32) else grad_y.dtype,
        ),
        column(want_grad_weight),
        column(want_grad_bias),
        column(want_grad_input_bias),
    )
