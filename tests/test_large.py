"""Tensors past 2**31 elements, on the CPU, in bf16: element-wise, per-sample and per-channel
masks, checked at a few thousand positions (both ends, around 2**31, random ones) against the
reference computed at those positions only (``reference.ref_dropout_at``, on ``keep_at``).

The big cases are ``slow`` and need about 4.3 GB (8.6 GB for the out-of-place one); each skips,
saying so, when the machine has less memory available. The same check runs in the default suite
on a small tensor, so the checking code is itself tested.
"""

from __future__ import annotations

import importlib
import os
import resource
import sys
import time

import pytest
import torch

from fused_dropout import functional as FD
from fused_dropout import ops

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
ref = importlib.import_module("reference")  # tests/reference.py, whatever the import mode
from helpers import assert_bitwise  # noqa: E402

PERIOD = 255  # input value of element i: i % 255 + 1 (exact in bf16); 2**31 % 255 != 0
SEED, OFFSET = 2**64 - 5, 2**62 + 8
P = 0.3
BIG = 2**31 + 2**12


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def patterned(shape) -> torch.Tensor:
    """bf16 tensor of ``shape`` whose element i (row-major) is ``i % PERIOD + 1``."""
    x = torch.empty(shape, dtype=torch.bfloat16)
    pattern = (torch.arange(PERIOD) + 1).to(torch.bfloat16)
    x.view(-1, PERIOD).copy_(pattern.expand(x.numel() // PERIOD, PERIOD))
    return x


def positions(n: int) -> torch.Tensor:
    """Both ends, around 2**31 (and 2**32) when inside, and random positions."""
    parts = [torch.arange(min(n, 1000)), torch.arange(max(0, n - 1000), n)]
    for edge in (2**31, 2**32):
        if edge < n:
            parts.append(torch.arange(edge - 500, min(n, edge + 500)))
    parts.append(torch.randint(0, n, (1000,), generator=torch.Generator().manual_seed(0)))
    return torch.cat(parts).unique()


CASES = {  # name: (shape for n elements, op (in place), elements per mask element)
    "elementwise": (
        lambda n: (n,),
        lambda x: FD.dropout(x, P, inplace=True, seed_offset=(SEED, OFFSET)),
        lambda shape: 1,
    ),
    "per_sample": (
        lambda n: (3, n // 3),
        lambda x: ops.dropout_(x, P, 1, seed_offset=(SEED, OFFSET)),
        lambda shape: shape[1],
    ),
    "per_channel": (
        lambda n: (2, 3, 5, n // 30),
        lambda x: FD.dropout2d(x, P, inplace=True, seed_offset=(SEED, OFFSET)),
        lambda shape: shape[2] * shape[3],
    ),
}


def check_at_positions(case: str, n: int, out_of_place: bool = False) -> dict:
    make_shape, op, run = CASES[case]
    n -= n % (30 * PERIOD)  # every shape divides it, and the pattern tiles it
    shape = make_shape(n)
    x = patterned(shape)
    at = positions(n)
    t0 = time.perf_counter()
    if out_of_place:
        y = FD.dropout(x, P, seed_offset=(SEED, OFFSET))
        assert_bitwise(x.view(-1)[at], ((at % PERIOD) + 1).to(torch.bfloat16), "input kept")
    else:
        op(x)
        y = x
    seconds = time.perf_counter() - t0
    values = ((at % PERIOD) + 1).to(torch.bfloat16)
    expected = ref.ref_dropout_at(values, at // run(shape), P, SEED, OFFSET)
    assert_bitwise(y.view(-1)[at], expected, f"{case}: {n} elements at {at.numel()} positions")
    dropped = (expected == 0).float().mean().item()
    assert 0.2 < dropped < 0.4 or run(shape) > 1  # the positions do see both decisions
    return {"numel": n, "op_seconds": seconds, "positions": at.numel()}


@pytest.mark.parametrize("case", list(CASES))
def test_positions_check_on_a_small_tensor(case):
    """The big check's machinery on 1e5 elements, compared with the whole reference output."""
    make_shape, op, run = CASES[case]
    n = 100_000 - 100_000 % (30 * PERIOD)
    check_at_positions(case, n)
    x = patterned(make_shape(n))
    k = {"elementwise": -1, "per_sample": 1, "per_channel": 2}[case]
    whole = ref.ref_dropout(x, P, SEED, OFFSET, k)
    op(x)
    assert_bitwise(x, whole, case)


@pytest.mark.slow
@pytest.mark.parametrize(
    "case, out_of_place",
    [("elementwise", False), ("per_sample", False), ("per_channel", False), ("elementwise", True)],
    ids=["elementwise", "per_sample", "per_channel", "elementwise_out_of_place"],
)
def test_more_than_2_31_elements_bf16(case, out_of_place, capsys):
    need = 2 * BIG * (2 if out_of_place else 1) + 2**30  # the tensors and 1 GiB to spare
    have = available_bytes()
    if have < need:
        pytest.skip(
            f"needs {need / 2**30:.1f} GiB of available memory, {have / 2**30:.1f} GiB free"
        )
    t0 = time.perf_counter()
    stats = check_at_positions(case, BIG, out_of_place)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    with capsys.disabled():
        print(
            f"\n[>2**31 {case}{' out-of-place' if out_of_place else ''}] {stats['numel']} "
            f"bf16 elements, {stats['positions']} positions checked; "
            f"op {stats['op_seconds']:.1f} s, test {time.perf_counter() - t0:.1f} s, "
            f"process peak RSS {peak:.1f} GiB"
        )
