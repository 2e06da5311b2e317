"""What the examples share: the command line, tables, Welch's t-test and the claim checks."""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import matplotlib
import numpy as np
import torch
from scipy import stats

matplotlib.use("Agg")  # write PNGs, no display needed

FIGURES = Path(__file__).resolve().parent / "figures"
START = time.perf_counter()


def parse_args(doc: str, name: str) -> argparse.Namespace:
    """``--smoke`` (seconds: a short run, claims not checked) and ``--out`` (the PNG)."""
    parser = argparse.ArgumentParser(
        description=doc.strip().splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=doc,
    )
    parser.add_argument(
        "--smoke", action="store_true", help="a short run (CI): claims computed, not checked"
    )
    parser.add_argument(
        "--out", type=Path, default=FIGURES / f"{name}.png", help="the PNG to write"
    )
    return parser.parse_args()


def map_seeds(run, seeds: int, *args) -> list:
    """``[run(seed, *args) for seed in range(seeds)]``, the seeds spread over the CPU's cores.

    One process per core (forked: nothing is imported again), each with one torch thread:
    these models are small, and a second thread per process costs more than it saves.
    """
    torch.set_num_threads(1)
    workers = min(seeds, len(os.sched_getaffinity(0)))
    if workers == 1:
        return [run(seed, *args) for seed in range(seeds)]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(run, range(seeds), *([a] * seeds for a in args)))


def mean_std(values, digits: int = 4) -> str:
    """``mean ± std`` (sample std) of ``values``."""
    v = np.asarray(values, dtype=float)
    std = v.std(ddof=1) if v.size > 1 else float("nan")
    return f"{v.mean():.{digits}f} ± {std:.{digits}f}"


def welch(a, b, alternative: str = "two-sided"):
    """Welch's two-sample t-test (unequal variances) of ``a`` against ``b``: (t, p)."""
    r = stats.ttest_ind(a, b, equal_var=False, alternative=alternative)
    return float(r.statistic), float(r.pvalue)


def table(header: list[str], rows: list[list[str]]) -> None:
    """Print a plain, aligned text table."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for i, row in enumerate([header, *rows]):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


class Claims:
    """The statistical claims of a full run: each printed PASS/FAIL; a failure exits 1."""

    def __init__(self, smoke: bool) -> None:
        self.smoke = smoke
        self.results: list[tuple[bool, str]] = []

    def check(self, ok: bool, text: str) -> None:
        self.results.append((bool(ok), text))

    def finish(self, out: Path) -> None:
        """Print the claims, the PNG written and the run time; exit 1 if a claim failed."""
        print("\nclaims" + (" (smoke run: too short to check, shown only)" if self.smoke else ""))
        for ok, text in self.results:
            print(f"  {'    ' if self.smoke else ('PASS' if ok else 'FAIL')}  {text}")
        print(f"\nwrote {out}; took {time.perf_counter() - START:.1f} s")
        if not self.smoke and not all(ok for ok, _ in self.results):
            sys.exit(1)
