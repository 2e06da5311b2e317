"""What a run prints and writes: tables, DESIGN.md s.7 targets, JSON, CSV, metadata."""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def dtype_name(dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


# ---------------------------------------------------------------- summary rows


def rows(records: list[dict]) -> list[dict]:
    """One row per (op, shape, dtype, pass) with ours' time and the ratios to each baseline."""
    groups: dict[tuple, dict] = {}
    for r in records:
        key = (r["op"], r["shape"], r["dtype"], r["pass"])
        groups.setdefault(key, {})[r["impl"]] = r
    out = []
    for (op, shape, dtype, p), g in groups.items():
        ours = g["ours"]
        out.append(
            {
                "op": op,
                "shape": shape,
                "numel": ours["numel"],
                "sweep": ours["sweep"],
                "dtype": dtype,
                "pass": p,
                "ours_us": ours["median_us"],
                "spread": (ours["p75_us"] - ours["p25_us"]) / 2 / ours["median_us"],
                "vs_eager": g["eager"]["time_vs_ours"] if "eager" in g else None,
                "vs_compile": g["compile"]["time_vs_ours"] if "compile" in g else None,
                "vs_unfused": g["unfused"]["time_vs_ours"] if "unfused" in g else None,
                "ours_over_limit": 1 / g["limit"]["time_vs_ours"] if "limit" in g else None,
                "gbps": ours["gbps"],
                "pct_peak": ours["pct_peak"],
                "saved": {k: v.get("saved_bytes") for k, v in g.items() if "saved_bytes" in v},
                "peak": {k: v.get("peak_bytes") for k, v in g.items() if "peak_bytes" in v},
            }
        )
    return out


def _x(v, fmt="{:.2f}x") -> str:
    return "-" if v is None else fmt.format(v)


def _bytes(n) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def time_table(rs: list[dict]) -> str:
    head = (
        f"{'op':<22}{'shape':<9}{'dtype':<6}{'pass':<7}{'ours us':>10}{'+-':>5}"
        f"{'eager/ours':>11}{'compile/ours':>13}{'unfused/ours':>13}{'ours/limit':>11}"
        f"{'GB/s':>8}{'%peak':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in rs:
        lines.append(
            f"{r['op']:<22}{r['shape']:<9}{r['dtype']:<6}{r['pass']:<7}{r['ours_us']:>10.1f}"
            f"{r['spread'] * 100:>4.0f}%{_x(r['vs_eager']):>11}{_x(r['vs_compile']):>13}"
            f"{_x(r['vs_unfused']):>13}{_x(r['ours_over_limit']):>11}{r['gbps']:>8.1f}"
            f"{r['pct_peak']:>6.0f}%"
        )
    return "\n".join(lines)


def memory_table(rs: list[dict]) -> str:
    impls = ("ours", "eager", "compile", "unfused")
    head = (
        f"{'op':<22}{'shape':<9}{'dtype':<6}"
        + "".join(f"{'saved ' + k:>15}" for k in impls)
        + "".join(f"{'peak ' + k:>15}" for k in impls)
    )
    lines = [head, "-" * len(head)]
    for r in rs:
        if r["pass"] == "fwdbwd":
            lines.append(
                f"{r['op']:<22}{r['shape']:<9}{r['dtype']:<6}"
                + "".join(f"{_bytes(r['saved'].get(k)):>15}" for k in impls)
                + "".join(f"{_bytes(r['peak'].get(k)):>15}" for k in impls)
            )
    return "\n".join(lines)


# ------------------------------------------------------------ DESIGN.md s.7

M = 1 << 20
# (target, which rows, metric of a row, "<=" or ">=", threshold)
TARGETS = (
    (
        "dropout fwd within 1.5x of x*2 (1M-16M)",
        lambda r: r["op"] == "dropout" and r["pass"] == "fwd" and M <= r["numel"] <= 16 * M,
        "ours_over_limit",
        "<=",
        1.5,
    ),
    (
        "dropout fwd >= 5x faster than F.dropout (1M-16M)",
        lambda r: r["op"] == "dropout" and r["pass"] == "fwd" and M <= r["numel"] <= 16 * M,
        "vs_eager",
        ">=",
        5.0,
    ),
    (
        "dropout fwd+bwd >= 4x faster than F.dropout (1M-16M)",
        lambda r: r["op"] == "dropout" and r["pass"] == "fwdbwd" and M <= r["numel"] <= 16 * M,
        "vs_eager",
        ">=",
        4.0,
    ),
    (
        "dropout fwd at 1K: per call <= F.dropout",
        lambda r: r["op"] == "dropout" and r["pass"] == "fwd" and r["numel"] <= 1024,
        "vs_eager",
        ">=",
        1.0,
    ),
    (
        "drop_path_add fwd within 1.2x of a+b (vit-s)",
        lambda r: r["op"] == "drop_path_add" and r["pass"] == "fwd" and r["shape"] == "vit-s",
        "ours_over_limit",
        "<=",
        1.2,
    ),
    (
        "dropout_add, bias_dropout_add fwd within 1.5x of a+b (bert)",
        lambda r: (
            r["op"] in ("dropout_add", "bias_dropout_add")
            and r["pass"] == "fwd"
            and r["shape"] == "bert"
        ),
        "ours_over_limit",
        "<=",
        1.5,
    ),
    (
        "dropout_add_layer_norm fwd >= 3x faster than eager (bert)",
        lambda r: _norm_row(r, "fwd"),
        "vs_eager",
        ">=",
        3.0,
    ),
    (
        "dropout_add_layer_norm fwd >= 1.2x faster than ours unfused (bert)",
        lambda r: _norm_row(r, "fwd"),
        "vs_unfused",
        ">=",
        1.2,
    ),
    (
        "dropout_add_layer_norm fwd+bwd >= 1.15x faster than ours unfused (bert)",
        lambda r: _norm_row(r, "fwdbwd"),
        "vs_unfused",
        ">=",
        1.15,
    ),
    (
        "dropout_add_layer_norm fwd faster than torch.compile (bert)",
        lambda r: _norm_row(r, "fwd"),
        "vs_compile",
        ">=",
        1.0,
    ),
    (
        "saved for backward <= 64 B per call (the norm keeps h, as LayerNorm does)",
        lambda r: r["pass"] == "fwdbwd" and r["op"] != "dropout_add_layer_norm",
        "saved_ours",
        "<=",
        64,
    ),
)


def _norm_row(r, pass_):
    return r["op"] == "dropout_add_layer_norm" and r["pass"] == pass_ and r["shape"] == "bert"


def _metric(r, name):
    return r["saved"].get("ours") if name == "saved_ours" else r[name]


def targets_table(rs: list[dict]) -> str:
    lines = []
    for name, which, metric, cmp, bound in TARGETS:
        vals = [v for r in rs if which(r) and (v := _metric(r, metric)) is not None]
        if not vals:
            lines.append(f"  n/a   {name} (not measured in this run)")
            continue
        worst = max(vals) if cmp == "<=" else min(vals)
        ok = worst <= bound if cmp == "<=" else worst >= bound
        lines.append(
            f"  {'PASS' if ok else 'FAIL'}  {name}: worst {worst:.3g} over {len(vals)} rows"
        )
    return "\n".join(lines)


# ------------------------------------------------------------ output


def print_all(records: list[dict], meta: dict) -> None:
    rs = rows(records)
    print(
        f"\n{meta['device_name']} | torch {meta['torch']} | {meta['threads']} threads | "
        f"p={meta['p']} | peak {meta['peak_gbps']:.1f} GB/s ({meta['peak_source']})"
    )
    if meta.get("library"):
        print(
            f"fused_dropout {meta['fused_dropout_file']}: {meta['library_kind']} library "
            f"{meta['library']}, CPU path {meta['cpu_path']}"
        )
    print("ratios are paired medians; eager/ours and compile/ours > 1: ours is faster\n")
    print(time_table(rs))
    print("\nmemory of one forward+backward (saved for backward; peak above the inputs)\n")
    print(memory_table(rs))
    print("\nDESIGN.md s.7 targets\n")
    print(targets_table(rs))
    for note in meta["notes"]:
        print(f"note: {note}")
    print(f"\nwall time {meta['wall_s']:.0f} s (fused_dropout import {meta['import_s']:.1f} s)")


def write(out: Path, meta: dict, records: list[dict]) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{meta['device']}{'_quick' if meta['quick'] else ''}"
    js, cs = stem.with_suffix(".json"), stem.with_suffix(".csv")
    js.write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    fields = [k for k in records[0] if k != "samples_us"] if records else []
    with open(cs, "w", newline="") as f:
        w = csv.DictWriter(f, fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(records)
    for p in (js, cs):
        print(f"wrote {os.path.relpath(p)}")
    return [js, cs]


def _git(*args) -> str | None:
    try:
        return subprocess.run(
            ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "cpu"


def metadata(args, peak, clone, import_s, notes, wall_s) -> dict:
    meta = {
        "device": args.device,
        "device_name": _device_name(args.device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "commit": _git("rev-parse", "HEAD"),
        "dirty": bool(_git("status", "--porcelain")),
        "fused_dropout": getattr(sys.modules.get("fused_dropout"), "__version__", None),
        "import_s": import_s,
        "p": args.p,
        "quick": args.quick,
        "compile": args.compile,
        "reps": args.reps,
        "block_ms": args.block_ms,
        "peak_gbps": peak,
        "peak_source": (
            "memory clock x bus width" if args.device == "cuda" else "best torch.clone"
        ),
        "clone_gbps": {str(k): v for k, v in clone.items()},
        "notes": notes,
        "wall_s": wall_s,
        "argv": sys.argv,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if args.device == "cuda":
        p = torch.cuda.get_device_properties(0)
        meta.update(
            memory_clock_khz=p.memory_clock_rate,
            memory_bus_width=p.memory_bus_width,
            sm=f"{p.major}{p.minor}",
        )
    return meta


class Progress:
    """A progress bar on stderr (a line per 10% when stderr is not a terminal)."""

    def __init__(self, total: int):
        self.total, self.n, self.t0 = total, 0, time.perf_counter()
        self.tty = sys.stderr.isatty()

    def step(self, label: str) -> None:
        done, self.n = self.n, self.n + 1
        elapsed = time.perf_counter() - self.t0
        eta = f"eta {elapsed / done * (self.total - done):.0f}s" if done else ""
        bar = "#" * (30 * done // self.total)
        line = f"[{bar:<30}] {done}/{self.total} {elapsed:.0f}s {eta} {label}"
        if self.tty:
            print("\r" + line[:110].ljust(110), end="", file=sys.stderr, flush=True)
        elif 10 * done // self.total != 10 * (done - 1) // self.total or not done:
            print(line, file=sys.stderr, flush=True)

    def done(self) -> None:
        line = f"[{'#' * 30}] {self.total}/{self.total} {time.perf_counter() - self.t0:.0f}s"
        print(("\r" if self.tty else "") + line.ljust(110 if self.tty else 0), file=sys.stderr)
