"""Stochastic depth that skips the compute of dropped samples.

``drop_path_residual(x, branch, p)`` returns ``x + drop_path(branch(x), p)`` but calls ``branch``
only on the samples it keeps. The per-sample decisions are those of the RNG contract, computed on
the CPU by the library's own kernel before the branch runs: a mask is a pure function of
``(seed, offset, p, batch size)``, so no device sync is needed, and a change of the contract
carries over here unchanged. ``convert(model, skip_dropped=True)`` rewires the residual blocks it
knows (see ``fused_dropout.blocks``) to call it.

Distributed: inside ``distributed.batch_sharded`` the decisions are those of the global batch
(rank ``r`` takes its rows of the one-process decision vector). Where ``torch.distributed`` is
initialized, a call that keeps no sample still runs the branch, on zero rows, so that every
rank calls the same modules (FSDP2's all-gathers) and builds the same autograd graph (DDP's
reduction, FSDP2's reduce-scatters): no rank waits for a collective that another skipped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fused_dropout import _compat, _impl, distributed, ops

__all__ = ["DropPathResidual", "count_skipped", "drop_path_residual", "kept_samples"]

Branch = Callable[[Tensor], Tensor]
MODES = ("sample", "subset")
_UINT64 = 1 << 64
_TWO32 = 1 << 32

# ---------------------------------------------------------------- decisions


def _draw_seed_offset(device: torch.device, generator: torch.Generator | None) -> tuple[int, int]:
    """The pair an op call on ``device`` would draw now, advancing the generator the same way."""
    seed, offset = torch.ops.fused_dropout.draw_seed_offset(device, generator)
    return seed % _UINT64, offset


def _keeps(batch: int, p: float, seed_offset: tuple[int, int]) -> Tensor:
    """Bool (batch,): what drop_path keeps at ``p`` for this pair, computed by the library's CPU
    kernel on a vector of ones (so the decisions follow the contract wherever it goes)."""
    return ops.dropout(torch.ones(batch), p, 1, False, seed_offset=seed_offset)[0] != 0


def _keeps_below(batch: int, threshold: int, seed_offset: tuple[int, int]) -> Tensor:
    """Bool (batch,): keep iff the contract word is below ``threshold`` (1 <= threshold < 2^32)."""
    # 1 - threshold/2^32 is exact in double, and the kernel's T = floor((1 - p) * 2^32) maps it
    # back to `threshold`.
    return _keeps(batch, 1.0 - threshold / _TWO32, seed_offset)


def _smallest_words(batch: int, k: int, seed_offset: tuple[int, int]) -> Tensor:
    """Bool (batch,): the ``k`` samples with the smallest contract words (ties: lowest index),
    found by bisecting the keep threshold, so that the words come from the kernel itself."""
    lo, hi = 0, _TWO32  # count(lo) < k <= count(hi); count(2^32) = batch (every word is < 2^32)
    keep_lo = torch.zeros(batch, dtype=torch.bool)
    keep_hi = torch.ones(batch, dtype=torch.bool)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        keep = _keeps_below(batch, mid, seed_offset)
        n = int(keep.sum())
        if n == k:
            return keep
        if n < k:
            lo, keep_lo = mid, keep
        else:
            hi, keep_hi = mid, keep
    # Words equal to lo (a tie, or the word 2^32 - 1 that no threshold keeps): lowest index first.
    tied = (keep_hi & ~keep_lo).nonzero().squeeze(1)
    keep_lo[tied[: k - int(keep_lo.sum())]] = True
    return keep_lo


def kept_samples(
    batch: int,
    p: float,
    mode: str = "sample",
    scale_by_keep: bool = True,
    *,
    seed_offset: tuple[int, int],
) -> tuple[Tensor, float]:
    """The kept sample indices (sorted, int64, CPU) and the scale of their branch outputs.

    ``"sample"``: sample ``i`` is kept iff ``drop_path(..., seed_offset=seed_offset)`` keeps it,
    scale ``1 / (1 - p)``. ``"subset"``: the ``max(int(batch * (1 - p)), 1)`` samples with the
    smallest contract words (a uniformly random subset), scale ``batch / k``; ``p == 1`` keeps none.
    """
    _impl.check_p(p, "drop probability")
    if mode not in MODES:
        raise ValueError(f"mode has to be one of {MODES}, but got {mode!r}")
    if p == 0.0 or batch == 0:
        return torch.arange(batch), 1.0
    if p == 1.0:
        return torch.zeros(0, dtype=torch.int64), 1.0
    if mode == "sample":
        keep = _keeps(batch, p, seed_offset)
        scale = 1.0 / (1.0 - p)
    else:
        k = max(int(batch * (1 - p)), 1)
        keep = _smallest_words(batch, k, seed_offset)
        scale = batch / k
    return keep.nonzero().squeeze(1), scale if scale_by_keep else 1.0


# ---------------------------------------------------------------- the residual


@dataclass
class _Counts:
    samples: int = 0
    skipped: int = 0
    calls: int = 0  # calls that drew decisions
    none_kept: int = 0  # of those, the calls that kept no sample


_counters: list[_Counts] = []


@contextlib.contextmanager
def count_skipped() -> Iterator[_Counts]:
    """Counts, inside the ``with`` block, the samples that ``drop_path_residual`` is given in
    training with ``p > 0`` (``samples``) and those whose branch it skips (``skipped``); the
    calls that drew decisions (``calls``) and those that kept no sample (``none_kept``)."""
    counts = _Counts()
    _counters.append(counts)
    try:
        yield counts
    finally:
        _counters.remove(counts)


def _record(batch: int, kept: int) -> None:
    for c in _counters:
        c.samples += batch
        c.skipped += batch - kept
        c.calls += 1
        c.none_kept += kept == 0


# torch.compile graph-breaks at the host-side decision: _decide wrapped by torch.compiler.disable,
# made by the module form and convert(skip_dropped=True) (outside any compiled region, and not
# at import: it imports torch._dynamo, which takes seconds).
_NOT_COMPILED = (
    "fused_dropout.drop_path_residual decides on the host which samples to keep. Without "
    "fullgraph=True the branch is still compiled (mode='subset' keeps static shapes; 'sample' "
    "compiles a dynamic batch); for one graph use drop_path_add (convert(model) without "
    "skip_dropped)."
)
_decide_uncompiled: Callable | None = None


def _prepare_compile() -> None:
    global _decide_uncompiled
    if _decide_uncompiled is None:
        _decide_uncompiled = _compat.compiler_disable(_decide, _NOT_COMPILED)


def _global_rows(x: Tensor) -> tuple[int, int] | None:
    """(global batch, first global row) of ``x``'s dim 0 inside ``distributed.batch_sharded``
    (when it shards dim 0), else None."""
    shape, offset = distributed.current_box(x)
    if shape is None or shape[0] == x.shape[0]:
        return None
    return shape[0], offset[0]


def _collectives() -> bool:
    """Whether other processes may wait for this one's collectives: torch.distributed is
    initialized with more than one rank."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _decide(
    x: Tensor,
    p: float,
    mode: str,
    scale_by_keep: bool,
    generator: torch.Generator | None,
    seed_offset: tuple[int, int] | None,
) -> tuple[Tensor | None, int, float]:
    """(indices on x's device, or None when every sample is kept or when none is and the
    branch is to be skipped; how many; scale). Inside ``batch_sharded``: this rank's rows of
    the global batch's decisions. None kept, with collectives (:func:`_collectives`): an
    empty index, so that the branch runs on zero rows (decided here, behind the graph break,
    so that compiled code does not query torch.distributed)."""
    batch = x.shape[0]
    if seed_offset is None:
        seed_offset = _draw_seed_offset(x.device, generator)
    else:
        ops.split_seed_offset(seed_offset)  # validate
    rows = _global_rows(x)
    if rows is None:
        idx, scale = kept_samples(batch, p, mode, scale_by_keep, seed_offset=seed_offset)
    else:
        total, start = rows
        idx, scale = kept_samples(total, p, mode, scale_by_keep, seed_offset=seed_offset)
        idx = idx[(idx >= start) & (idx < start + batch)] - start
    k = idx.numel()
    _record(batch, k)
    if k == batch or (k == 0 and not _collectives()):
        return None, k, scale
    if x.device.type != "cpu":
        # pinned, so that the copy does not block; the caching host allocator keeps the buffer
        # alive until the copy is done.
        idx = idx.to(x.device) if not k else idx.pin_memory().to(x.device, non_blocking=True)
    return idx, k, scale


def _add_scaled(x: Tensor, x_kept: Tensor, out: Tensor, idx: Tensor | None, scale: float):
    """``x`` with ``x_kept + scale * out`` at rows ``idx`` (all rows when None), rounded as
    drop_path_add rounds: scale*out and the add in the compute type, one rounding to the dtype."""
    dtype = torch.promote_types(x.dtype, out.dtype)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    if dtype == compute:  # fp32/fp64: scale*out rounds once, the add rounds once
        x, out = x.to(dtype), out.to(dtype)
        scaled = out if scale == 1.0 else out * scale
        return x + scaled if idx is None else x.index_add(0, idx, scaled)
    rows = (x_kept.to(compute) + out.to(compute) * scale).to(dtype)
    return rows if idx is None else x.to(dtype).index_copy(0, idx, rows)


def drop_path_residual(
    x: Tensor,
    branch: Branch,
    p: float,
    training: bool = True,
    *,
    mode: str = "sample",
    scale_by_keep: bool = True,
    generator: torch.Generator | None = None,
    seed_offset: tuple[int, int] | None = None,
) -> Tensor:
    """``x + drop_path(branch(x), p)``, calling ``branch`` only on the kept samples (dim 0).

    The kept samples are gathered, ``branch`` runs on them, and ``scale * branch(...)`` is added
    into a copy of ``x`` at their rows; autograd flows through all of it.

    - ``mode="sample"`` (timm's): each sample is kept with probability ``1 - p``, exactly where
      ``drop_path(..., seed_offset=pair)`` keeps it for the same pair, scaled by ``1 / (1 - p)``.
    - ``mode="subset"`` (DINOv2's): exactly ``max(int(B * (1 - p)), 1)`` samples, a uniformly
      random subset (those with the smallest contract words), scaled by ``B / k``: a static
      shape. ``p == 1`` keeps none (DINOv2's formula would keep one).
    - The pair is ``seed_offset``, else drawn from ``generator`` (or the default generator of
      ``x``'s device) on the host, advancing it as one op call does. Decisions are made on the
      CPU; on CUDA the index tensor is sent from pinned memory without blocking.
    - No sample kept (or ``p == 1``): a copy of ``x`` is returned, and ``branch`` is not called,
      unless ``torch.distributed`` is initialized (more than one rank): then ``branch`` runs on
      zero rows, so that this rank's collectives (FSDP2's all-gather in forward, DDP's and
      FSDP2's gradient reduction in backward, which then see zero gradients) match the ranks
      that kept samples. Outside training (or ``p == 0``): ``x + branch(x)``, nothing drawn.
    - Inside ``distributed.batch_sharded`` (batch along dim 0): the decisions of the global
      batch, at this rank's rows (``"subset"``: the global subset's rows that are this rank's,
      scaled by ``global batch / k``), so N ranks keep exactly one process's samples.
    - ``branch`` must be per-sample (no batch statistics such as BatchNorm's, which then see only
      the kept samples) and return ``x``'s shape.
    - torch.compile: graph-breaks at the host-side decision; ``"subset"`` keeps static shapes,
      ``"sample"`` recompiles once for a dynamic batch size. ``fullgraph=True`` raises, naming
      ``drop_path_add`` (for a bare functional call compiled first: dynamo's generic message).
      CUDA graph capture raises (use ``drop_path_add``, which captures).
    """
    _impl.check_p(p, "drop probability")
    if mode not in MODES:
        raise ValueError(f"mode has to be one of {MODES}, but got {mode!r}")
    if x.dim() == 0:
        raise RuntimeError("drop_path_residual: expected an input with a batch dimension, got 0-D")
    if not training or p == 0.0:
        return x + branch(x)
    if x.numel() == 0:
        return x + branch(x) if _collectives() else x.clone()
    decide = _decide
    if torch.compiler.is_compiling():
        # Prepared: a graph break that names the alternative. Not (a bare functional call
        # compiled first): the wrapper is made here, itself a graph break.
        decide = _decide_uncompiled or _compat.compiler_disable(_decide, _NOT_COMPILED)
    idx, k, scale = decide(x, p, mode, scale_by_keep, generator, seed_offset)
    if k == 0 and idx is None:
        return x.clone()
    x_kept = x if idx is None else x.index_select(0, idx)
    out = branch(x_kept)
    if out.shape != x_kept.shape:
        raise RuntimeError(
            f"drop_path_residual: branch returned shape {tuple(out.shape)} for an input of shape "
            f"{tuple(x_kept.shape)}; it must keep the shape"
        )
    return _add_scaled(x, x_kept, out, idx, scale)


class DropPathResidual(nn.Module):
    """``x + drop_path(branch(x))`` with ``branch`` run only on the kept samples."""

    def __init__(
        self,
        branch: nn.Module,
        drop_prob: float = 0.0,
        mode: str = "sample",
        scale_by_keep: bool = True,
    ) -> None:
        super().__init__()
        _impl.check_p(drop_prob, "drop probability")
        if mode not in MODES:
            raise ValueError(f"mode has to be one of {MODES}, but got {mode!r}")
        _prepare_compile()
        self.branch = branch
        self.drop_prob = drop_prob
        self.mode = mode
        self.scale_by_keep = scale_by_keep

    def forward(self, x: Tensor) -> Tensor:
        return drop_path_residual(
            x, self.branch, self.drop_prob, self.training, mode=self.mode,
            scale_by_keep=self.scale_by_keep,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"drop_prob={round(self.drop_prob, 3):0.3f}, mode={self.mode!r}"
