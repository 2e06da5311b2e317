"""Tests of the fused dropout + residual add + norm: ``functional.dropout_add_layer_norm`` and
``functional.dropout_add_rms_norm``.

``h = residual + dropout(input + input_bias)`` (per-sample mask with ``per_sample``), then
``y = norm(h) * weight (+ bias)`` over the last dim. ``h`` is checked bit for bit against our
``dropout_add`` / ``bias_dropout_add`` / ``drop_path_add`` for the same pair; ``y`` and every
gradient against torch's composition with FlashAttention's rule: the error of ours from the
float64 composition is at most twice torch's own error in the same dtype, plus ``atol``.
"""

from __future__ import annotations

import math

import pytest
import reference as ref
import torch
import torch.nn.functional as F
from helpers import assert_bitwise, randn

from fused_dropout import functional as FD

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
SEED_OFFSET = (0x1234_5678_9ABC_DEF0, 4 * 77)
# FlashAttention's rule's atol: a few units of the dtype's rounding at the values' scale (~1)
ATOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(autouse=True)
def _isolate_global_rng():
    with torch.random.fork_rng():
        torch.manual_seed(18)
        yield


def _fused(rms: bool):
    return FD.dropout_add_rms_norm if rms else FD.dropout_add_layer_norm


def _call(rms, x, r, w, b, p, **kw):
    """One call of the op under test (``b`` is ignored by the RMS form, which has none)."""
    if rms:
        return FD.dropout_add_rms_norm(x, r, w, p, **kw)
    return FD.dropout_add_layer_norm(x, r, w, b, p, **kw)


def _operands(shape, dtype, *, residual=True, weight=True, bias=True, input_bias=False, wdt=None):
    """Inputs of one call: values of order 1, the weight around 1."""
    n = shape[-1]
    wdt = wdt or dtype
    x = randn(shape, dtype, 1)
    r = randn(shape, dtype, 2) if residual else None
    w = (1 + 0.5 * randn((n,), torch.float64, 3)).to(wdt) if weight else None
    b = (0.5 * randn((n,), torch.float64, 4)).to(wdt) if bias else None
    ib = (0.5 * randn((n,), torch.float64, 5)).to(dtype) if input_bias else None
    return x, r, w, b, ib


def composition(x, r, w, b, ib, p, keep, rms, eps, dtype):
    """torch's composition in ``dtype``: ``norm(r + (x + ib) * keep * scale) * w + b``, with the
    contract's mask ``keep`` (broadcastable to x) and every operand cast to ``dtype``."""

    def cast(t):
        return None if t is None else t.to(dtype)

    v = cast(x) if ib is None else cast(x) + cast(ib)
    scale = 1.0 / (1.0 - p) if p < 1 else 0.0
    h = torch.where(keep, v * scale, torch.zeros((), dtype=dtype))
    if r is not None:
        h = cast(r) + h
    n = [x.shape[-1]]
    if rms:
        y = F.rms_norm(h, n, cast(w), eps)
        return y if b is None else y + cast(b)
    return F.layer_norm(h, n, cast(w), cast(b), eps)


def keep_of(x, p, per_sample, seed_offset):
    """The contract's keep mask for ``x`` (tests/reference.py), broadcastable to x."""
    seed, offset = seed_offset
    if p == 0:
        return torch.ones((), dtype=torch.bool)
    shape = x.shape[:1] if per_sample else x.shape
    mask = ref.keep_mask(seed, offset, p, shape)
    return mask.reshape(shape + (1,) * (x.dim() - len(shape)))


def assert_flash_rule(ours, torch_same, reference, atol, what):
    """FlashAttention's test rule: max |ours - ref| <= 2 max |torch in the dtype - ref| + atol."""
    err = (ours.double() - reference).abs().max().item() if ours.numel() else 0.0
    base = (torch_same.double() - reference).abs().max().item() if ours.numel() else 0.0
    assert err <= 2 * base + atol, f"{what}: error {err:.3g} > 2 x torch's {base:.3g} + {atol:g}"


def _default_eps(rms, hdtype):
    return torch.finfo(hdtype).eps if rms else 1e-5


# ----------------------------------------------------------------------- h is dropout_add's


@pytest.mark.cpu_paths
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["elementwise", "per_sample"])
@pytest.mark.parametrize("input_bias", [False, True], ids=["", "input_bias"])
def test_h_is_bitwise_our_fused_add(dtype, rms, per_sample, input_bias):
    x, r, w, b, ib = _operands((6, 5, 40), dtype, input_bias=input_bias)
    p = 0.3
    y, h = _call(
        rms,
        x,
        r,
        w,
        b,
        p,
        input_bias=ib,
        per_sample=per_sample,
        prenorm=True,
        seed_offset=SEED_OFFSET,
    )
    if per_sample:
        bias_term = x if ib is None else x + ib  # drop_path_add has no bias: per-sample only
        if ib is None:
            want = FD.drop_path_add(r, bias_term, p, seed_offset=SEED_OFFSET)
        else:
            want = torch.ops.fused_dropout.dropout_add(x, r, ib, p, 1, True, *SEED_OFFSET, None)[0]
    elif ib is None:
        want = FD.dropout_add(x, r, p, seed_offset=SEED_OFFSET)
    else:
        want = FD.bias_dropout_add(x, ib, r, p, seed_offset=SEED_OFFSET)
    assert_bitwise(h, want, "h")
    assert y.dtype == dtype and y.shape == x.shape


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float32))
def test_residual_in_fp32_keeps_the_fp32_sum(dtype):
    x, r, w, b, ib = _operands((4, 64), dtype, input_bias=True)
    y, h = FD.dropout_add_layer_norm(
        x, r, w, b, 0.2, input_bias=ib, prenorm=True, residual_in_fp32=True, seed_offset=SEED_OFFSET
    )
    want = FD.bias_dropout_add(x.float(), ib.float(), r.float(), 0.2, seed_offset=SEED_OFFSET)
    assert h.dtype == torch.float32
    assert_bitwise(h, want, "h in fp32")
    # an fp32 residual (the stream kept in fp32 by the previous layer) is taken as it is
    _, h2 = FD.dropout_add_layer_norm(
        x, want, w, b, 0.2, prenorm=True, residual_in_fp32=True, seed_offset=SEED_OFFSET
    )
    assert_bitwise(h2, FD.dropout_add(x.float(), want, 0.2, seed_offset=SEED_OFFSET), "h2")


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_residual_is_dropout(dtype):
    x, _, w, b, _ = _operands((3, 33), dtype, residual=False)
    _, h = FD.dropout_add_layer_norm(x, None, w, b, 0.4, prenorm=True, seed_offset=SEED_OFFSET)
    assert_bitwise(h, FD.dropout(x, 0.4, seed_offset=SEED_OFFSET), "h")


@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_eval_and_p0_add_without_drawing(rms):
    x, r, w, b, ib = _operands((5, 48), torch.float32, input_bias=True)
    state = torch.get_rng_state()
    for kw in (dict(training=False), dict()):
        p = 0.7 if kw else 0.0
        _, h = _call(rms, x, r, w, b, p, input_bias=ib, prenorm=True, **kw)
        assert_bitwise(h, r + (x + ib), f"h with {kw or 'p=0'}")
    assert torch.equal(torch.get_rng_state(), state)


# ----------------------------------------------------------------------- y and the gradients


def _check_against_torch(
    shape,
    dtype,
    rms,
    p,
    *,
    per_sample=False,
    wdt=None,
    input_bias=False,
    residual=True,
    weight=True,
    bias=True,
    prenorm=False,
    layout=None,
    memory_efficient=False,
):
    """Forward and backward of ours against torch's composition (FlashAttention's rule)."""
    x, r, w, b, ib = _operands(
        shape, dtype, residual=residual, weight=weight, bias=bias, input_bias=input_bias, wdt=wdt
    )
    if rms:
        b = None
    if layout is not None:
        x, r = layout(x), (None if r is None else layout(r))
    leaves = [t for t in (x, r, w, b, ib) if t is not None]
    for t in leaves:
        t.requires_grad_()
    keep = keep_of(x, p, per_sample, SEED_OFFSET)
    eps = _default_eps(rms, dtype)
    out = _call(
        rms,
        x,
        r,
        w,
        b,
        p,
        input_bias=ib,
        per_sample=per_sample,
        prenorm=prenorm,
        memory_efficient=memory_efficient,
        seed_offset=SEED_OFFSET,
    )
    y, h = out if prenorm else (out, None)
    gy = randn(shape, dtype, 9)
    gh = randn(shape, dtype, 10) if prenorm else None
    grads = torch.autograd.grad(
        [y] + ([h] if prenorm else []), leaves, [gy] + ([gh] if prenorm else [])
    )

    def run(dt):
        y_ = composition(x, r, w, b, ib, p, keep, rms, eps, dt)
        outs, gos = [y_], [gy.to(dt)]
        if prenorm:  # h's own gradient flows in too
            v = x.to(dt) if ib is None else x.to(dt) + ib.to(dt)
            h_ = torch.where(keep, v / (1 - p), torch.zeros((), dtype=dt))
            h_ = h_ if r is None else r.to(dt) + h_
            outs.append(h_)
            gos.append(gh.to(dt))
        return y_, torch.autograd.grad(outs, leaves, gos, allow_unused=True)

    y64, g64 = run(torch.float64)
    ys, gs = run(dtype)
    atol = ATOL[dtype]
    assert y.dtype == dtype
    assert_flash_rule(y, ys, y64, atol, "y")
    names = [n for n, t in zip("x r w b ib".split(), (x, r, w, b, ib)) if t is not None]
    for name, ours, same, want in zip(names, grads, gs, g64):
        assert ours.dtype == dict(zip(names, leaves))[name].dtype, name
        # column sums add up `rows` terms: scale atol with them
        tol = atol * (math.prod(shape[:-1]) ** 0.5 if name in ("w", "b", "ib") else 1)
        assert_flash_rule(ours, same, want, tol, f"grad of {name}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_matches_torch_composition(dtype, rms):
    _check_against_torch((4, 7, 96), dtype, rms, 0.25, input_bias=True)


@pytest.mark.parametrize("hidden", [1, 7, 768, 1000, 4096])
@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_hidden_sizes(hidden, rms):
    _check_against_torch((3, hidden), torch.float32, rms, 0.1)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_hidden_65536(dtype):
    _check_against_torch((2, 65536), dtype, False, 0.1, input_bias=True)


@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize(
    "variant",
    [
        dict(prenorm=True),
        dict(per_sample=True),
        dict(residual=False),
        dict(weight=False, bias=False),
        dict(bias=False),
        dict(wdt=torch.float32),
        dict(prenorm=True, per_sample=True, input_bias=True),
        dict(memory_efficient=True),
        dict(memory_efficient=True, prenorm=True, input_bias=True),
        dict(memory_efficient=True, weight=False, bias=False),
        dict(memory_efficient=True, wdt=torch.float32),
    ],
    ids=lambda v: "-".join(f"{k}={getattr(x, 'name', x)}" for k, x in v.items()),
)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_options_match_torch_composition(rms, variant, dtype):
    _check_against_torch((3, 4, 72), dtype, rms, 0.3, **variant)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_memory_efficient_matches_torch_composition(dtype, rms):
    _check_against_torch((4, 7, 96), dtype, rms, 0.25, input_bias=True, memory_efficient=True)


def _saved_by_backward(fn):
    """The tensors autograd saves while ``fn()`` runs, and what it returned."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return saved, out


@pytest.mark.parametrize("prenorm", [False, True], ids=["postnorm", "prenorm"])
def test_memory_efficient_saves_y_not_h(prenorm):
    """memory_efficient keeps the output (which the next layer keeps anyway), never h; the
    default keeps h. Either way no mask and nothing else of the activation's size."""
    x, r, w, b, _ = _operands((4, 6, 32), torch.float32)
    for t in (x, r, w, b):
        t.requires_grad_()

    def run(memory_efficient):
        return _call(False, x, r, w, b, 0.3, prenorm=prenorm, memory_efficient=memory_efficient)

    for memory_efficient in (False, True):
        saved, out = _saved_by_backward(lambda m=memory_efficient: run(m))
        y = out[0] if prenorm else out
        big = [t for t in saved if t.numel() == x.numel()]
        assert len(big) == 1, [tuple(t.shape) for t in saved]
        assert (big[0].untyped_storage().data_ptr() == y.untyped_storage().data_ptr()) == (
            memory_efficient
        ), f"memory_efficient={memory_efficient}"


def test_memory_efficient_zero_weight_is_a_clear_error():
    x, r, w, b, _ = _operands((3, 16), torch.float32)
    w = w.detach().clone()
    w[5] = 0.0
    x.requires_grad_()
    y = FD.dropout_add_layer_norm(x, r, w, b, 0.2, memory_efficient=True)
    with pytest.raises(RuntimeError, match="memory_efficient=True needs a weight with no zeros"):
        y.sum().backward()
    # the default keeps h and handles it
    y = FD.dropout_add_layer_norm(x, r, w, b, 0.2)
    (gx,) = torch.autograd.grad(y.sum(), x)
    assert gx.isfinite().all()


def test_memory_efficient_output_changed_in_place_raises():
    """y is saved: changing it in place before backward raises, as for any saved tensor."""
    x, r, w, b, _ = _operands((3, 16), torch.float32)
    x.requires_grad_()
    y = FD.dropout_add_layer_norm(x, r, w, b, 0.2, memory_efficient=True)
    y.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_non_contiguous_inputs():
    def sliced(t):  # every other column of a wider tensor, then transposed twice
        wide = torch.stack([t, t], -1).flatten(-2)[..., ::2]
        return wide.transpose(0, 1).contiguous().transpose(0, 1)

    _check_against_torch((5, 6, 40), torch.float32, False, 0.2, layout=sliced)


@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_zero_rows(rms):
    x, r, w, b, _ = _operands((0, 3, 16), torch.float32)
    for t in (x, r, w, b):
        t.requires_grad_()
    y, h = _call(rms, x, r, w, b, 0.5, prenorm=True)
    assert y.shape == h.shape == x.shape
    (y.sum() + h.sum()).backward()
    assert x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_gradcheck_fp64(rms):
    x, r, w, b, ib = _operands((3, 2, 10), torch.float64, input_bias=True)
    args = [t.requires_grad_() for t in (x, r, w, b, ib)]

    def f(x, r, w, b, ib):
        y, h = _call(rms, x, r, w, b, 0.3, input_bias=ib, prenorm=True, seed_offset=SEED_OFFSET)
        return y, h

    assert torch.autograd.gradcheck(f, args)


def test_activation_checkpointing_recomputes_the_same_mask():
    x, r, w, b, _ = _operands((4, 64), torch.float32)
    for t in (x, r, w, b):
        t.requires_grad_()

    def block(x, r):
        return FD.dropout_add_layer_norm(x, r, w, b, 0.5).sin()

    torch.manual_seed(3)
    want = torch.autograd.grad(block(x, r).sum(), (x, r, w, b))
    torch.manual_seed(3)
    out = torch.utils.checkpoint.checkpoint(block, x, r, use_reentrant=False)
    got = torch.autograd.grad(out.sum(), (x, r, w, b))
    for g, e in zip(got, want):
        assert_bitwise(g, e, "gradient under checkpointing")


def test_torch_compile_fullgraph_matches_eager():
    x, r, w, b, ib = _operands((4, 8, 64), torch.float32, input_bias=True)

    def layer(x, r):
        y, h = FD.dropout_add_layer_norm(
            x, r, w, b, 0.1, input_bias=ib, prenorm=True, seed_offset=SEED_OFFSET
        )
        return y * 2 + h

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    assert_bitwise(compiled(x, r), layer(x, r), "compiled")


# ----------------------------------------------------------------------- the contract, bitwise


def _op_case(
    shape,
    dtype,
    *,
    rms=False,
    p=0.3,
    per_sample=False,
    residual_in_fp32=False,
    residual=True,
    weight=True,
    bias=True,
    input_bias=True,
    wdt=None,
    seed_offset=SEED_OFFSET,
    special=False,
    tiny=False,
):
    """One forward and backward call of the op, checked bit for bit against tests/reference.py;
    returns y and h."""
    x, r, w, b, ib = _operands(
        shape, dtype, residual=residual, weight=weight, bias=bias, input_bias=input_bias, wdt=wdt
    )
    if rms:
        b = None
    if special:  # NaN, Inf and -0 in the input (a NaN row stays NaN; others are untouched)
        x.view(-1)[:: max(1, x.numel() // 7)] = torch.tensor(float("nan"), dtype=dtype)
        x.view(-1)[1 :: max(1, x.numel() // 5)] = -0.0
    if residual_in_fp32 and r is not None:
        r = r.float()
    eps = 1e-5 if not rms else torch.finfo(dtype).eps
    if tiny:  # h and y in the denormal range: h near 2^-130; its statistics underflow, so
        # rstd = eps^-1/2, and a weight near 4 eps^1/2 puts y near 2^-128
        x, r, ib = (None if t is None else t * 2.0**-130 for t in (x, r, ib))
        w, b = w * (4 * eps**0.5), None
    seed, offset = seed_offset
    y, h, mean, rstd, pair = torch.ops.fused_dropout.dropout_add_norm(
        x,
        r,
        w,
        b,
        ib,
        p,
        eps,
        rms,
        per_sample,
        residual_in_fp32,
        True,
        False,
        ref.seed_to_int64(seed),
        offset,
        None,
    )
    want = ref.ref_norm(x, r, w, b, ib, p, seed, offset, eps, rms, per_sample, residual_in_fp32)
    what = f"{list(shape)} {dtype} rms={rms} per_sample={per_sample}"

    def same(got, expected, name):  # NaN patterns are the hardware's (tests/reference.py: torch's)
        if special:
            nan = got.isnan()
            assert torch.equal(nan, expected.isnan()), f"{name} of {what}: NaN elsewhere"
            got, expected = got.masked_fill(nan, 0), expected.masked_fill(nan, 0)
        assert_bitwise(got, expected, f"{name} of {what}")

    same(h, want[1], "h")
    same(rstd, want[3], "rstd")
    if not rms:
        same(mean, want[2], "mean")
    same(y, want[0], "y")
    dy = randn(shape, dtype, 11)
    dh_in = randn(shape, h.dtype, 12)
    for saved_is_y in (False, True):  # backward from h, and from y (memory_efficient)
        grads = torch.ops.fused_dropout.dropout_add_norm_backward(
            dy, dh_in, y if saved_is_y else h, saved_is_y, w, b, mean, rstd, pair, p, rms,
            per_sample, residual_in_fp32, True, True, True, True,
        )  # fmt: skip
        from_y = dict(y=y, bias=b) if saved_is_y else {}
        wants = ref.ref_norm_backward(
            dy, dh_in, h, w, want[2], rstd, p, seed, offset, rms, per_sample, **from_y
        )
        for name, got, expected in zip(
            ("grad_input", "grad_h", "grad_weight", "grad_bias", "grad_input_bias"), grads, wants
        ):
            same(got, expected, f"{name} (from {'y' if saved_is_y else 'h'})")
    return y, h


@pytest.mark.cpu_paths
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_bitwise_against_reference(dtype, rms):
    _op_case((3, 5, 96), dtype, rms=rms)
    _op_case((37, 20), dtype, rms=rms, per_sample=True, wdt=torch.float32)


@pytest.mark.cpu_paths
@pytest.mark.parametrize(
    "cols", [1, 7, 8, 64, 255, 256, 257, 320, 768, 1000, 2048, 2049, 2112, 4096, 9000]
)
def test_bitwise_row_lengths(cols):
    """Every stripe/group boundary of the row sums: G = 1, 2, 4, 8 (9000 > 4 x 2048). Rows of
    a multiple of 64 take the vector rows: 64 and 320 end in a stripe of 4 vectors (AVX-512),
    2112 in a group-0 stripe of 64 columns with G = 2."""
    _op_case((3, cols), torch.float32)
    _op_case((2, cols), torch.bfloat16, rms=True, residual_in_fp32=True)


@pytest.mark.slow
def test_bitwise_65536():
    _op_case((2, 65536), torch.float32)


@pytest.mark.cpu_paths
@pytest.mark.parametrize("rows", [0, 1, 15, 16, 17, 33])
def test_bitwise_row_counts(rows):
    """The column sums' blocks of 16 rows: fewer, exactly one, one more."""
    _op_case((rows, 24), torch.float32)


OPTIONS = [
    dict(residual=False),
    dict(weight=False),
    dict(weight=False, bias=False, input_bias=False),
    dict(p=0.0),
    dict(p=1.0),
    dict(residual_in_fp32=True),
    dict(special=True),
    dict(seed_offset=(2**64 - 1, 2**62)),
]


def _option_id(variant: dict) -> str:
    return "-".join(f"{k}={x}" for k, x in variant.items()) or "default"


@pytest.mark.cpu_paths
@pytest.mark.parametrize("variant", OPTIONS, ids=_option_id)
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_bitwise_options(variant, dtype):
    _op_case((4, 6, 40), dtype, **variant)


@pytest.mark.cpu_paths
@pytest.mark.parametrize("variant", [dict(), dict(per_sample=True), *OPTIONS], ids=_option_id)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_bitwise_vector_rows(variant, dtype, rms):
    """Rows of a multiple of 64 elements in fp32 and bf16 take the vector rows of the SIMD
    paths (cpu/norm.cpp: keep bits as masks); rows of 192 share Philox blocks."""
    _op_case((5, 3, 192), dtype, rms=rms, **variant)


@pytest.mark.cpu_paths
@pytest.mark.parametrize("cols", [40, 192], ids=["scalar_rows", "vector_rows"])
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_bitwise_denormals(rms, dtype, cols):
    """h and y in the denormal range round as every other value does (the avx512bf16 path's
    vcvtneps2bf16 flushes denormals to zero: its vectors that hold one take the integer form)."""
    y, h = _op_case((5, 3, cols), dtype, rms=rms, tiny=True)
    for name, t in (("y", y), ("h", h)):
        denormal = (t != 0) & (t.abs() < torch.finfo(torch.float32).tiny)
        assert denormal.float().mean() > 0.5, f"{name}: too few denormals to test"


@pytest.mark.slow
@pytest.mark.cpu_paths
@pytest.mark.parametrize("dtype, rows", [(torch.float32, 2752), (torch.bfloat16, 5472)])
def test_bitwise_streaming_stores(dtype, rows):
    """Outputs over 8 MiB (cpu/norm.cpp's kStreamBytes) are written with non-temporal stores."""
    _op_case((rows, 768), dtype)


@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize("keep_h", [False, True], ids=["y", "y_and_h"])
@pytest.mark.parametrize("memory_efficient", [False, True], ids=["save_h", "save_y"])
def test_opcheck(rms, keep_h, memory_efficient):
    x, r, w, b, ib = _operands((3, 4, 24), torch.float32, input_bias=True)
    for t in (x, r, w, b, ib):
        t.requires_grad_()
    b = None if rms else b
    args = (x, r, w, b, ib, 0.3, 1e-5, rms, False, False, keep_h, memory_efficient, 7, 8, None)
    torch.library.opcheck(torch.ops.fused_dropout.dropout_add_norm.default, args)
    y, h, mean, rstd, pair = torch.ops.fused_dropout.dropout_add_norm(
        *args[:10], True, False, 7, 8, None
    )
    saved = (y if memory_efficient else h).detach()
    backward = (randn(x.shape, x.dtype, 3), randn(x.shape, x.dtype, 4), saved, memory_efficient)
    torch.library.opcheck(
        torch.ops.fused_dropout.dropout_add_norm_backward.default,
        (*backward, w.detach(), None if b is None else b.detach(), mean, rstd, pair, 0.3, rms,
         False, False, True, True, not rms, True),
    )  # fmt: skip
