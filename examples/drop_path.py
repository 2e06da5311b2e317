"""DropPath in a tiny ViT on 8x8 digits: timm's layers, fused_dropout.convert, skip_dropped.

A timm VisionTransformer built without weights (8x8 images in four 4x4 patches, width 32,
depth 4, drop_path_rate 0.4 on timm's linear schedule over depth), trained briefly with AdamW on
scikit-learn's bundled digits (no download), in up to three configurations from the same
initial weights, stepped in turn on the same batches:
  - timm: the model as built, with timm's DropPath;
  - convert: after fused_dropout.convert(model);
  - skip_dropped: after fused_dropout.convert(model, skip_dropped=True), where the installed
    fused_dropout has it: the residual branches run only on the samples DropPath keeps.
It reports loss curves, the median step time, and the bytes autograd saves for backward
(torch.autograd.graph.saved_tensors_hooks). Over the seeds it checks that the
configurations reach statistically indistinguishable test accuracy (Welch's t-test), that
convert saves less for backward than timm (a 16-byte seed pair per DropPath call instead of a
per-sample mask), and skip_dropped less again (no activations of skipped samples).

    python examples/drop_path.py           # full run: ~40 s of CPU, seeds over the cores
    python examples/drop_path.py --smoke   # seconds: 2 seeds, 10 steps, claims not checked
"""

from __future__ import annotations

import copy
import inspect
import time

import _common
import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from timm.layers import DropPath
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import fused_dropout

HAS_SKIP_DROPPED = "skip_dropped" in inspect.signature(fused_dropout.convert).parameters
DROP_PATH_RATE = 0.4
BATCH = 64


def tiny_vit() -> VisionTransformer:
    """A 4-block ViT for 1x8x8 images: four 4x4 patches and a class token, width 32."""
    return VisionTransformer(
        img_size=8, patch_size=4, in_chans=1, num_classes=10,
        embed_dim=32, depth=4, num_heads=2, mlp_ratio=2.0,
        drop_path_rate=DROP_PATH_RATE,
    )  # fmt: skip


def configurations(seed: int) -> dict[str, nn.Module]:
    """The same initial weights as timm's model, converted by fused_dropout, and skipping."""
    torch.manual_seed(seed)
    models = {"timm": tiny_vit()}
    models["convert"], _ = fused_dropout.convert(copy.deepcopy(models["timm"]))
    if HAS_SKIP_DROPPED:
        models["skip_dropped"], _ = fused_dropout.convert(
            copy.deepcopy(models["timm"]), skip_dropped=True
        )
    return models


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
    if not HAS_SKIP_DROPPED:
        print(
            "fused_dropout.convert has no skip_dropped= in this version: "
            "the skip_dropped configuration is left out\n"
        )
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
            + [f"{saved[n] / saved['timm']:.3f}x"]
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
    if HAS_SKIP_DROPPED:
        claims.check(
            saved["skip_dropped"] < saved["convert"],
            f"skip_dropped saves less for backward than convert ({saved['skip_dropped']:,.0f} B "
            f"< {saved['convert']:,.0f} B)",
        )

    fig, (left, mid, right) = plt.subplots(1, 3, figsize=(16, 4.2))
    colors = dict(zip(names, ("tab:blue", "tab:green", "tab:purple")))
    for name in names:
        loss = np.mean([r[name]["loss"] for r in results], axis=0)
        smooth = np.convolve(loss, np.ones(10) / 10, mode="valid")
        acc = _common.mean_std(over_seeds(name, "test accuracy"), 1)
        left.plot(np.arange(10, steps + 1), smooth, c=colors[name], label=f"{name}: {acc}% test")
    left.set(title=f"training loss (mean of {seeds} seeds, 10-step average)", xlabel="step")
    left.set(ylabel="cross-entropy")
    left.legend()
    bars = mid.bar(names, [step_ms[n] for n in names], color=[colors[n] for n in names])
    mid.bar_label(bars, labels=[f"{step_ms[n]:.1f} ms" for n in names])
    mid.set(title="median step time (shared CPU: noisy)", ylabel="ms")
    bars = right.bar(names, [saved[n] / 2**10 for n in names], color=[colors[n] for n in names])
    right.bar_label(bars, labels=[f"{saved[n]:,.0f} B" for n in names])
    right.set(title=f"saved for backward, one forward of {BATCH}", ylabel="KiB")
    if not HAS_SKIP_DROPPED:
        fig.text(0.99, 0.01, "skip_dropped: not in this fused_dropout", ha="right", fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90)
    claims.finish(args.out)


if __name__ == "__main__":
    main()
