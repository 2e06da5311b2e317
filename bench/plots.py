"""PNG plots of a run: speed-up over each baseline, and GB/s against the peak, vs size.

One figure per dtype, one panel per op. Lines join the 1-D sweep's sizes; the
real shapes are single markers at their element count.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"ours": "tab:green", "eager": "tab:blue", "compile": "tab:orange", "limit": "tab:gray"}
STYLES = {"fwd": "-", "bwd": "--", "fwdbwd": ":"}
MARKERS = {"fwd": "o", "bwd": "s", "fwdbwd": "^"}
LABELS = {
    "eager": "eager",
    "compile": "torch.compile",
    "limit": "limit (x*2 | a+b)",
    "ours": "ours",
}


def draw(records: list[dict], meta: dict, out: Path) -> list[Path]:
    stem = f"{meta['device']}{'_quick' if meta['quick'] else ''}"
    paths = []
    for dtype in dict.fromkeys(r["dtype"] for r in records):
        rs = [r for r in records if r["dtype"] == dtype]
        paths.append(_speedup(rs, meta, out / f"{stem}_speedup_{dtype}.png"))
        paths.append(_bandwidth(rs, meta, out / f"{stem}_bandwidth_{dtype}.png"))
    return paths


def _grid(ops: list[str], title: str):
    cols = min(3, len(ops))
    rows = math.ceil(len(ops) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(4.6 * cols, 9), 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(ops) :]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=9)
    return fig, dict(zip(ops, axes.flat))


def _series(rs, op, impl, p, key):
    """(sweep xs, sweep ys, real xs, real ys) of one line."""
    pts = [
        (r["numel"], r[key], r["sweep"])
        for r in rs
        if r["op"] == op and r["impl"] == impl and r["pass"] == p
    ]
    sweep = sorted((x, y) for x, y, s in pts if s)
    real = [(x, y) for x, y, s in pts if not s]
    return [x for x, _ in sweep], [y for _, y in sweep], [x for x, _ in real], [y for _, y in real]


def _plot(ax, rs, op, impl, p, key):
    xs, ys, rx, ry = _series(rs, op, impl, p, key)
    label = f"{LABELS[impl]} {p}"
    if xs:
        ax.plot(xs, ys, STYLES[p], color=COLORS[impl], marker=MARKERS[p], ms=3, label=label)
        label = None
    if rx:
        ax.plot(rx, ry, MARKERS[p], color=COLORS[impl], ms=5, mfc="none", label=label)


def _finish(fig, axes, path, ylabel):
    for ax in axes.values():
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("elements (lines: 1-D sweep; open markers: real shapes)", fontsize=7)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        ax.tick_params(labelsize=7)
    handles: dict = {}
    for ax in axes.values():
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=4, fontsize=7)
    legend_inches = 0.2 * math.ceil(len(handles) / 4) + 0.1
    fig.tight_layout(rect=(0, legend_inches / fig.get_figheight(), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _header(meta, dtype):
    return (
        f"{meta['device_name']}, {meta['threads']} threads, torch {meta['torch']},\n"
        f"{dtype}, p={meta['p']}"
    )


def _speedup(rs, meta, path):
    ops = list(dict.fromkeys(r["op"] for r in rs))
    fig, axes = _grid(
        ops, f"speed-up of fused_dropout (baseline time / ours): {_header(meta, rs[0]['dtype'])}"
    )
    for op, ax in axes.items():
        for impl in ("eager", "compile", "limit"):
            for p in STYLES:
                _plot(ax, rs, op, impl, p, "time_vs_ours")
        ax.axhline(1, color="black", lw=0.8)
        ax.set_title(op, fontsize=9)
    return _finish(fig, axes, path, "baseline time / ours  (>1: ours faster)")


def _bandwidth(rs, meta, path):
    ops = list(dict.fromkeys(r["op"] for r in rs))
    fig, axes = _grid(ops, f"achieved GB/s (bytes model / time): {_header(meta, rs[0]['dtype'])}")
    clone = sorted((int(k), v) for k, v in meta["clone_gbps"].items())
    for op, ax in axes.items():
        for impl in COLORS:
            for p in ("fwd", "bwd"):
                _plot(ax, rs, op, impl, p, "gbps")
        ax.axhline(
            meta["peak_gbps"],
            color="red",
            lw=1,
            ls="--",
            label=f"peak {meta['peak_gbps']:.0f} GB/s ({meta['peak_source']})",
        )
        ax.plot(*zip(*clone), color="black", lw=0.8, ls=":", label="torch.clone")
        ax.set_title(op, fontsize=9)
    return _finish(fig, axes, path, "GB/s")
