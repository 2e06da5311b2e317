"""A drop-rate sweep on 8x8 digits: hand-written dropout, torch.nn.Dropout and fused_dropout.

scikit-learn's digits (1797 8x8 images, bundled with the package: no download), 300 of them
for training and the rest for testing, a 64-128-128-10 ReLU MLP with dropout after each
hidden layer, trained full-batch with Adam (lr 1e-3), for p in {0, 0.2, 0.5, 0.8} and three
dropout implementations:
  - hand-written: a torch.bernoulli(1 - p) mask times x / (1 - p), autograd does the backward;
  - torch.nn.Dropout(p);
  - fused_dropout.Dropout(p).
At p = 0 all three are the identity, so that model is trained once per seed. Each seed has its
own train/test split and initial weights, shared by every (p, implementation).

It checks, over the seeds: at each p > 0 the three implementations reach statistically
indistinguishable test accuracy (one-way ANOVA); moderate p overfits less than p = 0 (a
smaller gap between test and train loss); p = 0.8 underfits (a higher training loss).

    python examples/drop_rate_sweep.py           # full run: ~70 s of CPU, seeds over the cores
    python examples/drop_rate_sweep.py --smoke   # seconds: 2 seeds, 30 steps, claims not checked
"""

from __future__ import annotations

import _common
import matplotlib.pyplot as plt
import numpy as np
import torch
from scipy import stats
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import fused_dropout

RATES = (0.0, 0.2, 0.5, 0.8)
N_TRAIN = 300


class BernoulliDropout(nn.Module):
    """Dropout by hand: x * bernoulli(1 - p) / (1 - p); autograd applies the mask in backward."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        mask = torch.bernoulli(torch.full_like(x, 1 - self.p))
        return x * mask / (1 - self.p)


IMPLEMENTATIONS = {
    "hand-written": BernoulliDropout,
    "torch.nn.Dropout": nn.Dropout,
    "fused_dropout.Dropout": fused_dropout.Dropout,
}
COLORS = dict(zip(IMPLEMENTATIONS, ("tab:orange", "tab:blue", "tab:green")))


def digits(seed: int) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_test, y_test): pixels scaled to [0, 1], a stratified split."""
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        torch.as_tensor(x / 16, dtype=torch.float32),
        torch.as_tensor(y),
        train_size=N_TRAIN,
        random_state=seed,
        stratify=y,
    )
    return x_train, y_train, x_test, y_test


def mlp(dropout: type[nn.Module], p: float) -> nn.Sequential:
    """64-128-128-10 with ReLU, ``dropout(p)`` after each hidden layer."""
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), dropout(p),
        nn.Linear(128, 128), nn.ReLU(), dropout(p),
        nn.Linear(128, 10),
    )  # fmt: skip


def train(dropout: type[nn.Module], p: float, seed: int, steps: int, every: int) -> dict:
    """Train and test loss and accuracy (eval mode), every ``every`` steps."""
    x, y, x_test, y_test = digits(seed)
    torch.manual_seed(seed)  # the same initial weights for every (p, implementation)
    model = mlp(dropout, p)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    result = {key: [] for key in ("train", "test", "train accuracy", "test accuracy")}

    def evaluate() -> None:
        model.eval()
        with torch.no_grad():
            for split, (xs, ys) in {"train": (x, y), "test": (x_test, y_test)}.items():
                logits = model(xs)
                result[split].append(nn.functional.cross_entropy(logits, ys).item())
                accuracy = 100 * (logits.argmax(1) == ys).float().mean().item()
                result[f"{split} accuracy"].append(accuracy)

    for step in range(steps):
        model.train()
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % every == 0:
            evaluate()
    return result


def run(seed: int, steps: int, every: int) -> dict[tuple[float, str], dict]:
    """Every (p, implementation) trained from the split and initial weights of ``seed``."""
    out = {(0.0, "none"): train(nn.Dropout, 0.0, seed, steps, every)}  # p = 0: the identity
    for p in RATES[1:]:
        for name, dropout in IMPLEMENTATIONS.items():
            out[p, name] = train(dropout, p, seed, steps, every)
    return out


def main() -> None:
    args = _common.parse_args(__doc__, "drop_rate_sweep")
    seeds, steps, every = (2, 30, 10) if args.smoke else (5, 200, 10)
    results = _common.map_seeds(run, seeds, steps, every)
    runs = {key: [r[key] for r in results] for key in results[0]}
    none = runs.pop((0.0, "none"))

    def final(rs: list[dict], what: str) -> np.ndarray:
        """The last value of ``what`` in each run."""
        return np.array([r[what][-1] for r in rs])

    def gap(rs: list[dict]) -> np.ndarray:
        """Test minus training loss: how much each run overfits."""
        return final(rs, "test") - final(rs, "train")

    print(f"final test accuracy (%) after {steps} Adam steps, {seeds} seeds (mean ± std)\n")
    rows, anova = [], {}
    for p in RATES[1:]:
        groups = [final(runs[p, name], "test accuracy") for name in IMPLEMENTATIONS]
        anova[p] = stats.f_oneway(*groups).pvalue
        rows.append([f"{p}", *(_common.mean_std(g, 2) for g in groups), f"{anova[p]:.2g}"])
    acc0 = _common.mean_std(final(none, "test accuracy"), 2)
    rows.insert(0, ["0.0", acc0, "(the same model)", "", ""])
    _common.table(["p", *IMPLEMENTATIONS, "ANOVA p"], rows)

    print("\nper p, the three implementations pooled (mean ± std over runs)\n")
    pooled = {0.0: none, **{p: sum((runs[p, n] for n in IMPLEMENTATIONS), []) for p in RATES[1:]}}
    rows = []
    for p, rs in pooled.items():
        rows.append(
            [f"{p}", _common.mean_std(final(rs, "train")), _common.mean_std(final(rs, "test"))]
            + [_common.mean_std(gap(rs)), _common.mean_std(final(rs, "train accuracy"), 2)]
            + [_common.mean_std(final(rs, "test accuracy"), 2)]
        )
    _common.table(
        ["p", "train loss", "test loss", "test - train", "train acc %", "test acc %"], rows
    )
    avg = {p: {k: final(rs, k).mean() for k in ("train", "test")} for p, rs in pooled.items()}
    print(
        f"\nWhat it shows: without dropout the MLP overfits (train loss {avg[0.0]['train']:.3f}, "
        f"test loss {avg[0.0]['test']:.3f}); moderate p overfits less (p = 0.5: train "
        f"{avg[0.5]['train']:.3f}, test {avg[0.5]['test']:.3f}); p = 0.8 underfits (train loss "
        f"{avg[0.8]['train']:.3f}). The three implementations train alike at every p."
    )

    claims = _common.Claims(args.smoke)
    alpha = 0.05 / len(anova)  # Bonferroni over the three rates
    for p, pvalue in anova.items():
        claims.check(
            pvalue > alpha,
            f"p = {p}: the three implementations' test accuracies are indistinguishable "
            f"(ANOVA p = {pvalue:.2g} > {alpha:.3f})",
        )
    # Paired by seed against p = 0, per implementation: the seed fixes the split and weights.
    for name in IMPLEMENTATIONS:
        t = stats.ttest_rel(gap(runs[0.5, name]), gap(none), alternative="less")
        claims.check(
            t.pvalue < 0.05,
            f"p = 0.5 ({name}) overfits less than p = 0: a smaller test - train loss "
            f"(paired one-sided p = {t.pvalue:.2g})",
        )
        t = stats.ttest_rel(
            final(runs[0.8, name], "train"), final(none, "train"), alternative="greater"
        )
        claims.check(
            t.pvalue < 0.05,
            f"p = 0.8 ({name}) underfits: a higher training loss than p = 0 "
            f"(paired one-sided p = {t.pvalue:.2g})",
        )

    fig, axes = plt.subplots(1, len(RATES) + 1, figsize=(22, 4.2))
    x_steps = np.arange(every, steps + 1, every)
    for ax, p in zip(axes, RATES):
        curves = {"no dropout": none} if p == 0 else {n: runs[p, n] for n in IMPLEMENTATIONS}
        for name, rs in curves.items():
            color = COLORS.get(name, "k")
            for split, style in (("train", "--"), ("test", "-")):
                mean = np.mean([r[split] for r in rs], axis=0)
                ax.plot(x_steps, mean, style, c=color, label=f"{name} {split}")
        ax.set(title=f"p = {p}", xlabel="Adam step", ylabel="cross-entropy", yscale="log")
        ax.legend(fontsize=7)
    ax = axes[-1]
    for i, name in enumerate(IMPLEMENTATIONS):
        acc = [final(none if p == 0 else runs[p, name], "test accuracy") for p in RATES]
        ax.errorbar(
            np.array(RATES) + 0.015 * (i - 1),
            [a.mean() for a in acc],
            yerr=[a.std(ddof=1) if a.size > 1 else 0 for a in acc],
            c=COLORS[name],
            marker="o",
            capsize=3,
            label=name,
        )
    ax.set(title=f"final test accuracy, mean ± std, {seeds} seeds", xlabel="p", ylabel="%")
    ax.legend(fontsize=8)
    fig.suptitle(f"digits, {N_TRAIN} training images, mean over {seeds} seeds")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90)
    claims.finish(args.out)


if __name__ == "__main__":
    main()
