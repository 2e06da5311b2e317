"""``convert(model, skip_dropped=True)`` under DDP and FSDP2, and ``batch_sharded`` under FSDP2.

Spawned gloo ranks (2 and 4; ``tests/test_distributed.py``'s ``_spawn``: ``file://``
rendezvous, loopback only, one spawn per world size runs every scenario, under a timeout so a
hang fails fast):

- skip_dropped training steps of a small timm ViT (attention, MLP, LayerScale; drop-path rates
  0, 0.4, 0.8) under DDP and under FSDP2 (``fully_shard`` on each block's attention and MLP,
  each block and the root: the sharded modules a rank skips are exactly what used to hang;
  also with timm's activation checkpointing of the blocks),
  each rank seeded differently (its own decisions). The test asserts that some rank kept no
  sample in a call where another kept some, that every rank called every sharded module
  (zero rows where it kept none), and that the parameters after the steps are those of one
  process emulating the ranks (each rank's generator in turn, gradients averaged) within
  1e-10 of their scale (float64; the all-reduce sums in another order).
- ``drop_path_residual`` inside ``batch_sharded``: each rank keeps exactly its rows of the
  one-process decisions for the global batch ("sample" and "subset"), outputs bit for bit;
  and the converted ViT under DDP and FSDP2 inside ``batch_sharded`` (seeded alike) skips,
  summed over the ranks, exactly the samples one process skips on the global batch, with its
  outputs and parameters within 1e-10.
- ``batch_sharded`` under FSDP2 (``test_distributed``'s batch-invariant block), with and
  without activation checkpointing: dropout masks and outputs bit for bit against one process
  on the global batch, gradients within 1e-12 of their scale (float64, reordered sums).

Without torch.distributed (here, in the test process): a branch on zero rows (what a rank that
keeps no sample runs) of a timm ViT block and of a Hugging Face BERT layer as ``convert``
rewires them gives zero gradients, not None, for every parameter.
"""

from __future__ import annotations

import pytest
import torch
from test_distributed import LOCAL, SEED, _global_input, _model, _rows, _spawn
from torch import nn

import fused_dropout as fd
from fused_dropout import distributed, skip

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)

STEPS = 3
LR = 0.5
VIT_BATCH = 2  # rows per rank


def _fully_shard():
    """torch's FSDP2 ``fully_shard``, or the reason it is missing."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError as e:  # before torch 2.6 (2.4-2.5: torch.distributed._composable.fsdp)
        try:
            from torch.distributed._composable.fsdp import fully_shard
        except ImportError:
            return None, f"this torch has no FSDP2 fully_shard ({e})"
    return fully_shard, None


def _world() -> int:
    return torch.distributed.get_world_size()


# ---------------------------------------------------------------- skip_dropped training steps


def _vit() -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(
        img_size=8, patch_size=4, num_classes=3, embed_dim=16, depth=3, num_heads=2,
        mlp_ratio=2.0, init_values=0.1, drop_path_rate=0.8,
    ).double()  # fmt: skip
    return fd.convert(model, skip_dropped=True)[0]


def _vit_inputs(step: int, world: int, rank: int | None) -> torch.Tensor:
    x = _global_input((world * VIT_BATCH, 3, 8, 8), 100 + step)
    return x if rank is None else _rows(x, rank, VIT_BATCH)


def _train(model: nn.Module, rank: int, params) -> dict:
    """STEPS SGD steps, this rank seeded SEED + rank; the rows each attention call got."""
    rows: list[int] = []
    for block in model.blocks if hasattr(model, "blocks") else model.module.blocks:
        block.attn.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    torch.manual_seed(SEED + rank)
    losses = []
    with skip.count_skipped() as counts:
        for step in range(STEPS):
            loss = model(_vit_inputs(step, _world(), rank)).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.detach())
    return {"rows": rows, "losses": losses, "params": params(model), "none_kept": counts.none_kept}


def _scenario_skip_ddp(rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    def params(model):
        return {n.removeprefix("module."): p.detach().clone() for n, p in model.named_parameters()}

    return _train(DDP(_vit()), rank, params)


def _scenario_skip_fsdp(rank: int, checkpointed: bool = False) -> dict:
    fully_shard, why = _fully_shard()
    if fully_shard is None:
        return {"skip_reason": why}
    model = _vit()
    # timm's activation checkpointing of the blocks: the recomputation redraws the same
    # decisions (the RNG state is restored), so the zero-row calls recur identically
    model.set_grad_checkpointing(checkpointed)
    for block in model.blocks:
        fully_shard(block.attn)
        fully_shard(block.mlp)
        fully_shard(block)
    fully_shard(model)

    def params(model):
        return {n: p.full_tensor().detach() for n, p in model.named_parameters()}

    return _train(model, rank, params)


def _scenario_skip_fsdp_checkpoint(rank: int) -> dict:
    return _scenario_skip_fsdp(rank, checkpointed=True)


def _emulate(world: int) -> dict:
    """One process running the world's ranks in turn: rank r's generator (seeded SEED + r) and
    rows, gradients averaged over the ranks, then the step."""
    model = _vit()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    states = []
    for r in range(world):
        torch.manual_seed(SEED + r)
        states.append(torch.get_rng_state())
    losses: list[list[torch.Tensor]] = [[] for _ in range(world)]
    for step in range(STEPS):
        total = [torch.zeros_like(p) for p in model.parameters()]
        for r in range(world):
            torch.set_rng_state(states[r])
            loss = model(_vit_inputs(step, world, r)).square().mean()
            loss.backward()
            states[r] = torch.get_rng_state()
            losses[r].append(loss.detach())
            for t, p in zip(total, model.parameters()):
                if p.grad is not None:  # None: a skipped branch (one process runs none)
                    t += p.grad / world
                p.grad = None
        for t, p in zip(total, model.parameters()):
            p.grad = t
        opt.step()
        opt.zero_grad()
    return {"params": dict(model.named_parameters()), "losses": losses}


def _sharded_steps(model: nn.Module, rank: int | None) -> dict:
    """STEPS SGD steps inside batch_sharded (a rank) or on the global batch (one process),
    every rank seeded SEED: the outputs and the samples skipped in each step."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    world = _world() if rank is not None else WORLD_REF[0]
    torch.manual_seed(SEED)
    outs, skipped = [], []
    for step in range(STEPS):
        x = _vit_inputs(step, world, rank)
        with skip.count_skipped() as counts:
            if rank is None:
                out = model(x)
            else:
                with distributed.batch_sharded(batch_size=VIT_BATCH):
                    out = model(x)
        out.square().mean().backward()
        opt.step()
        opt.zero_grad()
        outs.append(out.detach())
        skipped.append(counts.skipped)
    return {"outs": outs, "skipped": skipped}


WORLD_REF = [0]  # the world size the one-process reference emulates


def _scenario_skip_sharded_ddp(rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(_vit())
    got = _sharded_steps(model, rank)
    got["params"] = {n.removeprefix("module."): p.detach() for n, p in model.named_parameters()}
    return got


def _scenario_skip_sharded_fsdp(rank: int) -> dict:
    fully_shard, why = _fully_shard()
    if fully_shard is None:
        return {"skip_reason": why}
    model = _vit()
    for block in model.blocks:
        fully_shard(block.attn)
        fully_shard(block.mlp)
        fully_shard(block)
    fully_shard(model)
    got = _sharded_steps(model, rank)
    got["params"] = {n: p.full_tensor().detach() for n, p in model.named_parameters()}
    return got


# ---------------------------------------------------------------- decisions of the global batch

DECISION_CASES = [("sample", 0.5), ("sample", 0.8), ("subset", 0.5), ("subset", 0.8)]


def _decision_input(world: int) -> torch.Tensor:
    return _global_input((world * LOCAL, 4), 20)


def _branch(seen: list):
    def branch(t: torch.Tensor) -> torch.Tensor:
        seen.append(t.detach().clone())
        return t.sin() * 3

    return branch


def _scenario_sharded_decisions(rank: int) -> dict:
    x = _rows(_decision_input(_world()), rank)
    out = {}
    for mode, p in DECISION_CASES:
        seen: list[torch.Tensor] = []
        torch.manual_seed(SEED)
        with distributed.batch_sharded(batch_size=LOCAL):
            y = skip.drop_path_residual(x, _branch(seen), p, mode=mode)
        out[mode, p] = (y, seen)
    return out


# ---------------------------------------------------------------- batch_sharded under FSDP2


def _block_inputs(world: int, rank: int | None):
    x = _global_input((world * LOCAL, 7, 16), 5)
    up = _global_input((world * LOCAL, 7, 16), 6)
    return (x, up) if rank is None else (_rows(x, rank), _rows(up, rank))


def _run_block(model: nn.Module, x, up, checkpointed: bool, rank: int | None) -> dict:
    """Forward and backward (inside batch_sharded on a rank); the attention-dropout outputs."""
    from torch.utils.checkpoint import checkpoint

    masks: list[torch.Tensor] = []
    model.attn_drop.register_forward_hook(lambda m, args, out: masks.append(out.detach()))
    x = x.clone().requires_grad_()
    torch.manual_seed(SEED)
    with distributed.batch_sharded() if rank is not None else torch.enable_grad():
        out = checkpoint(model, x, use_reentrant=False) if checkpointed else model(x)
        out.backward(up)  # inside the block: a checkpoint's recomputation draws the global masks
    return {"out": out.detach(), "x_grad": x.grad, "attn_drop": masks}


def _scenario_fsdp_block(rank: int) -> dict:
    fully_shard, why = _fully_shard()
    if fully_shard is None:
        return {"skip_reason": why}
    out = {}
    for checkpointed in (False, True):
        model = _model()
        fully_shard(model.fc1)
        fully_shard(model.fc2)
        fully_shard(model)
        got = _run_block(model, *_block_inputs(_world(), rank), checkpointed, rank)
        got["grads"] = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        out[checkpointed] = got
    return out


SCENARIOS = {
    "skip_ddp": _scenario_skip_ddp,
    "skip_fsdp": _scenario_skip_fsdp,
    "skip_fsdp_checkpoint": _scenario_skip_fsdp_checkpoint,
    "skip_sharded_ddp": _scenario_skip_sharded_ddp,
    "skip_sharded_fsdp": _scenario_skip_sharded_fsdp,
    "decisions": _scenario_sharded_decisions,
    "fsdp_block": _scenario_fsdp_block,
}


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def ranks(request, tmp_path_factory) -> list[dict]:
    pytest.importorskip("timm")
    world = request.param
    return _spawn(tmp_path_factory.mktemp(f"skip{world}"), world, SCENARIOS)


# ---------------------------------------------------------------- the checks


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The one-process references run on one thread, as the ranks do: tiny tensors, and on a
    busy 2-core machine two threads made the emulation 40x slower (5 s instead of 0.14 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _bitwise(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, what
    assert torch.equal(got.view(torch.int64), want.contiguous().view(torch.int64)), what


def _close(got: torch.Tensor, want: torch.Tensor, bound: float, what: str) -> None:
    scale = float(want.abs().max()) or 1.0
    err = float((got - want).abs().max())
    assert err <= bound * scale, f"{what}: differs by {err} (scale {scale})"


@pytest.mark.parametrize("how", ["skip_ddp", "skip_fsdp", "skip_fsdp_checkpoint"])
def test_skip_dropped_training_steps_never_hang(ranks, how):
    """Every rank finished (the spawn's timeout catches a hang), called every attention module
    in the same order (zero rows where it kept none), some rank kept no sample in a call where
    another kept some (the case that used to hang or raise), and the parameters after STEPS
    steps are those of one process emulating the ranks, within 1e-10 of their scale (float64;
    the all-reduce or reduce-scatter sums the ranks' gradients in another order)."""
    world = len(ranks)
    if "skip_reason" in ranks[0][how]:
        pytest.skip(ranks[0][how]["skip_reason"])
    rows = [got[how]["rows"] for got in ranks]
    calls = STEPS * 3 * (2 if how.endswith("checkpoint") else 1)  # recomputed in backward
    assert len({len(r) for r in rows}) == 1 and len(rows[0]) == calls, rows
    mixed = [i for i, call in enumerate(zip(*rows)) if min(call) == 0 < max(call)]
    assert mixed, f"no call where one rank kept no sample and another kept some: {rows}"
    assert all(got[how]["none_kept"] for got in ranks[:2]), "ranks 0 and 1 each kept none once"
    want = _emulate(world)
    for r, got in enumerate(ranks):
        for step, (loss, ref) in enumerate(zip(got[how]["losses"], want["losses"][r])):
            _close(loss, ref, 1e-10, f"{how}: rank {r}'s loss at step {step}")
        for name, p in want["params"].items():
            _close(got[how]["params"][name], p.detach(), 1e-10, f"{how}: rank {r}'s {name}")
    # the steps moved the parameters (the comparison can fail)
    init = dict(_vit().named_parameters())
    assert any(not torch.equal(init[n], p) for n, p in want["params"].items())


@pytest.mark.parametrize("how", ["skip_sharded_ddp", "skip_sharded_fsdp"])
def test_skip_dropped_in_batch_sharded_is_one_process(ranks, how):
    """A converted ViT under DDP or FSDP2 inside batch_sharded, every rank seeded alike: the
    ranks
    together skip exactly the samples one process skips on the global batch in each step,
    their outputs are that process's rows and their parameters after STEPS steps its
    parameters, within 1e-10 of their scale (float64; the CPU matmul is not batch-invariant
    and the all-reduce reorders the sum: a different decision would differ by O(1))."""
    world = len(ranks)
    if "skip_reason" in ranks[0][how]:
        pytest.skip(ranks[0][how]["skip_reason"])
    WORLD_REF[0] = world
    model = _vit()
    want = _sharded_steps(model, None)
    skipped = [sum(got[how]["skipped"][s] for got in ranks) for s in range(STEPS)]
    assert skipped == want["skipped"] and 0 < sum(skipped) < STEPS * 3 * world * VIT_BATCH
    for r, got in enumerate(ranks):
        got = got[how]
        for step, (out, ref) in enumerate(zip(got["outs"], want["outs"])):
            _close(out, _rows(ref, r, VIT_BATCH), 1e-10, f"rank {r}'s output at step {step}")
        for name, p in model.named_parameters():
            _close(got["params"][name], p.detach(), 1e-10, f"rank {r}'s {name}")


@pytest.mark.parametrize(("mode", "p"), DECISION_CASES)
def test_skip_dropped_in_batch_sharded_keeps_the_global_batch_decisions(ranks, mode, p):
    """Rank r ran the branch on exactly its rows of one process's kept samples for the global
    batch (zero rows where it has none), and its output is those rows bit for bit."""
    world = len(ranks)
    x = _decision_input(world)
    torch.manual_seed(SEED)
    pair = skip._draw_seed_offset(torch.device("cpu"), None)
    idx, _ = skip.kept_samples(world * LOCAL, p, mode, seed_offset=pair)
    seen: list[torch.Tensor] = []
    torch.manual_seed(SEED)
    want = skip.drop_path_residual(x, _branch(seen), p, mode=mode)
    _bitwise(seen[0], x[idx], "one process's branch input")  # idx is the one-process decision
    for r, got in enumerate(ranks):
        y, branch_inputs = got["decisions"][mode, p]
        mine = idx[(idx >= r * LOCAL) & (idx < (r + 1) * LOCAL)]
        assert len(branch_inputs) == 1, f"rank {r} ran the branch {len(branch_inputs)} times"
        _bitwise(branch_inputs[0], x[mine], f"{mode} p={p}: rank {r}'s kept rows")
        _bitwise(y, _rows(want, r), f"{mode} p={p}: rank {r}'s output")


def test_the_decision_cases_can_fail(ranks):
    """Over the cases above, some rank's rows of the global decisions differ from what it would
    decide for its local batch alone (batch_sharded changed something), and some rank kept
    no sample (it ran the branch on zero rows)."""
    world = len(ranks)
    differs = none = 0
    for mode, p in DECISION_CASES:
        torch.manual_seed(SEED)
        pair = skip._draw_seed_offset(torch.device("cpu"), None)
        idx, _ = skip.kept_samples(world * LOCAL, p, mode, seed_offset=pair)
        local, _ = skip.kept_samples(LOCAL, p, mode, seed_offset=pair)
        for r in range(world):
            mine = idx[(idx >= r * LOCAL) & (idx < (r + 1) * LOCAL)] - r * LOCAL
            differs += not torch.equal(mine, local)
            none += mine.numel() == 0
    assert differs and none, (differs, none)


@pytest.mark.parametrize("checkpointed", [False, True], ids=["plain", "checkpoint"])
def test_batch_sharded_under_fsdp2_is_one_process(ranks, checkpointed):
    """FSDP2 (fully_shard on fc1, fc2 and the root) inside batch_sharded, with the same seed on
    every rank: the attention-dropout outputs (so the masks) and the block's output and input
    gradient bit for bit those of one process on the global batch; the parameter gradients
    (FSDP2 averages the ranks', so times world) within 1e-12 of their scale (float64, the
    reduce-scatter reorders the sum). With checkpointing the recomputation draws the same
    masks again."""
    world = len(ranks)
    if "skip_reason" in ranks[0]["fsdp_block"]:
        pytest.skip(ranks[0]["fsdp_block"]["skip_reason"])
    model = _model()
    x, up = _block_inputs(world, None)
    want = _run_block(model, x, up, False, None)
    (mask,) = want["attn_drop"]
    for r, got in enumerate(ranks):
        got = got["fsdp_block"][checkpointed]
        assert len(got["attn_drop"]) == (2 if checkpointed else 1)
        for m in got["attn_drop"]:
            _bitwise(m, _rows(mask, r), f"rank {r}'s attention dropout")
        _bitwise(got["out"], _rows(want["out"], r), f"rank {r}'s output")
        _bitwise(got["x_grad"], _rows(want["x_grad"], r), f"rank {r}'s input gradient")
        for name, p in model.named_parameters():
            _close(got["grads"][name] * world, p.grad, 1e-12, f"rank {r}'s {name} gradient")
    assert 0 < int((mask == 0).sum()) < mask.numel()


# ---------------------------------------------------------------- zero rows, one process


def _zero_row_grads(module: nn.Module, x: torch.Tensor, **kwargs) -> dict[str, torch.Tensor]:
    out = module(x[:0], **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    assert out.shape[0] == 0
    out.sum().backward()
    return {n: p.grad for n, p in module.named_parameters()}


def test_a_timm_vit_block_runs_on_zero_rows(monkeypatch):
    """What a rank that keeps no sample runs: with torch.distributed initialized (patched here)
    a drop_path_residual that keeps none calls the branch (norm, attention, MLP, LayerScale)
    on zero rows, and every parameter of the block gets a zero gradient, not None (so DDP's
    reducer and FSDP2's reduce-scatter see every parameter on every rank)."""
    pytest.importorskip("timm")
    model = _vit().train()
    block = model.blocks[2]  # drop-path rate 0.8
    block.drop_path1.drop_prob = block.drop_path2.drop_prob = 1.0  # keeps no sample
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    calls = []
    block.attn.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    monkeypatch.setattr(skip, "_collectives", lambda: True)
    with skip.count_skipped() as counts:
        y = block(x)
    assert calls == [0] and counts.none_kept == 2
    _bitwise(y.detach(), x.detach(), "no sample kept: the block is the identity")
    y.square().sum().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and not p.grad.any(), name
    _bitwise(x.grad, 2 * x.detach(), "the input gradient")
    monkeypatch.setattr(skip, "_collectives", lambda: False)  # one process: no branch call
    calls.clear()
    block(x)
    assert calls == []


def test_the_bert_modules_convert_rewires_run_on_zero_rows():
    """Hugging Face BERT's SelfOutput and Output after convert(fuse_norm=True) (rewired to the
    fused dropout + add + LayerNorm) on zero rows: forward and backward run, every parameter
    gets a zero gradient. (BERT's self-attention itself cannot take zero rows in this
    transformers: its ``view(*shape, -1, head_dim)`` of 0 elements raises; BERT holds no
    drop path, so skip_dropped never makes it a branch.)"""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        hidden_size=16, num_attention_heads=2, intermediate_size=32, num_hidden_layers=1
    )
    torch.manual_seed(0)
    layer = transformers.models.bert.modeling_bert.BertLayer(config).double().train()
    counts = fd.convert(layer, fuse_norm=True)[1]
    assert sum(v for k, v in counts.items() if k.startswith("fuse_norm:")) == 2, counts
    for module, width in ((layer.attention.output, 16), (layer.output, 32)):
        a = torch.randn(0, 5, width, dtype=torch.float64)
        b = torch.randn(0, 5, 16, dtype=torch.float64, requires_grad=True)
        out = module(a, b)
        assert out.shape == (0, 5, 16)
        out.sum().backward()
        for name, p in module.named_parameters():
            assert p.grad is not None and not p.grad.any(), name
