"""Tests of ``functional.drop_path_residual``, ``DropPathResidual`` and
``convert(model, skip_dropped=True)``: the branch runs only on the kept samples.

- Kept sets are checked against tests/reference.py (mode "sample": its keep mask; mode "subset":
  the samples with the smallest contract words, each word recovered from the reference mask).
- Outputs are compared with ``drop_path_add(x, branch(x), p, seed_offset=pair)``:
  - bit for bit, with the gradient of ``x``, for a branch without a matrix product (its result
    per sample does not depend on the batch size);
  - with a Linear branch within BLAS's batch-size rounding, and branch parameter gradients
    within reduction-order rounding (a sum over fewer rows).
- Rewired blocks of timm and torchvision models are compared, in training, with the same model
  converted without skipping (same pairs, same kept samples), and in eval bit for bit with the
  unconverted model.
"""

from __future__ import annotations

import copy
import importlib
import io
import math
import os
import sys

import pytest
import torch
from torch import nn

import fused_dropout
from fused_dropout import _layers, skip
from fused_dropout import functional as FD

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
ref = importlib.import_module("reference")  # tests/reference.py, whatever the import mode
from helpers import assert_bitwise, randn  # noqa: E402
from helpers import gen as _gen  # noqa: E402

PAIRS = [(3, 0), (2**63 + 1, 12), (2**64 - 3, 2**40 + 4)]


@pytest.fixture(autouse=True)
def _isolate_global_rng():
    with torch.random.fork_rng():
        torch.manual_seed(20240603)
        yield


def _reference_words(seed: int, offset: int, batch: int) -> list[int]:
    """Each sample's contract word, recovered from the reference keep mask alone: the word of
    m is the largest threshold T with m not kept at T (keep iff word < T)."""
    words = []
    for m in range(batch):
        lo, hi = 0, 2**32  # not kept at lo (T = 0 keeps nothing); kept at hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            kept = bool(ref.keep_mask(seed, offset, 1.0 - mid / 2**32, batch)[m])
            lo, hi = (lo, mid) if kept else (mid, hi)
        words.append(lo)
    return words


class Recorder:
    """A per-sample branch (no matrix product) that records the inputs it was called with."""

    def __init__(self, dim: int, dtype=torch.float32, seed: int = 1):
        self.w = randn((dim,), dtype, seed).requires_grad_()
        self.b = randn((dim,), dtype, seed + 1).requires_grad_()
        self.calls: list[torch.Tensor] = []

    def __call__(self, t):
        self.calls.append(t.detach().clone())
        return torch.relu(t * self.w + self.b)


def _never(t):
    raise AssertionError("branch called although no sample is kept")


# ---------------------------------------------------------------- kept sets


@pytest.mark.parametrize("seed,offset", PAIRS)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_sample_kept_set_is_the_contracts(seed, offset, p):
    batch = 37
    idx, scale = skip.kept_samples(batch, p, "sample", seed_offset=(seed, offset))
    expected = ref.keep_mask(seed, offset, p, batch).nonzero().squeeze(1)
    assert torch.equal(idx, expected)
    assert scale == 1.0 / (1.0 - p)
    # and the branch sees exactly those samples
    x = randn((batch, 3, 4), torch.float32)
    branch = Recorder(4)
    FD.drop_path_residual(x, branch, p, seed_offset=(seed, offset))
    if len(expected):
        assert torch.equal(branch.calls[0], x[expected])


@pytest.mark.parametrize("seed,offset", PAIRS)
@pytest.mark.parametrize("batch,p", [(16, 0.25), (10, 0.3), (10, 0.7), (7, 0.99), (24, 0.5)])
def test_subset_is_the_k_smallest_contract_words(seed, offset, batch, p):
    idx, scale = skip.kept_samples(batch, p, "subset", seed_offset=(seed, offset))
    k = max(int(batch * (1 - p)), 1)  # DINOv2's subset size
    words = _reference_words(seed, offset, batch)
    expected = sorted(sorted(range(batch), key=lambda m: (words[m], m))[:k])
    assert idx.tolist() == expected
    assert scale == batch / k


def test_subset_ties_go_to_the_lowest_index(monkeypatch):
    # Every word equal: the threshold search ends on a tie of all samples.
    monkeypatch.setattr(skip, "_keeps_below", lambda batch, t, pair: torch.ones(batch, dtype=bool))
    idx, _ = skip.kept_samples(8, 0.5, "subset", seed_offset=(1, 0))
    assert idx.tolist() == [0, 1, 2, 3]


# ---------------------------------------------------------------- equivalence


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed,offset", PAIRS[:2])
def test_sample_mode_equals_drop_path_add_exactly(dtype, seed, offset):
    """Per-sample branch: output and x's gradient bit for bit; the parameters' gradients sum
    over fewer rows (the kept ones) and agree within that reduction's rounding."""
    x = randn((19, 5, 8), dtype, 3).requires_grad_()
    gy = randn((19, 5, 8), dtype, 4)
    p, pair = 0.4, (seed, offset)
    branch = Recorder(8, dtype)
    y = FD.drop_path_residual(x, branch, p, seed_offset=pair)
    gx, gw, gb = torch.autograd.grad(y, (x, branch.w, branch.b), gy)
    x2 = x.detach().clone().requires_grad_()
    y2 = FD.drop_path_add(x2, branch(x2), p, seed_offset=pair)
    gx2, gw2, gb2 = torch.autograd.grad(y2, (x2, branch.w, branch.b), gy)
    assert_bitwise(y, y2)
    assert torch.equal(gx, gx2)  # equal values (a zero's sign may differ)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gw, gw2, **tol)
    torch.testing.assert_close(gb, gb2, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sample_mode_linear_branch_within_blas_rounding(dtype):
    """A Linear branch: a matrix product over fewer rows may round differently (BLAS blocks by
    batch size), so outputs and gradients agree within that rounding, not bit for bit."""
    torch.manual_seed(0)
    lin = nn.Linear(16, 16).to(dtype)
    x = randn((32, 7, 16), dtype, 5).requires_grad_()
    gy = randn((32, 7, 16), dtype, 6)
    pair = (11, 4)
    y = FD.drop_path_residual(x, lin, 0.5, seed_offset=pair)
    grads = torch.autograd.grad(y, (x, *lin.parameters()), gy)
    x2 = x.detach().clone().requires_grad_()
    y2 = FD.drop_path_add(x2, lin(x2), 0.5, seed_offset=pair)
    grads2 = torch.autograd.grad(y2, (x2, *lin.parameters()), gy)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(y, y2, **tol)
    for g, g2 in zip(grads, grads2):
        torch.testing.assert_close(g, g2, **tol)
    # the dropped rows are x itself, exactly
    dropped = ~ref.keep_mask(*pair, 0.5, 32)
    assert torch.equal(y[dropped], x[dropped])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_subset_mode_equals_drop_path_add_at_its_threshold(dtype):
    """The subset is what drop_path_add keeps at the threshold just above the k-th smallest
    word; unscaled the outputs match it bit for bit, scaled by B/k they match the fp32
    formula rounded once."""
    batch, p, pair = 20, 0.3, (7, 8)
    words = _reference_words(*pair, batch)
    k = max(int(batch * (1 - p)), 1)
    p_star = 1.0 - (sorted(words)[k - 1] + 1) / 2**32
    x = randn((batch, 3, 8), dtype, 7).requires_grad_()
    gy = randn((batch, 3, 8), dtype, 8)
    branch = Recorder(8, dtype)
    y = FD.drop_path_residual(x, branch, p, mode="subset", scale_by_keep=False, seed_offset=pair)
    assert len(branch.calls[0]) == k
    (gx,) = torch.autograd.grad(y, (x,), gy)
    x2 = x.detach().clone().requires_grad_()
    y2 = FD.drop_path_add(x2, branch(x2), p_star, scale_by_keep=False, seed_offset=pair)
    (gx2,) = torch.autograd.grad(y2, (x2,), gy)
    assert_bitwise(y, y2)
    assert torch.equal(gx, gx2)

    y = FD.drop_path_residual(x, branch, p, mode="subset", seed_offset=pair)
    keep = ref.keep_mask(*pair, p_star, batch).reshape(-1, 1, 1)
    scale = torch.tensor(batch / k, dtype=torch.float32)
    expected = (x.float() + torch.where(keep, branch(x).float() * scale, 0.0)).to(dtype)
    assert_bitwise(y, expected)


def test_generator_draws_the_pair_a_kernel_call_would():
    """Without seed_offset the pair comes from the generator as one op call draws it: the same
    kept set as drop_path_add from an equally seeded generator, and the same state after."""
    x = randn((64, 4), torch.float32)
    branch = Recorder(4)
    g1, g2 = _gen(99), _gen(99)
    y = FD.drop_path_residual(x, branch, 0.5, generator=g1)
    y2 = FD.drop_path_add(x, branch(x), 0.5, generator=g2)
    assert_bitwise(y, y2)
    assert torch.equal(g1.get_state(), g2.get_state())
    torch.manual_seed(5)
    y = FD.drop_path_residual(x, branch, 0.5)
    torch.manual_seed(5)
    assert_bitwise(y, FD.drop_path_add(x, branch(x), 0.5))


def test_keep_rate_is_binomial():
    """Over many calls, the kept fraction is 1 - p within 4.5 binomial sigmas; the subset mode
    includes every index equally often."""
    p, batch, calls = 0.3, 64, 300
    branch = Recorder(2)
    x = torch.ones(batch, 2)
    with skip.count_skipped() as c:
        for _ in range(calls):
            FD.drop_path_residual(x, branch, p)
    n = batch * calls
    assert c.samples == n
    assert abs(c.skipped - n * p) < 4.5 * math.sqrt(n * p * (1 - p))
    assert sum(len(t) for t in branch.calls) == n - c.skipped

    counts = torch.zeros(batch)
    k = max(int(batch * (1 - p)), 1)
    for _ in range(calls):
        idx, _ = skip.kept_samples(
            batch, p, "subset", seed_offset=(int(torch.randint(1 << 62, ())), 0)
        )
        assert len(idx) == k
        counts[idx] += 1
    q = k / batch  # each index is in a uniform k-subset with probability k/B
    sigma = math.sqrt(calls * q * (1 - q))
    assert (counts - calls * q).abs().max() < 4.5 * sigma


# ---------------------------------------------------------------- edge cases


@pytest.mark.parametrize("mode", ["sample", "subset"])
def test_p_one_never_calls_the_branch(mode):
    x = randn((6, 3), torch.float32).requires_grad_()
    y = FD.drop_path_residual(x, _never, 1.0, mode=mode)
    assert y is not x and torch.equal(y, x)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_no_sample_kept_never_calls_the_branch():
    # a pair under which drop_path at p = 0.9 keeps none of 4 samples
    pair = next(
        (s, 0) for s in range(1000) if not ref.keep_mask(s, 0, 0.9, 4).any()
    )  # fmt: skip
    x = randn((4, 3), torch.float32)
    y = FD.drop_path_residual(x, _never, 0.9, seed_offset=pair)
    assert y is not x and torch.equal(y, x)
    with skip.count_skipped() as c:
        FD.drop_path_residual(x, _never, 0.9, seed_offset=pair)
    assert (c.samples, c.skipped) == (4, 4)


@pytest.mark.parametrize("mode", ["sample", "subset"])
def test_outside_training_and_p_zero_run_everything_unscaled(mode):
    x = randn((9, 4), torch.float32)
    branch = Recorder(4)
    state = torch.get_rng_state()
    for kwargs in ({"p": 0.5, "training": False}, {"p": 0.0}):
        y = FD.drop_path_residual(x, branch, mode=mode, **kwargs)
        assert torch.equal(branch.calls[-1], x)
        assert_bitwise(y, x + branch(x))
    assert torch.equal(torch.get_rng_state(), state)  # nothing drawn


def test_bad_input_raises():
    x = randn((4, 3), torch.float32)
    with pytest.raises(ValueError, match="between 0 and 1"):
        FD.drop_path_residual(x, _never, 1.5)
    with pytest.raises(ValueError, match="mode"):
        FD.drop_path_residual(x, _never, 0.5, mode="row")
    with pytest.raises(RuntimeError, match="batch dimension"):
        FD.drop_path_residual(torch.tensor(1.0), _never, 0.5)
    with pytest.raises(RuntimeError, match="keep the shape"):
        FD.drop_path_residual(x, lambda t: t[:, :2], 0.5, seed_offset=(3, 0))
    with pytest.raises(ValueError, match="offset"):
        FD.drop_path_residual(x, _never, 0.5, seed_offset=(3, 2))
    empty = torch.empty(0, 3)
    assert FD.drop_path_residual(empty, _never, 0.5).shape == (0, 3)


def test_module_form():
    lin = nn.Linear(4, 4)
    m = fused_dropout.DropPathResidual(lin, 0.5, mode="subset")
    assert "drop_prob=0.500, mode='subset'" in repr(m)
    x = randn((8, 4), torch.float32)
    torch.manual_seed(1)
    y = m(x)
    torch.manual_seed(1)
    assert_bitwise(y, FD.drop_path_residual(x, lin, 0.5, mode="subset"))
    m.eval()
    assert_bitwise(m(x), x + lin(x))
    with pytest.raises(ValueError):
        fused_dropout.DropPathResidual(lin, 0.5, mode="batch")


def test_checkpointing_recomputes_the_same_samples():
    """torch.utils.checkpoint restores the RNG state for the recomputation, so the same pair is
    drawn, the same samples are gathered, and the gradients equal those without it."""
    from torch.utils.checkpoint import checkpoint

    lin = nn.Linear(8, 8)
    x = randn((16, 8), torch.float32)

    def run(use_checkpoint):
        torch.manual_seed(3)
        xx = x.clone().requires_grad_()
        f = lambda t: FD.drop_path_residual(t, lin, 0.5)  # noqa: E731
        y = checkpoint(f, xx, use_reentrant=False) if use_checkpoint else f(xx)
        y.square().sum().backward()
        return y.detach(), xx.grad, lin.weight.grad.clone()

    a = run(False)
    lin.zero_grad()
    b = run(True)
    for u, v in zip(a, b):
        assert_bitwise(u, v)


# ---------------------------------------------------------------- torch.compile


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["subset", "sample"])
def test_compiled_matches_eager(mode):
    """Both modes compile with a graph break at the host-side decision; the compiled steps
    equal eager ones from the same seed (subset: static shapes; sample: a dynamic batch)."""
    from helpers import run_steps

    torch._dynamo.reset()
    model = fused_dropout.DropPathResidual(nn.Sequential(nn.Linear(8, 8), nn.GELU()), 0.5, mode)
    compiled = torch.compile(copy.deepcopy(model))
    x, gy = randn((16, 8), torch.float32, 1), randn((16, 8), torch.float32, 2)
    for (y, gx, gp), (cy, cgx, cgp) in zip(
        run_steps(model, x, gy, seed=4, steps=3), run_steps(compiled, x, gy, seed=4, steps=3)
    ):
        torch.testing.assert_close(cy, y)
        torch.testing.assert_close(cgx, gx)
        for name in gp:
            torch.testing.assert_close(cgp[name], gp[name])


@pytest.mark.slow
def test_fullgraph_compile_names_the_alternative():
    torch._dynamo.reset()
    model = fused_dropout.DropPathResidual(nn.Linear(8, 8), 0.5, "subset")
    with pytest.raises(Exception, match="drop_path_add"):
        torch.compile(model, fullgraph=True)(torch.randn(4, 8))


# ---------------------------------------------------------------- convert(skip_dropped=True)


def _timm_vit(rate, **kw):
    timm = pytest.importorskip("timm")
    return timm.create_model(
        "vit_small_patch16_224", img_size=32, num_classes=10, drop_path_rate=rate, **kw
    )


def _timm_convnext(rate):
    timm = pytest.importorskip("timm")
    return timm.create_model("convnext_tiny", num_classes=10, drop_path_rate=rate)


def _torchvision_convnext(rate):
    tv = pytest.importorskip("torchvision")
    return tv.models.convnext_tiny(weights=None, num_classes=10, stochastic_depth_prob=rate)


MODELS = {
    # name: (builder, block class name, rewired blocks, drop layer name, drop layers)
    "timm-vit-s": (_timm_vit, "Block", 11, "DropPath", 22),  # block 0 has rate 0: Identity
    "timm-convnext-t": (_timm_convnext, "ConvNeXtBlock", 17, "DropPath", 17),
    "torchvision-convnext-t": (_torchvision_convnext, "CNBlock", 18, "StochasticDepth", 18),
}


@pytest.mark.parametrize("name", MODELS)
def test_convert_skip_dropped_counts_eval_pickle(name):
    build, block, n_blocks, layer, n_layers = MODELS[name]
    torch.manual_seed(0)
    model = build(0.2).eval()
    x = randn((2, 3, 32, 32), torch.float32)
    before_sd = copy.deepcopy(model.state_dict())
    before_repr = repr(model)
    y0 = model(x)
    model, counts = fused_dropout.convert(model, skip_dropped=True)
    assert counts[f"skip_dropped:{block}"] == n_blocks
    assert counts[layer] == n_layers
    assert not any(k.startswith("not_skipped") for k in counts)
    assert repr(model) == before_repr
    sd = model.state_dict()
    assert list(sd) == list(before_sd)
    for k in sd:
        assert_bitwise(sd[k], before_sd[k], k)
    assert_bitwise(model(x), y0, "eval output")
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert_bitwise(loaded(x), y0, "eval output after pickling")
    # converting again changes nothing
    assert fused_dropout.convert(model, skip_dropped=True)[1] == {}


@pytest.mark.parametrize("name", MODELS)
def test_convert_skip_dropped_trains(name):
    """A few AdamW steps on one batch: the loss falls, and branches skip about the mean rate."""
    build = MODELS[name][0]
    torch.manual_seed(0)
    model, _ = fused_dropout.convert(build(0.4), skip_dropped=True)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, target = randn((6, 3, 32, 32), torch.float32), torch.arange(6)
    losses = []
    with skip.count_skipped() as c:
        for _ in range(4):
            loss = nn.functional.cross_entropy(model(x), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert 0.05 < c.skipped / c.samples < 0.4  # linear schedule to 0.4: mean rate about 0.2


def _block_inputs(model, block_type, x):
    """The input of every ``block_type`` module during an eval forward of ``model``."""
    inputs = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, args, n=n: inputs.setdefault(n, args[0]))
        for n, m in model.named_modules()
        if type(m).__name__ == block_type
    ]
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return inputs


def _timm_small(name):
    timm = pytest.importorskip("timm")
    return timm.create_model(name, img_size=32, num_classes=10, drop_path_rate=0.5)


def _timm_module(name):
    return importlib.import_module(f"timm.models.{name}")


def _tv_swin(v2):
    tv = pytest.importorskip("torchvision")
    return (tv.models.swin_v2_t if v2 else tv.models.swin_t)(weights=None, num_classes=10)


BLOCKS = {
    "timm-vit-Block": (lambda: _timm_vit(0.5), "Block", (2, 3, 32, 32)),
    "timm-vit-ResPostBlock": (
        lambda: _timm_vit(0.5, block_fn=_timm_module("vision_transformer").ResPostBlock),
        "ResPostBlock",
        (2, 3, 32, 32),
    ),
    "timm-ConvNeXtBlock": (lambda: _timm_convnext(0.5), "ConvNeXtBlock", (2, 3, 32, 32)),
    "torchvision-CNBlock": (lambda: _torchvision_convnext(0.5), "CNBlock", (2, 3, 32, 32)),
    "timm-cait-LayerScaleBlock": (
        lambda: _timm_small("cait_xxs24_224"),
        "LayerScaleBlock",
        (2, 3, 32, 32),
    ),
    "timm-convit-Block": (lambda: _timm_small("convit_tiny"), "Block", (2, 3, 32, 32)),
    "torchvision-Swin": (lambda: _tv_swin(False), "SwinTransformerBlock", (2, 3, 32, 32)),
    "torchvision-SwinV2": (lambda: _tv_swin(True), "SwinTransformerBlockV2", (2, 3, 32, 32)),
}


@pytest.mark.parametrize("name", BLOCKS)
def test_rewired_block_trains_like_the_converted_block(name):
    """Training forward and backward of each rewired block equal those of the same block
    converted without skipping (fused DropPath, same pairs drawn in the same order) within
    BLAS's batch-size rounding; rows whose every residual is dropped are the input exactly."""
    build, block_type, shape = BLOCKS[name]
    torch.manual_seed(0)
    model = build()
    for m in model.modules():  # p = 0.5 everywhere, so that samples are skipped
        if _layers.drop_kind(m):
            setattr(m, "drop_prob" if hasattr(m, "drop_prob") else "p", 0.5)
    # the last block: the first has rate 0 (no drop layer) in the linear schedule
    n, x = list(_block_inputs(model, block_type, randn(shape, torch.float32)).items())[-1]
    block = model.get_submodule(n)
    x = torch.cat([x] * 8)  # 16 samples
    plain, _ = fused_dropout.convert(copy.deepcopy(block).train())
    rewired, counts = fused_dropout.convert(copy.deepcopy(block).train(), skip_dropped=True)
    assert counts == {f"skip_dropped:{block_type}": 1, **_}
    results = []
    for b in (plain, rewired):
        torch.manual_seed(7)
        xx = x.clone().requires_grad_()
        y = b(xx)
        y.square().sum().backward()
        results.append((y.detach(), xx.grad, [p.grad for p in b.parameters()]))
    (y, gx, gp), (y2, gx2, gp2) = results
    torch.testing.assert_close(y2, y, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gx2, gx, rtol=1e-4, atol=1e-4)
    for g, g2 in zip(gp, gp2):  # sums over many rows: rounding relative to the largest term
        torch.testing.assert_close(g2, g, rtol=1e-3, atol=1e-4 * float(g.abs().max()))
    untouched = (y == x).flatten(1).all(1)  # every residual of these samples dropped
    assert 0 < int(untouched.sum()) < len(x)  # some samples skipped every branch, not all
    assert_bitwise(y2[untouched], x[untouched], "samples that skip every branch")


def test_batchnorm_blocks_are_left_unless_asked():
    """A known block whose branch holds a BatchNorm would get batch statistics of the kept
    samples only: convert leaves it (and says so) unless allow_batchnorm=True."""
    tv = pytest.importorskip("torchvision")
    model = tv.models.convnext_tiny(weights=None, stochastic_depth_prob=0.2)
    model.features[1][0].block[2] = nn.BatchNorm2d(96)  # replaces a LayerNorm; shapes differ
    with pytest.warns(UserWarning, match="BatchNorm"):
        _, counts = fused_dropout.convert(copy.deepcopy(model), skip_dropped=True)
    assert counts["not_skipped:CNBlock"] == 1 and counts["skip_dropped:CNBlock"] == 17
    _, counts = fused_dropout.convert(model, skip_dropped=True, allow_batchnorm=True)
    assert counts["skip_dropped:CNBlock"] == 18


def test_unknown_blocks_are_left_and_counted():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = nn.Linear(4, 4)
            self.drop_path = fused_dropout.DropPath(0.5)

        def forward(self, x):
            return x + self.drop_path(self.f(x))

    model = nn.Sequential(Residual(), Residual())
    with pytest.warns(UserWarning, match="unknown block"):
        _, counts = fused_dropout.convert(model, skip_dropped=True)
    assert counts == {"not_skipped:Residual": 2}
    assert type(model[0]) is Residual


def test_subset_mode_block_keeps_a_fixed_count():
    model, counts = fused_dropout.convert(_timm_vit(0.4), skip_dropped=True, skip_mode="subset")
    model.train()
    seen = []
    model.blocks[11].mlp.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    for _ in range(3):
        model(randn((10, 3, 32, 32), torch.float32))
    p = model.blocks[11].drop_path2.drop_prob  # about 0.4 (timm's schedule rounds it)
    assert seen == [max(int(10 * (1 - p)), 1)] * 3


# ---------------------------------------------------------------- CUDA


@pytest.mark.gpu
def test_cuda_matches_drop_path_add_without_a_sync():
    x = randn((64, 8), torch.float32).cuda()
    lin = nn.Linear(8, 8).cuda()
    torch.cuda.manual_seed(3)
    y = FD.drop_path_residual(x, lin, 0.5)
    state = torch.cuda.get_rng_state()
    torch.cuda.manual_seed(3)
    y2 = FD.drop_path_add(x, lin(x), 0.5)
    assert torch.equal(torch.cuda.get_rng_state(), state)  # advanced as one kernel call does
    torch.testing.assert_close(y, y2)


@pytest.mark.gpu
def test_cuda_graph_capture_raises():
    x = torch.randn(8, 4, device="cuda")
    g = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="drop_path_add"):
        with torch.cuda.graph(g):
            FD.drop_path_residual(x, torch.tanh, 0.5)
