"""DTensor rules of every op: the mask of the logical tensor, forward and backward.

A DTensor input is run as its local shard with the box it holds in the logical tensor
(``global_shape``/``global_offset``, csrc/ops/checks.cpp's check_box), so
``op(dtensor).full_tensor() == op(dtensor.full_tensor())`` bit for bit, whatever the placements
and the mesh size, for ``dropout``, ``dropout_`` (in place), ``dropout_add`` (so
``bias_dropout_add``, ``drop_path_add``) and their backward ``dropout_backward``, and the fused
norms ``dropout_add_norm`` and ``dropout_add_norm_backward``.

Placements:

- ``Shard(d)`` for every d (uneven shards and empty local shards too), ``Replicate``, and
  ``Partial`` inputs, which are reduced first (a dropout of a partial sum is not the sum of
  dropouts; the in-place ``dropout_`` cannot change its input's placements and raises);
- meshes of any number of dims. The kernels take one box with at most one partial mask dim
  (MaskMap + base); a shard whose box has more (``[Shard(1), Shard(2)]`` on ``(B, S, H)``) is
  run as several calls, one per slice of its outer dims, all with the ONE pair drawn for the
  call. ``[Shard(0), Shard(2)]`` on ``(B, S, H)`` is already one box (base ``o0*S*H + o2``,
  runs of ``h2`` every ``H``): one call;
- ``_StridedShard`` (FSDP2 + TP): the global positions of the local rows come from torch's
  DTensor utilities; they are split into runs of consecutive positions, one call each. If
  torch's private helper is missing, it raises NotImplementedError naming the placement.

The fused norms (``dropout_add_norm``) reduce over the last dim and have no box arguments, so
they run on the replicated tensors: every operand is all-gathered (``Replicate`` on every mesh
dim), each rank runs the whole op, and the outputs are put back in the input's placements (a
local slice, no communication). That costs one all-gather of the input and the residual (and
of the gradients in backward) and ``mesh size`` times the compute: correct, not fast.

Every DTensor operand must be a DTensor: a plain tensor beside a DTensor input raises
(naming it). ``dropout_add``'s residual is redistributed to the input's placements when they
differ; its bias may be replicated or sharded like the input's last dim (column parallel): the
local slice matching the input's last-dim box is passed.

The pair is drawn once per call, as one process draws it: every rank must draw the same one,
with the same ``seed_offset`` or the same default-generator state
(``distributed.check_same_seed``). Where a call is split in several (or a rank's shard is
empty, so its kernel would draw nothing), the rule draws the pair itself
(``draw_seed_offset``, which advances the generator as the op would); on CUDA that is a host
draw, so such calls cannot be captured in a CUDA graph.

Registered through ``torch.library.register_torch_dispatch`` (torch 2.5 and later); older torch
raises torch's "does not have a sharding strategy registered".
"""

from __future__ import annotations

import itertools

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


def _runs(index: list[int]) -> list[tuple[int, int, int]]:
    """Maximal runs of consecutive global positions: ``(local start, global start, length)``."""
    runs: list[tuple[int, int, int]] = []
    for i, g in enumerate(index):
        if runs and runs[-1][1] + runs[-1][2] == g:
            ls, gs, n = runs[-1]
            runs[-1] = (ls, gs, n + 1)
        else:
            runs.append((i, g, 1))
    return runs


def _one_box(local: list[int], k: int, shape: list[int], start: list[int]) -> bool:
    """Whether the kernels take this box in one call (at most one partial mask dim)."""
    from fused_dropout import ops

    try:
        ops.mask_box(local, k, shape, start)
    except NotImplementedError:
        return False
    return True


Piece = tuple[tuple[tuple[int, int], ...], list[int]]  # ((local start, size) per dim, start)


def _split(slices: list[tuple[int, int]], start: list[int], k: int, shape: list[int]) -> list:
    """``[(slices, start)]`` pieces of one box, each a box the kernels take in one call: the
    outermost mask dim of local size > 1 is cut into slices of one until the rest is one."""
    local = [n for _, n in slices]
    if _one_box(local, k, shape, start):
        return [(tuple(slices), list(start))]
    d = next(d for d in range(k) if local[d] > 1)
    pieces = []
    for i in range(local[d]):
        s, st = list(slices), list(start)
        s[d] = (slices[d][0] + i, 1)
        st[d] = start[d] + i
        pieces += _split(s, st, k, shape)
    return pieces


def _narrow(t: torch.Tensor, slices) -> torch.Tensor:
    for d, (s, n) in enumerate(slices):
        if s != 0 or n != t.shape[d]:
            t = t.narrow(d, s, n)
    return t


def register() -> bool:
    """Register the rules (once); False if torch lacks the API (see ``available``)."""
    global _registered
    if _registered:
        return True
    if available() is not None:
        return False
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    try:
        from torch.distributed.tensor.placement_types import _StridedShard
    except ImportError:  # pragma: no cover (old torch)
        _StridedShard = ()

    def reduced(x: DTensor) -> DTensor:
        """``x`` with its Partial placements reduced (Replicate on those mesh dims)."""
        if any(isinstance(p, Partial) for p in x.placements):
            x = x.redistribute(
                x.device_mesh,
                [Replicate() if isinstance(p, Partial) else p for p in x.placements],
            )
        for p in x.placements:
            if not isinstance(p, (Shard, Replicate)) and not (
                _StridedShard and isinstance(p, _StridedShard)
            ):
                raise NotImplementedError(
                    f"DTensor placement {p} is not supported by fused_dropout (Shard, "
                    "Replicate, Partial and _StridedShard are)"
                )
        return x

    def global_index(x: DTensor, op: str) -> list[list[int] | None]:
        """Per dim, the global positions of the local shard's entries (None: the whole dim)."""
        shape, mesh, placements = list(x.shape), x.device_mesh, x.placements
        strided = [p for p in placements if _StridedShard and isinstance(p, _StridedShard)]
        if not strided:
            local, offset = compute_local_shape_and_global_offset(shape, mesh, placements)
            return [
                None if n == g else list(range(o, o + n)) for n, g, o in zip(local, shape, offset)
            ]
        try:
            from torch.distributed.tensor._utils import _get_shard_size_and_offsets
        except ImportError as e:  # pragma: no cover (torch without the helper)
            raise NotImplementedError(
                f"fused_dropout.{op}: DTensor placement {strided[0]} (_StridedShard): this "
                "torch has no torch.distributed.tensor._utils._get_shard_size_and_offsets to "
                "find the shard's global positions"
            ) from e
        coordinate = mesh.get_coordinate()
        size, index = list(shape), {}
        for mesh_dim, p in enumerate(placements):
            if not isinstance(p, Shard) and not isinstance(p, _StridedShard):
                continue
            n, idx = _get_shard_size_and_offsets(
                size[p.dim],
                mesh.size(mesh_dim),
                coordinate[mesh_dim],
                p,
                index.get(p.dim),
                shape[p.dim],
                False,
            )
            size[p.dim], index[p.dim] = n, idx
        return [
            None if d not in index else [int(i) for i in index[d][: size[d]]]
            for d in range(len(shape))
        ]

    def pieces(x: DTensor, local: torch.Tensor, k: int, op: str) -> list[Piece]:
        """The calls the local shard of ``x`` runs as (mask over its leading ``k`` dims)."""
        shape = list(x.shape)
        if local.numel() == 0:
            return []
        per_dim = []
        for d, index in enumerate(global_index(x, op)):
            n = local.shape[d]
            if index is None:
                per_dim.append([(0, 0, n)])
            elif d >= k:  # not a mask dim: where it lies does not matter (any valid start)
                runs = _runs(index)
                per_dim.append([(0, runs[0][1] if len(runs) == 1 else 0, n)])
            else:
                per_dim.append(_runs(index))
        out = []
        for box in itertools.product(*per_dim):
            slices = [(ls, n) for ls, _, n in box]
            out += _split(slices, [gs for _, gs, _ in box], k, shape)
        return out

    def mask_dims(mask_ndim: int, ndim: int) -> int:
        return ndim if mask_ndim == -1 else mask_ndim

    def wrap(local: torch.Tensor, like: DTensor) -> DTensor:
        return DTensor.from_local(
            local,
            like.device_mesh,
            like.placements,
            run_check=False,
            shape=like.shape,
            stride=like.stride(),
        )

    def replicated(t: torch.Tensor, mesh) -> DTensor:
        return DTensor.from_local(t, mesh, [Replicate()] * mesh.ndim, run_check=False)

    def dtensor_input(x, op: str, name: str = "input") -> DTensor:
        if not isinstance(x, DTensor):
            raise TypeError(
                f"fused_dropout.{op}: {name} is a plain tensor but another operand is a "
                f"DTensor; pass {name} as a DTensor too (e.g. DTensor.from_local or "
                "distribute_tensor)"
            )
        return x

    def no_box(given, op: str) -> None:
        if given is not None:
            raise ValueError(
                f"fused_dropout.{op}: a DTensor input takes its box from its placements; "
                "pass global_shape/global_offset only with a plain tensor"
            )

    def seed_pair(x: DTensor, p: float, seed, offset, gen) -> tuple[int | None, int | None]:
        """The call's pair, drawn here if the op would draw one (p > 0, a non-empty tensor)."""
        if seed is not None or p == 0.0 or x.numel() == 0:
            return seed, offset
        s, o = torch.ops.fused_dropout.draw_seed_offset(x.to_local().device, gen)
        return s, o

    def pair_tensor(seed, offset, device) -> torch.Tensor:
        values = [0, 0] if seed is None else [seed, offset]
        return torch.tensor(values, dtype=torch.int64, device=device)

    def single(ps: list[Piece], local: torch.Tensor) -> bool:
        """One call covering the whole (non-empty) local shard."""
        return len(ps) == 1 and all(
            s == 0 and n == local.shape[d] for d, (s, n) in enumerate(ps[0][0])
        )

    # ------------------------------------------------------------ dropout, dropout_, backward

    @torch.library.register_torch_dispatch("fused_dropout::dropout", DTensor)
    def _dropout(cls, func, types, args, kwargs):
        x, p, mask_ndim, scale_by_keep, alpha, seed, offset, gen, shape, _ = _arguments(
            func, args, kwargs
        )
        no_box(shape, "dropout")
        x = reduced(dtensor_input(x, "dropout"))
        local = x.to_local()
        ps = pieces(x, local, mask_dims(mask_ndim, x.dim()), "dropout")
        gshape = list(x.shape)
        if single(ps, local):
            out, pair = func(
                local, p, mask_ndim, scale_by_keep, alpha, seed, offset, gen, gshape, ps[0][1]
            )
            return wrap(out, x), replicated(pair, x.device_mesh)
        seed, offset = seed_pair(x, p, seed, offset, gen)
        rest = (p, mask_ndim, scale_by_keep, alpha, seed, offset, gen, gshape)
        out = torch.empty_like(local)
        for slices, start in ps:
            y, _ = func(_narrow(local, slices), *rest, start)
            _narrow(out, slices).copy_(y)
        return wrap(out, x), replicated(pair_tensor(seed, offset, local.device), x.device_mesh)

    @torch.library.register_torch_dispatch("fused_dropout::dropout_", DTensor)
    def _dropout_inplace(cls, func, types, args, kwargs):
        x, p, mask_ndim, scale_by_keep, alpha, seed, offset, gen, shape, _ = _arguments(
            func, args, kwargs
        )
        no_box(shape, "dropout_")
        x = dtensor_input(x, "dropout_")
        if any(isinstance(pl, Partial) for pl in x.placements):
            raise NotImplementedError(
                "fused_dropout.dropout_: an in-place dropout of a Partial DTensor cannot change "
                "its placements (dropout of a partial sum is not the sum of dropouts); use "
                "inplace=False, or redistribute it first"
            )
        reduced(x)  # checks the placements
        local = x.to_local()
        ps = pieces(x, local, mask_dims(mask_ndim, x.dim()), "dropout_")
        gshape = list(x.shape)
        if single(ps, local):
            pair = func(
                local, p, mask_ndim, scale_by_keep, alpha, seed, offset, gen, gshape, ps[0][1]
            )
            return replicated(pair, x.device_mesh)
        seed, offset = seed_pair(x, p, seed, offset, gen)
        rest = (p, mask_ndim, scale_by_keep, alpha, seed, offset, gen, gshape)
        for slices, start in ps:
            func(_narrow(local, slices), *rest, start)
        return replicated(pair_tensor(seed, offset, local.device), x.device_mesh)

    @torch.library.register_torch_dispatch("fused_dropout::dropout_backward", DTensor)
    def _dropout_backward(cls, func, types, args, kwargs):
        grad, pair, p, mask_ndim, scale_by_keep, alpha, shape, _ = _arguments(func, args, kwargs)
        no_box(shape, "dropout_backward")
        if not isinstance(grad, DTensor):
            raise NotImplementedError(
                "fused_dropout.dropout_backward: a DTensor pair with a plain gradient"
            )
        grad = reduced(grad)
        if isinstance(pair, DTensor):
            pair = pair.to_local()
        local = grad.to_local()
        ps = pieces(grad, local, mask_dims(mask_ndim, grad.dim()), "dropout_backward")
        gshape = list(grad.shape)
        if single(ps, local):
            return wrap(
                func(local, pair, p, mask_ndim, scale_by_keep, alpha, gshape, ps[0][1]), grad
            )
        out = torch.empty_like(local)
        for slices, start in ps:
            y = func(
                _narrow(local, slices), pair, p, mask_ndim, scale_by_keep, alpha, gshape, start
            )
            _narrow(out, slices).copy_(y)
        return wrap(out, grad)

    # ------------------------------------------------------------ dropout_add

    def bias_slice(bias, x: DTensor, op: str) -> torch.Tensor | None:
        """The entries of ``bias`` (over the last dim) that the local shard of ``x`` needs."""
        if bias is None:
            return None
        bias = reduced(dtensor_input(bias, op, "bias"))
        n = x.shape[-1]
        index = global_index(x, op)[-1]
        want = list(range(n)) if index is None else index
        have = global_index(bias, op)[0] if bias.dim() == 1 else None
        have = list(range(bias.shape[0])) if have is None else have
        if have == want:
            return bias.to_local()
        full = bias.full_tensor()
        if index is None:
            return full
        return full[torch.tensor(want, dtype=torch.long, device=full.device)]

    @torch.library.register_torch_dispatch("fused_dropout::dropout_add", DTensor)
    def _dropout_add(cls, func, types, args, kwargs):
        values = _arguments(func, args, kwargs)
        x, residual, bias, p, mask_ndim, scale_by_keep, seed, offset, gen, shape, _ = values
        no_box(shape, "dropout_add")
        x = reduced(dtensor_input(x, "dropout_add"))
        residual = dtensor_input(residual, "dropout_add", "residual")
        if residual.placements != x.placements or residual.device_mesh != x.device_mesh:
            residual = residual.redistribute(x.device_mesh, x.placements)
        b = bias_slice(bias, x, "dropout_add")
        local, r = x.to_local(), residual.to_local()
        ps = pieces(x, local, mask_dims(mask_ndim, x.dim()), "dropout_add")
        gshape = list(x.shape)
        if single(ps, local):
            out, pair = func(
                local, r, b, p, mask_ndim, scale_by_keep, seed, offset, gen, gshape, ps[0][1]
            )
            return wrap(out, x), replicated(pair, x.device_mesh)
        seed, offset = seed_pair(x, p, seed, offset, gen)
        out = torch.empty_like(local)
        for slices, start in ps:
            piece_bias = None if b is None else b.narrow(0, *slices[-1])
            y, _ = func(
                _narrow(local, slices),
                _narrow(r, slices),
                piece_bias,
                p,
                mask_ndim,
                scale_by_keep,
                seed,
                offset,
                gen,
                gshape,
                start,
            )
            _narrow(out, slices).copy_(y)
        return wrap(out, x), replicated(pair_tensor(seed, offset, local.device), x.device_mesh)

    # ------------------------------------------------------------ the fused norms

    def gathered(t, op: str, name: str) -> torch.Tensor | None:
        """The whole tensor (``t`` replicated on every mesh dim), or None."""
        if t is None:
            return None
        t = dtensor_input(t, op, name)
        mesh = t.device_mesh
        return t.redistribute(mesh, [Replicate()] * mesh.ndim).to_local()

    def scattered(full: torch.Tensor, like: DTensor) -> DTensor:
        """``full`` (every rank holds all of it) in ``like``'s placements (a local slice)."""
        mesh = like.device_mesh
        placements = [Replicate() if isinstance(p, Partial) else p for p in like.placements]
        out = replicated(full, mesh)
        if full.shape != like.shape:  # an empty placeholder (h or a gradient not asked for)
            return out
        return out.redistribute(mesh, placements)

    @torch.library.register_torch_dispatch("fused_dropout::dropout_add_norm", DTensor)
    def _dropout_add_norm(cls, func, types, args, kwargs):
        values = _arguments(func, args, kwargs)
        x = dtensor_input(values[0], "dropout_add_norm")
        names = ("input", "residual", "weight", "bias", "input_bias")
        full = [gathered(t, "dropout_add_norm", n) for t, n in zip(values[:5], names)]
        y, h, mean, rstd, pair = func(*full, *values[5:])
        mesh = x.device_mesh
        return (
            scattered(y, x),
            scattered(h, x),
            replicated(mean, mesh),
            replicated(rstd, mesh),
            replicated(pair, mesh),
        )

    @torch.library.register_torch_dispatch("fused_dropout::dropout_add_norm_backward", DTensor)
    def _dropout_add_norm_backward(cls, func, types, args, kwargs):
        values = _arguments(func, args, kwargs)
        op = "dropout_add_norm_backward"
        grad_y = dtensor_input(values[0], op, "grad_y")
        names = {0: "grad_y", 1: "grad_h", 2: "saved", 4: "weight", 5: "bias"}
        names.update({6: "mean", 7: "rstd", 8: "seed_offset"})
        full = list(values)
        for i, name in names.items():
            full[i] = gathered(values[i], op, name)
        grad_input, grad_h, grad_weight, grad_bias, grad_input_bias = func(*full)
        mesh = grad_y.device_mesh
        return (
            scattered(grad_input, grad_y),
            scattered(grad_h, grad_y),
            replicated(grad_weight, mesh),
            replicated(grad_bias, mesh),
            replicated(grad_input_bias, mesh),
        )

    _registered = True
    return True
