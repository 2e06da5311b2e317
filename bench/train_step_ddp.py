"""Training steps of timm's ViT-S/16 on N gloo processes under DDP: unconverted,
convert(model), and convert(model, skip_dropped=True), side by side.

    python bench/train_step_ddp.py --quick     # 2 ranks, 128 px, rates 0.1 and 0.4
    python bench/train_step_ddp.py             # 2 ranks, 224 px, rates 0.1 and 0.4

Each rank (spawned, gloo over the loopback interface, one torch thread) holds ``--batch``
images (default 2) and its own seed (``seed + rank``), so each rank makes its own skip
decisions: with skip_dropped, a rank that keeps no sample of a block runs that branch on zero
rows, and DDP's all-reduce waits for the slowest rank in every step. One step is forward,
cross-entropy, backward (with DDP's all-reduce) and AdamW. The three configurations start
from the same weights and are stepped in turn (rotating who goes first); a step's time is the
slowest rank's. Reported: the median step time, the median of the paired ratios against
unconverted, the same for the process CPU time (both ranks summed: on a shared machine the
steadier figure, as time spent waiting for a core does not count), and the fraction of branch
samples skipped and of skip_dropped calls that kept no sample (all ranks).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

CONFIGS = ("unconverted", "convert", "skip_dropped")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="128 px, 4 repetitions")
    ap.add_argument("--ddp", type=int, default=2, help="number of gloo processes (default 2)")
    ap.add_argument("--rates", default="0.1,0.4", help="comma list of drop_path_rate values")
    ap.add_argument("--batch", type=int, default=2, help="images per rank (default 2)")
    ap.add_argument("--img", type=int, help="image size in pixels (default 224; --quick: 128)")
    ap.add_argument("--reps", type=int, help="timed steps per configuration (default 6; --quick 4)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    ap.add_argument("--seed", type=int, default=0, help="rank r draws from seed + r")
    args = ap.parse_args(argv)
    args.rates = [float(r) for r in args.rates.split(",")]
    args.img = args.img or (128 if args.quick else 224)
    args.reps = args.reps or (4 if args.quick else 6)
    return args


def _step(model: nn.Module, opt, x, target):
    def step():
        loss = nn.functional.cross_entropy(model(x), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _rank_main(rank: int, world: int, init_file: str, out_dir: str, args) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(args.threads)
    import timm
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import fused_dropout
    from fused_dropout import skip

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results = {}
    try:
        for rate in args.rates:
            torch.manual_seed(0)
            base = timm.create_model(
                "vit_small_patch16_224", img_size=args.img, drop_path_rate=rate
            ).train()
            models = {
                "unconverted": base,
                "convert": fused_dropout.convert(copy.deepcopy(base))[0],
                "skip_dropped": fused_dropout.convert(copy.deepcopy(base), skip_dropped=True)[0],
            }
            gen = torch.Generator().manual_seed(1 + rank)
            x = torch.randn(args.batch, 3, args.img, args.img, generator=gen)
            target = torch.randint(0, 1000, (args.batch,), generator=gen)
            steps = {}
            for name, model in models.items():
                ddp = DDP(model)
                opt = torch.optim.AdamW(ddp.parameters(), lr=1e-4, fused=True)
                steps[name] = _step(ddp, opt, x, target)
            torch.manual_seed(args.seed + rank)
            for step in steps.values():  # warm-up (and the optimizer's state)
                step()
            wall = {name: [] for name in steps}
            cpu = {name: [] for name in steps}
            with skip.count_skipped() as counted:
                for rep in range(args.reps):
                    order = list(steps)[rep % 3 :] + list(steps)[: rep % 3]
                    for name in order:
                        dist.barrier()
                        t, c = time.perf_counter(), time.process_time()
                        steps[name]()
                        wall[name].append(time.perf_counter() - t)
                        cpu[name].append(time.process_time() - c)
            results[rate] = {
                "wall": wall,
                "cpu": cpu,
                "samples": counted.samples,
                "skipped": counted.skipped,
                "calls": counted.calls,
                "none_kept": counted.none_kept,
            }
            if rank == 0:
                print(f"  rate {rate}: done", flush=True)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def _paired(base: list[float], other: list[float]) -> float:
    """Median over repetitions of base/other, each pair measured side by side."""
    return statistics.median(a / b for a, b in zip(base, other))


def main(argv=None) -> None:
    import torch.multiprocessing as mp

    args = parse_args(argv)
    start = time.time()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(
            _rank_main,
            args=(args.ddp, str(Path(tmp) / "rendezvous"), tmp, args),
            nprocs=args.ddp,
            start_method="spawn",
        )
        ranks = [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(args.ddp)]
    lines = [
        f"DDP on {args.ddp} gloo processes ({_cpu_name()}, {os.cpu_count()} cores, "
        f"{args.threads} thread(s) per rank), torch {torch.__version__}, ViT-S/16 at "
        f"{args.img} px, {args.batch} images per rank, fp32, median of {args.reps} interleaved "
        f"steps (a step: the slowest rank's); load average {load:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end",
        "",
        "| drop_path_rate | config | step (ms) | speed-up vs unconverted | CPU time (ms, ranks "
        "summed) | speed-up, CPU time | branch samples skipped | calls keeping no sample |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rate in args.rates:
        per = [r[rate] for r in ranks]
        wall = {n: [max(ws) for ws in zip(*(p["wall"][n] for p in per))] for n in CONFIGS}
        cpu = {n: [sum(cs) for cs in zip(*(p["cpu"][n] for p in per))] for n in CONFIGS}
        samples = sum(p["samples"] for p in per)
        skipped = sum(p["skipped"] for p in per)
        calls, none = sum(p["calls"] for p in per), sum(p["none_kept"] for p in per)
        for name in CONFIGS:
            skip_cells = (
                f"{skipped / max(samples, 1):.1%} | {none}/{calls}"
                if name == "skip_dropped"
                else "- | -"
            )
            lines.append(
                f"| {rate} | {name} | {statistics.median(wall[name]) * 1e3:.0f} | "
                f"{_paired(wall['unconverted'], wall[name]):.2f}x | "
                f"{statistics.median(cpu[name]) * 1e3:.0f} | "
                f"{_paired(cpu['unconverted'], cpu[name]):.2f}x | {skip_cells} |"
            )
    print("\n".join(lines))
    print(f"\n({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
