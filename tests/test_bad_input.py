"""Bad input: each gets torch's exception type and a message naming the argument, the fake
(meta) kernels fail like the real ones and give shapes otherwise, and an in-place input is
unchanged after an error."""

from __future__ import annotations

import importlib
import math
import os
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from fused_dropout import functional as FD
from fused_dropout import ops

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
ref = importlib.import_module("reference")  # tests/reference.py, whatever the import mode

OPS = torch.ops.fused_dropout


def x45(device="cpu", dtype=torch.float32):
    return torch.randn(4, 5, generator=torch.Generator().manual_seed(0)).to(device, dtype)


# The registered ops called with one bad argument each, on a tensor made by `t(shape, dtype)`.
RAW = {
    "dropout": lambda t, **kw: OPS.dropout(
        t((4, 5), kw.get("dtype")),
        kw.get("p", 0.5),
        kw.get("k", -1),
        True,
        False,
        kw.get("seed"),
        kw.get("offset"),
        None,
    ),
    "dropout_": lambda t, **kw: OPS.dropout_(
        t((4, 5), kw.get("dtype")),
        kw.get("p", 0.5),
        kw.get("k", -1),
        True,
        False,
        kw.get("seed"),
        kw.get("offset"),
        None,
    ),
    "dropout_backward": lambda t, **kw: OPS.dropout_backward(
        t((4, 5), kw.get("dtype")),
        torch.zeros(2, dtype=torch.int64, device=t((1,), None).device),
        kw.get("p", 0.5),
        kw.get("k", -1),
        True,
        False,
    ),
    "dropout_add": lambda t, **kw: OPS.dropout_add(
        t((4, 5), kw.get("dtype")),
        t((4, 5), kw.get("dtype")),
        None,
        kw.get("p", 0.5),
        kw.get("k", -1),
        True,
        kw.get("seed"),
        kw.get("offset"),
        None,
    ),
}
BAD = {  # name: (kwargs, exception type, words the message must contain)
    "p_nan": ({"p": math.nan}, ValueError, "probability"),
    "p_inf": ({"p": math.inf}, ValueError, "probability"),
    "p_negative_inf": ({"p": -math.inf}, ValueError, "probability"),
    "p_above_1": ({"p": 1.5}, ValueError, "probability"),
    "int32": ({"dtype": torch.int32}, RuntimeError, "floating-point"),
    "bool": ({"dtype": torch.bool}, RuntimeError, "floating-point"),
    "complex": ({"dtype": torch.complex64}, NotImplementedError, "floating-point"),
    "mask_ndim": ({"k": 3}, RuntimeError, "mask_ndim"),
    "offset_3": ({"seed": 1, "offset": 3}, ValueError, "offset"),
    "offset_negative": ({"seed": 1, "offset": -4}, ValueError, "offset"),
    "seed_without_offset": ({"seed": 1}, ValueError, "seed and offset"),
}


def _on(device):
    def make(shape, dtype):
        dtype = dtype or torch.float32
        return (
            torch.zeros(shape, dtype=dtype, device=device)
            if device == "meta"
            else (
                torch.randn(shape).to(dtype)
                if dtype.is_floating_point or dtype.is_complex
                else torch.ones(shape, dtype=dtype)
            )
        )

    return make


@pytest.mark.parametrize(
    "op, bad",
    [
        (op, bad)
        for op in RAW
        for bad in BAD
        if not (op == "dropout_backward" and "seed" in BAD[bad][0])
    ],
)  # dropout_backward takes its pair as a tensor
def test_real_and_fake_kernels_raise_alike(op, bad):
    kwargs, kind, words = BAD[bad]
    for device in ("cpu", "meta"):
        with pytest.raises(kind, match=words) as info:
            RAW[op](_on(device), **kwargs)
        assert f"fused_dropout.{op}" in str(info.value) or "probability" in words, device


@pytest.mark.parametrize("op", list(RAW))
def test_meta_tensors_get_shapes_from_the_fake_kernels(op):
    out = RAW[op](lambda shape, dtype: torch.empty(shape, device="meta").t().contiguous().t())
    outs = out if isinstance(out, tuple) else (out,)
    assert all(o.device.type == "meta" for o in outs)
    if op != "dropout_":
        assert outs[0].shape == (4, 5) and outs[0].stride() == (1, 4)  # empty_like's layout
    pair = outs[-1] if op != "dropout_backward" else None
    if pair is not None:
        assert pair.shape == (2,) and pair.dtype == torch.int64


@pytest.mark.parametrize(
    "call",
    [
        lambda t: FD.dropout(t, 0.3),
        lambda t: FD.dropout2d(t[None, None], 0.3),
        lambda t: FD.drop_path(t, 0.3, True),
        lambda t: FD.dropout_add(t, t, 0.3),
        lambda t: FD.bias_dropout_add(t, t[0], t, 0.3),
        lambda t: FD.drop_path_add(t, t, 0.3),
    ],
)
def test_functional_ops_on_meta_tensors(call):
    y = call(torch.empty(4, 5, device="meta"))
    assert y.device.type == "meta" and y.shape[-2:] == (4, 5)


@pytest.mark.parametrize(
    "make",
    [
        lambda x: x.to_sparse(),
        lambda x: x.to_sparse_csr(),
        lambda x: torch.quantize_per_tensor(x, 0.1, 0, torch.quint8),
    ],
    ids=["sparse_coo", "sparse_csr", "quantized"],
)
def test_sparse_and_quantized_inputs_are_not_implemented(make):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = make(x45())
    with pytest.raises(NotImplementedError):  # torch's F.dropout: NotImplementedError too
        F.dropout(t, 0.5)
    for call in (lambda: FD.dropout(t, 0.5), lambda: ops.dropout(t, 0.5)):
        with pytest.raises(NotImplementedError, match=r"input .*dense"):
            call()
    with pytest.raises(NotImplementedError, match=r"residual .*dense"):
        FD.dropout_add(x45(), t, 0.5)


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool, torch.complex128])
def test_integer_bool_complex_inputs(dtype):
    t = torch.ones(4, 5, dtype=dtype)
    with pytest.raises(RuntimeError, match="expected a floating-point tensor") as info:
        FD.dropout(t, 0.5)
    if dtype.is_complex:  # torch's F.dropout raises NotImplementedError for complex
        assert info.type is NotImplementedError
    for call in (
        lambda: FD.dropout(t, 0.5, inplace=True),
        lambda: FD.dropout2d(t[None, None], 0.5),
    ):
        with pytest.raises(RuntimeError, match="floating-point"):
            call()
    assert torch.equal(t, torch.ones(4, 5, dtype=dtype))


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_residual_and_bias_of_another_dtype(device):
    x = x45(device)
    with pytest.raises(TypeError, match="residual has dtype"):
        FD.dropout_add(x, x.double(), 0.5)
    with pytest.raises(TypeError, match="bias has dtype"):
        FD.bias_dropout_add(x, x[0].half(), x, 0.5)
    with pytest.raises(TypeError, match="residual has dtype"):
        FD.drop_path_add(x.bfloat16(), x, 0.5)


@pytest.mark.parametrize("other", ["residual", "bias"])
def test_residual_and_bias_on_another_device(other):
    x, elsewhere = x45(), torch.empty(4, 5, device="meta")
    with pytest.raises(RuntimeError, match=f"{other} is on meta but input is on cpu"):
        if other == "residual":
            FD.dropout_add(x, elsewhere, 0.5)
        else:
            FD.bias_dropout_add(x, elsewhere[0], x, 0.5)


def test_bias_of_the_wrong_shape():
    x = x45()
    for bias in (torch.randn(4), torch.randn(1, 5), torch.randn(())):
        with pytest.raises(RuntimeError, match="bias must be 1-D"):
            FD.bias_dropout_add(x, bias, x, 0.5)


OVERLAPPING = {  # name: (make, whether torch's own F.dropout(inplace=True) notices)
    "expanded": (lambda: torch.randn(1, 5).expand(4, 5), True),
    "expanded_transposed": (lambda: torch.randn(3, 1, 4).expand(3, 2, 4).transpose(0, 1), True),
    "overlapping_windows": (lambda: torch.randn(6).as_strided((4, 3), (1, 1)), False),
    "overlapping_rows": (lambda: torch.randn(40).as_strided((5, 2, 4), (3, 20, 1)), False),
}


@pytest.mark.parametrize("name", list(OVERLAPPING))
def test_overlapping_inplace_output(name):
    make, torch_notices = OVERLAPPING[name]
    t = make()
    before = t.clone()
    for call in (
        lambda: FD.dropout(t, 0.5, inplace=True),
        lambda: FD.alpha_dropout(t, 0.5, True, inplace=True),
        lambda: ops.dropout_(t, 0.5, seed_offset=(1, 0)),
    ):
        with pytest.raises(
            RuntimeError,
            match=r"more than one element of the written-to tensor "
            r"\(input\) refers to a single memory location",
        ):
            call()
    assert torch.equal(t, before)
    if torch_notices:  # the same type and words as torch's own error
        with pytest.raises(RuntimeError, match="more than one element of the written-to tensor"):
            F.dropout(make(), 0.5, inplace=True)


def test_interleaved_but_not_overlapping_inplace_is_accepted():
    base = torch.randn(8)
    t = base.as_strided((2, 3), (3, 2))  # offsets 0 2 4 / 3 5 7: all distinct, not dense
    expected = ref.ref_dropout(t, 0.5, 9, 12)
    FD.dropout(t, 0.5, inplace=True, seed_offset=(9, 12))
    assert torch.equal(t, expected)


@pytest.mark.parametrize(
    "seed_offset, kind, words",
    [
        ((1, 3), ValueError, "offset must be a non-negative multiple of 4"),
        ((1, 2**63 + 2), ValueError, "offset must be a non-negative multiple of 4"),
        ((1, 2**63), ValueError, "offset must be a non-negative multiple of 4"),
        ((1, -4), ValueError, "offset must be a non-negative multiple of 4"),
        ((2**64, 0), ValueError, "seed must be in"),
        ((-1, 0), ValueError, "seed must be in"),
        ((1.5, 0), TypeError, "seed_offset must be a pair of integers"),
        ((1, 4.0), TypeError, "seed_offset must be a pair of integers"),
        ((1, 2, 3), TypeError, "seed_offset must be a pair of integers"),
        ((1,), TypeError, "seed_offset must be a pair of integers"),
        (7, TypeError, "seed_offset must be a pair of integers"),
    ],
)
def test_bad_seed_offset(seed_offset, kind, words):
    x = x45()
    for call in (
        lambda: FD.dropout(x, 0.5, seed_offset=seed_offset),
        lambda: FD.dropout_add(x, x, 0.5, seed_offset=seed_offset),
        lambda: ops.dropout(x, 0.5, seed_offset=seed_offset),
    ):
        with pytest.raises(kind, match=words):
            call()


def test_integer_like_seed_offset_is_accepted():
    x = x45()
    expected = FD.dropout(x, 0.5, seed_offset=(3, 8))
    for so in ((torch.tensor(3), torch.tensor(8)), (True + 2, 8), [3, 8]):
        assert torch.equal(FD.dropout(x, 0.5, seed_offset=so), expected)


INPLACE_ERRORS = [
    ("p_nan", lambda t: FD.dropout(t, math.nan, inplace=True), ValueError),
    ("offset", lambda t: FD.dropout(t, 0.5, inplace=True, seed_offset=(1, 6)), ValueError),
    ("raw_offset", lambda t: OPS.dropout_(t, 0.5, -1, True, False, 1, 6, None), ValueError),
    (
        "raw_mask_ndim",
        lambda t: OPS.dropout_(t, 0.5, 9, True, False, None, None, None),
        RuntimeError,
    ),
    ("raw_p", lambda t: OPS.dropout_(t, -0.5, -1, True, False, None, None, None), ValueError),
    ("dropout1d_rank", lambda t: FD.dropout1d(t[None, None], 0.5, inplace=True), RuntimeError),
    ("feature_rank", lambda t: FD.feature_alpha_dropout(t[0], 0.5, True, True), RuntimeError),
    (
        "generator_device",
        lambda t: FD.dropout(t, 0.5, inplace=True, generator=torch.Generator("meta")),
        RuntimeError,
    ),
]


@pytest.mark.parametrize("name, call, kind", INPLACE_ERRORS, ids=[c[0] for c in INPLACE_ERRORS])
def test_inplace_input_unchanged_after_an_error(name, call, kind):
    t = x45()
    before = t.clone()
    with pytest.raises(kind):
        call(t)
    assert torch.equal(t, before) and t.shape == before.shape


def test_inplace_on_a_leaf_that_requires_grad_leaves_it_unchanged():
    t = x45().requires_grad_()
    before = t.detach().clone()
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        FD.dropout(t, 0.5, inplace=True)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        F.dropout(x45().requires_grad_(), 0.5, inplace=True)  # torch's message
    assert torch.equal(t.detach(), before)
