"""``convert(model, fuse_norm=True)``: dropout (or drop path) + residual add + norm as one op.

Real models built tiny from their configs, without weights: a Hugging Face BERT (its
SelfOutput/Output found by their traced form) and a timm ViT (its ``Block``: the first
residual fused with ``norm2``, prenorm), plus single blocks of the other known forms. For each:

- counts, ``state_dict`` unchanged, pickling, converting twice;
- eval: each rewired block against its own forward in float64, by FlashAttention's rule (ours
  errs at most twice as much as torch's float32 forward, plus 1e-5: the norm's rounding), and
  the model's output within 1e-4 of the unconverted model's;
- training: the same masks as ``convert`` without ``fuse_norm`` (the outputs agree within the
  norm's rounding under the same seed), a few optimizer steps with falling loss;
- with ``functional=True`` and ``skip_dropped=True`` (skipping wins in training where a drop
  probability is above 0: the same kept samples as ``skip_dropped`` alone).
"""

from __future__ import annotations

import copy
import io
import operator

import pytest
import torch
from helpers import assert_bitwise, randn
from torch import nn

import fused_dropout
from fused_dropout import blocks, skip

ATOL = 1e-5  # fp32 outputs of a norm are of order 1: a few units of fp32's rounding


@pytest.fixture(autouse=True)
def _isolate_global_rng():
    with torch.random.fork_rng():
        torch.manual_seed(18)
        yield


def randomize(model: nn.Module) -> nn.Module:
    """Norm weights and biases and Linear biases away from their initial 1 and 0, at which a
    norm applied twice or a bias left out would go unseen."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.RMSNorm)) and m.weight is not None:
                m.weight.copy_(1 + 0.5 * torch.randn(m.weight.shape, generator=gen))
            if isinstance(m, (nn.LayerNorm, nn.Linear)) and m.bias is not None:
                m.bias.copy_(0.5 * torch.randn(m.bias.shape, generator=gen))
    return model


def _output(out):
    return out if isinstance(out, torch.Tensor) else out.logits


def _block_inputs(model, block_types, *args):
    """(path, block, args) of every module of ``block_types`` in an eval forward of ``model``."""
    seen = []
    hooks = [
        m.register_forward_pre_hook(lambda mod, a, n=n: seen.append((n, mod, a)))
        for n, m in model.named_modules()
        if type(m).__name__ in block_types
    ]
    with torch.no_grad():
        model.eval()(*args)
    for h in hooks:
        h.remove()
    return seen


def assert_blocks_within_norm_rounding(model, converted, block_types, *args):
    """Each rewired block's eval output against its original forward in float64: ours errs at
    most twice as much as the original forward in float32, plus ATOL."""
    found = _block_inputs(model, block_types, *args)
    assert found
    converted.eval()
    for path, block, inputs in found:
        rewired = converted.get_submodule(path)
        assert type(rewired) is not type(block) and isinstance(rewired, type(block)), path
        exact = copy.deepcopy(block).double()
        with torch.no_grad():
            ref = exact(*(t.double() for t in inputs))
            err = (rewired(*inputs).double() - ref).abs().max().item()
            base = (block(*inputs).double() - ref).abs().max().item()
        assert err <= 2 * base + ATOL, f"{path}: error {err:.3g}, torch's {base:.3g}"


def assert_state_dict_unchanged(converted, model):
    sd, before = converted.state_dict(), model.state_dict()
    assert list(sd) == list(before)
    for k in sd:
        assert_bitwise(sd[k], before[k], k)


def assert_pickles(model, *args):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert [type(m) for m in loaded.modules()] == [type(m) for m in model.modules()]
    with torch.no_grad():
        assert_bitwise(_output(loaded.eval()(*args)), _output(model.eval()(*args)), "pickled")


def train_losses(model, args, loss_fn, steps=4, lr=1e-3):
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn(_output(model(*args)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], losses
    return losses


def assert_same_training_forward(a, b, *args, tol=1e-4):
    """Under the same seed, two conversions draw the same masks: their training outputs agree
    within the norm's rounding (other masks would differ at order 1)."""
    a.train()
    b.train()
    with torch.no_grad():
        torch.manual_seed(11)
        ya = _output(a(*args))
        torch.manual_seed(11)
        yb = _output(b(*args))
        torch.manual_seed(12)
        other = _output(a(*args))
    torch.testing.assert_close(yb, ya, rtol=tol, atol=tol)
    assert (other - ya).abs().max() > 100 * tol  # the seed matters: dropout is active


# -------------------------------------------------------------------- Hugging Face BERT


def _bert(**config):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
        hidden_dropout_prob=0.2,
        attention_probs_dropout_prob=0.1,
        attn_implementation="eager",
        **config,
    )
    torch.manual_seed(0)
    return randomize(transformers.BertForSequenceClassification(config).eval())


IDS = torch.randint(0, 100, (4, 12), generator=torch.Generator().manual_seed(1))
LABELS = torch.tensor([0, 1, 2, 1])
BERT_BLOCKS = ("BertSelfOutput", "BertOutput")


def _ce(labels):
    return lambda logits: nn.functional.cross_entropy(logits, labels)


def test_bert_counts_state_dict_eval_pickle():
    model = _bert()
    converted, counts = fused_dropout.convert(copy.deepcopy(model), fuse_norm=True)
    plain_counts = fused_dropout.convert(copy.deepcopy(model))[1]
    assert counts == {
        "fuse_norm:BertSelfOutput": 2,
        "fuse_norm:BertOutput": 2,
        "not_fused:BertEmbeddings": 1,  # LayerNorm, then dropout: not this form
        **plain_counts,
    }
    for path in ("bert.encoder.layer.0.attention.output", "bert.encoder.layer.1.output"):
        block = converted.get_submodule(path)
        assert isinstance(block, type(model.get_submodule(path)))
        assert blocks.rewired_class(type(model.get_submodule(path))) is type(block)
    assert repr(converted) == repr(fused_dropout.convert(copy.deepcopy(model))[0])
    assert_state_dict_unchanged(converted, model)
    assert_blocks_within_norm_rounding(model, converted, BERT_BLOCKS, IDS)
    with torch.no_grad():
        torch.testing.assert_close(
            converted(IDS).logits, model(IDS).logits, rtol=0, atol=1e-4
        )  # fmt: skip
    assert_pickles(converted, IDS)
    # converting again rewires nothing more
    assert fused_dropout.convert(converted, fuse_norm=True)[1] == {"not_fused:BertEmbeddings": 1}


@pytest.mark.parametrize("functional", [False, True], ids=["modules", "functional"])
def test_bert_trains_with_the_same_masks(functional):
    model = _bert()
    fused, _ = fused_dropout.convert(copy.deepcopy(model), functional, fuse_norm=True)
    plain, _ = fused_dropout.convert(copy.deepcopy(model), functional)
    assert_same_training_forward(plain, fused, IDS)
    train_losses(fused, (IDS,), _ce(LABELS), steps=8, lr=1e-2)


def _saved_bytes(model, inputs):
    """Bytes of the distinct storages autograd saves in one training forward."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.train()(inputs)
    return sum(storages.values())


@pytest.mark.parametrize("make", ["bert", "vit"])
def test_fuse_norm_saves_less_for_backward(make):
    """The fused op keeps y, which the next layer keeps anyway, not h as LayerNorm(h) does:
    one activation less per fused norm (the row statistics stay; the op's pair is 16 B)."""
    model, inputs = (_bert(), IDS) if make == "bert" else (_vit(), torch.randn(2, 3, 32, 32))
    plain, _ = fused_dropout.convert(copy.deepcopy(model), functional=True)
    fused, counts = fused_dropout.convert(copy.deepcopy(model), functional=True, fuse_norm=True)
    fused_norms = sum(v for k, v in counts.items() if k.startswith("fuse_norm:"))
    activation = (IDS.numel() if make == "bert" else 2 * 17) * 32 * 4  # rows x hidden x fp32
    less = _saved_bytes(plain, inputs) - _saved_bytes(fused, inputs)
    assert less >= fused_norms * (activation - 16), (less, fused_norms, activation)


def test_bert_dense_bias_goes_into_the_op():
    """The Linear's bias is the op's input_bias: the Linear runs without it."""
    model, _ = fused_dropout.convert(_bert(), fuse_norm=True)
    block = model.bert.encoder.layer[0].output
    calls = []
    original = fused_dropout.functional.dropout_add_layer_norm

    def spy(*args, **kwargs):
        calls.append(kwargs["input_bias"])
        return original(*args, **kwargs)

    fused_dropout.functional.dropout_add_layer_norm = spy
    try:
        model(IDS)
    finally:
        fused_dropout.functional.dropout_add_layer_norm = original
    assert len(calls) == 4 and any(b is block.dense.bias for b in calls)


# -------------------------------------------------------------------- timm ViT


def _vit(rate=0.2, **kw):
    pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=3,
        num_heads=2,
        mlp_ratio=2.0,
        num_classes=10,
        init_values=0.1,  # layer scale
        drop_rate=0.1,
        proj_drop_rate=0.1,
        drop_path_rate=rate,
        **kw,
    )
    return randomize(model).eval()


X = randn((4, 3, 32, 32), torch.float32, 5)
Y = torch.tensor([0, 3, 5, 7])


def test_vit_counts_state_dict_eval_pickle():
    model = _vit()
    converted, counts = fused_dropout.convert(copy.deepcopy(model), fuse_norm=True)
    plain_counts = fused_dropout.convert(copy.deepcopy(model))[1]
    # every block: the first has drop rate 0 (Identity), still an add + norm2 to fuse
    assert counts == {"fuse_norm:Block": 3, "not_fused:VisionTransformer": 1, **plain_counts}
    assert_state_dict_unchanged(converted, model)
    assert_blocks_within_norm_rounding(model, converted, ("Block",), X)
    with torch.no_grad():
        torch.testing.assert_close(converted(X), model(X), rtol=0, atol=1e-4)
    assert_pickles(converted, X)
    assert fused_dropout.convert(converted, fuse_norm=True)[1] == {"not_fused:VisionTransformer": 1}


def test_vit_trains_with_the_same_masks():
    model = _vit(0.3)
    fused, _ = fused_dropout.convert(copy.deepcopy(model), fuse_norm=True)
    plain, _ = fused_dropout.convert(copy.deepcopy(model))
    assert_same_training_forward(plain, fused, X)
    train_losses(fused, (X,), _ce(Y))


def test_vit_first_residual_is_one_prenorm_op():
    """Block: y, x = op(ls1(attn(norm1(x))), x, norm2, drop_path1's p, per_sample, prenorm)."""
    model, _ = fused_dropout.convert(_vit(0.3), fuse_norm=True)
    block = model.blocks[2]
    calls = []
    original = fused_dropout.functional.dropout_add_layer_norm

    def spy(*args, **kwargs):
        calls.append((args[2], args[4], kwargs["per_sample"], kwargs["prenorm"]))
        return original(*args, **kwargs)

    fused_dropout.functional.dropout_add_layer_norm = spy
    try:
        model.train()(X)
    finally:
        fused_dropout.functional.dropout_add_layer_norm = original
    assert len(calls) == 3  # one per block
    assert calls[-1] == (block.norm2.weight, block.drop_path1.drop_prob, True, True)


@pytest.mark.parametrize("skip_mode", ["sample", "subset"])
def test_vit_with_skip_dropped_skips_in_training_and_fuses_otherwise(skip_mode):
    model = _vit(0.4)
    both, counts = fused_dropout.convert(
        copy.deepcopy(model), fuse_norm=True, skip_dropped=True, skip_mode=skip_mode
    )
    assert counts["fuse_norm:Block"] == 3 and counts["skip_dropped:Block"] == 2
    skipping, _ = fused_dropout.convert(
        copy.deepcopy(model), skip_dropped=True, skip_mode=skip_mode
    )  # fmt: skip
    # training: the samples skip_dropped alone keeps (block 0, rate 0, is fused instead)
    with skip.count_skipped() as c:
        assert_same_training_forward(skipping, both, X)
    assert c.skipped > 0
    # eval: the fused forward
    assert_blocks_within_norm_rounding(model, both, ("Block",), X)
    assert_pickles(both, X)
    train_losses(both, (X,), _ce(Y))


# -------------------------------------------------------------------- other known blocks


def _cait():
    from timm.models.cait import LayerScaleBlock

    return LayerScaleBlock(32, 2, drop_path=0.5, init_values=0.1), (8, 10, 32)


def _convit():
    from timm.models.convit import Block

    return Block(32, 2, drop_path=0.5, use_gpsa=False), (8, 10, 32)


def _swin():
    from torchvision.models.swin_transformer import SwinTransformerBlock

    return SwinTransformerBlock(32, 2, [4, 4], [0, 0], stochastic_depth_prob=0.5), (8, 4, 4, 32)


def _res_post():
    from timm.models.vision_transformer import ResPostBlock

    return ResPostBlock(32, 2, drop_path=0.5), (8, 10, 32)


OTHER_BLOCKS = {"cait": _cait, "convit": _convit, "torchvision-swin": _swin}


@pytest.mark.parametrize("name", OTHER_BLOCKS)
def test_other_known_blocks(name):
    pytest.importorskip("timm")
    pytest.importorskip("torchvision")
    torch.manual_seed(0)
    block, shape = OTHER_BLOCKS[name]()
    x = randn(shape, torch.float32, 3)
    holder = randomize(nn.Sequential(block)).eval()
    converted, counts = fused_dropout.convert(copy.deepcopy(holder), fuse_norm=True)
    assert counts[f"fuse_norm:{type(block).__name__}"] == 1
    assert_state_dict_unchanged(converted, holder)
    assert_blocks_within_norm_rounding(holder, converted, (type(block).__name__,), x)
    plain, _ = fused_dropout.convert(copy.deepcopy(holder))
    assert_same_training_forward(plain, converted, x)
    assert_pickles(converted, x)


def test_known_blocks_without_a_norm_after_the_add_are_not_fused():
    """ResPostBlock normalizes inside the branch: nothing to fuse; counted, left as it is."""
    pytest.importorskip("timm")
    block, _ = _res_post()
    model = nn.Sequential(block)
    plain_counts = fused_dropout.convert(copy.deepcopy(model))[1]
    _, counts = fused_dropout.convert(model, fuse_norm=True)
    assert counts == {"not_fused:ResPostBlock": 1, **plain_counts}
    assert type(model[0]) is type(block)


# -------------------------------------------------------------------- the traced form


class Output(nn.Module):
    """BertOutput's form under other names, the operands of the add swapped, an RMSNorm."""

    def __init__(self, norm=None, drop=None, add=operator.add):
        super().__init__()
        self.proj = nn.Linear(16, 8)
        self.drop = drop if drop is not None else nn.Dropout(0.3)
        self.rms = norm if norm is not None else nn.RMSNorm(8)
        self.add = add

    def forward(self, x, skip):
        return self.rms(self.add(skip, self.drop(self.proj(x))))


class TwiceOutput(Output):
    def forward(self, x, skip):
        return 2 * super().forward(x, skip)


class SubLayerNorm(nn.LayerNorm):
    pass


def test_any_module_of_the_form_is_found_by_its_graph():
    a, r = randn((3, 5, 16), torch.float32, 1), randn((3, 5, 8), torch.float32, 2)
    model = nn.Sequential()
    model.out = randomize(Output())
    converted, counts = fused_dropout.convert(copy.deepcopy(model), fuse_norm=True)
    assert counts == {"fuse_norm:Output": 1, "Dropout": 1}
    form = converted.out._fused_dropout_rewiring.form
    assert form == blocks.PostNorm(("x", "skip"), "proj", "drop", "rms")
    for module in (model.out, converted.out):
        module.eval()
    exact = copy.deepcopy(model.out).double()
    with torch.no_grad():
        ref = exact(a.double(), r.double())
        err = (converted.out(a, r).double() - ref).abs().max().item()
        base = (model.out(a, r).double() - ref).abs().max().item()
        assert err <= 2 * base + ATOL
        # keywords as the forward names them
        assert_bitwise(converted.out(a, skip=r), converted.out(a, r), "keyword call")
        assert_bitwise(converted.out(x=a, skip=r), converted.out(a, r), "keyword call")
    plain, _ = fused_dropout.convert(copy.deepcopy(model))
    assert_same_training_forward(plain.out, converted.out, a, r)


@pytest.mark.parametrize(
    "make",
    [
        lambda: TwiceOutput(),  # another graph
        lambda: Output(drop=nn.Dropout1d(0.3)),  # channel-wise: not the op's mask
        lambda: Output(norm=nn.LayerNorm([5, 8])),  # over two dims
        lambda: Output(norm=SubLayerNorm(8)),  # a subclass: its forward may differ
        lambda: Output(add=torch.sub),
    ],
    ids=["other-graph", "dropout1d", "two-dims", "norm-subclass", "sub"],
)
def test_other_forms_are_left_and_counted(make):
    model = nn.Sequential(make())
    before = type(model[0])
    counts = fused_dropout.convert(model, fuse_norm=True)[1]
    assert counts[f"not_fused:{before.__name__}"] == 1
    assert not any(k.startswith("fuse_norm") for k in counts)
    assert type(model[0]) is before


def test_hooked_layers_are_not_fused():
    """A hook on the dropout or the norm would not run inside the op: left as it is."""
    model = nn.Sequential(Output(), Output())
    model[0].rms.register_forward_hook(lambda *a: None)
    model[1].drop.register_forward_pre_hook(lambda *a: None)
    assert fused_dropout.convert(model, fuse_norm=True)[1]["not_fused:Output"] == 2


@pytest.mark.parametrize("name", ["bert", "vit"])
def test_autocast_bf16(name):
    """Under CPU autocast a bf16 branch meets an fp32 residual: the operands are promoted as
    the add promotes them, so outputs match the unconverted model's in bf16, and it trains."""
    model, args = (_bert(), (IDS,)) if name == "bert" else (_vit(0.2), (X,))
    converted, _ = fused_dropout.convert(copy.deepcopy(model), fuse_norm=True)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = _output(model(*args)), _output(converted(*args))
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=2**-7, atol=2**-7)
    converted.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _output(converted(*args)).float().square().mean().backward()
    grads = [p.grad for p in converted.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
