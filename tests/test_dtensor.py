"""DTensor inputs of every op: ``op(dtensor).full_tensor()`` is one process's ``op(full)``.

One spawn per world size (2 and 4 ranks; gloo on the CPU, a ``file://`` rendezvous in a tmp dir,
loopback only, under a timeout so that a hang fails fast) runs the whole matrix and returns
what each rank saw; the tests compare it with ONE process running the full tensors:

- every public functional (and a few modules) x placements: ``Shard(d)`` for each d, uneven
  shards (5 rows, 7 columns; on 4 ranks some shards are empty), ``Replicate``, ``Partial``
  (reduced first), and on 4 ranks 2-D meshes (``[Shard(0), Shard(2)]``, ``[Shard(1),
  Shard(2)]`` which the rules split into several calls, ``[Shard(0), Replicate()]``,
  ``[Shard(2), Shard(0)]``, ``[Shard(1), Shard(1)]``, ``[Replicate(), Partial()]``, FSDP+TP's
  ``_StridedShard``): outputs and input gradients bit for bit, with the same default-generator
  state, the same ``generator=`` state, or the same ``seed_offset``;
- the local shards' masks against tests/reference.py at their global positions;
- the errors (a plain residual, an in-place dropout of a Partial DTensor).

Not bitwise, by design (stated where checked): ``bias_dropout_add``'s bias gradient is a sum
over the rows, which a row-sharded input sums per rank and then all-reduces (another order).
"""

from __future__ import annotations

import dataclasses
import os
import time
import zlib
from pathlib import Path
from typing import Callable

import pytest
import torch

import fused_dropout as fd
from fused_dropout import functional as F

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)

TIMEOUT_S = 120
SEED = 4321
SHAPE = (5, 7, 6)  # uneven on 2 and 4 ranks along every dim
IMG = (5, 4, 3, 3)
SEED_OFFSET = (0x1234_5678_9ABC_DEF0, 8)


def _available() -> str | None:
    from fused_dropout import _dtensor

    return _dtensor.available()


# ---------------------------------------------------------------- the matrix


def _global(shape, seed) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@dataclasses.dataclass
class Case:
    name: str
    mesh: tuple[int, ...]
    placements: tuple  # of the first input (and of every input spec'd "like")
    inputs: list  # [(name, global tensor, spec)]: spec "like", "rep" or a placements tuple
    call: Callable
    summed: tuple = ()  # gradients that are sums over sharded rows: compared within a bound
    error: str | None = None  # the exception text expected instead of a result
    ref: tuple | None = None  # (p, seed, offset): check the mask against tests/reference.py


def _ops() -> list[tuple[str, list, Callable, tuple]]:
    """(name, inputs, call, summed): every public functional, element-wise, per-sample and
    per-channel masks, the fused adds and the fused norms, and modules."""
    from torch.distributed.tensor import Replicate

    x, r = _global(SHAPE, 1), _global(SHAPE, 2)
    bias, w, b = _global(SHAPE[-1:], 3), _global(SHAPE[-1:], 4), _global(SHAPE[-1:], 5)
    img = _global(IMG, 6)
    X, R = ("x", x, "like"), ("r", r, "like")
    gen = torch.Generator()

    def with_gen(t):
        gen.manual_seed(99)
        return F.dropout(t, 0.3, generator=gen)

    def layer_norm(t, r, w, b):
        return F.dropout_add_layer_norm(t, r, w, b, 0.3)

    def layer_norm_prenorm(t, r, w, b):
        return F.dropout_add_layer_norm(t, r, w, b, 0.3, prenorm=True, per_sample=True)

    def rms_norm(t, r, w):
        return F.dropout_add_rms_norm(t, r, w, 0.3, memory_efficient=True)

    def two_calls(t):
        """A second call after the first, on the whole tensor: a rank whose shard of the
        first is empty must still have drawn its pair (else its generator falls behind)."""
        whole = t
        if hasattr(t, "device_mesh"):
            whole = t.redistribute(t.device_mesh, [Replicate()] * t.device_mesh.ndim)
        return F.dropout(t, 0.4), F.dropout(whole, 0.3)

    W, B = ("w", w, "rep"), ("b", b, "rep")
    RR, BIAS = ("r", r, "rep"), ("bias", bias, "rep")

    def bias_dropout_add(t, b, r):
        return F.bias_dropout_add(t, b, r, 0.3)

    module_ln = fd.DropoutAddLayerNorm(SHAPE[-1], p=0.3).double()
    return [
        ("dropout", [X], lambda t: F.dropout(t, 0.4), ()),
        ("two_calls", [X], two_calls, ()),
        ("dropout_inplace", [X], lambda t: F.dropout(t * 1, 0.4, inplace=True), ()),
        ("dropout_seed_offset", [X], lambda t: F.dropout(t, 0.4, seed_offset=SEED_OFFSET), ()),
        ("dropout_generator", [X], with_gen, ()),
        ("alpha_dropout", [X], lambda t: F.alpha_dropout(t, 0.2, True), ()),
        ("feature_alpha_dropout", [X], lambda t: F.feature_alpha_dropout(t, 0.2, True), ()),
        ("dropout1d", [X], lambda t: F.dropout1d(t, 0.5), ()),
        ("dropout2d", [("img", img, "like")], lambda t: F.dropout2d(t, 0.5), ()),
        ("drop_path", [X], lambda t: F.drop_path(t, 0.5, True), ()),
        ("stochastic_depth_row", [X], lambda t: F.stochastic_depth(t, 0.5, "row"), ()),
        ("stochastic_depth_batch", [X], lambda t: F.stochastic_depth(t, 0.5, "batch"), ()),
        ("dropout_add", [X, R], lambda t, r: F.dropout_add(t, r, 0.3), ()),
        ("dropout_add_rep_residual", [X, RR], lambda t, r: F.dropout_add(t, r, 0.3), ()),
        ("bias_dropout_add", [X, BIAS, R], bias_dropout_add, ("bias",)),
        ("drop_path_add", [R, X], lambda r, t: F.drop_path_add(r, t, 0.5), ()),
        ("dropout_add_layer_norm", [X, R, W, B], layer_norm, ()),
        ("dropout_add_layer_norm_prenorm", [X, R, W, B], layer_norm_prenorm, ()),
        ("dropout_add_rms_norm", [X, R, W], rms_norm, ()),
        ("module_Dropout", [X], fd.Dropout(0.3), ()),
        ("module_BiasDropoutAdd", [X, BIAS, R], fd.BiasDropoutAdd(0.3), ("bias",)),
        ("module_DropoutAddLayerNorm", [X, R], module_ln, ()),
    ]  # fmt: skip


def _cases(world: int) -> list[Case]:
    from torch.distributed.tensor import Partial, Replicate, Shard

    one_d = [(Shard(0),), (Shard(1),), (Shard(2),), (Replicate(),), (Partial(),)]
    two_d = []
    if world == 4:
        two_d = [
            (Shard(0), Shard(2)),
            (Shard(1), Shard(2)),
            (Shard(0), Replicate()),
            (Shard(2), Shard(0)),
            (Shard(1), Shard(1)),
            # Partial beside Replicate: torch 2.14's own redistribute of a Partial beside an
            # UNEVEN Shard on a 2-D gloo mesh mismatches its collectives (sizes 504 vs 336
            # bytes) with no op of ours involved (`(x.redistribute(...) * 1).full_tensor()`).
            (Replicate(), Partial()),
        ]
    cases = []
    for name, inputs, call, summed in _ops():
        for placements in one_d + two_d:
            mesh = (world,) if len(placements) == 1 else (2, world // 2)
            if name == "dropout_inplace" and any(isinstance(p, Partial) for p in placements):
                continue  # an error case, below
            cases.append(Case(f"{name}-{placements}", mesh, placements, inputs, call, summed))
    x, r, bias = _global(SHAPE, 1), _global(SHAPE, 2), _global(SHAPE[-1:], 3)
    # column parallel: the bias sharded like the input's last dim
    for placements, bias_pl in (((Shard(2),), (Shard(0),)), ((Shard(0),), (Shard(0),))):
        cases.append(
            Case(
                f"bias_dropout_add-colwise-{placements}-bias{bias_pl}",
                (world,),
                placements,
                [("x", x, "like"), ("bias", bias, bias_pl), ("r", r, "like")],
                lambda t, b, r: F.bias_dropout_add(t, b, r, 0.3),
                ("bias",),
            )
        )
    # the mask itself against tests/reference.py, at the local shards' global positions
    ref_placements = [(Shard(1),), (Shard(2),)]
    if world == 4:
        ref_placements.append((Shard(1), Shard(2)))
    for placements in ref_placements:
        mesh = (world,) if len(placements) == 1 else (2, world // 2)
        cases.append(
            Case(
                f"reference-{placements}",
                mesh,
                placements,
                [("x", x, "like")],
                lambda t: F.dropout(t, 0.4, seed_offset=SEED_OFFSET),
                ref=(0.4, *SEED_OFFSET),
            )
        )
    # errors
    cases.append(
        Case(
            "error-plain-residual",
            (world,),
            (Shard(0),),
            [("x", x, "like"), ("r", r, "plain")],
            lambda t, r: F.dropout_add(t, r, 0.3),
            error="residual is a plain tensor",
        )
    )
    cases.append(
        Case(
            "error-inplace-partial",
            (world,),
            (Partial(),),
            [("x", x, "like")],
            lambda t: F.dropout(t * 1, 0.4, inplace=True),
            error="in-place dropout of a Partial DTensor",
        )
    )
    return cases


def _strided_cases(world: int) -> list[Case]:
    """FSDP+TP's layout: TP shards dim 0 on mesh dim 1, FSDP shards it again on mesh dim 0
    (``_StridedShard``), as ``fully_shard`` over a TP-parallelized module makes it."""
    if world != 4:
        return []
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    x, r = _global((8, 7, 6), 11), _global((8, 7, 6), 12)
    placements = (_StridedShard(0, split_factor=2), Shard(0))
    return [
        Case(
            f"{name}-strided",
            (2, 2),
            placements,
            inputs,
            call,
        )
        for name, inputs, call in (
            ("dropout", [("x", x, "like")], lambda t: F.dropout(t, 0.4)),
            ("dropout2d_strided", [("x", x, "like")], lambda t: F.dropout1d(t, 0.5)),
            (
                "dropout_add",
                [("x", x, "like"), ("r", r, "like")],
                lambda t, r: F.dropout_add(t, r, 0.3),
            ),
        )
    ]


# ---------------------------------------------------------------- what each rank runs


def _dtensor(x: torch.Tensor, mesh, placements) -> torch.Tensor:
    """``x`` as a DTensor; a Partial mesh dim holds ``x`` on its coordinate 0 and zeros
    elsewhere (so the sum is ``x`` exactly)."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, distribute_tensor

    if not any(isinstance(p, Partial) for p in placements):
        return distribute_tensor(x, mesh, list(placements))
    plain = [Replicate() if isinstance(p, Partial) else p for p in placements]
    local = distribute_tensor(x, mesh, plain).to_local().clone()
    coordinate = mesh.get_coordinate()
    for d, p in enumerate(placements):
        if isinstance(p, Partial) and coordinate[d] != 0:
            local.zero_()
    return DTensor.from_local(local, mesh, list(placements), run_check=False)


def _seed(case: Case) -> int:
    """Each case its own default-generator seed, the same on the ranks and in the parent."""
    return SEED + zlib.crc32(case.name.encode())


def _upstream(shape, dtype) -> torch.Tensor:
    return torch.arange(torch.Size(shape).numel(), dtype=dtype).view(shape).cos()


def _outputs(y) -> list:
    return list(y) if isinstance(y, (tuple, list)) else [y]


def _run_case(case: Case, meshes: dict) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    if case.mesh not in meshes:
        names = ("a", "b")[: len(case.mesh)]
        meshes[case.mesh] = init_device_mesh("cpu", case.mesh, mesh_dim_names=names)
    mesh = meshes[case.mesh]
    tensors = []
    for _, x, spec in case.inputs:
        if spec == "plain":
            tensors.append(x.clone())
            continue
        placements = {"like": case.placements, "rep": (Replicate(),) * mesh.ndim}.get(spec, spec)
        tensors.append(_dtensor(x, mesh, placements).detach().requires_grad_())
    call = case.call
    if isinstance(call, torch.nn.Module):  # its parameters replicated on the mesh
        import copy

        from torch.distributed.tensor import distribute_module

        call = distribute_module(copy.deepcopy(call), mesh)
    torch.manual_seed(_seed(case))
    try:
        ys = _outputs(call(*tensors))
    except Exception as e:  # noqa: BLE001 (the parent checks the text)
        return {"error": f"{type(e).__name__}: {e}"}
    result = {"out": [y.full_tensor().detach() for y in ys]}
    if case.ref is not None:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        y = ys[0]
        _, offset = compute_local_shape_and_global_offset(y.shape, mesh, y.placements)
        result["local"] = (y.to_local().detach(), tensors[0].to_local().detach(), list(offset))
    ups = [distribute_tensor(_upstream(y.shape, y.dtype), mesh, y.placements) for y in ys]
    try:
        torch.autograd.backward(ys, ups)
    except Exception as e:  # noqa: BLE001 (reported by the parent)
        return {"error": f"backward: {type(e).__name__}: {e}"}
    result["grads"] = {
        name: None if t.grad is None else t.grad.full_tensor()
        for (name, _, spec), t in zip(case.inputs, tensors)
        if spec != "plain"
    }
    return result


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    try:
        from fused_dropout import distributed

        start = time.perf_counter()
        results: dict = {}
        if distributed.enable_dtensor():
            meshes: dict = {}
            cases = _cases(world) + _strided_cases(world)
            results["cases"] = {c.name: _run_case(c, meshes) for c in cases}
            results.update(_tp_scenarios(rank, world))
        results["seconds"] = time.perf_counter() - start
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


# ---------------------------------------------------------------- the TP/SP block


class TPBlock(torch.nn.Module):
    """A pre-norm transformer block with our modules: ``Dropout`` on the attention
    probabilities, ``BiasDropoutAdd`` after the attention projection (Megatron's), ``Dropout``
    inside the MLP and ``DropoutAdd`` after it. Written for tensor parallelism: separate q, k,
    v projections (column parallel: heads sharded), the projections back row parallel."""

    def __init__(self, d: int = 16, heads: int = 4):
        super().__init__()
        nn = torch.nn
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.proj = nn.Linear(d, d, bias=False)
        self.proj_bias = nn.Parameter(torch.randn(d) * 0.1)
        self.attn_drop = fd.Dropout(0.2)
        self.bda = fd.BiasDropoutAdd(0.3)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.mlp_drop = fd.Dropout(0.1)
        self.drop_add = fd.DropoutAdd(0.25)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, s, d = x.shape
        h = self.norm1(x)
        q, k, v = (f(h).view(n, s, self.heads, -1) for f in (self.q, self.k, self.v))
        att = (torch.einsum("nshd,nthd->nhst", q, k) * (d // self.heads) ** -0.5).softmax(-1)
        att = self.attn_drop(att)
        o = torch.einsum("nhst,nthd->nshd", att, v).reshape(n, s, d)
        x = self.bda(self.proj(o), self.proj_bias, x)
        branch = self.fc2(self.mlp_drop(torch.nn.functional.gelu(self.fc1(self.norm2(x)))))
        return self.drop_add(branch, x)


TP_DROPOUTS = ("attn_drop", "bda", "mlp_drop", "drop_add")
TP_SHAPE = (2, 6, 16)


def _tp_block() -> TPBlock:
    torch.manual_seed(0)
    return TPBlock().double()


def _tp_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    return _global(TP_SHAPE, 21), _global(TP_SHAPE, 22)


def _record(block: torch.nn.Module, calls: list) -> None:
    """Hooks on the block's dropouts: per call, the default-generator state it started from
    (it draws its pair from it), its full inputs and its full output."""

    def full(t):
        return t.full_tensor().detach() if hasattr(t, "full_tensor") else t.detach().clone()

    for name in TP_DROPOUTS:
        module = getattr(block, name)

        def pre(module, args, name=name):
            placements = [str(getattr(a, "placements", "plain")) for a in args]
            calls.append([name, torch.get_rng_state(), [full(a) for a in args], None, placements])

        def post(module, args, out):
            calls[-1][3] = full(out)

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)


def _tp_run(mode: str, world: int) -> dict:
    """The block tensor parallel ("tp": replicated activations) or sequence parallel ("sp":
    activations sharded along the sequence between the parallel regions), optionally under
    activation checkpointing; outputs and gradients as full tensors, and the dropouts' calls."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_module, distribute_tensor
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )
    from torch.utils.checkpoint import checkpoint

    mesh = init_device_mesh("cpu", (world,))
    block = _tp_block()
    sp = mode.startswith("sp")
    act = Shard(1) if sp else Replicate()  # the activations between the parallel regions
    plan = {
        "": PrepareModuleInput(
            input_layouts=(act,), desired_input_layouts=(act,), use_local_output=False
        ),
        "q": ColwiseParallel(input_layouts=act, use_local_output=False),
        "k": ColwiseParallel(input_layouts=act, use_local_output=False),
        "v": ColwiseParallel(input_layouts=act, use_local_output=False),
        "proj": RowwiseParallel(output_layouts=act, use_local_output=False),
        "fc1": ColwiseParallel(input_layouts=act, use_local_output=False),
        "fc2": RowwiseParallel(output_layouts=act, use_local_output=False),
    }
    if sp:
        plan["norm1"] = SequenceParallel(use_local_output=False)
        plan["norm2"] = SequenceParallel(use_local_output=False)
    parallelize_module(block, mesh, plan)
    distribute_module(block, mesh)  # the rest (proj_bias, norms in TP) replicated
    calls: list = []
    _record(block, calls)
    x, up = _tp_inputs()
    x = distribute_tensor(x, mesh, [act]).requires_grad_()
    torch.manual_seed(SEED)
    if mode.endswith("ckpt"):  # recomputed whole (no early stop), so every hook runs again
        with torch.utils.checkpoint.set_checkpoint_early_stop(False):
            out = checkpoint(block, x, use_reentrant=False)
    else:
        out = block(x)
    out.backward(distribute_tensor(up, mesh, out.placements))
    grads = {n: p.grad.full_tensor() for n, p in block.named_parameters()}
    return {
        "out": out.full_tensor().detach(),
        "x_grad": x.grad.full_tensor(),
        "grads": grads,
        "calls": calls,
    }


def _tp_scenarios(rank: int, world: int) -> dict:
    if world != 2:
        return {}
    out = {}
    for mode in ("tp", "sp", "sp_ckpt"):
        try:
            out[f"tp_{mode}"] = _tp_run(mode, world)
        except Exception as e:  # noqa: BLE001 (reported by the parent)
            import traceback

            out[f"tp_{mode}"] = {"error": traceback.format_exc() + str(e)}
    return out


def _spawn(tmp: Path, world: int) -> list[dict]:
    """Run the matrix on ``world`` spawned ranks; kill them and fail after TIMEOUT_S."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(
        _worker,
        args=(world, str(tmp / "rendezvous"), str(tmp)),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"the {world} ranks did not finish within {TIMEOUT_S} s (a hang?)")
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]


# 4 ranks on CI's 2 cores: about 45 s for the spawn (2 ranks: about 20 s), so marked slow (CI
# runs it; -m 'not slow' leaves it out).
@pytest.fixture(
    scope="module", params=[2, pytest.param(4, marks=pytest.mark.slow)], ids=["world2", "world4"]
)
def ranks(request, tmp_path_factory) -> tuple[int, list[dict]]:
    if _available() is not None:
        pytest.skip(_available())
    world = request.param
    return world, _spawn(tmp_path_factory.mktemp(f"dtensor{world}"), world)


# ---------------------------------------------------------------- one process, and the checks


def _bitwise(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, what
    assert torch.equal(got.view(torch.int64), want.contiguous().view(torch.int64)), what


def _one_process(case: Case) -> dict:
    tensors = [x.detach().clone().requires_grad_(spec != "plain") for _, x, spec in case.inputs]
    torch.manual_seed(_seed(case))
    ys = _outputs(case.call(*tensors))
    ups = [_upstream(y.shape, y.dtype) for y in ys]
    wanted = [t for t in tensors if t.requires_grad]
    grads = torch.autograd.grad(ys, wanted, ups, allow_unused=True)
    names = [n for n, _, spec in case.inputs if spec != "plain"]
    return {"out": [y.detach() for y in ys], "grads": dict(zip(names, grads))}


def _check_matrix(world: int, got: list[dict], cases: list[Case]) -> int:
    checked = 0
    for case in cases:
        if case.error is not None:
            for r, ranked in enumerate(got):
                res = ranked["cases"][case.name]
                assert case.error in res.get("error", ""), (case.name, r, res)
            checked += 1
            continue
        want = _one_process(case)
        for r, ranked in enumerate(got):
            res = ranked["cases"][case.name]
            assert "error" not in res, f"{case.name} on rank {r} of {world}: {res.get('error')}"
            for k, (g, w) in enumerate(zip(res["out"], want["out"], strict=True)):
                _bitwise(g, w, f"{case.name}: rank {r} of {world}, output {k}")
            for name, w in want["grads"].items():
                g = res["grads"][name]
                what = f"{case.name}: rank {r} of {world}, gradient of {name}"
                assert (g is None) == (w is None), what
                if w is None:
                    continue
                if name in case.summed:
                    # a column sum over rows: rows summed per rank, then all-reduced, in
                    # float64: within (rows) * eps * sum |terms|
                    bound = 64 * torch.finfo(w.dtype).eps * float(w.abs().max() + 1)
                    assert float((g - w).abs().max()) <= bound, what
                else:
                    _bitwise(g, w, what)
        checked += 1
    return checked


def test_every_op_and_placement_is_one_process_bit_for_bit(ranks):
    world, got = ranks
    assert all("cases" in g for g in got), "a rank ran no DTensor case"
    cases = _cases(world)
    checked = _check_matrix(world, got, cases)
    assert checked == len(cases)
    # the test can fail: different shards hold different masks, not all kept or all dropped
    y = got[0]["cases"]["dropout-(Shard(dim=0),)"]["out"][0]
    assert 0 < int((y == 0).sum()) < y.numel()


def test_strided_shards_fsdp_plus_tp(ranks):
    world, got = ranks
    cases = _strided_cases(world)
    if not cases:
        pytest.skip("_StridedShard needs a 2-D mesh: 4 ranks")
    assert _check_matrix(world, got, cases) == len(cases)


def test_local_masks_match_the_reference_at_global_positions(ranks):
    """Independent of the one-process path: each rank's local output is tests/reference.py's
    dropout of its local input at the global positions of its elements."""
    import reference as ref

    world, got = ranks
    cases = [c for c in _cases(world) if c.ref is not None]
    assert cases
    for case in cases:
        p, seed, offset = case.ref
        for r, ranked in enumerate(got):
            y, x, start = ranked["cases"][case.name]["local"]
            if y.numel() == 0:
                continue
            index = torch.zeros((), dtype=torch.int64)
            for d, (n, o) in enumerate(zip(y.shape, start)):
                index = index.unsqueeze(-1) * SHAPE[d] + torch.arange(o, o + n)
            want = ref.ref_dropout_at(x, index.numpy(), p, seed, offset)
            _bitwise(y, want, f"{case.name}: rank {r} of {world} against the reference")


def test_the_matrix_is_cheap(ranks):
    """The whole matrix (every case, forward and backward) runs in seconds per rank."""
    world, got = ranks
    assert max(g["seconds"] for g in got) < 60, [g["seconds"] for g in got]


def _tp_one_process() -> dict:
    block = _tp_block()
    calls: list = []
    _record(block, calls)
    x, up = _tp_inputs()
    x.requires_grad_()
    torch.manual_seed(SEED)
    out = block(x)
    out.backward(up)
    return {
        "out": out.detach(),
        "x_grad": x.grad,
        "grads": {n: p.grad for n, p in block.named_parameters()},
        "calls": calls,
    }


# The sharded matmuls (column/row parallel) and the all-reduced or reduce-scattered partial
# sums reorder additions: in float64 the outputs and gradients of this small block agree with
# one process within 1e-12 relative to their scale (observed: about 1e-15).
TP_BOUND = 1e-12


def _close(got: torch.Tensor, want: torch.Tensor, what: str, floor: float = 0.0) -> None:
    scale = max(float(want.abs().max()), floor) or 1.0
    err = float((got - want).abs().max())
    assert err <= TP_BOUND * scale, f"{what}: differs by {err} (scale {scale})"


@pytest.mark.parametrize("mode", ["tp", "sp", "sp_ckpt"])
def test_tensor_and_sequence_parallel_block(ranks, mode):
    """parallelize_module (ColwiseParallel / RowwiseParallel / SequenceParallel, DTensor
    outputs) of a block built with our modules, on 2 ranks, float64:

    - every dropout call draws exactly the one-process mask: each call starts from the
      default-generator state one process has at that call (so draws the same pair), and its
      full output is bit for bit what the one-process module gives on the same full inputs
      from that state;
    - the block's outputs and gradients agree with one process within TP_BOUND;
    - under activation checkpointing (sp_ckpt), the recomputation draws the same masks: the
      recomputed calls repeat the first ones bit for bit, and the results equal sp's bit for
      bit."""
    world, got = ranks
    if world != 2:
        pytest.skip("the TP/SP block runs on 2 ranks")
    one = _tp_one_process()
    replay = _tp_block()  # without hooks
    for r, ranked in enumerate(got):
        res = ranked[f"tp_{mode}"]
        assert "error" not in res, f"rank {r}: {res.get('error')}"
        calls = res["calls"]
        n = len(one["calls"])
        assert len(calls) == (2 * n if mode.endswith("ckpt") else n), [c[0] for c in calls]
        seen = {c[0]: c[4] for c in calls}
        # our ops saw DTensors, sharded where TP/SP shards them (heads, hidden, sequence)
        assert seen["attn_drop"] == ["(Shard(dim=1),)"], seen
        assert seen["mlp_drop"] == ["(Shard(dim=2),)"], seen
        act = "(Shard(dim=1),)" if mode.startswith("sp") else "(Replicate(),)"
        assert seen["bda"] == [act, "(Replicate(),)", act], seen
        assert seen["drop_add"] == [act, act], seen
        for i, (name, state, inputs, output, _) in enumerate(calls):
            want_name, want_state = one["calls"][i % n][:2]
            assert name == want_name, (i, name, want_name)
            assert torch.equal(state, want_state), f"rank {r}: {name} drew another pair"
            module = getattr(replay, name)
            torch.set_rng_state(state)
            with torch.no_grad():
                want = module(*inputs)
            _bitwise(output, want, f"rank {r}, {mode}: {name}'s mask (call {i})")
            if i >= n:  # the recomputation
                _bitwise(output, calls[i - n][3], f"rank {r}: {name} recomputed")
        _close(res["out"], one["out"], f"rank {r}, {mode}: block output")
        _close(res["x_grad"], one["x_grad"], f"rank {r}, {mode}: input gradient")
        # relative to the largest gradient: some are zero in exact arithmetic (the key bias
        # cancels in the softmax) and are rounding noise on both sides
        floor = max(float(g.abs().max()) for g in one["grads"].values())
        for pname, want in one["grads"].items():
            what = f"rank {r}, {mode}: gradient of {pname}"
            _close(res["grads"][pname], want, what, floor)
        if mode == "sp_ckpt":
            plain = ranked["tp_sp"]
            _bitwise(res["out"], plain["out"], f"rank {r}: checkpointed output")
            _bitwise(res["x_grad"], plain["x_grad"], f"rank {r}: checkpointed input gradient")
