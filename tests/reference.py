"""Independent reference implementation of the fused_dropout RNG and numerics contract.

Written from DESIGN.md (sections 2 and 3) and the kernel arithmetic of the working
plan alone; it shares no code with the extension. Everything here is plain numpy
(Philox, the mask) and plain PyTorch elementwise ops on CPU (the arithmetic), so
it is slow but obviously correct.

Contract summary (DESIGN.md s.2, version 2):
  * the 16-bit number of mask element ``m``: ``u(m)`` = half ``m % 2`` (0 = low 16
    bits) of word ``(m // 2) % 4`` of
    ``philox4x32_10(key=(seed_lo, seed_hi), ctr=(o_lo, o_hi, g_lo, g_hi))``
    with ``o = offset // 4`` and ``g = m // 8`` (one call per 8 elements);
  * ``T = min(floor((1 - p) * 2**32), 2**32 - 1)``, ``Th = T >> 16``, ``Tl = T & 0xFFFF``;
    keep ``m`` iff ``u(m) < Th``, or ``u(m) == Th`` and ``v(m) < Tl``, where ``v(m)`` is
    taken like ``u(m)`` from the counter ``(o_lo, o_hi | 0x80000000, g_lo, g_hi)``;
    ``p == 0`` keeps all; so P(keep) = T / 2**32 exactly;
  * kept: ``x * scale`` with ``scale = 1 / (1 - p)`` rounded to the compute type
    (fp32 for fp16/bf16/fp32, fp64 for fp64); dropped: exactly ``+0`` (select).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

__all__ = [
    "ALPHA",
    "MASK32",
    "MASK64",
    "compute_dtype",
    "keep_at",
    "keep_mask",
    "mask_numbers",
    "philox4x32_10",
    "ref_dropout",
    "ref_dropout_add",
    "ref_dropout_at",
    "ref_dropout_backward",
    "ref_norm",
    "ref_norm_backward",
    "row_sum",
    "seed_to_int64",
    "seed_to_uint64",
    "threshold",
]

MASK32 = 0xFFFFFFFF
MASK64 = 0xFFFFFFFFFFFFFFFF

# Philox4x32 constants (Salmon et al., Random123; identical in cuRAND).
_PHILOX_M0 = np.uint64(0xD2511F53)
_PHILOX_M1 = np.uint64(0xCD9E8D57)
_PHILOX_W0 = np.uint64(0x9E3779B9)
_PHILOX_W1 = np.uint64(0xBB67AE85)
_LO = np.uint64(MASK32)
_SHIFT = np.uint64(32)

# torch's alpha_dropout constant (SELU alpha * scale).
ALPHA = 1.7580993408473766


def philox4x32_10(ctr, key):
    """Philox4x32-10, vectorised over counters.

    ``ctr``: array-like of shape ``(..., 4)`` (uint32 words c0..c3), or a tuple of
    four broadcastable arrays. ``key``: pair ``(k0, k1)`` of ints or broadcastable
    arrays. Returns a uint32 array of shape ``(..., 4)``.

    Arithmetic is done in numpy uint64 so that the 32x32->64 products are exact.
    """
    if isinstance(ctr, tuple):
        c = [np.asarray(w, dtype=np.uint64) & _LO for w in ctr]
    else:
        a = np.asarray(ctr, dtype=np.uint64)
        c = [a[..., j] & _LO for j in range(4)]
    c0, c1, c2, c3 = np.broadcast_arrays(*c)
    c0, c1, c2, c3 = (w.copy() for w in (c0, c1, c2, c3))
    k0 = np.asarray(key[0], dtype=np.uint64) & _LO
    k1 = np.asarray(key[1], dtype=np.uint64) & _LO
    for rnd in range(10):
        if rnd:
            k0 = (k0 + _PHILOX_W0) & _LO
            k1 = (k1 + _PHILOX_W1) & _LO
        p0 = _PHILOX_M0 * c0  # exact: both factors < 2**32
        p1 = _PHILOX_M1 * c2
        hi0, lo0 = p0 >> _SHIFT, p0 & _LO
        hi1, lo1 = p1 >> _SHIFT, p1 & _LO
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return np.stack([c0, c1, c2, c3], axis=-1).astype(np.uint32)


def seed_to_uint64(seed: int) -> int:
    """Accept a seed as uint64 value or as int64 two's-complement bits."""
    seed = int(seed)
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"seed {seed} does not fit in 64 bits")
    return seed & MASK64


def seed_to_int64(seed: int) -> int:
    """The int64 (two's-complement) spelling of a uint64 seed, as the ops take it."""
    s = seed_to_uint64(seed)
    return s - 2**64 if s >= 2**63 else s


def _check_offset(offset: int) -> int:
    offset = int(offset)
    if offset < 0 or offset % 4 != 0 or offset >= 2**64:
        raise ValueError(f"offset must be a non-negative multiple of 4, got {offset}")
    return offset


def mask_numbers(seed: int, offset: int, n: int, tie: bool = False) -> np.ndarray:
    """The uint16 numbers ``u(0..n-1)`` (``tie=True``: ``v(0..n-1)``) of the contract."""
    return _numbers_cached(seed_to_uint64(seed), _check_offset(offset), int(n), bool(tie)).copy()


@functools.lru_cache(maxsize=4)
def _numbers_cached(s: int, offset: int, n: int, tie: bool) -> np.ndarray:
    # small cache: a test computes the same mask for forward and backward
    o = offset // 4
    if n <= 0:
        return np.zeros((0,), dtype=np.uint16)
    ngroups = (n + 7) // 8
    g = np.arange(ngroups, dtype=np.uint64)
    o_hi = (o >> 32) | (0x80000000 if tie else 0)
    ctr = (np.uint64(o & MASK32), np.uint64(o_hi), g & _LO, g >> _SHIFT)
    words = philox4x32_10(ctr, (s & MASK32, s >> 32))  # (ngroups, 4) uint32
    # element 8g + 2w + h is half h of word w: low half first
    halves = np.stack([words & 0xFFFF, words >> 16], axis=-1).astype(np.uint16)
    out = halves.reshape(-1)[:n]
    out.setflags(write=False)
    return out


def threshold(p: float) -> int:
    """``min(floor((1 - p) * 2**32), 2**32 - 1)`` computed in double, as an int."""
    keep = 1.0 - float(p)  # double, like the kernels
    return min(math.floor(keep * 4294967296.0), MASK32)


def _as_shape(mask_shape) -> tuple[int, ...]:
    if isinstance(mask_shape, int):
        return (mask_shape,)
    return tuple(int(d) for d in mask_shape)


def keep_mask(seed: int, offset: int, p: float, mask_shape) -> torch.Tensor:
    """Bool tensor of ``mask_shape``: True where the element is kept.

    ``p == 0`` keeps everything (and draws nothing), ``p == 1`` keeps nothing.
    """
    shape = _as_shape(mask_shape)
    n = math.prod(shape)
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if p == 0.0:
        return torch.ones(shape, dtype=torch.bool)
    keep = _keep_flat(seed_to_uint64(seed), _check_offset(offset), n, threshold(p))
    return torch.from_numpy(keep.reshape(shape).copy())


def keep_at(seed: int, offset: int, p: float, m) -> np.ndarray:
    """Keep flags of the mask elements at the indices ``m`` (any below 2**64): what
    ``keep_mask`` gives there, for masks too large to build (counter groups past 2**32)."""
    m = np.asarray(m, dtype=np.uint64)
    if float(p) == 0.0:
        return np.ones(m.shape, dtype=bool)
    s, o = seed_to_uint64(seed), _check_offset(offset) // 4
    g = m >> np.uint64(3)
    word = ((m >> np.uint64(1)) & np.uint64(3)).astype(np.int64)[..., None]
    shift = (m & np.uint64(1)) * np.uint64(16)

    def number(o_hi: int) -> np.ndarray:
        words = philox4x32_10(
            (np.uint64(o & MASK32), np.uint64(o_hi), g & _LO, g >> _SHIFT), (s & MASK32, s >> 32)
        ).astype(np.uint64)
        return (np.take_along_axis(words, word, -1)[..., 0] >> shift) & np.uint64(0xFFFF)

    t = threshold(p)
    u = number(o >> 32)
    v = number((o >> 32) | 0x80000000)
    return (u < t >> 16) | ((u == t >> 16) & (v < (t & 0xFFFF)))


def _keep_flat(s: int, offset: int, n: int, t: int) -> np.ndarray:
    th, tl = t >> 16, t & 0xFFFF
    u = _numbers_cached(s, offset, n, False).astype(np.int64)
    keep = u < th
    tied = np.flatnonzero(u == th)
    if tied.size:  # the tie draw, only where needed
        v = _numbers_cached(s, offset, n, True).astype(np.int64)
        keep[tied] = v[tied] < tl
    return keep


def ref_dropout_at(
    values: torch.Tensor, mask_index, p: float, seed: int, offset: int, scale_by_keep: bool = True
) -> torch.Tensor:
    """The reference dropout output of elements with input ``values`` whose mask elements are
    ``mask_index`` (the same arithmetic as :func:`ref_dropout`, at a few positions only)."""
    p = float(p)
    if p == 0.0:
        return values.clone()
    if p == 1.0:
        return torch.zeros_like(values)
    cdt = compute_dtype(values.dtype)
    keep = torch.from_numpy(keep_at(seed, offset, p, mask_index))
    kept = values.to(cdt) * _scale(p, scale_by_keep, cdt)
    return torch.where(keep, kept, torch.zeros((), dtype=cdt)).to(values.dtype)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype == torch.float64:
        return torch.float64
    if dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.float32
    raise TypeError(f"fused_dropout reference: unsupported dtype {dtype}")


def _mask_for(x: torch.Tensor, seed, offset, p, mask_ndim: int) -> torch.Tensor:
    """Keep mask of ``x`` with the leading ``mask_ndim`` dims, broadcastable to x."""
    nd = x.dim()
    m = nd if mask_ndim == -1 else int(mask_ndim)
    if not 0 <= m <= nd:
        raise ValueError(f"mask_ndim {mask_ndim} out of range for a {nd}-d tensor")
    mshape = tuple(x.shape[:m])
    mask = keep_mask(seed, offset, p, mshape)
    return mask.reshape(mshape + (1,) * (nd - m))


def _scale(p: float, scale_by_keep: bool, cdt: torch.dtype) -> torch.Tensor:
    keep = 1.0 - float(p)
    s = (1.0 / keep) if (scale_by_keep and keep > 0.0) else 1.0
    return torch.tensor(s, dtype=torch.float64).to(cdt)  # one rounding double -> compute


def _alpha_consts(p: float, cdt: torch.dtype):
    """(a, kept-bias, dropped-value) of torch's alpha_dropout, in double then rounded.

    Choice made here (the plan only says ``kept: x*a + A*a*p, dropped: A*a*(p-1)``):
    the three constants are computed in double and each rounded once to the compute
    type; the kept value is ``(x*a) + b`` as two separately rounded compute-type ops.
    """
    p = float(p)
    a = 1.0 / math.sqrt((ALPHA * ALPHA * p + 1.0) * (1.0 - p))
    b = ALPHA * a * p
    d = ALPHA * a * (p - 1.0)
    return tuple(torch.tensor(v, dtype=torch.float64).to(cdt) for v in (a, b, d))


def ref_dropout(
    x: torch.Tensor,
    p: float,
    seed: int,
    offset: int,
    mask_ndim: int = -1,
    scale_by_keep: bool = True,
    alpha: bool = False,
) -> torch.Tensor:
    """Reference forward. Output is contiguous (compare values, not strides)."""
    x = x.detach().cpu()
    p = float(p)
    cdt = compute_dtype(x.dtype)
    if p == 0.0:
        return x.clone()
    if p == 1.0:
        return torch.zeros(x.shape, dtype=x.dtype)
    mask = _mask_for(x, seed, offset, p, mask_ndim)
    xc = x.to(cdt)
    zero = torch.zeros((), dtype=cdt)
    if alpha:
        a, b, d = _alpha_consts(p, cdt)
        kept = (xc * a) + b
        y = torch.where(mask, kept, d)
    else:
        y = torch.where(mask, xc * _scale(p, scale_by_keep, cdt), zero)
    return y.to(x.dtype).contiguous()


def ref_dropout_backward(
    grad: torch.Tensor,
    p: float,
    seed: int,
    offset: int,
    mask_ndim: int = -1,
    scale_by_keep: bool = True,
    alpha: bool = False,
) -> torch.Tensor:
    """Gradient of :func:`ref_dropout` w.r.t. x: dropout of ``grad`` with the same pair."""
    g = grad.detach().cpu()
    p = float(p)
    cdt = compute_dtype(g.dtype)
    if p == 0.0:
        return g.clone()
    if p == 1.0:
        return torch.zeros(g.shape, dtype=g.dtype)
    mask = _mask_for(g, seed, offset, p, mask_ndim)
    gc = g.to(cdt)
    zero = torch.zeros((), dtype=cdt)
    if alpha:
        a, _, _ = _alpha_consts(p, cdt)
        y = torch.where(mask, gc * a, zero)
    else:
        y = torch.where(mask, gc * _scale(p, scale_by_keep, cdt), zero)
    return y.to(g.dtype).contiguous()


def ref_dropout_add(
    x: torch.Tensor,
    residual: torch.Tensor,
    bias: torch.Tensor | None,
    p: float,
    seed: int,
    offset: int,
    mask_ndim: int = -1,
    scale_by_keep: bool = True,
) -> torch.Tensor:
    """``residual + dropout(x + bias)`` computed in the compute type, rounded once.

    v = x (+ bias) in compute type; kept -> v*scale, dropped -> +0 (select);
    then + residual in compute type (separate ops, no FMA); one rounding to x.dtype.
    The mask has the shape of ``x``'s leading ``mask_ndim`` dims.
    """
    x = x.detach().cpu()
    r = residual.detach().cpu()
    p = float(p)
    cdt = compute_dtype(x.dtype)
    v = x.to(cdt)
    if bias is not None:
        v = v + bias.detach().cpu().to(cdt)
    zero = torch.zeros((), dtype=cdt)
    if p == 0.0:
        d = v
    elif p == 1.0:
        d = torch.zeros_like(v)
    else:
        mask = _mask_for(x, seed, offset, p, mask_ndim)
        d = torch.where(mask, v * _scale(p, scale_by_keep, cdt), zero)
    y = d + r.to(cdt)
    return y.to(x.dtype).contiguous()


# ----------------------------------------------------------------------- the fused norms
#
# The reduction contract (written from issue 18's text, independently of csrc/core/norm.h):
#   * row sum S(v) of n values: element i goes to accumulator (g, t, j) with c = i // 8,
#     t = c % 32, s = c // 32, g = s % G, j = i % 8, G = clamp(next_pow2(ceil(n / 2048)), 1, 8);
#     each accumulator starts at +0 and adds its elements in increasing i; then per (g, t)
#     ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7)), then over t a halving tree
#     (t + 16, t + 8, ..., t + 1), then over g the same (g + G/2, ..., g + 1);
#   * column sums: blocks of 16 rows, each block's partial from +0 adding its rows in order,
#     the total from +0 adding the partials in block order;
#   * every add, multiply, division and square root rounded on its own in the compute type.
# Padding with +0 is harmless: an accumulator that starts at +0 is never -0, and x + 0 == x
# for every other x (NaN and Inf included).

ROW_BLOCK = 16


def norm_groups(n: int) -> int:
    g = 1
    while g < 8 and g * 2048 < n:
        g *= 2
    return g


def _halve(x: torch.Tensor) -> torch.Tensor:
    """The halving tree over the last dim (a power of two): x[k] + x[k + half], repeatedly."""
    while x.shape[-1] > 1:
        half = x.shape[-1] // 2
        x = x[..., :half] + x[..., half:]
    return x[..., 0]


def row_sum(v: torch.Tensor) -> torch.Tensor:
    """S(v) of every row of ``v`` (rows, n), in v's dtype, in the contract's order."""
    rows, n = v.shape
    groups = norm_groups(n)
    stripes = -(-n // 256)
    padded = torch.zeros((rows, stripes * 256), dtype=v.dtype)
    padded[:, :n] = v
    acc = torch.zeros((rows, groups, 256), dtype=v.dtype)
    for s in range(stripes):
        acc[:, s % groups] = acc[:, s % groups] + padded[:, 256 * s : 256 * (s + 1)]
    a = acc.view(rows, groups, 32, 8)
    lane = ((a[..., 0] + a[..., 4]) + (a[..., 2] + a[..., 6])) + (
        (a[..., 1] + a[..., 5]) + (a[..., 3] + a[..., 7])
    )
    return _halve(_halve(lane))  # over t, then over g


def column_sum(v: torch.Tensor) -> torch.Tensor:
    """The column sums of ``v`` (rows, cols): blocks of 16 rows, then the blocks in order."""
    rows, cols = v.shape
    blocks = -(-rows // ROW_BLOCK)
    padded = torch.zeros((blocks * ROW_BLOCK, cols), dtype=v.dtype)
    padded[:rows] = v
    padded = padded.view(blocks, ROW_BLOCK, cols)
    partial = torch.zeros((blocks, cols), dtype=v.dtype)
    for i in range(ROW_BLOCK):
        partial = partial + padded[:, i]
    total = torch.zeros((cols,), dtype=v.dtype)
    for b in range(blocks):
        total = total + partial[b]
    return total


def _divide(a: torch.Tensor, b) -> torch.Tensor:
    """a / b, IEEE-rounded (numpy: torch's CPU division by a scalar multiplies by its
    reciprocal, which can differ in the last bit)."""
    b = b.numpy() if isinstance(b, torch.Tensor) else np.asarray(b, dtype=a.numpy().dtype)
    return torch.from_numpy(np.divide(a.numpy(), b))


def _rstd(mean_square: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / sqrt(mean_square + eps), each step IEEE-rounded in mean_square's dtype."""
    e = torch.tensor(eps, dtype=torch.float64).to(mean_square.dtype)
    root = torch.from_numpy(np.sqrt((mean_square + e).numpy()))
    return _divide(torch.ones_like(root), root)


def _h_dtype(dtype: torch.dtype, residual_in_fp32: bool) -> torch.dtype:
    return torch.float32 if residual_in_fp32 and dtype in (torch.float16, torch.bfloat16) else dtype


def ref_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    input_bias: torch.Tensor | None,
    p: float,
    seed: int,
    offset: int,
    eps: float,
    rms: bool = False,
    per_sample: bool = False,
    residual_in_fp32: bool = False,
):
    """``(y, h, mean, rstd)`` of the fused dropout + add + norm (mean None for RMSNorm).

    ``h = residual + dropout(x + input_bias)`` as :func:`ref_dropout_add` (no residual: adding
    -0, the identity), rounded to ``x.dtype`` (fp32 with ``residual_in_fp32`` for 16-bit
    dtypes); then from h as stored, per row in the compute type: mean = S(h) / n,
    var = S((h - mean)^2) / n (RMSNorm: S(h^2) / n), rstd = 1 / sqrt(var + eps), and
    ``y = ((h - mean) * rstd) * weight + bias`` rounded once to ``x.dtype``."""
    x = x.detach().cpu()
    hdt = _h_dtype(x.dtype, residual_in_fp32)
    cdt = compute_dtype(x.dtype)
    r = torch.full(x.shape, -0.0, dtype=hdt) if residual is None else residual.detach().cpu()
    ib = None if input_bias is None else input_bias.detach().cpu().to(hdt)
    h = ref_dropout_add(x.to(hdt), r.to(hdt), ib, p, seed, offset, 1 if per_sample else -1)
    n = x.shape[-1]
    hv = h.to(cdt).reshape(-1, n)
    mean = None
    dev = hv
    if not rms:
        mean = _divide(row_sum(hv), n)
        dev = hv - mean[:, None]
    rstd = _rstd(_divide(row_sum(dev * dev), n), eps)
    y = dev * rstd[:, None]
    if weight is not None:
        y = y * weight.detach().cpu().to(cdt)
    if bias is not None:
        y = y + bias.detach().cpu().to(cdt)
    return y.to(x.dtype).reshape(x.shape), h, mean, rstd


def ref_norm_backward(
    dy: torch.Tensor,
    dh_in: torch.Tensor | None,
    h: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor | None,
    rstd: torch.Tensor,
    p: float,
    seed: int,
    offset: int,
    rms: bool = False,
    per_sample: bool = False,
    *,
    y: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
):
    """``(grad_input, grad_h, grad_weight, grad_bias, grad_input_bias)`` of :func:`ref_norm`.

    Per row in the compute type, with xhat = (h - mean) * rstd (RMSNorm: h * rstd), or, given
    the output ``y`` (memory_efficient), xhat = (y - bias) / weight (h gives only its dtype); and
    g = dy * weight: c1 = S(g * xhat) / n, c2 = S(g) / n, dh = (g - (xhat * c1 + c2)) * rstd
    (RMSNorm: (g - xhat * c1) * rstd), plus dh_in; grad_h = dh rounded to h's dtype;
    grad_input = dropout of dh (the forward's mask and scale) rounded to dy's dtype. Column
    sums in the compute type: dy * xhat, dy, and grad_input as stored."""
    dy, h = dy.detach().cpu(), h.detach().cpu()
    cdt = compute_dtype(dy.dtype)
    n = dy.shape[-1]
    if y is None:
        hv = h.to(cdt).reshape(-1, n)
        dev = hv if rms else hv - mean.to(cdt)[:, None]
        xhat = dev * rstd.to(cdt)[:, None]
    else:
        xhat = y.detach().cpu().to(cdt).reshape(-1, n)
        if bias is not None:
            xhat = xhat - bias.detach().cpu().to(cdt)
        if weight is not None:
            xhat = xhat / weight.detach().cpu().to(cdt)
    dyv = dy.to(cdt).reshape(-1, n)
    g = dyv if weight is None else dyv * weight.detach().cpu().to(cdt)
    c1 = _divide(row_sum(g * xhat), n)
    t = xhat * c1[:, None]
    if not rms:
        t = t + _divide(row_sum(g), n)[:, None]
    dh = (g - t) * rstd.to(cdt)[:, None]
    if dh_in is not None:
        dh = dh + dh_in.detach().cpu().to(cdt).reshape(-1, n)
    grad_h = dh.to(h.dtype).reshape(dy.shape)
    keep = _mask_for(dy, seed, offset, p, 1 if per_sample else -1).expand(dy.shape)
    keep = keep.reshape(-1, n)
    grad_input = torch.where(keep, dh * _scale(p, True, cdt), torch.zeros((), dtype=cdt))
    grad_input = grad_input.to(dy.dtype)
    return (
        grad_input.reshape(dy.shape),
        grad_h,
        column_sum(dyv * xhat),
        column_sum(dyv),
        column_sum(grad_input.to(cdt)),
    )
