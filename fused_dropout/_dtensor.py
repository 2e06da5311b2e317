"""DTensor rules of ``dropout`` (and its backward): the mask of the logical tensor.

A DTensor input is run as its local shard with the box it holds in the logical tensor
(``global_shape``/``global_offset``, csrc/ops/checks.cpp's check_box), so
``dropout(dtensor).full_tensor() == dropout(dtensor.full_tensor())`` bit for bit, whatever the
placements and the mesh size. Placements: ``Shard(d)`` (uneven shards too) and ``Replicate``
on meshes of any number of dims, as long as the shard is a box of at most one sharded mask dim
(more raise NotImplementedError); ``Partial`` inputs are reduced first (a dropout of a
partial sum is not the sum of dropouts). Every rank must draw the same pair: the same
``seed_offset`` or the same default-generator state (``distributed.check_same_seed``).

Registered through ``torch.library.register_torch_dispatch`` (torch 2.5 and later).
Only ``dropout`` and ``dropout_backward`` so far: the other ops still raise torch's
"does not have a sharding strategy registered".
"""

from __future__ import annotations

import torch

_registered = False


def available() -> str | None:
    """None if the rules can be registered here, else why not."""
    if not hasattr(torch.library, "register_torch_dispatch"):
        return f"torch {torch.__version__} has no torch.library.register_torch_dispatch (2.5+)"
    if not torch.distributed.is_available():
        return "this torch was built without torch.distributed"
    try:
        import importlib

        importlib.import_module("torch.distributed.tensor")
    except ImportError as e:  # pragma: no cover (old torch)
        return f"torch.distributed.tensor cannot be imported: {e}"
    return None


def _arguments(func, args, kwargs) -> list:
    """Every argument of ``func``'s schema, defaults filled in."""
    values = list(args)
    for a in func._schema.arguments[len(args) :]:
        values.append(kwargs[a.name] if a.name in kwargs else a.default_value)
    return values


def register() -> bool:
    """Register the rules (once); False if torch lacks the API (see ``available``)."""
    global _registered
    if _registered:
        return True
    if available() is not None:
        return False
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    def local_and_box(x: DTensor, op: str, given) -> tuple[torch.Tensor, list[int], list[int]]:
        if given is not None:
            raise ValueError(
                f"fused_dropout.{op}: a DTensor input takes its box from its placements; "
                "pass global_shape/global_offset only with a plain tensor"
            )
        if any(isinstance(p, Partial) for p in x.placements):  # reduce first
            x = x.redistribute(
                x.device_mesh,
                [Replicate() if isinstance(p, Partial) else p for p in x.placements],
            )
        for p in x.placements:
            if not isinstance(p, (Shard, Replicate)):
                raise NotImplementedError(
                    f"fused_dropout.{op}: DTensor placement {p} is not supported (Shard, "
                    "Replicate and Partial are)"
                )
        _, offset = compute_local_shape_and_global_offset(x.shape, x.device_mesh, x.placements)
        return x, list(x.shape), list(offset)

    def wrap(local: torch.Tensor, like: DTensor) -> DTensor:
        return DTensor.from_local(
            local,
            like.device_mesh,
            like.placements,
            run_check=False,
            shape=like.shape,
            stride=like.stride(),
        )

    def replicated(t: torch.Tensor, like: DTensor) -> DTensor:
        return DTensor.from_local(
            t, like.device_mesh, [Replicate()] * like.device_mesh.ndim, run_check=False
        )

    @torch.library.register_torch_dispatch("fused_dropout::dropout", DTensor)
    def _dropout(cls, func, types, args, kwargs):
        x, p, k, scale_by_keep, alpha, seed, offset, gen, shape, start = _arguments(
            func, args, kwargs
        )
        x, shape, start = local_and_box(x, "dropout", shape)
        out, pair = func(x.to_local(), p, k, scale_by_keep, alpha, seed, offset, gen, shape, start)
        return wrap(out, x), replicated(pair, x)

    @torch.library.register_torch_dispatch("fused_dropout::dropout_backward", DTensor)
    def _dropout_backward(cls, func, types, args, kwargs):
        grad, pair, p, k, scale_by_keep, alpha, shape, start = _arguments(func, args, kwargs)
        if not isinstance(grad, DTensor):
            raise NotImplementedError(
                "fused_dropout.dropout_backward: a DTensor pair with a plain gradient"
            )
        grad, shape, start = local_and_box(grad, "dropout_backward", shape)
        if isinstance(pair, DTensor):
            pair = pair.to_local()
        out = func(grad.to_local(), pair, p, k, scale_by_keep, alpha, shape, start)
        return wrap(out, grad)

    _registered = True
    return True
