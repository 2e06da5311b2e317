"""Training steps of timm's ViT-S/16 and ConvNeXt-T: unconverted, convert(model), and
convert(model, skip_dropped=True), at several drop_path_rate values, side by side.

    python bench/train_step.py --quick      # CPU: 2 rates, 128 px, a few minutes on 2 cores
    python bench/train_step.py              # rates 0.1, 0.2, 0.4 at 224 px
    python bench/train_step.py --device cuda --batch 128

One step is forward, cross-entropy, backward and AdamW. The three configurations of a model
and rate start from the same weights and are stepped in turn (rotating who goes first), so
each ratio is the median of step-time ratios measured side by side. Also reported: the
fraction of branch samples skipped and the peak memory of one step.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import fused_dropout  # noqa: E402
from bench.memory import peak_bytes  # noqa: E402
from fused_dropout import skip  # noqa: E402

MODELS = {"vit_s": "vit_small_patch16_224", "convnext_t": "convnext_tiny"}
CONFIGS = ("unconverted", "convert", "skip_dropped")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="rates 0.1,0.4, 128 px, 4 repetitions")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    ap.add_argument("--rates", help="comma list of drop_path_rate values (default 0.1,0.2,0.4)")
    ap.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    ap.add_argument("--batch", type=int, help="default: 8 on a CPU, 128 on a GPU")
    ap.add_argument("--img", type=int, help="image size in pixels (default 224; --quick: 128)")
    ap.add_argument("--reps", type=int, help="timed steps per configuration (default 7; --quick 4)")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="autocast dtype")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory step")
    ap.add_argument(
        "--profile", action="store_true", help="print the top ops of one skip_dropped step"
    )
    args = ap.parse_args(argv)
    args.rates = [
        float(r) for r in (args.rates or ("0.1,0.4" if args.quick else "0.1,0.2,0.4")).split(",")
    ]
    args.batch = args.batch or (8 if args.device == "cpu" else 128)
    args.img = args.img or (128 if args.quick else 224)
    args.reps = args.reps or (4 if args.quick else 7)
    return args


def build(model_name: str, rate: float, img: int, device: str) -> dict[str, nn.Module]:
    """The three configurations of one model, with the same weights."""
    import timm

    torch.manual_seed(0)
    kw = {"img_size": img} if model_name.startswith("vit") else {}
    base = timm.create_model(MODELS[model_name], drop_path_rate=rate, **kw).to(device).train()
    converted, _ = fused_dropout.convert(copy.deepcopy(base))
    skipping, counts = fused_dropout.convert(copy.deepcopy(base), skip_dropped=True)
    rewired = sum(v for k, v in counts.items() if k.startswith("skip_dropped:"))
    print(f"  {model_name} rate {rate}: {rewired} blocks rewired ({counts})", flush=True)
    return {"unconverted": base, "convert": converted, "skip_dropped": skipping}


def make_step(model: nn.Module, x, target, dtype):
    # fused: the optimizer's share of a step, which no configuration changes, is at its least
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = nn.functional.cross_entropy(model(x), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def timed(step, device: str) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one step. On a shared machine the CPU time is
    the steadier figure: time spent waiting for a core does not count."""
    if device == "cuda":
        torch.cuda.synchronize()
    t, c = time.perf_counter(), time.process_time()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, time.process_time() - c


def run_one(model_name: str, rate: float, args) -> list[dict]:
    device = args.device
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    models = build(model_name, rate, args.img, device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, args.img, args.img, generator=gen).to(device)
    target = torch.randint(0, 1000, (args.batch,), generator=gen).to(device)
    steps = {name: make_step(m, x, target, dtype) for name, m in models.items()}
    for step in steps.values():  # warm-up (and the optimizer's state)
        for _ in range(2 if device == "cuda" else 1):
            step()
    wall = {name: [] for name in steps}
    cpu = {name: [] for name in steps}
    with skip.count_skipped() as counted:
        for rep in range(args.reps):
            order = list(steps)[rep % 3 :] + list(steps)[: rep % 3]
            for name in order:
                w, c = timed(steps[name], device)
                wall[name].append(w)
                cpu[name].append(c)
            print(
                f"    rep {rep + 1}/{args.reps}: "
                + ", ".join(
                    f"{n} {wall[n][-1] * 1e3:.0f} ms (cpu {cpu[n][-1] * 1e3:.0f})" for n in steps
                ),
                flush=True,
            )
    rows = []
    for name in steps:
        peak = None if args.no_memory else peak_bytes(steps[name], device)
        rows.append({
            "model": model_name,
            "rate": rate,
            "config": name,
            "ms": statistics.median(wall[name]) * 1e3,
            "speedup": _paired(wall["unconverted"], wall[name]),
            "cpu_speedup": _paired(cpu["unconverted"], cpu[name]),
            "skipped": counted.skipped / counted.samples if name == "skip_dropped" else 0.0,
            "peak_mb": None if peak is None else peak / 2**20,
        })  # fmt: skip
    if args.profile:
        profile(steps["skip_dropped"], device)
    return rows


def _paired(base: list[float], other: list[float]) -> float:
    """Median over repetitions of base/other, each pair measured side by side."""
    return statistics.median(a / b for a, b in zip(base, other))


def profile(step, device: str) -> None:
    """The ops that take the most time in one skip_dropped step."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch_profile(activities=acts) as prof:
        step()
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=12), flush=True)


def table(rows: list[dict], args) -> str:
    cpu = _cpu_name() if args.device == "cpu" else torch.cuda.get_device_name()
    head = (
        f"{args.device} ({cpu}), {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"batch {args.batch}, {args.img} px, {args.dtype}, median of {args.reps} interleaved steps"
    )
    lines = [
        head,
        "",
        "| model | drop_path_rate | config | step (ms) | speed-up vs unconverted | "
        "speed-up, CPU time | branch samples skipped | peak memory (MB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        peak = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
        lines.append(
            f"| {r['model']} | {r['rate']} | {r['config']} | {r['ms']:.0f} | {r['speedup']:.2f}x "
            f"| {r['cpu_speedup']:.2f}x | {r['skipped']:.1%} | {peak} |"
        )
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    rows = []
    for model_name in args.models.split(","):
        if model_name not in MODELS:
            raise SystemExit(f"unknown model {model_name!r}; choose from {', '.join(MODELS)}")
        for rate in args.rates:
            print(f"{model_name}, drop_path_rate {rate}:", flush=True)
            rows += run_one(model_name, rate, args)
    print()
    print(table(rows, args))
    print(f"\n({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
