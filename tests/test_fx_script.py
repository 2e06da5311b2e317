"""FX and TorchScript on converted models, as they work on the unconverted ones.

- The modules are FX leaves (one ``call_module`` node, ``training`` read at run time) and the
  functionals are ``torch.fx.wrap`` leaves.
- ``torch.jit.script`` compiles every module's forward (it calls the registered ops), and
  ``torch.jit.trace`` records them.
- Real models (timm ViT, ConvNeXt, EfficientNet; torchvision ConvNeXt, EfficientNet), built
  tiny and without weights: the traced/scripted copy gives bitwise the outputs of the converted
  module under the same seed, in training and in eval; torchvision's
  ``create_feature_extractor`` and timm's FX feature path (``FeatureGraphNet``) work.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from helpers import TORCH_2_6, assert_bitwise
from torch import nn

import fused_dropout
from fused_dropout import functional as FD

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:FutureWarning")

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _run(fn, seed, *args):
    torch.manual_seed(seed)
    return fn(*args)


def _same_outputs(reference: nn.Module, copy_: nn.Module, x: torch.Tensor, train: bool) -> None:
    reference.train(train)
    copy_.train(train)
    with torch.no_grad():
        a, b = _run(reference, 7, x), _run(copy_, 7, x)
    assert_bitwise(b, a)


# ------------------------------------------------------------------- the modules themselves

ALL_MODULES = [
    fused_dropout.Dropout(0.3),
    fused_dropout.Dropout1d(0.3),
    fused_dropout.Dropout2d(0.3),
    fused_dropout.Dropout3d(0.3),
    fused_dropout.AlphaDropout(0.3),
    fused_dropout.FeatureAlphaDropout(0.3),
    fused_dropout.DropPath(0.3),
    fused_dropout.StochasticDepth(0.3, "row"),
]
INPUT_SHAPES = [(4, 6, 5), (4, 6, 5), (4, 6, 5, 5), (4, 6, 3, 5, 5), (4, 6), (4, 6, 5), (4, 6, 5)]
INPUT_SHAPES += [(4, 6, 5)]


@pytest.mark.parametrize(
    "index", range(len(ALL_MODULES)), ids=lambda i: type(ALL_MODULES[i]).__name__
)
def test_each_module_is_one_fx_node_scripts_and_traces(index):
    module = ALL_MODULES[index]
    x = torch.randn(INPUT_SHAPES[index])
    model = nn.Sequential(nn.Identity(), module)
    gm = torch.fx.symbolic_trace(model)
    calls = [n for n in gm.graph.nodes if n.op == "call_module"]
    assert [n.target for n in calls] == ["0", "1"]  # a leaf, like torch's Dropout
    assert gm.get_submodule("1") is module
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dropout2d/3d rank warnings are not the subject here
        for train in (True, False):
            _same_outputs(model, gm, x, train)  # training follows gm.train()/eval() at run time
        scripted = torch.jit.script(model)
        for train in (True, False):
            _same_outputs(model, scripted, x, train)
    model.eval()
    traced = torch.jit.trace(model, x)
    assert torch.equal(traced(x), x)


def test_fused_add_modules_script_and_fx():
    r, b = torch.randn(4, 6), torch.randn(4, 6)
    bias = torch.randn(6)
    for module, args in (
        (fused_dropout.DropPathAdd(0.3), (r, b)),
        (fused_dropout.DropoutAdd(0.3), (b, r)),
        (fused_dropout.BiasDropoutAdd(0.3), (b, bias, r)),
    ):
        scripted = torch.jit.script(module)
        holder = Holder(module)
        gm = torch.fx.symbolic_trace(holder, concrete_args={"c": None} if len(args) == 2 else None)
        assert [n.op for n in gm.graph.nodes].count("call_module") == 1
        assert torch.equal(_run(module, 3, *args), _run(scripted, 3, *args))
        assert torch.equal(_run(holder, 3, *args), _run(gm, 3, *args))
        with pytest.raises(NotImplementedError, match="cannot be traced as the root"):
            torch.fx.symbolic_trace(module)


@pytest.mark.parametrize(
    "module",
    [
        fused_dropout.DropoutAddLayerNorm(6, 0.3),
        fused_dropout.DropoutAddRMSNorm(6, 0.3),
        fused_dropout.DropoutAddLayerNorm(6, 0.3, prenorm=True),
    ],
    ids=["layer", "rms", "layer-prenorm"],
)
def test_norm_modules_script_and_fx(module):
    x, r = torch.randn(4, 6), torch.randn(4, 6)
    scripted = torch.jit.script(module)
    holder = Holder(module)
    gm = torch.fx.symbolic_trace(holder, concrete_args={"c": None})
    assert [n.op for n in gm.graph.nodes].count("call_module") == 1
    for train in (True, False):
        for m in (module, scripted, gm):
            m.train(train)
        want = _run(module, 3, x, r)
        for got in (_run(scripted, 3, x, r), _run(gm, 3, x, r)):
            pairs = zip(got, want) if module.prenorm else [(got, want)]
            assert all(torch.equal(a, b) for a, b in pairs)
    with pytest.raises(NotImplementedError, match="cannot be traced as the root"):
        torch.fx.symbolic_trace(module)


class Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, a, b, c=None):
        return self.layer(a, b) if c is None else self.layer(a, b, c)


def test_scripted_module_saves_and_loads(tmp_path):
    model = nn.Sequential(nn.Linear(6, 6), fused_dropout.Dropout(0.4), fused_dropout.DropPath(0.2))
    path = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    loaded = torch.jit.load(str(path))
    x = torch.randn(4, 6)
    _same_outputs(model, loaded, x, True)
    assert "fused_dropout::dropout" in str(loaded.inlined_graph)  # our op, not aten's


def test_functionals_are_fx_leaves():
    class UsesFunctionals(nn.Module):
        def forward(self, x):
            y = FD.dropout(x, 0.2, self.training)
            y = FD.drop_path_add(x, y, 0.3, self.training)
            return FD.dropout2d(y.unsqueeze(-1), 0.1, self.training).squeeze(-1)

    model = UsesFunctionals()
    gm = torch.fx.symbolic_trace(model)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert FD.dropout in targets and FD.drop_path_add in targets and FD.dropout2d in targets
    _same_outputs(model, gm, torch.randn(4, 6, 3), True)


# ------------------------------------------------------------------- real models


def _timm(name):
    kwargs = {"img_size": 32, "depth": 3} if name.startswith("vit") else {}
    return timm.create_model(name, num_classes=10, drop_rate=0.1, drop_path_rate=0.1, **kwargs)


def _torchvision(name):
    return getattr(torchvision.models, name)(num_classes=10, stochastic_depth_prob=0.1)


MODELS = {
    "timm_vit": lambda: _timm("vit_tiny_patch16_224"),
    "timm_convnext": lambda: _timm("convnext_atto"),
    "timm_efficientnet": lambda: _timm("efficientnet_b0"),
    "torchvision_convnext": lambda: _torchvision("convnext_tiny"),
    "torchvision_efficientnet": lambda: _torchvision("efficientnet_b0"),
}
# Scripting these takes 30-80 s each on 2 cores: CI runs them as slow tests.
SLOW_SCRIPT = {"timm_efficientnet", "torchvision_convnext", "torchvision_efficientnet"}


def _converted(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    model, counts = fused_dropout.convert(model)
    assert counts  # the model holds dropout-family layers
    return model


# timm's ViT attention passes is_causal (an FX proxy under symbolic_trace) to
# F.scaled_dot_product_attention, which torch 2.6 rejects: the unconverted model fails alike.
_VIT_FX = pytest.mark.xfail(
    TORCH_2_6,
    reason="torch 2.6 cannot FX-trace timm's ViT at all (is_causal must be bool, not Proxy)",
    strict=True,
)


def _fx_params(names):
    return [pytest.param(n, marks=_VIT_FX) if n == "timm_vit" else n for n in names]


@pytest.mark.parametrize("name", _fx_params(MODELS))
def test_fx_round_trip_of_converted_model(name):
    model = _converted(name)
    # Traced once per mode: other layers (timm's BatchNormAct2d) bake ``training`` into the graph.
    for train in (True, False):
        model.train(train)
        gm = torch.fx.symbolic_trace(model)
        calls = [gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"]
        assert any(type(m).__module__.startswith("fused_dropout") for m in calls)
        _same_outputs(model, gm, X, train)
    gm.train()
    gm(X).sum().backward()  # trains through the graph


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_SCRIPT else n for n in MODELS],
)
def test_torchscript_round_trip_of_converted_model(name):
    model = _converted(name)
    scripted = torch.jit.script(model)
    for train in (True, False):
        _same_outputs(model, scripted, X, train)
    model.eval()
    traced = torch.jit.trace(model, X)
    with torch.no_grad():
        assert_bitwise(traced(X), model(X), "traced")


def test_create_feature_extractor_on_converted_torchvision_convnext():
    from torchvision.models.feature_extraction import create_feature_extractor

    model = _converted("torchvision_convnext")
    nodes = {"features.3": "c3", "features.7": "c7"}
    extractor = create_feature_extractor(model, return_nodes=nodes)
    for train in (True, False):
        model.train(train)
        extractor.train(train)
        captured: dict[str, torch.Tensor] = {}
        hooks = [
            model.get_submodule(path).register_forward_hook(
                lambda m, i, o, key=key, into=captured: into.__setitem__(key, o)
            )
            for path, key in nodes.items()
        ]
        with torch.no_grad():
            _run(model, 5, X)
            got = _run(extractor, 5, X)
        for h in hooks:
            h.remove()
        assert got.keys() == captured.keys()
        for key in got:
            assert_bitwise(got[key], captured[key], key)


@pytest.mark.parametrize("name", _fx_params(["timm_convnext", "timm_efficientnet", "timm_vit"]))
def test_timm_fx_feature_path_on_converted_model(name):
    from timm.models import FeatureGraphNet

    model = _converted(name)
    features = FeatureGraphNet(copy.deepcopy(model), out_indices=(1, 2))
    assert any(
        type(m).__module__.startswith("fused_dropout") for m in features.graph_module.modules()
    )
    features.train()
    outs = _run(features, 9, X)
    assert len(outs) == 2 and all(torch.isfinite(o).all() for o in outs)
    sum(o.sum() for o in outs).backward()
