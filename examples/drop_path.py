"""DropPath in a tiny ViT on 8x8 digits: timm's layers, convert, skip_dropped, fuse_norm.

A timm VisionTransformer built without weights (8x8 images in four 4x4 patches, width 32,
depth 4, drop_path_rate 0.4 on timm's linear schedule over depth), trained briefly with AdamW on
scikit-learn's bundled digits (no download), in five configurations from the same initial
weights, stepped in turn on the same batches:
  - timm: the model as built, with timm's DropPath;
  - convert: after fused_dropout.convert(model);
  - skip_dropped: after convert(model, skip_dropped=True): the residual branches run only on
    the samples DropPath keeps;
  - fuse_norm: after convert(model, fuse_norm=True): each block's first residual (drop path +
    add) and norm2 are one op;
  - skip_dropped+fuse_norm: both; in training a block with a drop probability above 0 skips,
    the first block (rate 0) fuses.
It reports loss curves, the median step time and the bytes autograd saves for backward
(torch.autograd.graph.saved_tensors_hooks), both also as ratios to timm's. Over the seeds it
checks that every configuration reaches test accuracy statistically indistinguishable from
timm's (Welch's t-test), that convert saves less for backward than timm (a 16-byte seed pair
per DropPath call instead of a per-sample mask), that skip_dropped saves less again (no
activations of skipped samples) and that fuse_norm saves at most the fused op's seed pair
more than convert (the op keeps h and the row statistics, as LayerNorm does).

    python examples/drop_path.py           # full run: ~2 min of CPU, seeds over the cores
    python examples/drop_path.py --smoke   # seconds: 2 seeds, 10 steps, claims not checked

Step times are only meaningful on an otherwise idle machine.
"""

from __future__ import annotations

import copy
import time

import _common
import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from timm.layers import DropPath
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

import fused_dropout

DROP_PATH_RATE = 0.4
BATCH = 64
# configuration -> the keywords of fused_dropout.convert (None: timm's model as built)
CONFIGURATIONS = {
    "timm": None,
    "convert": {},
    "skip_dropped": {"skip_dropped": True},
    "fuse_norm": {"fuse_norm": True},
    "skip_dropped+fuse_norm": {"skip_dropped": True, "fuse_norm": True},
}
COLORS = dict(zip(CONFIGURATIONS, ("tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:red")))


def tiny_vit() -> VisionTransformer:
    """A 4-block ViT for 1x8x8 images: four 4x4 patches and a class token, width 32."""
    return VisionTransformer(
        img_size=8, patch_size=4, in_chans=1, num_classes=10,
        embed_dim=32, depth=4, num_heads=2, mlp_ratio=2.0,
        drop_path_rate=DROP_PATH_RATE,
    )  # fmt: skip


def configurations(seed: int) -> dict[str, nn.Module]:
    """The same initial weights as timm's model, converted as each configuration says."""
    torch.manual_seed(seed)
    timm_model = tiny_vit()
    return {
        name: timm_model if keywords is None else fused_dropout.convert(
            copy.deepcopy(timm_model), **keywords
        )[0]
        for name, keywords in CONFIGURATIONS.items()
    }  # fmt: skip


def digits(seed: int) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_test, y_test) as 1x8x8 images in [0, 1]; 500 test images."""
    x, y = load_digits(return_X_y=True)
    x = torch.as_tensor(x / 16, dtype=torch.float32).reshape(-1, 1, 8, 8)
    x_train, x_test, y_train, y_test = train_test_split(
        x, torch.as_tensor(y), test_size=500, random_state=seed, stratify=y
    )
    return x_train, y_train, x_test, y_test


def saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves for backward in one training forward."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(storages.values())


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return 100 * (model(x).argmax(1) == y).float().mean().item()


def run(seed: int, steps: int) -> dict[str, dict]:
    """Train every configuration of ``seed``, stepping them in turn on the same batches."""
    x, y, x_test, y_test = digits(seed)
    models = configurations(seed)
    opts = {n: torch.optim.AdamW(m.parameters(), lr=3e-3, fused=True) for n, m in models.items()}
    out = {n: {"loss": [], "step_s": []} for n in models}
    # Each configuration draws its masks from its own copy of torch's generator, so its run
    # does not depend on which other configurations are stepped beside it.
    rng = {n: torch.get_rng_state() for n in models}
    batches = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(x), (BATCH,), generator=batches)
        for name, model in models.items():
            torch.set_rng_state(rng[name])
            model.train()
            start = time.perf_counter()
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opts[name].zero_grad()
            loss.backward()
            opts[name].step()
            out[name]["step_s"].append(time.perf_counter() - start)
            out[name]["loss"].append(loss.item())
            rng[name] = torch.get_rng_state()
    for name, model in models.items():
        out[name]["test accuracy"] = accuracy(model, x_test, y_test)
        # 8 forwards from the same seed, averaged: with skip_dropped the bytes follow the masks.
        torch.manual_seed(seed)
        out[name]["saved"] = np.mean([saved_bytes(model, x[:BATCH]) for _ in range(8)])
    return out


def main() -> None:
    args = _common.parse_args(__doc__, "drop_path")
    seeds, steps = (2, 10) if args.smoke else (5, 150)
    results = _common.map_seeds(run, seeds, steps)
    names = list(results[0])

    def over_seeds(name: str, key: str) -> np.ndarray:
        return np.array([r[name][key] for r in results])

    saved = {n: over_seeds(n, "saved").mean() for n in names}
    step_ms = {n: 1e3 * np.median([r[n]["step_s"][steps // 5 :] for r in results]) for n in names}
    print(
        f"tiny ViT, drop_path_rate {DROP_PATH_RATE}, batch {BATCH}, {steps} AdamW steps, "
        f"{seeds} seeds (mean ± std over seeds)\n"
    )
    _common.table(
        ["configuration", "test accuracy %", "train loss (last 10)", "step ms (median)"]
        + ["saved for backward", "vs timm", "ratio"],
        [
            [n, _common.mean_std(over_seeds(n, "test accuracy"), 2)]
            + [_common.mean_std([np.mean(r[n]["loss"][-10:]) for r in results], 3)]
            + [f"{step_ms[n]:.1f} ({step_ms[n] / step_ms['timm']:.2f}x)"]
            + [f"{saved[n] / 2**10:.1f} KiB", f"{saved[n] - saved['timm']:+,.0f} B"]
            + [f"{saved[n] / saved['timm']:.4f}x"]
            for n in names
        ],
    )

    claims = _common.Claims(args.smoke)
    timm_acc = over_seeds("timm", "test accuracy")
    for name in names[1:]:
        t, p = _common.welch(over_seeds(name, "test accuracy"), timm_acc)
        claims.check(
            p > 0.05,
            f"{name} and timm reach indistinguishable test accuracy "
            f"(Welch t = {t:+.2f}, two-sided p = {p:.2g} > 0.05)",
        )
    # timm's DropPath saves its (batch, 1, 1) float mask for backward; ours a 16-byte seed pair
    # (the contract allows up to 64 bytes per call).
    calls = sum(isinstance(m, DropPath) for m in tiny_vit().modules())
    at_least = calls * (BATCH * 4 - 64)
    claims.check(
        saved["timm"] - saved["convert"] >= at_least,
        f"convert saves {saved['timm'] - saved['convert']:,.0f} B less for backward than timm, "
        f"at least {calls} DropPath calls x ({BATCH} x 4 B mask - 64 B) = {at_least:,} B",
    )
    claims.check(
        saved["skip_dropped"] < saved["convert"],
        f"skip_dropped saves less for backward than convert ({saved['skip_dropped']:,.0f} B "
        f"< {saved['convert']:,.0f} B)",
    )
    # The fused op keeps h and the row statistics, what LayerNorm(h) keeps, and its seed pair
    # (at most 64 B per call, even for block 0's drop path at rate 0, which keeps none).
    blocks = sum(isinstance(m, Block) for m in tiny_vit().modules())
    claims.check(
        saved["fuse_norm"] <= saved["convert"] + 64 * blocks,
        f"fuse_norm saves at most 64 B per fused block more than convert "
        f"({saved['fuse_norm'] - saved['convert']:+,.0f} B, {blocks} blocks)",
    )

    fig, (left, mid, right) = plt.subplots(1, 3, figsize=(18, 4.8))
    colors = [COLORS[n] for n in names]
    for name in names:
        loss = np.mean([r[name]["loss"] for r in results], axis=0)
        smooth = np.convolve(loss, np.ones(10) / 10, mode="valid")
        acc = _common.mean_std(over_seeds(name, "test accuracy"), 1)
        left.plot(np.arange(10, steps + 1), smooth, c=COLORS[name], label=f"{name}: {acc}% test")
    left.set(title=f"training loss (mean of {seeds} seeds, 10-step average)", xlabel="step")
    left.set(ylabel="cross-entropy")
    left.legend(fontsize=8)
    ticks = [n.replace("+", "+\n") for n in names]
    for ax, values, label in (
        (mid, step_ms, lambda n: f"{step_ms[n]:.1f} ms"),
        (right, saved, lambda n: f"{saved[n] - saved['timm']:+,.0f} B"),
    ):
        ratios = [values[n] / values["timm"] for n in names]
        bars = ax.bar(ticks, ratios, color=colors)
        labels = [f"{r:.4f}x\n{label(n)}" for r, n in zip(ratios, names)]
        ax.bar_label(bars, labels=labels, fontsize=8)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        low, high = min(ratios), max(ratios)
        pad = max(0.05, (high - low) * 0.25)
        ax.set_ylim(max(0.0, low - pad), high + pad)  # not from 0: the differences are small
        ax.set(ylabel="ratio to timm's (lower is better)")
        ax.tick_params(axis="x", labelsize=8)
    mid.set_title("median step time, ratio to timm's\n(meaningful on an idle machine only)")
    right.set_title(
        f"saved for backward in one forward of {BATCH},\nratio to timm's ({saved['timm']:,.0f} B)"
    )
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90)
    claims.finish(args.out)


if __name__ == "__main__":
    main()
