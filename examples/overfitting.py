"""Overfitting 20 noisy points, and Dropout(0.5) preventing it: torch's and fused_dropout's.

The classic demo: 20 training and 20 test points of y = x + 0.3 N(0, 1) on [-1, 1], a
1-300-300-1 ReLU MLP trained full-batch with Adam (lr 0.01) for 500 steps: without dropout,
with torch.nn.Dropout(0.5) after each hidden Linear, and with fused_dropout.Dropout(0.5).
Over 10 seeds (each: its own data and initial weights, shared by the three models) it checks
that both dropout versions beat no dropout on test MSE (paired t-test), and that torch's and
ours are statistically indistinguishable (paired and Welch's two-sample t-tests).

    python examples/overfitting.py           # full run: ~55 s of CPU, seeds over the cores
    python examples/overfitting.py --smoke   # seconds: 2 seeds, 60 steps, claims not checked
"""

from __future__ import annotations

import _common
import matplotlib.pyplot as plt
import numpy as np
import torch
from scipy import stats
from torch import nn

import fused_dropout

MODELS = {  # label -> dropout layer (None: no dropout)
    "no dropout": None,
    "torch.nn.Dropout(0.5)": nn.Dropout,
    "fused_dropout.Dropout(0.5)": fused_dropout.Dropout,
}
COLORS = dict(zip(MODELS, ("tab:red", "tab:blue", "tab:green")))


def data(seed: int) -> tuple[torch.Tensor, ...]:
    """20 training and 20 test points of y = x + 0.3 N(0, 1), x evenly spaced on [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.linspace(-1, 1, 20).unsqueeze(1)
    y, y_test = (x + 0.3 * torch.randn(x.shape, generator=g) for _ in range(2))
    return x, y, x, y_test


def mlp(dropout: type[nn.Module] | None) -> nn.Sequential:
    """1-300-300-1 with ReLU, and ``dropout(0.5)`` after each hidden Linear if given."""
    drop = [dropout(0.5)] if dropout else []
    return nn.Sequential(
        nn.Linear(1, 300), *drop, nn.ReLU(),
        nn.Linear(300, 300), *drop, nn.ReLU(),
        nn.Linear(300, 1),
    )  # fmt: skip


def train(
    dropout: type[nn.Module] | None, seed: int, steps: int
) -> tuple[nn.Module, list[float], float]:
    """The trained model, its test MSE after each step, and its final training MSE."""
    x, y, x_test, y_test = data(seed)
    torch.manual_seed(seed)  # same initial weights for the three models; the masks differ
    model = mlp(dropout)
    opt = torch.optim.Adam(model.parameters(), lr=0.01, fused=True)
    test_mse = []
    for _ in range(steps):
        model.train()
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.eval()
        with torch.no_grad():
            test_mse.append(nn.functional.mse_loss(model(x_test), y_test).item())
    with torch.no_grad():
        train_mse = nn.functional.mse_loss(model(x), y).item()
    return model, test_mse, train_mse


def run(seed: int, steps: int) -> dict[str, tuple[nn.Module, list[float], float]]:
    """The three models trained from the same data and initial weights of ``seed``."""
    return {name: train(dropout, seed, steps) for name, dropout in MODELS.items()}


def main() -> None:
    args = _common.parse_args(__doc__, "overfitting")
    seeds, steps = (2, 60) if args.smoke else (10, 500)
    results = _common.map_seeds(run, seeds, steps)
    curves = {name: [r[name][1] for r in results] for name in MODELS}  # test MSE per step
    train_mse = {name: [r[name][2] for r in results] for name in MODELS}
    fits = {name: results[0][name][0] for name in MODELS}  # the seed-0 models
    # The test MSE of a dropout model jitters from step to step (its last update followed a
    # random mask), so "final" is the mean over the last 10% of the steps (451-500).
    tail = steps // 10
    final = {name: [float(np.mean(c[-tail:])) for c in curves[name]] for name in MODELS}

    print(f"{steps} Adam steps, {seeds} seeds (mean ± std over seeds)\n")
    _common.table(
        ["model", f"test MSE (steps {steps - tail + 1}-{steps})", "train MSE (end)"],
        [[n, _common.mean_std(final[n]), _common.mean_std(train_mse[n])] for n in MODELS],
    )
    none, torch_name, ours = MODELS
    print(
        "\nfinal test MSE compared: paired t-test (by seed: same data and initial weights) and "
        "Welch's two-sample t-test\n"
    )
    tests = [(torch_name, none, "less"), (ours, none, "less"), (ours, torch_name, "two-sided")]
    rows, paired, welch = [], {}, {}
    for a, b, alternative in tests:
        diff = np.subtract(final[a], final[b])
        t_rel = stats.ttest_rel(final[a], final[b], alternative=alternative)
        paired[a, b] = t_rel.pvalue
        t, welch[a, b] = _common.welch(final[a], final[b], alternative)
        rows.append(
            [f"{a} - {b}", _common.mean_std(diff), alternative]
            + [f"{t_rel.statistic:+.2f}", f"{t_rel.pvalue:.2g}", f"{t:+.2f}", f"{welch[a, b]:.2g}"]
        )
    header = ["difference", "mean ± std", "alternative", "paired t", "p", "Welch t", "p"]
    _common.table(header, rows)

    claims = _common.Claims(args.smoke)
    for name in (torch_name, ours):
        claims.check(
            paired[name, none] < 0.05,
            f"{name} beats no dropout: paired one-sided p = {paired[name, none]:.2g} < 0.05",
        )
    claims.check(
        paired[ours, torch_name] > 0.05 and welch[ours, torch_name] > 0.05,
        f"ours and torch's are indistinguishable: two-sided p = {paired[ours, torch_name]:.2g} "
        f"(paired), {welch[ours, torch_name]:.2g} (Welch) > 0.05",
    )

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    x, y, x_test, y_test = data(0)
    grid = torch.linspace(-1, 1, 200).unsqueeze(1)
    left.plot(grid, grid, c="gray", ls=":", label="y = x")
    left.scatter(x, y, c="k", s=20, label="train")
    left.scatter(x_test, y_test, facecolors="none", edgecolors="k", s=20, label="test")
    for name, model in fits.items():
        with torch.no_grad():
            left.plot(grid, model(grid), c=COLORS[name], lw=2, label=name)
    left.set(title="fits after training (seed 0)", xlabel="x", ylabel="y")
    left.legend(fontsize=8)
    for name in MODELS:
        label = f"{name}: {_common.mean_std(final[name], 3)} at the end"
        right.plot(
            np.arange(1, steps + 1), np.mean(curves[name], axis=0), c=COLORS[name], label=label
        )
    right.set(
        title=f"test MSE, mean over {seeds} seeds",
        xlabel="Adam step",
        ylabel="test MSE",
        ylim=(0.05, 0.3),
    )
    right.axhline(0.09, c="gray", ls=":", lw=1, label="noise variance 0.09")
    right.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    claims.finish(args.out)


if __name__ == "__main__":
    main()
