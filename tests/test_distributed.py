"""Data parallel with ``fused_dropout.distributed.batch_sharded``: the masks of one process.

Two ranks (gloo on the CPU, spawned, a ``file://`` rendezvous in a tmp dir, loopback only)
each hold half of a global batch, inside ``batch_sharded()``, with the same seed. One spawn runs
every scenario (``_SCENARIOS``) on both ranks and saves what each saw; the tests compare it with
ONE process running the global batch:

- the masks themselves (element-wise, per-sample ``drop_path``, ``stochastic_depth`` "row" and
  "batch", channel ``dropout2d``, ``dropout_add``, ``bias_dropout_add``, ``drop_path_add``):
  bit for bit, forward and backward;
- DDP of a small transformer-like block built with our modules: outputs bit for bit, and the
  gradients after DDP's allreduce within the rounding of the reordered sum (float64; the
  bound is stated in the test).

The spawn runs under a timeout (``TIMEOUT_S``): a hang fails fast instead of stalling CI.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import fused_dropout as fd
from fused_dropout import distributed
from fused_dropout import functional as F

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)

WORLD = 2
LOCAL = 3  # rows per rank
TIMEOUT_S = 120
SEED = 1234


# ---------------------------------------------------------------- what each rank runs


def _global_input(shape, seed, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _rows(t: torch.Tensor, rank: int, b: int = LOCAL, dim: int = 0) -> torch.Tensor:
    return t.narrow(dim, rank * b, b).contiguous()


def _mask_ops(x, r, bias, img, rank: int | None = None) -> dict:
    """Every kind of mask once, in a fixed order from the current default-generator state;
    inputs require grad, and each result's gradient for a fixed upstream gradient (of the
    global batch, rank ``rank``'s rows) is kept."""
    out = {}
    calls = {
        "dropout": lambda x: F.dropout(x, 0.4),
        "dropout_inplace": lambda x: F.dropout(x * 1, 0.4, inplace=True),
        "drop_path": lambda x: F.drop_path(x, 0.5, True),
        "stochastic_depth_row": lambda x: F.stochastic_depth(x, 0.5, "row"),
        "stochastic_depth_batch": lambda x: F.stochastic_depth(x, 0.5, "batch"),
        "dropout_add": lambda x: F.dropout_add(x, r, 0.3),
        "bias_dropout_add": lambda x: F.bias_dropout_add(x, bias, r, 0.3),
        "drop_path_add": lambda x: F.drop_path_add(r, x, 0.5),
        "dropout2d": None,
        "alpha_dropout": lambda x: F.alpha_dropout(x, 0.2, True),
    }
    for name, call in calls.items():
        inp = (img if name == "dropout2d" else x).detach().clone().requires_grad_()
        y = F.dropout2d(inp, 0.5) if name == "dropout2d" else call(inp)
        shape = (y.shape[0] * (1 if rank is None else WORLD), *y.shape[1:])
        upstream = torch.arange(torch.Size(shape).numel())
        upstream = upstream.to(y.dtype).view(shape).cos()
        if rank is not None:
            upstream = _rows(upstream, rank)
        (grad,) = torch.autograd.grad(y, inp, upstream)
        out[name] = (y.detach(), grad)
    return out


def _mask_inputs(rank: int | None):
    x = _global_input((WORLD * LOCAL, 5, 24), 1)
    r = _global_input((WORLD * LOCAL, 5, 24), 2)
    bias = _global_input((24,), 3)
    img = _global_input((WORLD * LOCAL, 6, 4, 4), 4)
    if rank is None:
        return x, r, bias, img
    return _rows(x, rank), _rows(r, rank), bias, _rows(img, rank)


class RowLinear(nn.Linear):
    """nn.Linear computed row by row (products, then a sum over the input dim): torch's CPU
    matmul is not batch-invariant (rows of a 42-row product differ by an ulp from those of a
    21-row one), so with it no data-parallel output could equal one process's bit for bit,
    masks or not."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x.unsqueeze(-2) * self.weight).sum(-1)
        return y if self.bias is None else y + self.bias


class Block(nn.Module):
    """A pre-norm transformer-like block with our modules: attention-probability dropout,
    BiasDropoutAdd after the projection, DropPath on the MLP branch."""

    def __init__(self, d: int = 16, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = RowLinear(d, 3 * d)
        self.proj = RowLinear(d, d, bias=False)
        self.proj_bias = nn.Parameter(torch.randn(d) * 0.1)
        self.attn_drop = fd.Dropout(0.2)
        self.bda = fd.BiasDropoutAdd(0.3)
        self.fc1, self.fc2 = RowLinear(d, 4 * d), RowLinear(4 * d, d)
        self.mlp_drop = fd.Dropout(0.1)
        self.drop_path = fd.DropPathAdd(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, s, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(n, s, 3, self.heads, d // self.heads).unbind(2)
        att = torch.einsum("nshd,nthd->nhst", q, k).softmax(-1)
        att = self.attn_drop(att)
        h = torch.einsum("nhst,nthd->nshd", att, v).reshape(n, s, d)
        x = self.bda(self.proj(h), self.proj_bias, x)
        branch = self.fc2(self.mlp_drop(torch.nn.functional.gelu(self.fc1(self.norm2(x)))))
        return self.drop_path(x, branch)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return Block().double()


def _block_inputs(rank: int | None):
    x = _global_input((WORLD * LOCAL, 7, 16), 5)
    up = _global_input((WORLD * LOCAL, 7, 16), 6)
    return (x, up) if rank is None else (_rows(x, rank), _rows(up, rank))


def _scenario_masks(rank: int) -> dict:
    torch.manual_seed(SEED)
    with distributed.batch_sharded(batch_size=LOCAL):
        return _mask_ops(*_mask_inputs(rank), rank)


def _scenario_masks_plain(rank: int) -> dict:
    """The same without batch_sharded: each rank draws the masks of its local batch."""
    torch.manual_seed(SEED)
    return _mask_ops(*_mask_inputs(rank), rank)


def _scenario_masks_dim1(rank: int) -> dict:
    """Sequence-first activations (S, N, H): the batch along dim 1; as a decorator."""
    x = _rows(_global_input((4, WORLD * LOCAL, 8), 7), rank, dim=1)

    @distributed.batch_sharded(dim=1)
    def step(x):
        return F.dropout(x, 0.5), F.dropout(x, 0.5, training=True)

    torch.manual_seed(SEED)
    return {"dim1": step(x)}


def _scenario_ddp(rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(_model())
    x, up = _block_inputs(rank)
    torch.manual_seed(SEED)
    with distributed.batch_sharded():
        out = model(x)
    out.backward(up)  # backward outside the block: the boxes were saved with the pairs
    grads = {n.removeprefix("module."): p.grad.clone() for n, p in model.named_parameters()}
    return {"out": out.detach(), "grads": grads}


def _scenario_checkpoint(rank: int) -> dict:
    """Non-reentrant activation checkpointing: the recomputation runs in backward, which runs
    inside the block here, so it draws the same (global) masks again."""
    from torch.utils.checkpoint import checkpoint

    model = _model()
    x, up = _block_inputs(rank)
    x.requires_grad_()
    torch.manual_seed(SEED)
    with distributed.batch_sharded():
        out = checkpoint(model, x, use_reentrant=False)
        out.backward(up)
    return {"out": out.detach(), "x_grad": x.grad}


def _scenario_attached(rank: int) -> dict:
    """``batch_sharded().attach(model)`` and no ``with`` at all: checkpointing's recomputation
    runs in backward (reentrant or not), and must draw the global masks again."""
    from torch.utils.checkpoint import checkpoint

    model = distributed.batch_sharded().attach(_model())
    x, up = _block_inputs(rank)
    out = {}
    for reentrant in (False, True):
        xr = x.clone().requires_grad_()
        torch.manual_seed(SEED)
        y = checkpoint(model, xr, use_reentrant=reentrant)
        y.backward(up)
        out[reentrant] = (y.detach(), xr.grad)
    out["active_after"] = len(distributed._ACTIVE)
    distributed.detach(model)
    torch.manual_seed(SEED)
    out["detached"] = model(x).detach()
    return out


def _scenario_errors(rank: int) -> dict:
    errors = {}
    torch.manual_seed(SEED + rank)  # seeded differently
    try:
        with distributed.batch_sharded():
            pass
    except RuntimeError as e:
        errors["seed"] = str(e)
    torch.manual_seed(SEED)
    try:
        with distributed.batch_sharded(batch_size=LOCAL + rank):  # unequal local batches
            pass
    except RuntimeError as e:
        errors["batch"] = str(e)
    try:
        with distributed.batch_sharded(batch_size=LOCAL):
            F.dropout(torch.ones(LOCAL + 1, 2), 0.5)
    except RuntimeError as e:
        errors["rows"] = str(e)
    distributed.check_same_seed()  # seeded alike again: no error
    return errors


_SCENARIOS = {
    "masks": _scenario_masks,
    "masks_plain": _scenario_masks_plain,
    "masks_dim1": _scenario_masks_dim1,
    "ddp": _scenario_ddp,
    "errors": _scenario_errors,
    "checkpoint": _scenario_checkpoint,
    "attached": _scenario_attached,
}


def _worker(
    rank: int, world: int, init_file: str, out_dir: str, scenarios: dict | None = None
) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    try:
        results = {name: run(rank) for name, run in (scenarios or _SCENARIOS).items()}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def _spawn(
    tmp: Path, world: int = WORLD, scenarios: dict | None = None, timeout_s: float = TIMEOUT_S
) -> list[dict]:
    """Run every scenario (``_SCENARIOS``, or ``scenarios``: name -> module-level function of
    the rank) on ``world`` spawned ranks; kill them and fail after ``timeout_s``."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(
        _worker,
        args=(world, str(tmp / "rendezvous"), str(tmp), scenarios),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"the {world} ranks did not finish within {timeout_s} s (a hang?)")
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return _spawn(tmp_path_factory.mktemp("dist"))


# ---------------------------------------------------------------- one process, and the checks


def _bitwise(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, what
    assert torch.equal(got.view(torch.int64), want.contiguous().view(torch.int64)), what


def test_every_mask_kind_is_one_process_bit_for_bit(ranks):
    torch.manual_seed(SEED)
    one = _mask_ops(*_mask_inputs(None))
    for name, (y, grad) in one.items():
        for r, got in enumerate(ranks):
            gy, gg = got["masks"][name]
            _bitwise(gy, _rows(y, r), f"{name}: rank {r}'s output")
            _bitwise(gg, _rows(grad, r), f"{name}: rank {r}'s gradient")
    # the test can fail: the ranks' halves differ from each other (and are not all zero)
    a, b = ranks[0]["masks"]["dropout"][0], ranks[1]["masks"]["dropout"][0]
    assert not torch.equal(a == 0, b == 0) and 0 < int((a == 0).sum()) < a.numel()
    # and without batch_sharded rank 1 draws rank 0's masks, not one process's
    plain = ranks[1]["masks_plain"]["dropout"][0]
    assert torch.equal(plain == 0, ranks[0]["masks"]["dropout"][0] == 0)
    assert not torch.equal(plain == 0, _rows(one["dropout"][0], 1) == 0)
    batch = [got["masks"]["stochastic_depth_batch"][0] for got in ranks]
    assert len({bool((t == 0).all()) for t in batch}) == 1, "one decision for the global batch"


def test_sequence_first_batch_dim_and_decorator(ranks):
    x = _global_input((4, WORLD * LOCAL, 8), 7)
    torch.manual_seed(SEED)
    want = (F.dropout(x, 0.5), F.dropout(x, 0.5))
    for r, got in enumerate(ranks):
        for g, w in zip(got["masks_dim1"]["dim1"], want):
            _bitwise(g, _rows(w, r, dim=1), f"dim 1, rank {r}")


def test_ddp_block_outputs_and_gradients_are_one_process(ranks):
    """Outputs bit for bit. Gradients: DDP averages the ranks' (so times WORLD), and the
    one-process sums over the global batch in another order: in float64 the difference is
    bounded by (terms summed) * eps * sum |terms| <= 1e-12 relative to the gradient's scale."""
    model = _model()
    x, up = _block_inputs(None)
    torch.manual_seed(SEED)
    out = model(x)
    out.backward(up)
    for r, got in enumerate(ranks):
        _bitwise(got["ddp"]["out"], _rows(out.detach(), r), f"rank {r}'s block output")
    for name, p in model.named_parameters():
        want = p.grad
        for r, got in enumerate(ranks):
            g = got["ddp"]["grads"][name] * WORLD
            scale = float(want.abs().max()) or 1.0
            err = float((g - want).abs().max())
            assert err <= 1e-12 * scale, f"{name}: rank {r} differs by {err} (scale {scale})"


def test_errors_are_clear(ranks):
    for r, got in enumerate(ranks):
        errors = got["errors"]
        assert "default generators differ" in errors["seed"], r
        assert "different local batches" in errors["batch"] and "[3, 4]" in errors["batch"], r
        assert "batch_size=3 was given" in errors["rows"], r


def test_batch_sharded_needs_an_initialized_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        with distributed.batch_sharded():
            pass
    assert distributed.current_box(torch.ones(2)) == (None, None)


def _one_process_block():
    """The block's output and input gradient in one process (no checkpointing), global batch."""
    model = _model()
    x, up = _block_inputs(None)
    x.requires_grad_()
    torch.manual_seed(SEED)
    out = model(x)
    out.backward(up)
    return out.detach(), x.grad


def test_activation_checkpointing_recomputes_the_global_masks(ranks):
    """Outputs and input gradients bit for bit with one process (no checkpointing there): the
    recomputation in backward drew the same masks (preserve_rng_state, the default)."""
    out, x_grad = _one_process_block()
    for r, got in enumerate(ranks):
        _bitwise(got["checkpoint"]["out"], _rows(out, r), f"rank {r}'s output")
        _bitwise(got["checkpoint"]["x_grad"], _rows(x_grad, r), f"rank {r}'s input gradient")


def test_attached_model_recomputes_the_global_masks_outside_any_block(ranks):
    """The attached form: outputs and input gradients bit for bit with one process, for
    reentrant and non-reentrant checkpointing run outside any ``with``; after ``detach`` the
    ranks draw their local masks again (so rank 1's output is no longer one process's)."""
    out, x_grad = _one_process_block()
    for r, got in enumerate(ranks):
        for reentrant in (False, True):
            y, grad = got["attached"][reentrant]
            what = f"rank {r}, use_reentrant={reentrant}"
            _bitwise(y, _rows(out, r), f"{what}: output")
            _bitwise(grad, _rows(x_grad, r), f"{what}: input gradient")
        assert got["attached"]["active_after"] == 0, "a hook left the block active"
    assert not torch.equal(ranks[1]["attached"]["detached"], _rows(out, 1))
