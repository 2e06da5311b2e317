"""Benchmark every fused_dropout op against what a user would otherwise write.

    python bench/run.py --quick          # CPU: under 2 minutes on 2 idle cores
    python bench/run.py --device cuda    # the full sweep on a GPU
    venv/bin/python bench/run.py --quick --installed   # the package installed there (a wheel)

See bench/README.md for what is measured and how to read the output.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: --installed: time the fused_dropout installed in this environment (a wheel, say), not this
#: checkout's; the checkout then comes last on sys.path, for bench/ itself.
INSTALLED = "--installed" in sys.argv[1:]
sys.path.insert(len(sys.path) if INSTALLED else 0, str(ROOT))

import torch  # noqa: E402

from bench import ops as op_specs  # noqa: E402
from bench import report, shapes  # noqa: E402
from bench.bytes_model import bytes_moved, dims_of  # noqa: E402
from bench.memory import peak_bytes, saved_bytes  # noqa: E402
from bench.timing import (  # noqa: E402
    Runner,
    clone_bandwidth,
    gpu_peak_bandwidth,
    keep_heap,
    paired_ratio,
)

PASSES = ("fwd", "bwd", "fwdbwd")
DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="few sizes and repetitions; compile only the real shapes",
    )
    ap.add_argument("--ops", help=f"comma list of {', '.join(op_specs.OP_NAMES)}")
    ap.add_argument(
        "--dtypes",
        help="comma list of fp32, bf16, fp16 (default: fp32,bf16 on CPU, plus fp16 on GPU)",
    )
    ap.add_argument(
        "--sizes",
        help="comma list of: sweep, real, a real shape "
        f"({', '.join(shapes.REAL)}), 2^a..2^b, 2^a, N, AxBxC",
    )
    ap.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    ap.add_argument(
        "--compile",
        choices=("all", "real", "none"),
        help="which shapes get a torch.compile baseline (default: real with --quick, else all)",
    )
    ap.add_argument(
        "--reps", type=int, help="repetitions per measurement (5 quick, 15 full; GPU: 10x that)"
    )
    ap.add_argument("--block-ms", type=float, help="CPU: time of one repetition (5 quick, 20 full)")
    ap.add_argument("--p", type=float, default=op_specs.P_DEFAULT, help="drop probability")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads")
    ap.add_argument(
        "--fresh-pages",
        action="store_true",
        help="CPU: leave glibc returning freed memory to the OS (default: kept, timing.keep_heap)",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument(
        "--installed",
        action="store_true",
        help="time the fused_dropout installed in this Python environment, not this checkout's",
    )
    args = ap.parse_args(argv)
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is visible")
    args.ops = args.ops.split(",") if args.ops else None
    unknown = set(args.ops or ()) - set(op_specs.OP_NAMES)
    if unknown:
        ap.error(f"--ops: unknown {', '.join(sorted(unknown))}")
    args.dtypes = [
        DTYPES[d.strip()]
        for d in (args.dtypes or ("fp32,bf16,fp16" if gpu else "fp32,bf16")).split(",")
    ]
    args.sizes = (
        shapes.parse_sizes(args.sizes)
        if args.sizes
        else shapes.quick_shapes()
        if args.quick
        else shapes.parse_sizes("sweep,real")
    )
    args.compile = args.compile or ("real" if args.quick else "all")
    args.reps = args.reps or (5 if args.quick else 15) * (10 if gpu else 1)
    args.block_ms = args.block_ms or (5.0 if args.quick else 20.0)
    args.warmup = 1 if args.quick else 3
    return args


def import_ours(installed: bool):
    """fused_dropout.functional (None if it does not import, or --installed finds only this
    checkout's), and the import time."""
    t0 = time.perf_counter()
    try:
        import fused_dropout.functional as functional
    except Exception as e:  # noqa: BLE001 - report any build/import failure and go on
        print(f"fused_dropout does not import: {type(e).__name__}: {e}", file=sys.stderr)
        return None, time.perf_counter() - t0
    seconds = time.perf_counter() - t0
    if installed and ROOT in Path(functional.__file__).resolve().parents:
        print(
            f"--installed: no fused_dropout is installed in {sys.prefix} (found this checkout's)",
            file=sys.stderr,
        )
        return None, seconds
    return functional, seconds


def ours_build() -> dict:
    """Which fused_dropout was timed: its package, its library (prebuilt or JIT), CPU path."""
    import fused_dropout
    from fused_dropout import _loader, ops

    loaded = _loader.loaded()
    return {
        "fused_dropout_file": fused_dropout.__file__,
        "library_kind": loaded.plan.kind if loaded else None,
        "library": str(loaded.plan.path) if loaded else None,
        "cpu_path": ops.cpu_capability(),
    }


def configure_compile():
    import torch._dynamo.config as dynamo
    import torch._functorch.config as functorch

    # Backward is timed with retain_graph=True, which donated buffers forbid.
    functorch.donated_buffer = False
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo, name):
            setattr(dynamo, name, 64)


def fits(shape, dtype, device) -> bool:
    """Whether ~16 full-size tensors (inputs, grads, eager temporaries) fit in free memory."""
    need = 16 * shape.numel * torch.empty((), dtype=dtype).element_size()
    if device == "cuda":
        return need < torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return need < int(info["MemAvailable"].split()[0]) * 1024 // 2


def pass_callables(impl, inputs, grad):
    """{pass: zero-argument callable} for an implementation f(*inputs)."""
    out = impl(*inputs)
    return {
        "fwd": lambda: impl(*inputs),
        "bwd": lambda: torch.autograd.grad(out, inputs, grad, retain_graph=True),
        "fwdbwd": lambda: torch.autograd.grad(impl(*inputs), inputs, grad),
    }


def limit_callables(op, inputs, grad):
    fwd, args = op_specs.limit_forward(op), op_specs.limit_inputs(op, inputs)
    return {
        "fwd": lambda: fwd(*args),
        "bwd": lambda: grad * 2,
        "fwdbwd": lambda: (fwd(*args), grad * 2),
    }


def memory_figures(impl, inputs, grad, device) -> dict:
    """Saved and peak bytes of one forward+backward; the first call's time (compiles)."""
    t0 = time.perf_counter()
    saved, out = saved_bytes(lambda: impl(*inputs))
    first = time.perf_counter() - t0
    torch.autograd.grad(out, inputs, grad)
    del out
    peak = peak_bytes(lambda: torch.autograd.grad(impl(*inputs), inputs, grad), device)
    return {"saved_bytes": saved, "peak_bytes": peak, "first_call_s": first}


class Bench:
    def __init__(self, args, functional, runner, peak_gbps):
        self.args, self.functional, self.runner, self.peak = args, functional, runner, peak_gbps
        self.compiled = {}
        self.notes: list[str] = []

    def impls(self, op, shape):
        """name -> f(*inputs) for this case (the compile baseline only where selected)."""
        compiled = None
        if self.args.compile == "all" or (self.args.compile == "real" and not shape.sweep):
            if op.name not in self.compiled:
                self.compiled[op.name] = op_specs.compile_baseline(op, self.args.p)
            compiled = self.compiled[op.name]
        return op_specs.implementations(op, self.functional, compiled, self.args.p)

    def case(self, op, shape, dtype) -> list[dict]:
        """Every record of one (op, shape, dtype): each implementation and pass."""
        inputs = op_specs.make_inputs(op, shape, dtype, self.args.device)
        if inputs is None:
            return []
        grad = torch.randn_like(op_specs.full_inputs(op, inputs)[0])
        impls, mem = {}, {}
        for name, f in self.impls(op, shape).items():
            try:
                mem[name] = memory_figures(f, inputs, grad, self.args.device)
                impls[name] = f
            except Exception as e:  # noqa: BLE001 - one failing implementation must not stop a run
                self.notes.append(
                    f"{op.name} {shape.name} {report.dtype_name(dtype)} {name}: "
                    f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                )
        if "ours" not in impls:
            return []
        calls = {k: pass_callables(f, inputs, grad) for k, f in impls.items()}
        calls["limit"] = limit_callables(op, inputs, grad)
        model = {k: bytes_moved(op, k, dims_of(op, inputs), self.args.device) for k in calls}
        records = []
        for p in PASSES:
            samples = self.runner.measure({k: c[p] for k, c in calls.items()})
            for k, s in samples.items():
                records.append(
                    self.record(
                        op, shape, dtype, p, k, s, samples["ours"], model[k][p], mem.get(k, {})
                    )
                )
        return records

    def record(self, op, shape, dtype, p, impl, s, ours, nbytes, mem) -> dict:
        gbps = nbytes / s.median / 1e9
        return {
            "op": op.name,
            "baseline": op.baseline,
            "shape": shape.name,
            "dims": list(op_specs.layout_for(shape, op.kind)),
            "numel": shape.numel,
            "sweep": shape.sweep,
            "channels_last": shape.channels_last,
            "dtype": report.dtype_name(dtype),
            "pass": p,
            "impl": impl,
            "median_us": s.median * 1e6,
            "p25_us": s.quantile(0.25) * 1e6,
            "p75_us": s.quantile(0.75) * 1e6,
            "min_us": min(s.times) * 1e6,
            "reps": len(s.times),
            "calls_per_rep": s.number,
            "samples_us": [t * 1e6 for t in s.times],
            "time_vs_ours": paired_ratio(s, ours),
            "bytes": nbytes,
            "gbps": gbps,
            "pct_peak": 100 * gbps / self.peak,
            **mem,
        }


def reference_bandwidth(args, runner) -> tuple[float, dict]:
    """(peak GB/s, {numel: clone GB/s}). GPU: its spec. CPU: the best fp32 clone of 2^22
    elements or more (past the private caches), measured here."""
    big = {1 << 22, 1 << 24}
    sizes = sorted({s.numel for s in args.sizes if s.sweep and s.numel >= 1 << 16} | big)
    clone = clone_bandwidth(runner, sizes)
    if args.device == "cuda":
        return gpu_peak_bandwidth(), clone
    return max(v for n, v in clone.items() if n >= 1 << 22), clone


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    heap_note = []
    if args.device == "cpu" and not args.fresh_pages:
        kept = keep_heap()
        heap_note.append(
            "heap kept (glibc: no mmap, no trim): outputs reuse freed memory"
            if kept
            else "heap not kept (no glibc mallopt): page faults add noise"
        )
    t_start, load = time.perf_counter(), os.getloadavg()[0]
    functional, import_s = import_ours(args.installed)
    if functional is None and args.installed:
        return 1
    chosen, skipped = op_specs.select(args.ops, functional)
    for s in skipped:
        print(f"skip {s}", file=sys.stderr)
    if not chosen:
        print("nothing to run", file=sys.stderr)
        return 1
    configure_compile()
    runner = Runner(args.device, args.reps, args.block_ms / 1e3, args.warmup)
    peak, clone = reference_bandwidth(args, runner)
    bench = Bench(args, functional, runner, peak)
    cases = [(o, s, d) for o in chosen for d in args.dtypes for s in args.sizes]
    records, progress = [], report.Progress(len(cases))
    for op, shape, dtype in cases:
        progress.step(f"{op.name} {shape.name} {report.dtype_name(dtype)}")
        if not fits(shape, dtype, args.device):
            bench.notes.append(f"{shape.name} {report.dtype_name(dtype)}: skipped, too big")
            continue
        records += bench.case(op, shape, dtype)
    progress.done()
    if load > 0.5 * (os.cpu_count() or 1):
        bench.notes.append(
            f"load average {load:.1f} at start: other processes share the CPU, so timings are noisy"
        )
    notes = list(dict.fromkeys(heap_note + skipped + bench.notes))
    meta = report.metadata(args, peak, clone, import_s, notes, time.perf_counter() - t_start)
    meta["loadavg"] = [load, os.getloadavg()[0]]
    if functional is not None:
        meta.update(ours_build())
    report.print_all(records, meta)
    report.write(args.out, meta, records)
    if not args.no_plots:
        from bench import plots

        for path in plots.draw(records, meta, args.out):
            print(f"wrote {os.path.relpath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
