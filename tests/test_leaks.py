"""No leaks: many training calls do not grow the process's memory, and the autograd graph of
every op is freed with its output."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import fused_dropout
from fused_dropout import functional as FD

# One training step through every op kind: forward and backward.
BLOCK = torch.nn.ModuleDict(
    {
        "dropout": fused_dropout.Dropout(0.1),
        "channels": fused_dropout.Dropout2d(0.1),
        "alpha": fused_dropout.AlphaDropout(0.1),
        "drop_path": fused_dropout.DropPath(0.1),
        "drop_path_add": fused_dropout.DropPathAdd(0.1),
        "bias_dropout_add": fused_dropout.BiasDropoutAdd(0.1),
    }
)


def training_call(x: torch.Tensor, bias: torch.Tensor) -> None:
    h = BLOCK["dropout"](x * 1.0)
    h = BLOCK["channels"](h)
    h = BLOCK["alpha"](h)
    h = BLOCK["drop_path_add"](h, BLOCK["drop_path"](h))
    h = BLOCK["bias_dropout_add"](h, bias, h)
    h = FD.dropout(h, 0.2, inplace=True)
    h.sum().backward()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.slow
def test_10000_training_calls_do_not_grow_rss(capsys):
    x = torch.randn(4, 8, 6, 6, requires_grad=True)
    bias = torch.randn(6, requires_grad=True)
    BLOCK.train()
    for _ in range(1000):  # warm-up: allocator caches, autograd engine, first-call setup
        training_call(x, bias)
    gc.collect()
    before = rss_bytes()
    samples = []
    for i in range(10_000):
        training_call(x, bias)
        if i % 1000 == 999:
            samples.append(rss_bytes() - before)
    gc.collect()
    growth = rss_bytes() - before
    # A leak of even one small tensor per call (~0.5 KB) would add 5 MB, of one graph node more.
    assert growth < 2 * 2**20, f"RSS grew by {growth / 2**20:.2f} MiB (samples: {samples})"
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with capsys.disabled():
        print(f"\n[leaks] RSS after 10,000 training calls: {growth / 2**20:+.2f} MiB ({samples})")


def _graph_cases():
    r = torch.randn(4, 5)
    b = torch.randn(5)
    return {
        "dropout": lambda h: FD.dropout(h, 0.5),
        "dropout_inplace": lambda h: FD.dropout(h * 1.0, 0.5, inplace=True),
        "dropout2d": lambda h: FD.dropout2d(h[None, None], 0.5),
        "alpha_dropout": lambda h: FD.alpha_dropout(h, 0.5, True),
        "drop_path": lambda h: FD.drop_path(h, 0.5, True),
        "dropout_add": lambda h: FD.dropout_add(h, r, 0.5),
        "bias_dropout_add": lambda h: FD.bias_dropout_add(h, b, r, 0.5),
        "drop_path_add": lambda h: FD.drop_path_add(r, h, 0.5),
    }


@pytest.mark.parametrize("backward", ["no_backward", "backward", "double_backward"])
@pytest.mark.parametrize("case", list(_graph_cases()))
def test_autograd_graph_is_freed_with_the_output(case, backward):
    op = _graph_cases()[case]
    leaf = torch.randn(4, 5, requires_grad=True)
    a = leaf * 1.0
    h = a.sin()  # SinBackward saves `a`: once we drop it, it lives exactly as long as the graph
    watched = weakref.ref(a)
    del a
    y = op(h)
    if backward == "backward":
        y.sum().backward()
    elif backward == "double_backward":
        (g,) = torch.autograd.grad(y.sum(), leaf, create_graph=True)
        g.sum().backward()
        del g
    del h, y
    gc.collect()
    assert watched() is None, "the graph (and the tensor it saved) outlived the output"
    assert leaf.grad is None or torch.isfinite(leaf.grad).all()
