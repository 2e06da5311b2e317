"""Masks indexed by global position (issue 17, the kernels): an op on a box of a logical tensor
(``global_shape``, ``global_offset``) gives exactly the logical tensor's op, sliced to the box.

For many boxes (odd bases 1, 3, 7, 13; one sharded dim, any dim; dims of local size 1), every
dtype and every mask kind (element-wise, per-sample, per-channel, one for the batch):
``op(x[box], box) == op(x)[box]`` bit for bit, forward and backward, on every CPU path and
through the host-executed CUDA kernels under the suite's geometries (compiled and
host-executed, not run on a GPU), and against tests/reference.py. Planted bugs in the CUDA
kernel's box indexing must be caught.
"""

from __future__ import annotations

import dataclasses

import cuda_host
import pytest
import reference as ref
import torch
from helpers import assert_bitwise, randn

from fused_dropout import ops

OPS = torch.ops.fused_dropout
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
SEED_OFFSET = (0x0123456789ABCDEF, 4 * 77)
P = 0.4


@dataclasses.dataclass(frozen=True)
class Box:
    """A box ``[start, start + local)`` of a logical tensor of ``shape``; mask over the leading
    ``k`` dims (-1: element-wise)."""

    shape: tuple[int, ...]
    start: tuple[int, ...]
    local: tuple[int, ...]
    k: int = -1
    layout: str = "contiguous"  # or channels_last, strided (a non-contiguous local input)

    def __str__(self) -> str:
        j = "x".join
        s = f"k{self.k}-{j(map(str, self.shape))}@{j(map(str, self.start))}+"
        return s + j(map(str, self.local)) + ("" if self.layout == "contiguous" else self.layout)

    @property
    def index(self) -> tuple[slice, ...]:
        return tuple(slice(o, o + n) for o, n in zip(self.start, self.local))

    def args(self) -> dict:
        return {"global_shape": list(self.shape), "global_offset": list(self.start)}

    def localize(self, t: torch.Tensor) -> torch.Tensor:
        local = t[self.index].contiguous()
        if self.layout == "channels_last":
            return local.contiguous(memory_format=torch.channels_last)
        if self.layout == "strided":  # every other element of a wider tensor
            wide = torch.zeros((*local.shape[:-1], 2 * local.shape[-1]), dtype=t.dtype)
            wide[..., ::2] = local
            return wide[..., ::2]
        return local


def _boxes() -> list[Box]:
    boxes = []
    # 1-D, element-wise: odd bases, short boxes (heads only) and long ones (SIMD blocks)
    for start, n in ((1, 20), (3, 5), (7, 1), (13, 600), (8, 300), (1, 999), (0, 517)):
        boxes.append(Box((1000,), (start,), (n,)))
    # one sharded dim of three, each in turn, element-wise
    g = (6, 50, 7)
    boxes += [
        Box(g, (1, 0, 0), (3, 50, 7)),  # batch rows
        Box(g, (0, 3, 0), (6, 13, 7)),  # a middle dim: base 21, runs of 91 every 350
        Box(g, (0, 0, 1), (6, 50, 3)),  # the last dim: runs of 3 every 7
        Box(g, (2, 7, 0), (1, 41, 7)),  # a row of local size 1, then a sharded dim
        Box(g, (5, 0, 3), (1, 50, 1)),  # one element per row: one mask element per stride
        Box(g, (0, 3, 0), (6, 13, 7), layout="strided"),  # copied to contiguous first
    ]
    # wide rows, sharded columns (a column-parallel layer's output): SIMD blocks with a head
    boxes += [Box((4, 1000), (0, 13), (4, 600)), Box((3, 700), (1, 3), (2, 557))]
    # per-sample masks: the batch sharded, and a dim the mask does not cover
    boxes += [
        Box((10, 3, 5), (3, 0, 0), (4, 3, 5), 1),
        Box((10, 3, 5), (0, 1, 2), (10, 2, 3), 1),  # not covered: the same mask elements
        Box((300, 2), (13, 0), (257, 2), 1),
    ]
    # channel masks (N, C): N sharded, C sharded, a spatial dim, channels-last
    c = (6, 12, 4, 4)
    boxes += [
        Box(c, (1, 0, 0, 0), (5, 12, 4, 4), 2),
        Box(c, (0, 5, 0, 0), (6, 7, 4, 4), 2),
        Box(c, (0, 0, 1, 0), (6, 12, 3, 4), 2),
        Box(c, (1, 0, 0, 0), (5, 12, 4, 4), 2, "channels_last"),
        Box(c, (0, 5, 0, 0), (6, 7, 4, 4), 2, "channels_last"),
    ]
    # one decision for the whole batch (stochastic_depth "batch")
    boxes.append(Box((8, 5), (3, 1), (2, 3), 0))
    return boxes


BOXES = _boxes()


def _global_and_local(box: Box, dtype: torch.dtype, seed: int):
    x = randn(box.shape, dtype, seed)
    return x, box.localize(x)


def _bias_of(box: Box, dtype: torch.dtype):
    b = randn((box.shape[-1],), dtype, 9)
    return b, b[box.start[-1] : box.start[-1] + box.local[-1]].contiguous()


@pytest.mark.cpu_paths
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("box", BOXES, ids=str)
def test_box_forward_is_the_global_op_sliced(box, dtype, cpu_path):
    x, xl = _global_and_local(box, dtype, 1)
    want, pair = ops.dropout(x, P, box.k, seed_offset=SEED_OFFSET)
    got, pair_l = ops.dropout(xl, P, box.k, seed_offset=SEED_OFFSET, **box.args())
    assert_bitwise(got, want[box.index], f"dropout {box}")
    assert torch.equal(pair, pair_l)
    assert_bitwise(want, ref.ref_dropout(x, P, *SEED_OFFSET, box.k), f"dropout {box} vs ref")

    inplace = xl.clone()
    ops.dropout_(inplace, P, box.k, seed_offset=SEED_OFFSET, **box.args())
    assert_bitwise(inplace, want[box.index], f"dropout_ {box}")

    got = ops.dropout(xl, P, box.k, True, True, seed_offset=SEED_OFFSET, **box.args())[0]
    want_alpha = ops.dropout(x, P, box.k, True, True, seed_offset=SEED_OFFSET)[0]
    assert_bitwise(got, want_alpha[box.index], f"alpha dropout {box}")

    r, rl = _global_and_local(box, dtype, 2)
    if box.layout == "channels_last":
        rl = rl.contiguous(memory_format=torch.channels_last)
    got = ops.dropout_add(xl, rl, None, P, box.k, seed_offset=SEED_OFFSET, **box.args())[0]
    want = ops.dropout_add(x, r, None, P, box.k, seed_offset=SEED_OFFSET)[0]
    assert_bitwise(got, want[box.index], f"dropout_add {box}")
    if box.layout != "channels_last":
        b, bl = _bias_of(box, dtype)
        got = ops.dropout_add(xl, rl, bl, P, box.k, seed_offset=SEED_OFFSET, **box.args())[0]
        want = ops.dropout_add(x, r, b, P, box.k, seed_offset=SEED_OFFSET)[0]
        assert_bitwise(got, want[box.index], f"bias_dropout_add {box}")
        assert_bitwise(want, ref.ref_dropout_add(x, r, b, P, *SEED_OFFSET, box.k), "vs ref")


@pytest.mark.cpu_paths
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("box", BOXES, ids=str)
def test_box_backward_is_the_global_backward_sliced(box, dtype, cpu_path):
    g, gl = _global_and_local(box, dtype, 3)
    pair = torch.tensor([ref.seed_to_int64(SEED_OFFSET[0]), SEED_OFFSET[1]])
    want = ops.dropout_backward(g, pair, P, box.k)
    got = ops.dropout_backward(gl, pair, P, box.k, **box.args())
    assert_bitwise(got, want[box.index], f"dropout_backward {box}")
    assert_bitwise(want, ref.ref_dropout_backward(g, P, *SEED_OFFSET, box.k), "vs ref")

    # through autograd: the box is kept for backward (and double backward)
    x, xl = _global_and_local(box, dtype, 1)
    xl = xl.detach().requires_grad_()
    incoming = gl.detach().clone().requires_grad_()
    y = ops.dropout(xl, P, box.k, seed_offset=SEED_OFFSET, **box.args())[0]
    (grad,) = torch.autograd.grad(y, xl, incoming, create_graph=True)
    assert_bitwise(grad, want[box.index], f"autograd of dropout {box}")
    (again,) = torch.autograd.grad(grad, incoming, gl)  # linear: the same mask again
    assert_bitwise(again, want[box.index], f"double backward of dropout {box}")
    r = torch.zeros_like(xl)
    y = ops.dropout_add(xl, r, None, P, box.k, seed_offset=SEED_OFFSET, **box.args())[0]
    (grad,) = torch.autograd.grad(y, xl, gl)
    assert_bitwise(grad, want[box.index], f"autograd of dropout_add {box}")


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("local", "shape", "start", "error", "match"),
    [
        ((4, 8), (10, 8), (8, 0), ValueError, r"not inside global_shape \[10, 8\] \(dim 0\)"),
        ((4, 8), (10, 8), (0, 1), ValueError, r"not inside global_shape"),
        ((4, 8), (10, 8), (-1, 0), ValueError, r"not inside global_shape"),
        ((4, 8), (10,), (0,), ValueError, r"one entry per dim of the input \(2\)"),
        ((4, 8), (10, 8), (0,), ValueError, r"one entry per dim of the input"),
        ((2, 2, 2), (4, 4, 4), (0, 1, 2), NotImplementedError, r"more than one dim of the mask"),
    ],
)
@pytest.mark.parametrize("fake", [False, True], ids=["cpu", "fake"])
def test_bad_box_is_a_clear_error(local, shape, start, error, match, fake):
    x = torch.zeros(local)
    box = (list(shape), list(start))
    if fake:
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode() as mode:
            x = mode.from_tensor(x)
            with pytest.raises(error, match=match):
                OPS.dropout(x, 0.5, -1, True, False, 1, 0, None, *box)
        return
    pair = torch.tensor([1, 0])
    for call in (
        lambda: OPS.dropout(x, 0.5, -1, True, False, 1, 0, None, *box),
        lambda: OPS.dropout_(x, 0.5, -1, True, False, 1, 0, None, *box),
        lambda: OPS.dropout_add(x, x, None, 0.5, -1, True, 1, 0, None, *box),
        lambda: OPS.dropout_backward(x, pair, 0.5, -1, True, False, *box),
    ):
        with pytest.raises(error, match=match):
            call()


def test_box_needs_both_shape_and_offset():
    x = torch.zeros(4, 8)
    with pytest.raises(ValueError, match="must be given together"):
        OPS.dropout(x, 0.5, -1, True, False, 1, 0, None, [4, 8], None)


def test_box_of_a_sharded_dim_outside_the_mask_is_accepted():
    """A box sharded along dims the mask does not cover reuses the mask (no error)."""
    x = randn((4, 6, 5), torch.float32, 1)
    got = ops.dropout(
        x[:, 1:4], P, 1, seed_offset=SEED_OFFSET, global_shape=[4, 6, 5], global_offset=[0, 1, 0]
    )[0]
    assert_bitwise(got, ops.dropout(x, P, 1, seed_offset=SEED_OFFSET)[0][:, 1:4])


def test_opcheck_with_a_box():
    x = randn((6, 10), torch.float32, 1)
    box = ([12, 10], [6, 0])
    torch.library.opcheck(OPS.dropout.default, (x, P, -1, True, False, 5, 8, None, *box))
    torch.library.opcheck(
        OPS.dropout_add.default, (x, x.clone(), None, P, -1, True, 5, 8, None, *box)
    )


# ---------------------------------------------------------------- host-executed CUDA

needs_host = pytest.mark.skipif(
    cuda_host.unavailable_reason() is not None, reason=str(cuda_host.unavailable_reason())
)


@pytest.fixture(scope="module")
def host() -> cuda_host.HostCuda:
    return cuda_host.build()


def run_host_case(host: cuda_host.HostCuda, box: Box, dtype, op, geometry) -> None:
    """One op on ``box`` through the host-executed kernels vs the CPU op on the global tensor."""
    x, xl = _global_and_local(box, dtype, 1)
    what = f"host CUDA {op} {box} {dtype} on {geometry.name}"
    run = dict(geometry=geometry, mask_ndim=box.k, seed_offset=SEED_OFFSET, **box.args())
    if op == "dropout":
        want = ops.dropout(x, P, box.k, seed_offset=SEED_OFFSET)[0]
        got = host.masked_op(xl, P, **run)
    elif op == "backward":
        pair = torch.tensor([ref.seed_to_int64(SEED_OFFSET[0]), SEED_OFFSET[1]])
        want = ops.dropout_backward(x, pair, P, box.k)
        run["seed_offset"] = (1, 4)  # pair_in must win
        got = host.masked_op(xl, P, backward=True, pair_in=SEED_OFFSET, **run)
    else:
        r, rl = _global_and_local(box, dtype, 2)
        if box.layout == "channels_last":
            rl = rl.contiguous(memory_format=torch.channels_last)
        b = bl = None
        if op == "bias_add":
            b, bl = _bias_of(box, dtype)
        want = ops.dropout_add(x, r, b, P, box.k, seed_offset=SEED_OFFSET)[0]
        got = host.masked_op(xl, P, residual=rl, bias=bl, **run)
    assert_bitwise(got.out, want[box.index], what)


def _host_cases():
    cases = []
    for box in BOXES:
        for dtype in DTYPES:
            ops_ = ["dropout", "backward", "add"]
            if box.layout != "channels_last":
                ops_.append("bias_add")
            cases += [(box, dtype, op) for op in ops_]
    return cases


HOST_CASES = _host_cases()


@needs_host
@pytest.mark.parametrize("geometry", cuda_host.GEOMETRIES, ids=lambda g: g.name)
@pytest.mark.parametrize(
    ("box", "dtype", "op"),
    HOST_CASES,
    ids=[f"{op}-{str(d).removeprefix('torch.')}-{b}" for b, d, op in HOST_CASES],
)
def test_host_cuda_box_is_the_global_op_sliced(host, box, dtype, op, geometry):
    run_host_case(host, box, dtype, op, geometry)


KERNEL = "cuda/dropout.cu"
BOX_MUTATIONS = (
    cuda_host.Mutation(
        "base ignored",
        KERNEL,
        "map.boxed ? map.base + (q / map.seg)",
        "map.boxed ? (q / map.seg)",
    ),
    cuda_host.Mutation(
        "base rounded down to a multiple of 8",
        KERNEL,
        "map.boxed ? map.base + (q / map.seg)",
        "map.boxed ? map.base / 8 * 8 + (q / map.seg)",
    ),
    cuda_host.Mutation(
        "head peel off by one",
        KERNEL,
        "if (groups) return static_cast<uint32_t>(bits >> head);",
        "if (groups) return static_cast<uint32_t>(bits >> (head + 1));",
    ),
    cuda_host.Mutation(
        "tile straddling two Philox groups draws only the first",
        KERNEL,
        "groups ? (head + N + kMaskPerCall - 1) / kMaskPerCall",
        "groups ? (N + kMaskPerCall - 1) / kMaskPerCall",
    ),
    cuda_host.Mutation(
        "segment stride ignored",
        KERNEL,
        "(q / map.seg) * map.seg_stride",
        "(q / map.seg) * map.seg",
    ),
)


@needs_host
@pytest.mark.slow  # a cold CI run compiles each mutant of the kernel
@pytest.mark.parametrize("mutation", BOX_MUTATIONS, ids=lambda m: m.name.replace(" ", "_"))
def test_planted_box_bug_is_caught(mutation):
    mutant = cuda_host.build((mutation,), jobs=1)
    for box, dtype, op in HOST_CASES:
        for geometry in cuda_host.GEOMETRIES:
            try:
                run_host_case(mutant, box, dtype, op, geometry)
            except AssertionError as caught:
                print(f"{mutation.name}: caught by {op} {box} {dtype}: {caught}")
                return
    pytest.fail(f"planted bug {mutation.name!r} passed every box case")
