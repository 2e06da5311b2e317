"""Tests of the reference implementation of the RNG/numerics contract (DESIGN.md s.2-3).

These run without the extension: they pin down tests/reference.py, which the
extension's test suite then uses as its oracle.
"""

from __future__ import annotations

import importlib
import math
import os
import sys

import numpy as np
import pytest
import torch
from scipy import stats

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
ref = importlib.import_module("reference")  # tests/reference.py, whatever the import mode

# --------------------------------------------------------------------------- Philox


@pytest.mark.parametrize(
    "ctr, key, expected",
    [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        (
            (0xFFFFFFFF,) * 4,
            (0xFFFFFFFF, 0xFFFFFFFF),
            (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD),
        ),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ],
    ids=["zeros", "ones", "pi"],
)
def test_philox_known_answers(ctr, key, expected):
    out = ref.philox4x32_10(np.array(ctr, dtype=np.uint64), key)
    assert out.dtype == np.uint32
    assert [int(v) for v in out] == list(expected)


def test_philox_vectorised_matches_scalar_calls():
    rng = np.random.default_rng(0)
    ctrs = rng.integers(0, 2**32, size=(64, 4), dtype=np.uint64)
    key = (0xDEADBEEF, 0x01234567)
    batch = ref.philox4x32_10(ctrs, key)
    for j in range(ctrs.shape[0]):
        np.testing.assert_array_equal(batch[j], ref.philox4x32_10(ctrs[j], key))


def _scalar_word(seed: int, offset: int, i: int) -> int:
    """Word of mask element i computed straight from the contract's formula."""
    s = seed & ref.MASK64
    o = offset // 4
    k = i // 4
    ctr = (o & ref.MASK32, o >> 32, k & ref.MASK32, k >> 32)
    out = ref.philox4x32_10(np.array(ctr, dtype=np.uint64), (s & ref.MASK32, s >> 32))
    return int(out[i % 4])


@pytest.mark.parametrize(
    "seed, offset",
    [(0, 0), (1, 4), (2**63 + 12345, 2**34 + 8), (2**64 - 1, 4 * (2**32 + 5))],
)
def test_mask_words_counter_layout(seed, offset):
    n = 41
    words = ref.mask_words(seed, offset, n)
    assert words.shape == (n,) and words.dtype == np.uint32
    for i in range(n):
        assert int(words[i]) == _scalar_word(seed, offset, i), i


def test_mask_words_element_zero_to_three_is_one_philox_call():
    # seed 0, offset 0, k = 0: counter (0,0,0,0), key (0,0) -> the first known answer
    words = ref.mask_words(0, 0, 4)
    assert [int(w) for w in words] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


def test_mask_words_prefix_property():
    long = ref.mask_words(7, 12, 1001)
    for n in (0, 1, 3, 4, 5, 999):
        np.testing.assert_array_equal(ref.mask_words(7, 12, n), long[:n])


def test_mask_words_counters_k_and_k_plus_1_differ():
    w = ref.mask_words(123, 0, 4 * 4096).reshape(-1, 4)
    # consecutive counters give different 4-word blocks (and, overwhelmingly, all
    # four words differ)
    assert np.all(np.any(w[1:] != w[:-1], axis=1))
    assert np.mean(np.all(w[1:] != w[:-1], axis=1)) > 0.999


def test_offset_seed_and_seed_high_word_all_matter():
    base = ref.mask_words(5, 0, 4096)
    variants = {
        "offset+4": ref.mask_words(5, 4, 4096),
        "seed+1": ref.mask_words(6, 0, 4096),
        "seed high word": ref.mask_words(5 + 2**32, 0, 4096),
        "offset high word": ref.mask_words(5, 4 * 2**32, 4096),
    }
    for name, w in variants.items():
        # independent streams: about 1 in 2**32 words coincide
        assert np.mean(w == base) < 0.01, name


def test_offset_plus_4_is_not_a_shifted_stream():
    # offset moves the counter's first half, k its second half: the stream at
    # offset 4 must not be the stream at offset 0 shifted by one counter.
    a = ref.mask_words(9, 0, 4 * 1024)
    b = ref.mask_words(9, 4, 4 * 1024)
    assert not np.array_equal(a[4:], b[:-4])


def test_seed_int64_spelling():
    assert ref.seed_to_uint64(-1) == 2**64 - 1
    assert ref.seed_to_int64(2**64 - 1) == -1
    assert ref.seed_to_int64(2**63) == -(2**63)
    assert ref.seed_to_int64(2**63 - 1) == 2**63 - 1
    np.testing.assert_array_equal(ref.mask_words(-1, 0, 64), ref.mask_words(2**64 - 1, 0, 64))
    np.testing.assert_array_equal(ref.mask_words(-(2**63), 8, 64), ref.mask_words(2**63, 8, 64))


@pytest.mark.parametrize("offset", [-4, 1, 2, 3, 6])
def test_bad_offset_rejected(offset):
    with pytest.raises(ValueError):
        ref.mask_words(0, offset, 4)


def test_words_look_uniform():
    w = ref.mask_words(2024, 40, 1 << 18).astype(np.float64) / 2.0**32
    assert stats.kstest(w, "uniform").pvalue > 1e-4
    # every one of the 4 word lanes separately
    lanes = w.reshape(-1, 4)
    for j in range(4):
        assert stats.kstest(lanes[:, j], "uniform").pvalue > 1e-4, j


# ------------------------------------------------------------------- thresholds


@pytest.mark.parametrize(
    "p, expected",
    [
        (0.0, 2**32 - 1),  # floor(2**32) clamped
        (1.0, 0),
        (0.5, 2**31),
        (0.25, 3 * 2**30),
        (0.75, 2**30),
        (2.0**-32, 2**32 - 1),
        (2.0**-31, 2**32 - 2),
        (2.0**-33, 2**32 - 1),  # (2**32 - 0.5) floored
        (1e-12, 2**32 - 1),
        (1e-20, 2**32 - 1),  # 1 - p == 1.0 in double: clamped
        (1.0 - 2.0**-32, 1),
        (1.0 - 2.0**-34, 0),  # keep*2**32 = 0.25
        (0.1, math.floor(0.9 * 2**32)),
    ],
)
def test_threshold_edges(p, expected):
    assert ref.threshold(p) == expected


def test_threshold_uses_double_keep():
    p = 0.3
    keep = 1.0 - p  # evaluated in double, as the kernels do
    assert ref.threshold(p) == math.floor(keep * 2**32)
    assert ref.threshold(p) == 3006477107


def test_keep_mask_p0_keeps_all_p1_keeps_none():
    assert ref.keep_mask(1, 0, 0.0, (7, 9)).all()
    assert not ref.keep_mask(1, 0, 1.0, (7, 9)).any()
    assert ref.keep_mask(1, 0, 0.0, (0,)).shape == (0,)


def test_keep_mask_is_words_below_threshold():
    seed, offset, p = 77, 16, 0.37
    m = ref.keep_mask(seed, offset, p, (13, 17))
    w = ref.mask_words(seed, offset, 13 * 17).astype(np.uint64)
    np.testing.assert_array_equal(m.reshape(-1).numpy(), w < ref.threshold(p))
    assert m.dtype == torch.bool and m.shape == (13, 17)


def test_keep_mask_tiny_p_drops_only_max_word():
    # p = 1e-20 -> threshold 2**32 - 1: only a word of 0xffffffff is dropped
    m = ref.keep_mask(3, 0, 1e-20, (1 << 16,))
    w = ref.mask_words(3, 0, 1 << 16)
    np.testing.assert_array_equal(m.numpy(), w != 0xFFFFFFFF)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("seed", [0, 1, 2**63 + 99])
def test_keep_rate_binomial(p, seed):
    n = 1 << 18
    kept = int(ref.keep_mask(seed, 0, p, (n,)).sum())
    assert stats.binomtest(kept, n, 1.0 - p).pvalue > 1e-4


@pytest.mark.parametrize("p", [1e-6, 1 - 1e-6])
def test_keep_rate_extreme_p(p):
    n = 1 << 18
    kept = int(ref.keep_mask(11, 0, p, (n,)).sum())
    assert stats.binomtest(kept, n, 1.0 - p).pvalue > 1e-4


def test_mask_is_function_of_row_major_mask_index():
    m2 = ref.keep_mask(5, 4, 0.5, (6, 7))
    m1 = ref.keep_mask(5, 4, 0.5, (42,))
    assert torch.equal(m2.reshape(-1), m1)


# --------------------------------------------------------------- reference ops


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ref_dropout_p0_identity_p1_zeros(dtype):
    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(0)).to(dtype)
    assert torch.equal(_bits(ref.ref_dropout(x, 0.0, 1, 0)), _bits(x))
    x[0, 0] = float("nan")
    x[0, 1] = float("-inf")
    z = ref.ref_dropout(x, 1.0, 1, 0)
    assert torch.equal(_bits(z), torch.zeros_like(_bits(z)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ref_dropout_kept_scaled_dropped_plus_zero(dtype):
    p, seed, offset = 0.3, 1234, 8
    x = torch.randn(64, 33, generator=torch.Generator().manual_seed(1)).to(dtype)
    x[::3] = float("nan")
    x[1::3] = -float("inf")
    x[2::7] = -0.0
    y = ref.ref_dropout(x, p, seed, offset)
    mask = ref.keep_mask(seed, offset, p, x.shape)
    assert 0 < mask.sum() < mask.numel()
    # dropped: +0 bit pattern
    assert torch.equal(_bits(y)[~mask], torch.zeros_like(_bits(y)[~mask]))
    # kept: x * fl(1/keep) in the compute type, one rounding
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    scale = torch.tensor(1.0 / (1.0 - p), dtype=torch.float64).to(cdt)
    exp = (x.to(cdt) * scale).to(dtype)
    assert torch.equal(_bits(y)[mask], _bits(exp)[mask])


def test_ref_dropout_fp16_matches_numpy():
    # independent path for the fp16 rounding chain: numpy float32 math + RNE to half
    p, seed, offset = 0.1, 42, 0
    x = torch.randn(4097, generator=torch.Generator().manual_seed(2)).half()
    y = ref.ref_dropout(x, p, seed, offset)
    keep = ref.mask_words(seed, offset, x.numel()).astype(np.uint64) < ref.threshold(p)
    scale = np.float32(1.0 / (1.0 - p))
    exp = np.where(keep, x.numpy().astype(np.float32) * scale, np.float32(0)).astype(np.float16)
    np.testing.assert_array_equal(y.numpy().view(np.int16), exp.view(np.int16))


def test_ref_dropout_scale_by_keep_false():
    x = torch.randn(1000, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y = ref.ref_dropout(x, 0.4, 9, 0, scale_by_keep=False)
    mask = ref.keep_mask(9, 0, 0.4, x.shape)
    assert torch.equal(y[mask], x[mask])
    assert (y[~mask] == 0).all()


@pytest.mark.parametrize("mask_ndim", [0, 1, 2, 3, -1])
def test_ref_dropout_mask_ndim_broadcast(mask_ndim):
    x = torch.ones(4, 5, 6)
    y = ref.ref_dropout(x, 0.5, 31, 4, mask_ndim=mask_ndim)
    m = 3 if mask_ndim == -1 else mask_ndim
    mask = ref.keep_mask(31, 4, 0.5, x.shape[:m])
    exp = mask.reshape(x.shape[:m] + (1,) * (3 - m)).expand(x.shape).float() * 2.0
    assert torch.equal(y, exp)


def test_ref_backward_is_dropout_of_grad():
    g = torch.randn(3, 1025, generator=torch.Generator().manual_seed(4))
    for kw in ({}, {"mask_ndim": 1}, {"scale_by_keep": False}):
        assert torch.equal(
            ref.ref_dropout_backward(g, 0.25, 5, 12, **kw),
            ref.ref_dropout(g, 0.25, 5, 12, **kw),
        )


def test_ref_backward_matches_autograd_of_masked_scale():
    # d/dx of where(mask, x*s, 0) is where(mask, s, 0): compare with autograd in fp64
    x = torch.randn(257, dtype=torch.float64, requires_grad=True)
    mask = ref.keep_mask(8, 0, 0.6, x.shape)
    y = torch.where(mask, x * (1.0 / 0.4), torch.zeros((), dtype=torch.float64))
    g = torch.randn(257, dtype=torch.float64)
    (gx,) = torch.autograd.grad(y, x, g)
    assert torch.equal(ref.ref_dropout_backward(g, 0.6, 8, 0), gx)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_bias", [False, True])
def test_ref_dropout_add(dtype, with_bias):
    p, seed, offset = 0.2, 2**63 + 1, 4
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(16, 24, generator=gen).to(dtype)
    r = torch.randn(16, 24, generator=gen).to(dtype)
    b = torch.randn(24, generator=gen).to(dtype) if with_bias else None
    y = ref.ref_dropout_add(x, r, b, p, seed, offset)
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    v = x.to(cdt) + (b.to(cdt) if with_bias else 0)
    mask = ref.keep_mask(seed, offset, p, x.shape)
    scale = torch.tensor(1.0 / (1.0 - p), dtype=torch.float64).to(cdt)
    exp = (torch.where(mask, v * scale, torch.zeros((), dtype=cdt)) + r.to(cdt)).to(dtype)
    assert torch.equal(_bits(y), _bits(exp))
    # dropped elements are exactly the residual (0 + r, one rounding of an exact value)
    assert torch.equal(_bits(y)[~mask], _bits(r)[~mask])
    # p == 0: plain (x + b) + r
    y0 = ref.ref_dropout_add(x, r, b, 0.0, seed, offset)
    assert torch.equal(_bits(y0), _bits((v + r.to(cdt)).to(dtype)))


def test_ref_dropout_add_single_rounding_differs_from_two():
    # the fused op rounds once; rounding dropout(x) to half first would differ somewhere
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(1 << 14, generator=gen).half()
    r = torch.randn(1 << 14, generator=gen).half()
    fused = ref.ref_dropout_add(x, r, None, 0.1, 1, 0)
    twice = (ref.ref_dropout(x, 0.1, 1, 0).float() + r.float()).half()
    assert not torch.equal(_bits(fused), _bits(twice))


def test_ref_alpha_dropout_values_match_torch_formula():
    p = 0.2
    x = torch.randn(1 << 14, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    y = ref.ref_dropout(x, p, 3, 0, alpha=True)
    mask = ref.keep_mask(3, 0, p, x.shape)
    a = 1.0 / math.sqrt((ref.ALPHA**2 * p + 1) * (1 - p))
    torch.testing.assert_close(y[mask], x[mask] * a + ref.ALPHA * a * p)
    torch.testing.assert_close(y[~mask], torch.full_like(y[~mask], -ref.ALPHA * a * (1 - p)))
    # torch's alpha_dropout produces values from the same two affine families
    t = torch.nn.functional.alpha_dropout(x, p, training=True)
    on_kept = torch.isclose(t, x * a + ref.ALPHA * a * p)
    on_drop = torch.isclose(t, torch.full_like(t, -ref.ALPHA * a * (1 - p)))
    assert bool((on_kept | on_drop).all())
    # backward: grad * a where kept, 0 where dropped
    g = torch.randn_like(x)
    gb = ref.ref_dropout_backward(g, p, 3, 0, alpha=True)
    torch.testing.assert_close(gb, torch.where(mask, g * a, torch.zeros_like(g)))
    # p == 1 gives zeros
    assert (ref.ref_dropout(x, 1.0, 3, 0, alpha=True) == 0).all()


def test_ref_alpha_dropout_preserves_moments():
    x = torch.randn(1 << 18, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    y = ref.ref_dropout(x, 0.3, 17, 0, alpha=True)
    assert abs(float(y.mean())) < 0.02
    assert abs(float(y.std()) - 1.0) < 0.02
