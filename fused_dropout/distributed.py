"""Data-parallel training whose masks are one process's: :func:`batch_sharded`.

A mask is a pure function of ``(seed, offset, p, mask index)`` (DESIGN.md s.2). Inside
``batch_sharded(group, dim)``, rank ``r`` of ``world`` ranks holds rows ``[r*b, (r+1)*b)`` of a
global batch of ``world*b`` along ``dim``, and every op of this library called there draws the
mask of that global batch at those rows (the ops' ``global_shape``/``global_offset``). So DDP on
N ranks seeded alike draws exactly the masks of one process running the global batch:
element-wise, per-sample (``drop_path``, ``stochastic_depth`` "row") and per-channel masks, and
``stochastic_depth`` "batch"'s single decision, the same on every rank. Backward regenerates
the same masks (the box is saved with the pair), whether or not it runs inside the block.

The pair: every rank must draw the same ``(seed, offset)``. The default generator advances
identically on every rank as long as every rank seeds it alike (``torch.manual_seed(s)`` with
one ``s``) and runs the same ops; :func:`check_same_seed` checks it (one all_gather).

DTensor: every op takes DTensor inputs (any placements, meshes of any number of dims; tensor
and sequence parallel through ``parallelize_module``), see :func:`enable_dtensor` and
fused_dropout/_dtensor.py.

FSDP2 (``fully_shard``) works as DDP does: the box depends only on the activations' rows
(tested on 2 and 4 gloo ranks against one process, with and without non-reentrant activation
checkpointing whose backward runs inside the block).

``convert(model, skip_dropped=True)`` (``skip.drop_path_residual``) under DDP and FSDP2: a rank
that keeps no sample of a block still runs the branch, on zero rows, so its all-gathers and
gradient reductions match the other ranks' (zero gradients for that branch's parameters);
inside ``batch_sharded`` its decisions are the global batch's, at this rank's rows.

Activation checkpointing whose recomputation runs outside the block (reentrant checkpointing,
or backward outside the ``with``): ``batch_sharded(...).attach(model)`` keeps the block active
while any of the model's modules runs, recomputation included.

Not covered (yet): the fused norms under ``batch_sharded`` (``dropout_add_norm`` takes no box),
and TorchScript-compiled modules (they run the ops without the box).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib

import torch
from torch import nn

__all__ = [
    "batch_sharded",
    "check_same_seed",
    "current_box",
    "detach",
    "enable_dtensor",
    "generator_state_hash",
]


def enable_dtensor() -> bool:
    """Register the ops' DTensor rules (see fused_dropout/_dtensor.py): a DTensor input
    gets the mask of its logical tensor, whatever its placements. ``import fused_dropout``
    does it by itself when ``torch.distributed.tensor`` is already imported (importing it
    costs about 0.7 s, so it is not imported for everyone). Returns False where torch lacks
    ``torch.library.register_torch_dispatch`` (before 2.5)."""
    from fused_dropout import _dtensor

    return _dtensor.register()


@dataclasses.dataclass(frozen=True)
class _Shard:
    world: int
    rank: int
    dim: int
    batch_size: int | None


# The active blocks, innermost last. Process-wide (not per thread): a training step runs its
# forward and backward on one thread, and autograd's worker threads must see it too.
_ACTIVE: list[_Shard] = []
# id(model) -> the forward hooks of its batch_sharded.attach
_ATTACHED: dict[int, list] = {}


def current_box(input: torch.Tensor) -> tuple[list[int] | None, list[int] | None]:
    """``(global_shape, global_offset)`` of ``input`` under the innermost active
    :func:`batch_sharded` block, or ``(None, None)`` outside one."""
    if not _ACTIVE:
        return None, None
    shard = _ACTIVE[-1]
    dim = shard.dim if shard.dim >= 0 else shard.dim + input.dim()
    if not 0 <= dim < input.dim():
        raise RuntimeError(
            f"fused_dropout.distributed.batch_sharded(dim={shard.dim}): an input of shape "
            f"{list(input.shape)} has no dim {shard.dim} to shard the batch along"
        )
    b = int(input.shape[dim])
    if shard.batch_size is not None and b != shard.batch_size:
        raise RuntimeError(
            f"fused_dropout.distributed.batch_sharded: an input of shape {list(input.shape)} "
            f"has {b} rows along dim {dim}, but batch_size={shard.batch_size} was given; every "
            "rank must hold the same local batch"
        )
    shape = list(input.shape)
    offset = [0] * input.dim()
    shape[dim] = shard.world * b
    offset[dim] = shard.rank * b
    return shape, offset


def generator_state_hash(device: torch.device | str | None = None) -> int:
    """A 63-bit hash of the default generator's state on the CPU and, where CUDA is
    initialized, on the current CUDA device (or ``device``)."""
    h = hashlib.sha256(torch.get_rng_state().numpy().tobytes())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        h.update(torch.cuda.get_rng_state(device or "cuda").numpy().tobytes())
    return int.from_bytes(h.digest()[:8], "little") >> 1


def _gather(values: list[int], group) -> list[list[int]]:
    import torch.distributed as dist

    device = "cpu"
    if dist.get_backend(group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    return [t.tolist() for t in every]


def _check(group, batch_size: int | None, seed: bool = True) -> None:
    gathered = _gather(
        [generator_state_hash() if seed else 0, -1 if batch_size is None else batch_size], group
    )
    hashes = {h for h, _ in gathered}
    if len(hashes) != 1:
        raise RuntimeError(
            "fused_dropout.distributed: the ranks' default generators differ (state hashes "
            f"{[h for h, _ in gathered]}), so they would draw different masks; seed every rank "
            "alike (torch.manual_seed(s) with the same s) and run the same ops on each"
        )
    sizes = [b for _, b in gathered]
    if len(set(sizes)) != 1:
        raise RuntimeError(
            "fused_dropout.distributed.batch_sharded: the ranks hold different local batches "
            f"(batch_size per rank: {sizes}); every rank must hold the same number of rows "
            "(DistributedSampler pads the last batch, or drop_last=True drops it)"
        )


def check_same_seed(group=None) -> None:
    """Raise unless every rank of ``group`` has the same default-generator state (CPU, and the
    current CUDA device where CUDA is initialized). Costs one all_gather of two int64 per rank
    (and hashing the generator states: about 5 KB for the CPU's, 16 bytes for CUDA's)."""
    _check(group, None)


class batch_sharded(contextlib.ContextDecorator):  # noqa: N801 (a function-like name)
    """Context manager and decorator: masks of the global batch on a data-parallel rank.

    ``group``: the data-parallel process group (default: the whole world). ``dim``: the batch
    dim of the activations (0; 1 for sequence-first layouts). ``batch_size``: the local batch,
    if known: then every rank's is checked to be equal on entry, and every op's input to have
    it. Without it, equal local batches are assumed (DistributedSampler pads or drops the last
    one). ``check_seed``: on entry, check that every rank's default generator is in the same
    state (:func:`check_same_seed`; one all_gather, shared with the batch check). Entry is a
    collective when a check runs: every rank must enter together.
    """

    def __init__(
        self,
        group=None,
        dim: int = 0,
        *,
        batch_size: int | None = None,
        check_seed: bool = True,
    ):
        self.group, self.dim, self.batch_size, self.check_seed = group, dim, batch_size, check_seed

    def _checked_shard(self) -> _Shard:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "fused_dropout.distributed.batch_sharded needs torch.distributed to be "
                "initialized (torch.distributed.init_process_group)"
            )
        if self.batch_size is not None and self.batch_size < 0:
            raise ValueError(f"batch_size must be non-negative, got {self.batch_size}")
        if self.check_seed or self.batch_size is not None:
            _check(self.group, self.batch_size, self.check_seed)
        return _Shard(
            dist.get_world_size(self.group), dist.get_rank(self.group), self.dim, self.batch_size
        )

    def __enter__(self) -> batch_sharded:
        self._shard = self._checked_shard()
        _ACTIVE.append(self._shard)
        return self

    def __exit__(self, *exc) -> bool:
        _ACTIVE.remove(self._shard)
        return False

    def attach(self, model: nn.Module) -> nn.Module:
        """Keep this block active while ``model`` or any of its current submodules runs its
        forward, so that activation checkpointing's recomputation, which reruns a submodule in
        backward outside any ``with``, draws the global masks too. The checks run once, now
        (a collective: every rank attaches together). Undo with :func:`detach`."""
        if isinstance(model, torch.jit.ScriptModule):
            raise TypeError(
                "fused_dropout.distributed.batch_sharded.attach: TorchScript modules run no "
                "Python hooks"
            )
        detach(model)
        shard = self._checked_shard()

        def enter(module, args):
            _ACTIVE.append(shard)

        def leave(module, args, output):
            _ACTIVE.remove(shard)

        handles = []
        for module in model.modules():
            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(leave, always_call=True))
        _ATTACHED[id(model)] = handles
        return model


def detach(model: nn.Module) -> nn.Module:
    """Undo :meth:`batch_sharded.attach` for ``model`` (nothing if it is not attached)."""
    for handle in _ATTACHED.pop(id(model), []):
        handle.remove()
    return model
