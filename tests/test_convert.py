"""fused_dropout.convert: swapping the dropout-family layers of existing models.

Plain torch models first, then real architectures built without weights and tiny
(timm ViT and ConvNeXt, torchvision EfficientNet and ConvNeXt, Hugging Face BERT), each
skipped when its package is absent. For each: the counts, eval outputs bitwise unchanged,
a few training steps with finite and decreasing loss, idempotence.
"""

from __future__ import annotations

import collections
import copy
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers import bits
from torch import nn

import fused_dropout
from fused_dropout import modules as FM
from fused_dropout.convert import convert

REPO = Path(__file__).resolve().parent.parent

TORCH_KINDS = [
    "Dropout",
    "Dropout1d",
    "Dropout2d",
    "Dropout3d",
    "AlphaDropout",
    "FeatureAlphaDropout",
]


@pytest.fixture(autouse=True)
def _isolate_global_rng():
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        yield


def expected_counts(model: nn.Module) -> dict[str, int]:
    """Counts computed independently: exact types by their qualified names."""
    names = {f"torch.nn.modules.dropout.{k}": k for k in TORCH_KINDS}
    names["timm.layers.drop.DropPath"] = "DropPath"
    names["torchvision.ops.stochastic_depth.StochasticDepth"] = "StochasticDepth"
    seen = {id(m): m for m in model.modules()}.values()
    c = collections.Counter(
        names[f"{type(m).__module__}.{type(m).__qualname__}"]
        for m in seen
        if f"{type(m).__module__}.{type(m).__qualname__}" in names
    )
    return dict(c)


def structure(model: nn.Module) -> list[tuple[str, int]]:
    return [(name, id(m)) for name, m in model.named_modules(remove_duplicate=False)]


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def check_model(model, make_input, loss_fn, lr, steps=4, optim="adam"):
    """Convert a deep copy of ``model``; returns the counts. Checks eval equality, training."""
    model.eval()
    inputs = make_input()
    with torch.no_grad():
        before = model(*inputs)
    converted = copy.deepcopy(model)
    want = expected_counts(converted)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no unknown subclasses in these models
        out, counts = convert(converted)
    assert out is converted
    assert counts == want
    assert expected_counts(converted) == {}  # nothing of a replaced kind is left
    assert converted.state_dict().keys() == model.state_dict().keys()
    for (ka, va), (kb, vb) in zip(converted.state_dict().items(), model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    # eval: identical outputs, bit for bit
    with torch.no_grad():
        after = converted(*inputs)
    before = before if isinstance(before, torch.Tensor) else before.logits
    after = after if isinstance(after, torch.Tensor) else after.logits
    assert bitwise_equal(after, before)
    # converting again changes nothing
    ids = structure(converted)
    out2, counts2 = convert(converted)
    assert out2 is converted and counts2 == {} and structure(converted) == ids
    # training: dropout is active, the loss is finite and goes down on a fixed batch
    converted.train()
    with torch.no_grad():
        a, b = converted(*inputs), converted(*inputs)
    a = a if isinstance(a, torch.Tensor) else a.logits
    b = b if isinstance(b, torch.Tensor) else b.logits
    assert not torch.equal(a, b), "training outputs do not vary: dropout inactive?"
    opt = (torch.optim.Adam if optim == "adam" else torch.optim.SGD)(converted.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(converted(*inputs))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], losses
    grads = [p.grad for p in converted.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    return counts


def ce(target):
    return lambda out: nn.functional.cross_entropy(
        out if isinstance(out, torch.Tensor) else out.logits, target
    )


# -------------------------------------------------------------------- plain torch


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        return self.drop(self.lin(x))


def _torch_zoo() -> nn.Sequential:
    return nn.Sequential(
        nn.Dropout(0.2, inplace=True),
        nn.Dropout1d(0.3),
        nn.Dropout2d(0.4, inplace=True),
        nn.Dropout3d(0.5),
        nn.AlphaDropout(0.6),
        nn.FeatureAlphaDropout(0.7, inplace=True),
        nn.ModuleList([nn.Dropout(0.15), nn.ModuleDict({"d": nn.Dropout2d(0.25)})]),
        _Block(),
        nn.Identity(),
    )


def test_all_torch_kinds_replaced_with_same_parameters():
    model = _torch_zoo()
    model[3].eval()  # mixed training flags are kept per module
    old = {name: m for name, m in model.named_modules()}
    out, counts = convert(model)
    assert out is model
    assert counts == {
        "Dropout": 3,
        "Dropout1d": 1,
        "Dropout2d": 2,
        "Dropout3d": 1,
        "AlphaDropout": 1,
        "FeatureAlphaDropout": 1,
    }
    new = dict(model.named_modules())
    assert new.keys() == old.keys()
    for name, m in new.items():
        o = old[name]
        kind = type(o).__name__
        if kind in TORCH_KINDS:
            assert type(m) is getattr(FM, kind), name
            assert isinstance(m, type(o))  # fused modules subclass torch's
            assert (m.p, m.inplace, m.training) == (o.p, o.inplace, o.training), name
            assert repr(m) == repr(o)
        else:
            assert m is o, name  # containers and other layers untouched
    assert model[3].training is False and model[2].training is True


def test_root_module_is_replaced_and_returned():
    d = nn.Dropout2d(0.3, inplace=True).eval()
    out, counts = convert(d)
    assert type(out) is FM.Dropout2d and counts == {"Dropout2d": 1}
    assert (out.p, out.inplace, out.training) == (0.3, True, False)


def test_shared_module_replaced_once_and_stays_shared():
    shared = nn.Dropout(0.2)
    model = nn.Sequential(nn.Linear(4, 4), shared, nn.Linear(4, 4), shared)
    _, counts = convert(model)
    assert counts == {"Dropout": 1}
    assert model[1] is model[3] and type(model[1]) is FM.Dropout


def test_hooks_and_extra_attributes_are_kept():
    model = nn.Sequential(nn.Dropout(0.5))
    calls = []
    handle = model[0].register_forward_hook(lambda mod, inp, out: calls.append(type(mod)))
    model[0].note = "kept"
    convert(model)
    model(torch.ones(3))
    assert calls == [FM.Dropout] and model[0].note == "kept"
    handle.remove()  # the handle still refers to the (moved) hook dict
    model(torch.ones(3))
    assert len(calls) == 1


class MyDropout(nn.Dropout):
    def forward(self, x):
        return super().forward(x) * 1.0


class MyFusedDropout(FM.Dropout):
    pass


def test_unknown_subclass_left_alone_and_reported():
    model = nn.Sequential(MyDropout(0.1), nn.Dropout(0.1), MyDropout(0.2), MyFusedDropout(0.3))
    before = list(model)
    with pytest.warns(UserWarning, match=r"MyDropout.*'0', '2'") as rec:
        _, counts = convert(model)
    assert len(rec) == 1 and "test_convert.MyDropout" in str(rec[0].message)
    assert rec[0].filename == __file__  # attributed to the caller of convert
    assert counts == {"skipped:MyDropout": 2, "Dropout": 1}
    assert model[0] is before[0] and model[2] is before[2] and model[3] is before[3]
    assert type(model[1]) is FM.Dropout
    # subclasses of fused_dropout's modules count as converted: no warning, no count
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert convert(nn.Sequential(MyFusedDropout(0.3)))[1] == {}


def test_convert_twice_changes_nothing():
    model = _torch_zoo()
    convert(model)
    ids = structure(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, counts = convert(model)
    assert out is model and counts == {} and structure(model) == ids


def test_exported_from_package():
    assert fused_dropout.convert is convert


def test_convert_imports_neither_timm_nor_torchvision():
    code = (
        "import sys, torch\n"
        "import fused_dropout\n"
        "from fused_dropout.convert import convert\n"
        "m, c = convert(torch.nn.Sequential(torch.nn.Dropout(0.1)))\n"
        "assert c == {'Dropout': 1}, c\n"
        "bad = [k for k in sys.modules if k.split('.')[0] in ('timm', 'torchvision')]\n"
        "assert not bad, bad\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stdout + r.stderr


# -------------------------------------------------------------------- timm


def test_timm_drop_path_and_alias():
    timm_layers = pytest.importorskip("timm.layers")
    model = nn.Sequential(
        timm_layers.DropPath(0.2), timm_layers.DropPath(0.3, scale_by_keep=False).eval()
    )
    _, counts = convert(model)
    assert counts == {"DropPath": 2}
    # Ours, and still timm's (convert makes the swapped-in class subclass timm's too).
    for m in model:
        assert isinstance(m, FM.DropPath) and isinstance(m, timm_layers.DropPath)
    assert (model[0].drop_prob, model[0].scale_by_keep, model[0].training) == (0.2, True, True)
    assert (model[1].drop_prob, model[1].scale_by_keep, model[1].training) == (0.3, False, False)
    assert repr(model[0]) == repr(timm_layers.DropPath(0.2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # timm.models.layers is a deprecated alias
        from timm.models.layers import DropPath as AliasDropPath
    assert AliasDropPath is timm_layers.DropPath
    _, counts = convert(nn.Sequential(AliasDropPath(0.1)))
    assert counts == {"DropPath": 1}

    class MyDropPath(timm_layers.DropPath):
        pass

    with pytest.warns(UserWarning, match="MyDropPath"):
        assert convert(nn.Sequential(MyDropPath(0.1)))[1] == {"skipped:MyDropPath": 1}


def test_timm_vit():
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
        drop_rate=0.1,
        proj_drop_rate=0.1,
        attn_drop_rate=0.1,
        drop_path_rate=0.1,
    )
    x = torch.randn(4, 3, 32, 32)
    y = torch.tensor([0, 3, 5, 7])
    counts = check_model(model, lambda: (x,), ce(y), lr=3e-3)
    # depth 3 with drop_path_rate 0.1: the first block's rate is 0 (Identity), two blocks x 2
    assert counts["DropPath"] == 4
    # pos_drop, head_drop, and per block attn_drop, proj_drop, mlp drop1, drop2
    assert counts["Dropout"] == 2 + 3 * 4


def test_timm_convnext():
    pytest.importorskip("timm")
    from timm.models.convnext import ConvNeXt

    torch.manual_seed(0)
    model = ConvNeXt(
        depths=(1, 1, 1, 1),
        dims=(8, 16, 32, 64),
        num_classes=10,
        drop_rate=0.1,
        drop_path_rate=0.2,
    )
    x = torch.randn(4, 3, 32, 32)
    y = torch.tensor([1, 2, 3, 4])
    counts = check_model(model, lambda: (x,), ce(y), lr=3e-3)
    assert counts["DropPath"] == 3  # 4 blocks, the first with rate 0


# -------------------------------------------------------------------- torchvision


def test_torchvision_efficientnet():
    models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    model = models.efficientnet_b0(weights=None, num_classes=10, stochastic_depth_prob=0.2)
    x = torch.randn(4, 3, 32, 32)
    y = torch.tensor([0, 1, 2, 3])
    counts = check_model(model, lambda: (x,), ce(y), lr=1e-3)
    assert counts == {"StochasticDepth": 16, "Dropout": 1}
    sd = [m for m in model.modules() if type(m).__name__ == "StochasticDepth"]
    assert {m.mode for m in sd} == {"row"}


def test_torchvision_convnext_tiny_dims():
    pytest.importorskip("torchvision")
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    torch.manual_seed(0)
    model = ConvNeXt(
        [CNBlockConfig(8, 16, 2), CNBlockConfig(16, None, 2)],
        stochastic_depth_prob=0.3,
        num_classes=10,
    )
    x = torch.randn(4, 3, 32, 32)
    y = torch.tensor([0, 1, 2, 3])
    counts = check_model(model, lambda: (x,), ce(y), lr=3e-3)
    assert counts == {"StochasticDepth": 4}


def test_torchvision_stochastic_depth_batch_mode():
    ops = pytest.importorskip("torchvision.ops")
    model = nn.Sequential(ops.StochasticDepth(0.3, "batch"), ops.StochasticDepth(0.1, "row"))
    _, counts = convert(model)
    assert counts == {"StochasticDepth": 2}
    assert [(m.p, m.mode) for m in model] == [(0.3, "batch"), (0.1, "row")]
    assert all(isinstance(m, (FM.StochasticDepth)) for m in model)
    assert all(isinstance(m, ops.StochasticDepth) for m in model)
    assert repr(model[0]) == "StochasticDepth(p=0.3, mode=batch)"


# -------------------------------------------------------------------- Hugging Face


def test_huggingface_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    ids = torch.randint(0, 100, (4, 12), generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 1])
    counts = check_model(model, lambda: (ids,), ce(y), lr=1e-3)
    # embeddings, classifier, and per layer at least the attention-output and FFN dropouts;
    # attention-probability dropout is functional (F.dropout / SDPA) and stays as it is
    assert counts.keys() == {"Dropout"} and counts["Dropout"] >= 2 + 2 * 2


def test_converted_external_layers_pickle_with_the_model():
    timm_layers = pytest.importorskip("timm.layers")
    ops = pytest.importorskip("torchvision.ops")
    import io

    model, _ = convert(nn.Sequential(timm_layers.DropPath(0.1), ops.StochasticDepth(0.2, "row")))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert [type(m) for m in loaded] == [type(m) for m in model]
    assert isinstance(loaded[0], timm_layers.DropPath)
    assert isinstance(loaded[1], ops.StochasticDepth)
    assert repr(loaded) == repr(model)
