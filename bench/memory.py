"""Memory figures of one forward+backward: bytes saved for backward and peak bytes."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile


def saved_bytes(forward: Callable[[], torch.Tensor]) -> tuple[int, torch.Tensor]:
    """Bytes of the distinct storages autograd saves while ``forward`` runs, and its output."""
    storages: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    return sum(storages.values()), out


def peak_bytes(step: Callable[[], object], device: str) -> int:
    """Most bytes allocated at once while ``step`` runs, above what was live before."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    allocs = sorted(_allocations(prof.profiler.kineto_results.experimental_event_tree()))
    if not allocs:
        return 0
    _, size, total = allocs[0]
    base = total - size
    return max(0, max(t for _, _, t in allocs) - base)


def _allocations(events):
    """(time, size, running total) of every CPU allocation event, depth first."""
    for e in events:
        if (
            e.tag == torch._C._profiler._EventType.Allocation
            and e.extra_fields.device.type == "cpu"
        ):
            yield e.start_time_ns, e.extra_fields.alloc_size, e.extra_fields.total_allocated
        yield from _allocations(e.children)


@contextlib.contextmanager
def _quiet_stderr():
    """Silence fd 2 (the profiler's C++ log lines) for the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
