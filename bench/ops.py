"""The ops under test: for each, its inputs, the eager baseline, the practical
limit (DESIGN.md s.7) and how to call fused_dropout's version.

An op runs only when fused_dropout.functional has its function, so the suite
grows with the package.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from bench import baselines
from bench.shapes import Shape, layout_for, make_tensor

P_DEFAULT = 0.1


@dataclass(frozen=True)
class Op:
    name: str
    kind: str  # layout kind, see shapes.layout_for; also fixes the mask's size
    args: tuple[str, ...]  # input names; VECTORS are 1-D over the last dim, others full-size
    eager: Callable  # eager(*inputs, p): what a user writes today
    ours: Callable  # ours(functional, *inputs, p)
    needs: tuple[str, ...]  # functions of fused_dropout.functional it calls
    baseline: str  # what `eager` is, for the table
    fused_add: bool = False  # the limit is `a + b` instead of `x * 2`
    unfused: Callable | None = None  # unfused(functional, *inputs, p): ours, op by op
    norm: bool = False  # a norm over the last dim follows (bytes_model's norm rows)

    @property
    def alpha(self) -> bool:
        return "alpha" in self.name


VECTORS = ("bias", "weight")


def _channel(fd, x, p):
    return getattr(fd, f"dropout{x.ndim - 2}d")(x, p, True)


OPS = (
    Op(
        name="dropout",
        kind="elementwise",
        args=("x",),
        eager=lambda x, p: F.dropout(x, p, True),
        ours=lambda fd, x, p: fd.dropout(x, p, True),
        needs=("dropout",),
        baseline="F.dropout",
    ),
    Op(
        name="dropout_add",
        kind="elementwise",
        args=("x", "residual"),
        eager=baselines.dropout_add,
        ours=lambda fd, x, r, p: fd.dropout_add(x, r, p, True),
        needs=("dropout_add",),
        baseline="r + F.dropout(x)",
        fused_add=True,
    ),
    Op(
        name="bias_dropout_add",
        kind="bias",
        args=("x", "bias", "residual"),
        eager=lambda x, b, r, p: baselines.bias_dropout_add(x, b, r, p, True),
        ours=lambda fd, x, b, r, p: fd.bias_dropout_add(x, b, r, p, True),
        needs=("bias_dropout_add",),
        baseline="Megatron bias_dropout_add",
        fused_add=True,
    ),
    Op(
        name="dropout_add_layer_norm",
        kind="bias",
        args=("x", "residual", "weight", "bias"),
        eager=baselines.dropout_add_layer_norm,
        ours=lambda fd, x, r, w, b, p: fd.dropout_add_layer_norm(x, r, w, b, p, True),
        needs=("dropout_add_layer_norm", "dropout_add"),
        baseline="F.layer_norm(r + F.dropout(x))",
        fused_add=True,
        unfused=lambda fd, x, r, w, b, p: F.layer_norm(
            fd.dropout_add(x, r, p, True), w.shape, w, b
        ),
        norm=True,
    ),
    Op(
        name="drop_path",
        kind="sample",
        args=("x",),
        eager=lambda x, p: baselines.drop_path(x, p, True),
        ours=lambda fd, x, p: fd.drop_path(x, p, True),
        needs=("drop_path",),
        baseline="timm drop_path",
    ),
    Op(
        name="drop_path_add",
        kind="sample",
        args=("residual", "branch"),
        eager=baselines.drop_path_add,
        ours=lambda fd, r, b, p: fd.drop_path_add(r, b, p, True),
        needs=("drop_path_add",),
        baseline="r + timm drop_path(b)",
        fused_add=True,
    ),
    Op(
        name="stochastic_depth",
        kind="sample",
        args=("x",),
        eager=lambda x, p: baselines.stochastic_depth(x, p, "row", True),
        ours=lambda fd, x, p: fd.stochastic_depth(x, p, "row", True),
        needs=("stochastic_depth",),
        baseline="torchvision stochastic_depth(row)",
    ),
    Op(
        name="dropout_nd",
        kind="channel",
        args=("x",),
        eager=baselines.channel_dropout,
        ours=_channel,
        needs=("dropout1d", "dropout2d", "dropout3d"),
        baseline="F.dropout1d/2d/3d by rank",
    ),
    Op(
        name="alpha_dropout",
        kind="elementwise",
        args=("x",),
        eager=lambda x, p: F.alpha_dropout(x, p, True),
        ours=lambda fd, x, p: fd.alpha_dropout(x, p, True),
        needs=("alpha_dropout",),
        baseline="F.alpha_dropout",
    ),
    Op(
        name="feature_alpha_dropout",
        kind="channel",
        args=("x",),
        eager=lambda x, p: F.feature_alpha_dropout(x, p, True),
        ours=lambda fd, x, p: fd.feature_alpha_dropout(x, p, True),
        needs=("feature_alpha_dropout",),
        baseline="F.feature_alpha_dropout",
    ),
)
OP_NAMES = tuple(op.name for op in OPS)


def select(names: list[str] | None, functional) -> tuple[list[Op], list[str]]:
    """The ops to run and, for each op left out, why."""
    chosen, skipped = [], []
    for op in OPS:
        if names and op.name not in names:
            continue
        missing = [n for n in op.needs if not hasattr(functional, n)]
        if functional is None:
            skipped.append(f"{op.name}: fused_dropout is not importable")
        elif missing:
            skipped.append(f"{op.name}: fused_dropout.functional has no {', '.join(missing)} yet")
        else:
            chosen.append(op)
    return chosen, skipped


def make_inputs(op: Op, shape: Shape, dtype, device) -> tuple[torch.Tensor, ...] | None:
    """Fresh inputs (all requiring grad) for ``op`` on ``shape``, or None if it does not apply."""
    dims = layout_for(shape, op.kind)
    if dims is None:
        return None
    return tuple(
        make_tensor(
            dims[-1:] if a in VECTORS else dims,
            dtype,
            device,
            channels_last=shape.channels_last and a not in VECTORS,
        )
        for a in op.args
    )


def mask_numel(op: Op, dims: tuple[int, ...]) -> int:
    """Elements of the op's mask: what it draws from the RNG."""
    if op.kind == "sample":
        return dims[0]
    if op.kind == "channel":
        return dims[0] * dims[1]
    return math.prod(dims)


def implementations(op: Op, functional, compiled, p: float) -> dict[str, Callable]:
    """name -> f(*inputs) returning the op's output: ours and the baselines."""
    impls = {"ours": lambda *a: op.ours(functional, *a, p), "eager": lambda *a: op.eager(*a, p)}
    if op.unfused is not None:
        impls["unfused"] = lambda *a: op.unfused(functional, *a, p)
    if compiled is not None:
        impls["compile"] = compiled
    return impls


def compile_baseline(op: Op, p: float):
    """torch.compile of the eager composition. Dynamic shapes: one compilation per dtype
    serves every size (one object per op: dynamo keeps a graph per dtype)."""

    def composition(*inputs):
        return op.eager(*inputs, p)

    composition.__name__ = f"{op.name}_composition"
    return torch.compile(composition, dynamic=True)


def full_inputs(op: Op, inputs) -> list[torch.Tensor]:
    """The inputs of the output's size (all but the bias and weight)."""
    return [t for a, t in zip(op.args, inputs) if a not in VECTORS]


def limit_inputs(op: Op, inputs) -> tuple[torch.Tensor, ...]:
    """The full-size tensors the limit reads: x, or (x, residual) for the fused adds."""
    full = [t.detach() for t in full_inputs(op, inputs)]
    return tuple(full[:2] if op.fused_add else full[:1])


def limit_forward(op: Op) -> Callable:
    """torch's own tuned elementwise kernel moving the op's bytes (DESIGN.md s.7)."""
    return (lambda a, b: a + b) if op.fused_add else (lambda x: x * 2)
