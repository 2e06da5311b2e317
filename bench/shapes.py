"""The shapes a benchmark runs on: a 1-D size sweep and real model tensors.

A ``Shape`` is a logical size plus a memory format. How an op lays a 1-D sweep
size out (for a bias, a batch dim or channels) is ``layout_for``'s job.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Shape:
    name: str
    dims: tuple[int, ...]
    channels_last: bool = False
    sweep: bool = False  # part of the 1-D size sweep (plotted against size)

    @property
    def numel(self) -> int:
        return math.prod(self.dims)


REAL = {
    "vit-s": Shape("vit-s", (64, 197, 384)),
    "vit-b": Shape("vit-b", (64, 197, 768)),
    "bert": Shape("bert", (8, 512, 768)),
    "gpt2-xl": Shape("gpt2-xl", (8, 1024, 1600)),
    "cnn": Shape("cnn", (32, 64, 56, 56)),
    "cnn-cl": Shape("cnn-cl", (32, 64, 56, 56), channels_last=True),
}
SWEEP = tuple(range(10, 27))  # 2^10 .. 2^26 elements
QUICK_SWEEP = (10, 14, 17, 20)
QUICK_REAL = ("vit-s", "bert")


def sweep_shape(n: int) -> Shape:
    name = f"2^{n.bit_length() - 1}" if n & (n - 1) == 0 else str(n)
    return Shape(name, (n,), sweep=True)


def parse_sizes(spec: str) -> list[Shape]:
    """Parse ``--sizes``: comma-separated items, each one of
    ``sweep`` | ``real`` | a real shape's name | ``2^a..2^b`` | ``2^a`` | ``N`` | ``AxBxC``."""
    out: list[Shape] = []
    for item in filter(None, (s.strip().lower() for s in spec.split(","))):
        if item == "sweep":
            out += [sweep_shape(1 << k) for k in SWEEP]
        elif item == "real":
            out += list(REAL.values())
        elif item in REAL:
            out.append(REAL[item])
        elif m := re.fullmatch(r"2\^(\d+)\.\.2\^(\d+)", item):
            out += [sweep_shape(1 << k) for k in range(int(m[1]), int(m[2]) + 1)]
        elif m := re.fullmatch(r"2\^(\d+)", item):
            out.append(sweep_shape(1 << int(m[1])))
        elif re.fullmatch(r"\d+", item):
            out.append(sweep_shape(int(item)))
        elif re.fullmatch(r"\d+(x\d+)+", item):
            out.append(Shape(item, tuple(int(d) for d in item.split("x"))))
        else:
            raise ValueError(f"--sizes: cannot parse {item!r}")
    return list(dict.fromkeys(out))


def quick_shapes() -> list[Shape]:
    return [sweep_shape(1 << k) for k in QUICK_SWEEP] + [REAL[k] for k in QUICK_REAL]


def _split(n: int, lead: int) -> tuple[int, int]:
    """(a, n // a) with a the largest divisor of n that is <= lead."""
    a = math.gcd(n, lead)
    return a, n // a


def layout_for(shape: Shape, kind: str) -> tuple[int, ...] | None:
    """The tensor dims an op of ``kind`` runs on for ``shape`` (None: not applicable).

    kinds: ``elementwise`` (any), ``bias`` (bias on the last dim), ``sample`` (a
    per-sample mask on dim 0), ``channel`` (an (N, C) mask: rank 3 to 5).
    A sweep size n becomes (n,), (n/1024, 1024), (64, n/64) and (8, 64, n/512).
    """
    if not shape.sweep:
        ok = kind != "channel" or 3 <= len(shape.dims) <= 5
        return shape.dims if ok else None
    n = shape.numel
    if kind == "elementwise":
        return (n,)
    if kind == "bias":
        a, b = _split(n, 1024)
        return (b, a)
    if kind == "sample":
        return _split(n, 64)
    a, rest = _split(n, 8)
    c, length = _split(rest, 64)
    return (a, c, length)


def make_tensor(dims, dtype, device, channels_last=False, requires_grad=True) -> torch.Tensor:
    t = torch.randn(dims, dtype=dtype, device=device)
    if channels_last and len(dims) == 4:
        t = t.contiguous(memory_format=torch.channels_last)
    return t.requires_grad_(requires_grad)
