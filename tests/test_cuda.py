"""GPU tests: skipped on machines without a CUDA GPU (every machine this project's CI has).

They are written to run as they are for a user with a GPU: ``pytest tests/test_cuda.py``.
The contract makes the mask a pure function of (seed, offset, p, mask shape), so the CPU
kernels, which CI does run, are the reference for every CUDA result here.
"""

from __future__ import annotations

import pytest
import torch

import fused_dropout
from fused_dropout import functional as FD
from fused_dropout import ops

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
INT_VIEW = {
    torch.float32: torch.int32,
    torch.float64: torch.int64,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}
SEED_OFFSET = (0xDEADBEEF12345678, 4 * 12345)


def assert_same_bits(cuda_result: torch.Tensor, cpu_result: torch.Tensor) -> None:
    got = cuda_result.cpu().contiguous()
    want = cpu_result.contiguous()
    assert got.dtype == want.dtype and got.shape == want.shape
    # NaN payloads may differ between devices; everything else must match to the bit.
    finite = ~torch.isnan(want)
    assert torch.equal(torch.isnan(got), ~finite)
    assert torch.equal(
        got[finite].view(INT_VIEW[got.dtype]), want[finite].view(INT_VIEW[got.dtype])
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("numel", [1, 3, 4, 5, 1023, 4097, (1 << 20) + 3])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_cpu_and_cuda_bit_identical(dtype, numel, p):
    x = torch.randn(numel, dtype=torch.float64).to(dtype)
    out_cpu, pair_cpu = ops.dropout(x, p, seed_offset=SEED_OFFSET)
    out_cuda, pair_cuda = ops.dropout(x.cuda(), p, seed_offset=SEED_OFFSET)
    assert_same_bits(out_cuda, out_cpu)
    assert torch.equal(pair_cuda.cpu(), pair_cpu)
    grad = torch.randn_like(x)
    assert_same_bits(
        ops.dropout_backward(grad.cuda(), pair_cuda, p), ops.dropout_backward(grad, pair_cpu, p)
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values_bit_identical_and_bf16_nan_is_0x7fc0(dtype):
    """NaN, +-Inf, -0, subnormals and overflows: the same bits as the CPU (NaN patterns are
    the hardware's, but bf16's, which the kernels make the CPU's 0x7FC0)."""
    info = torch.finfo(dtype)
    specials = [float("nan"), float("inf"), -float("inf"), -0.0, info.tiny / 4, info.max]
    x = torch.randn(4099, dtype=torch.float64).to(dtype)
    x[::5] = torch.tensor(specials, dtype=dtype).repeat(len(x[::5]) // len(specials) + 1)[
        : len(x[::5])
    ]
    r = torch.randn_like(x)
    b = x[:97].clone()
    for op in (
        lambda t, rr, bb: ops.dropout(t, 0.3, seed_offset=SEED_OFFSET)[0],
        lambda t, rr, bb: ops.dropout_add(t, rr, None, 0.3, seed_offset=SEED_OFFSET)[0],
        lambda t, rr, bb: ops.dropout_add(
            t.view(-1, 97)[:42], rr.view(-1, 97)[:42], bb, 0.3, seed_offset=SEED_OFFSET
        )[0],
    ):
        want = op(x[:4074], r[:4074], b)
        got = op(x[:4074].cuda(), r[:4074].cuda(), b.cuda())
        assert_same_bits(got, want)
        if dtype == torch.bfloat16:
            assert torch.equal(got.cpu().view(torch.int16), want.view(torch.int16))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed", "misaligned"])
@pytest.mark.parametrize("mask_ndim", [-1, 0, 1, 2])
def test_layouts_and_broadcast_masks_bit_identical(dtype, layout, mask_ndim):
    x = torch.randn(3, 5, 7, 9, dtype=torch.float64).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":
        x = x.transpose(1, 3)
    elif layout == "misaligned":  # contiguous, but not 16-byte aligned: the scalar path
        x = torch.randn(x.numel() + 1, dtype=torch.float64).to(dtype)[1:].view(3, 5, 7, 9)
    want = ops.dropout(x, 0.4, mask_ndim, seed_offset=SEED_OFFSET)[0]
    got = ops.dropout(x.cuda(), 0.4, mask_ndim, seed_offset=SEED_OFFSET)[0]
    assert got.stride() == want.stride()
    assert_same_bits(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("mask_ndim", [-1, 1])
def test_fused_add_bit_identical(dtype, with_bias, mask_ndim):
    x = torch.randn(4, 77, 96, dtype=torch.float64).to(dtype)
    residual = torch.randn_like(x)
    bias = torch.randn(96, dtype=torch.float64).to(dtype) if with_bias else None
    want = ops.dropout_add(x, residual, bias, 0.3, mask_ndim, seed_offset=SEED_OFFSET)[0]
    got = ops.dropout_add(
        x.cuda(),
        residual.cuda(),
        None if bias is None else bias.cuda(),
        0.3,
        mask_ndim,
        seed_offset=SEED_OFFSET,
    )[0]
    assert_same_bits(got, want)


@pytest.mark.parametrize("alpha_fn", [FD.alpha_dropout, FD.feature_alpha_dropout])
def test_alpha_bit_identical(alpha_fn):
    x = torch.randn(8, 16, 5, 5)
    want = alpha_fn(x, 0.3, True, seed_offset=SEED_OFFSET)
    got = alpha_fn(x.cuda(), 0.3, True, seed_offset=SEED_OFFSET)
    assert_same_bits(got, want)


def test_nan_and_inf_never_leak_on_cuda():
    x = torch.full((4096,), float("nan"), device="cuda")
    x[::2] = float("inf")
    out = FD.dropout(x, 0.5)
    dropped = out == 0
    assert 0 < int(dropped.sum()) < x.numel()
    assert torch.isnan(out[~dropped] - out[~dropped]).all()  # kept ones stay non-finite


def test_gradcheck_cuda():
    x = torch.randn(6, 7, dtype=torch.float64, device="cuda", requires_grad=True)
    r = torch.randn_like(x, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, device="cuda", requires_grad=True)
    so = SEED_OFFSET
    assert torch.autograd.gradcheck(lambda t: FD.dropout(t, 0.3, seed_offset=so), (x,))
    assert torch.autograd.gradgradcheck(lambda t: FD.dropout(t, 0.3, seed_offset=so), (x,))
    assert torch.autograd.gradcheck(
        lambda t, u, v: FD.bias_dropout_add(t, v, u, 0.3, seed_offset=so), (x, r, b)
    )
    assert torch.autograd.gradcheck(
        lambda t, u: FD.drop_path_add(u, t, 0.5, seed_offset=so), (x, r)
    )


def test_generator_draws_reproduce_and_advance():
    x = torch.ones(1 << 12, device="cuda")
    torch.manual_seed(7)
    a, b = FD.dropout(x, 0.5), FD.dropout(x, 0.5)
    torch.manual_seed(7)
    assert torch.equal(FD.dropout(x, 0.5), a)
    assert not torch.equal(a, b)
    gen = torch.Generator(device="cuda").manual_seed(3)
    c = FD.dropout(x, 0.5, generator=gen)
    gen.manual_seed(3)
    assert torch.equal(FD.dropout(x, 0.5, generator=gen), c)


def test_pair_reported_by_kernel_reproduces_on_cpu():
    torch.manual_seed(11)
    x = torch.randn(10_000, device="cuda")
    out, pair = ops.dropout(x, 0.5)
    seed, offset = (int(v) for v in pair.cpu())
    cpu = ops.dropout(x.cpu(), 0.5, seed_offset=(seed % (1 << 64), offset))[0]
    assert_same_bits(out, cpu)


def test_cuda_graph_replay_gives_fresh_masks():
    x = torch.ones(1 << 16, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up outside capture
            ops.dropout(x, 0.5)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, pair = ops.dropout(x, 0.5)
    masks, pairs = [], []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        masks.append(out != 0)
        pairs.append(pair.clone())
        # Each replay's pair regenerates exactly its mask on the CPU.
        seed, offset = (int(v) for v in pair.cpu())
        cpu = ops.dropout(x.cpu(), 0.5, seed_offset=(seed % (1 << 64), offset))[0]
        assert_same_bits(out, cpu)
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])
    assert not torch.equal(pairs[0], pairs[1])


def test_compile_fullgraph_matches_eager_on_cuda():
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 128),
        torch.nn.ReLU(),
        fused_dropout.Dropout(0.3),
        torch.nn.Linear(128, 8),
    ).cuda()
    x = torch.randn(32, 64, device="cuda")
    torch.manual_seed(0)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True)
    torch.manual_seed(0)
    assert torch.allclose(compiled(x), eager, rtol=1e-5, atol=1e-6)


def test_saved_for_backward_is_the_pair_only():
    x = torch.randn(1 << 20, device="cuda", requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        FD.dropout(x, 0.5).sum().backward()
    assert sum(saved) <= 64


def test_empty_tensor_reports_the_pair_it_was_given():
    x = torch.empty(0, device="cuda")
    for pair in (
        ops.dropout(x, 0.5, seed_offset=(5, 8))[1],
        ops.dropout_add(x, x, None, 0.5, seed_offset=(5, 8))[1],
    ):
        assert pair.tolist() == [5, 8]
    assert ops.dropout(x.cpu(), 0.5, seed_offset=(5, 8))[1].tolist() == [5, 8]


# Boxes of a logical tensor (issue 17): (global shape, offset, local shape, mask_ndim).
BOXES = [
    ((1000,), (13,), (600,), -1),  # a head of 5 elements before the first whole group
    (((1 << 20) + 3,), (7,), ((1 << 20) - 9,), -1),  # many tiles, each straddling two groups
    ((6, 50, 7), (0, 3, 0), (6, 13, 7), -1),  # a middle dim sharded: runs of 91 every 350
    ((6, 50, 7), (0, 0, 1), (6, 50, 3), -1),  # the last dim: runs of 3 every 7
    ((300, 2), (13, 0), (257, 2), 1),  # per-sample, the batch sharded
    ((6, 12, 4, 4), (0, 5, 0, 0), (6, 7, 4, 4), 2),  # channel masks, channels sharded
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("box", BOXES, ids=str)
def test_box_on_cuda_is_the_global_cpu_op_sliced(dtype, box):
    """A box's mask on the GPU (global_shape/global_offset) is the CPU op's on the logical
    tensor, sliced: forward, dropout_add with a bias, and backward."""
    shape, start, local, k = box
    index = tuple(slice(o, o + n) for o, n in zip(start, local))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    r = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(shape[-1], generator=g, dtype=torch.float64).to(dtype)
    kw = dict(seed_offset=SEED_OFFSET, global_shape=list(shape), global_offset=list(start))
    xl, rl = x[index].contiguous().cuda(), r[index].contiguous().cuda()
    bl = b[start[-1] : start[-1] + local[-1]].contiguous().cuda()
    want = ops.dropout(x, 0.4, k, seed_offset=SEED_OFFSET)[0][index]
    assert_same_bits(ops.dropout(xl, 0.4, k, **kw)[0], want)
    want = ops.dropout_add(x, r, b, 0.4, k, seed_offset=SEED_OFFSET)[0][index]
    assert_same_bits(ops.dropout_add(xl, rl, bl, 0.4, k, **kw)[0], want)
    pair = ops.dropout(x[:1], 0.4, seed_offset=SEED_OFFSET)[1]
    want = ops.dropout_backward(x, pair, 0.4, k)[index]
    got = ops.dropout_backward(
        xl, pair.cuda(), 0.4, k, global_shape=list(shape), global_offset=list(start)
    )
    assert_same_bits(got, want)
