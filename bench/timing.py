"""Timing done right: warm-up, interleaved repetitions, medians and spread.

CPU: torch.utils.benchmark.Timer (with the process's thread count; its default
is one thread). GPU: CUDA events around each call, with the L2 cache flushed
before every repetition. Implementations are measured round-robin, one
repetition of each in turn (rotating who goes first), so a ratio compares
samples taken side by side in time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import statistics
from dataclasses import dataclass, field
from typing import Callable

import torch

# torch.utils.benchmark imports cpp_extension, which warns on a machine without a GPU.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
from torch.utils.benchmark import Timer  # noqa: E402


@dataclass
class Samples:
    """Seconds per call, one sample per repetition."""

    times: list[float] = field(default_factory=list)
    number: int = 1  # calls averaged into each sample

    def quantile(self, q: float) -> float:
        """The q-quantile (0 < q < 1) of the samples, interpolated."""
        if len(self.times) < 2:
            return self.times[0]
        return statistics.quantiles(self.times, n=100, method="inclusive")[round(q * 100) - 1]

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def keep_heap() -> bool:
    """Has glibc keep freed memory for the next allocation (no mmap'd chunks, no trimming),
    as a caching allocator would. Else a call's large outputs can come from fresh pages, each
    faulted in and zeroed (measured on the 2-core Zen 4 at BERT size, fp32: 300 to 1,800 page
    faults a call, call times 1x to 7x apart from run to run), which drowns the kernels'
    differences. False where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
    except (OSError, TypeError):  # no C library by that name (Windows: None is no path)
        return False
    if not hasattr(libc, "mallopt"):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's malloc.h
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


def paired_ratio(num: Samples, den: Samples) -> float:
    """Median over repetitions of num/den, each pair measured side by side."""
    return statistics.median(a / b for a, b in zip(num.times, den.times))


class Runner:
    def __init__(self, device: str, reps: int, block_s: float, warmup: int = 1):
        self.device, self.reps, self.block_s, self.warmup = device, reps, block_s, warmup
        self.threads = torch.get_num_threads()
        self._flush = None
        if device == "cuda":
            l2 = torch.cuda.get_device_properties(0).L2_cache_size
            self._flush = torch.empty(max(4 * l2, 64 << 20), dtype=torch.int8, device="cuda")

    def measure(self, fns: dict[str, Callable]) -> dict[str, Samples]:
        """Samples of every function, after ``warmup`` calls of each (on a CPU the last
        warm-up call also calibrates how many calls make one repetition)."""
        cpu = self.device != "cuda"
        for f in fns.values():
            for _ in range(self.warmup - cpu):
                f()
        return self._measure_cpu(fns) if cpu else self._measure_cuda(fns)

    def _measure_cpu(self, fns):
        timers = {
            k: Timer("f()", globals={"f": f}, num_threads=self.threads) for k, f in fns.items()
        }
        out = {k: Samples(number=self._calls_per_block(t)) for k, t in timers.items()}
        for rep in range(self.reps):
            for k in _rotated(list(fns), rep):
                out[k].times.append(_per_call(timers[k], out[k].number))
        return out

    def _calls_per_block(self, timer: Timer) -> int:
        once = _per_call(timer, 1)
        return max(1, min(10_000, round(self.block_s / once)))

    def _measure_cuda(self, fns):
        events = {k: [] for k in fns}
        for rep in range(self.reps):
            for k in _rotated(list(fns), rep):
                self._flush.zero_()
                start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
                fns[k]()
                end.record()
                events[k].append((start, end))
        torch.cuda.synchronize()
        return {k: Samples([s.elapsed_time(e) / 1e3 for s, e in ev]) for k, ev in events.items()}


def _per_call(timer: Timer, number: int) -> float:
    """Seconds per call over ``number`` calls. Timer.timeit() runs max(number // 100, 2)
    untimed calls before every sample, which triples the cost of slow calls; interleaving
    and our own warm-up make them unneeded, so this runs Timer's timed loop alone."""
    if hasattr(timer, "_timeit"):
        return timer._timeit(number) / number
    return timer.timeit(number).mean


def _rotated(keys: list, by: int) -> list:
    by %= len(keys)
    return keys[by:] + keys[:by]


def clone_bandwidth(runner: Runner, numels: list[int]) -> dict[int, float]:
    """GB/s of torch's clone (read + write) of an fp32 tensor of each size."""
    out = {}
    for n in numels:
        x = torch.randn(n, device=runner.device)
        s = runner.measure({"clone": x.clone})["clone"]
        out[n] = 2 * x.numel() * x.element_size() / s.median / 1e9
    return out


def gpu_peak_bandwidth() -> float:
    """GB/s from the memory clock (kHz, double data rate) and the bus width (bits)."""
    props = torch.cuda.get_device_properties(0)
    return 2 * props.memory_clock_rate * 1e3 * props.memory_bus_width / 8 / 1e9
