"""GPU tests of the fused dropout + add + norm (csrc/cuda/norm.cu): skipped without a CUDA GPU.

The order of every sum is the contract's (core/norm.h), so the CPU op is the reference, bit for
bit, for the forward outputs and every gradient. Written to run as they are on a GPU machine
(bench/gpu_check.sh runs them, also under compute-sanitizer); never run here (no GPU).
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_bitwise, randn

from fused_dropout import ops

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SEED_OFFSET = (0xDEADBEEF12345678, 4 * 777)
CASES = [
    (dtype, cols, rms)
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16)
    for cols in (1, 7, 768, 1000, 4096, 65536)
    for rms in (False, True)
    if cols < 65536 or dtype == torch.float32
]


def _same(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    got = got.cpu()
    nan = want.isnan()  # NaN payloads are the device's
    assert torch.equal(got.isnan(), nan), what
    assert_bitwise(got.masked_fill(nan, 0), want.masked_fill(nan, 0), what)


@pytest.mark.parametrize("saved_is_y", [False, True], ids=["from_h", "from_y"])
@pytest.mark.parametrize("dtype,cols,rms", CASES, ids=str)
def test_norm_cuda_matches_cpu(dtype, cols, rms, saved_is_y):
    shape = (37, cols)
    x, r, dy = (randn(shape, dtype, s) for s in (1, 2, 3))
    w = randn((cols,), dtype, 4)
    b = None if rms else randn((cols,), dtype, 5)
    ib = randn((cols,), dtype, 6)
    dev = [t if t is None else t.cuda() for t in (x, r, w, b, ib)]
    args = (0.3, 1e-5, rms, False, False, True)
    want = ops.dropout_add_norm(x, r, w, b, ib, *args, seed_offset=SEED_OFFSET)
    got = ops.dropout_add_norm(*dev, *args, seed_offset=SEED_OFFSET)
    for name, g, e in zip(("y", "h", "mean", "rstd", "pair"), got, want):
        _same(g, e, name)
    y, h, mean, rstd, pair = want
    saved = y if saved_is_y else h
    flags = (False, True, True, True)
    bwd = (dy, None, saved, saved_is_y, w, b, mean, rstd, pair)
    want_g = ops.dropout_add_norm_backward(*bwd, 0.3, rms, False, False, *flags)
    got_g = ops.dropout_add_norm_backward(
        *(t if t is None or isinstance(t, bool) else t.cuda() for t in bwd),
        0.3,
        rms,
        False,
        False,
        *flags,
    )
    names = ("grad_input", "grad_h", "grad_weight", "grad_bias", "grad_input_bias")
    for name, g, e in zip(names, got_g, want_g):
        _same(g, e, name)
