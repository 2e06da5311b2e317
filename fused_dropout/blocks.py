"""The residual blocks ``convert`` rewires, and how their rewired classes are made and pickled.

- ``convert(model, skip_dropped=True)`` makes a known block run each residual branch on the
  samples its drop-path layer keeps only (:func:`fused_dropout.skip.drop_path_residual`).
- ``convert(model, fuse_norm=True)`` makes a known block compute ``norm(residual +
  dropout(x))`` as one op (:func:`fused_dropout.functional.dropout_add_layer_norm`,
  ``dropout_add_rms_norm``), in training and in eval.

Known are the blocks of ``_BLOCKS`` (by class: each entry states its residual structure as a
:class:`Form`), and, for ``fuse_norm``, any module whose forward is ``norm(dropout(f(a)) + b)``
(:class:`PostNorm`: the Hugging Face BERT family's SelfOutput/Output and their copies), found
by tracing its forward with torch.fx, its children as leaves.

Either way, the block's class is swapped, in place, for a subclass (:func:`rewired_class`, one
per block class: same name, so ``repr``, ``state_dict`` and ``isinstance`` hold) whose
``forward`` does what the instance's :class:`Rewiring` says and otherwise runs the original
``forward``. Each rewired class is an attribute of this module, made on first use, so models
holding one pickle.
"""

from __future__ import annotations

import importlib
import operator
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fused_dropout import _layers, skip
from fused_dropout import functional as FD

__all__ = ["Rewiring", "rewire", "rewired_class"]

Branch = Callable[[Tensor], Tensor]
# A block's training forward as residuals: for each, the drop-path layer that decides it and the
# branch. None: run the block's own forward (arguments we cannot split per sample).
Plan = list[tuple[nn.Module, Branch]] | None
# A drop layer as the fused op takes it: (p, training, per_sample).
Drop = tuple[float, bool, bool]


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _fusable_drop(layer: nn.Module) -> Drop | None:
    """(p, training, per_sample) of a drop layer the fused op computes exactly as its forward
    does: element-wise dropout, drop path (scaled by 1/keep), row stochastic depth, Identity."""
    if _hooked(layer):
        return None
    if isinstance(layer, nn.Identity):
        return 0.0, False, False
    kind = _layers.layer_kind(layer)
    if kind == "Dropout":
        return float(layer.p), layer.training, False
    if kind == "DropPath" and layer.scale_by_keep:
        return float(layer.drop_prob), layer.training, True
    if kind == "StochasticDepth" and layer.mode == "row":
        return float(layer.p), layer.training, True
    return None  # channel-wise or alpha dropout, no 1/keep scale, a whole-batch decision


def _fusable_norm(layer: nn.Module) -> bool:
    return _layers.norm_kind(layer) is not None and not _hooked(layer)


def _dropout_add_norm(
    norm: nn.Module,
    input: Tensor,
    residual: Tensor,
    drop: Drop,
    *,
    prenorm: bool = False,
    input_bias: Tensor | None = None,
) -> Any:
    """``norm(residual + drop(input + input_bias))`` by the fused op (and the sum if prenorm)."""
    p, training, per_sample = drop
    # Operands in one dtype, as the add promotes them (autocast: a bf16 branch, an fp32
    # residual); the norm's parameters in it too unless fp32, which the op takes as they are.
    dtype = torch.promote_types(input.dtype, residual.dtype)

    def cast(t: Tensor | None, keep_fp32: bool = False) -> Tensor | None:
        if t is None or (keep_fp32 and t.dtype == torch.float32):
            return t
        return t.to(dtype)

    # memory_efficient: backward keeps y, which the next layer keeps anyway, instead of h.
    keywords = dict(
        input_bias=cast(input_bias), per_sample=per_sample, prenorm=prenorm, memory_efficient=True
    )
    input, residual, weight = cast(input), cast(residual), cast(norm.weight, True)
    if _layers.norm_kind(norm) == "LayerNorm":
        bias = cast(norm.bias, True)
        return FD.dropout_add_layer_norm(
            input, residual, weight, bias, p, training, norm.eps, **keywords
        )
    return FD.dropout_add_rms_norm(input, residual, weight, p, training, norm.eps, **keywords)


class Form:
    """What a known block's forward computes, as far as the rewiring needs to know."""

    def skip_plan(self, block: nn.Module, kwargs: dict) -> Plan:
        """The residuals of ``block``'s forward on ``x`` with keywords ``kwargs``, or None."""
        return None

    def fusions(self, block: nn.Module) -> list:
        """What ``fuse`` would fuse in ``block`` now (empty: nothing)."""
        return []

    def fuse(self, block: nn.Module, args: tuple, kwargs: dict) -> Tensor | None:
        """``block``'s forward with dropout + add + norm as one op, or None (cannot)."""
        return None


@dataclass(frozen=True)
class Chain(Form):
    """A block whose forward is ``x = x + drop(f_n(...f_1(x)))`` per residual, each ``f`` a
    submodule (called) or a parameter (multiplied). The block's keyword arguments go to the
    submodule ``kwargs_to``."""

    residuals: tuple[tuple[str, tuple[str, ...]], ...]
    kwargs_to: str = ""

    def skip_plan(self, block: nn.Module, kwargs: dict) -> Plan:
        # A per-sample attn_mask cannot follow the gathered samples: the block's own forward.
        if kwargs.get("attn_mask") is not None or (kwargs and not self.kwargs_to):
            return None
        return [
            (getattr(block, drop), self._branch(block, names, kwargs))
            for drop, names in self.residuals
        ]

    def fusions(self, block: nn.Module) -> list[tuple[nn.Module, Drop] | None]:
        """Per residual: (the norm that starts the next branch, the drop's parameters) when the
        add fuses with that norm, else None."""
        found: list[tuple[nn.Module, Drop] | None] = []
        for (drop_name, _), (_, next_names) in zip(self.residuals, self.residuals[1:]):
            norm = getattr(block, next_names[0])
            drop = _fusable_drop(getattr(block, drop_name))
            fusable = isinstance(norm, nn.Module) and _fusable_norm(norm) and drop is not None
            found.append((norm, drop) if fusable else None)
        return [*found, None] if any(found) else []

    def fuse(self, block: nn.Module, args: tuple, kwargs: dict) -> Tensor | None:
        # x = x + drop(branch(x)); norm(x) starts the next branch: y, x = op(branch(x), x) and
        # the next branch goes on from y.
        fusions = self.fusions(block)
        if len(args) != 1 or not fusions or (kwargs and not self.kwargs_to):
            return None
        x, y = args[0], None
        for (drop_name, names), fusion in zip(self.residuals, fusions):
            t = self._branch(block, names, kwargs)(x) if y is None else (
                self._branch(block, names[1:], kwargs)(y)
            )  # fmt: skip
            if fusion is None:
                x, y = x + getattr(block, drop_name)(t), None
            else:
                norm, drop = fusion
                y, x = _dropout_add_norm(norm, t, x, drop, prenorm=True)
        return x

    def _branch(self, block: nn.Module, names: tuple[str, ...], kwargs: dict) -> Branch:
        def run(t: Tensor) -> Tensor:
            for name in names:
                f = getattr(block, name)
                if isinstance(f, Tensor):
                    t = f * t
                else:
                    t = f(t, **kwargs) if name == self.kwargs_to else f(t)
            return t

        return run


@dataclass(frozen=True)
class Custom(Form):
    """A block whose residuals a function of this module states (``plan(block, kwargs)``)."""

    plan: Callable[[nn.Module, dict], Plan]

    def skip_plan(self, block: nn.Module, kwargs: dict) -> Plan:
        return self.plan(block, kwargs)


@dataclass(frozen=True)
class PostNorm(Form):
    """A block whose forward is ``norm(dropout(f(a)) + b)`` for its arguments ``(a, b)``, its
    children ``f``, ``dropout`` (element-wise) and ``norm`` (LayerNorm or RMSNorm): the Hugging
    Face BERT family's SelfOutput/Output and their copies. Found by :meth:`find`."""

    args: tuple[str, str]  # the forward's parameter names
    f: str
    dropout: str
    norm: str

    @staticmethod
    def find(block: nn.Module) -> PostNorm | None:
        """``block``'s form if its traced forward (children as leaves) is exactly that graph."""
        children = dict(block.named_children())
        if len(children) != 3 or isinstance(block, torch.jit.ScriptModule):
            return None
        try:
            graph = _ChildrenAsLeaves().trace(block)
        except Exception:  # any forward FX cannot trace is not of this form
            return None
        nodes = list(graph.nodes)
        if len(nodes) != 7 or any(n.kwargs for n in nodes):
            return None
        a, b, f, drop, add, norm, out = nodes
        modules = (f, drop, norm)
        ops = (a.op, b.op, add.op, out.op)
        if not (
            ops == ("placeholder", "placeholder", "call_function", "output")
            and all(n.op == "call_module" and n.target in children for n in modules)
            and len({n.target for n in modules}) == 3
            and f.args == (a,)
            and drop.args == (f,)
            and add.target is operator.add
            and add.args in ((drop, b), (b, drop))
            and norm.args == (add,)
            and out.args == (norm,)
        ):
            return None
        form = PostNorm((a.target, b.target), f.target, drop.target, norm.target)
        if _layers.layer_kind(children[form.dropout]) != "Dropout":
            return None
        return form

    def fusions(self, block: nn.Module) -> list[tuple[nn.Module, Drop]]:
        norm, drop = getattr(block, self.norm), _fusable_drop(getattr(block, self.dropout))
        return [(norm, drop)] if _fusable_norm(norm) and drop is not None else []

    def fuse(self, block: nn.Module, args: tuple, kwargs: dict) -> Tensor | None:
        fusions = self.fusions(block)
        names = self.args[len(args) :]
        if not fusions or len(args) > 2 or kwargs.keys() != set(names):
            return None
        a, b = (*args, *(kwargs[name] for name in names))
        (norm, drop), f = fusions[0], getattr(block, self.f)
        if type(f) is nn.Linear and f.bias is not None and not _hooked(f):
            # The bias goes into the fused op: one pass less than the Linear's own bias add.
            return _dropout_add_norm(norm, F.linear(a, f.weight), b, drop, input_bias=f.bias)
        return _dropout_add_norm(norm, f(a), b, drop)


class _ChildrenAsLeaves(torch.fx.Tracer):
    """Traces a module's own forward: each child is one ``call_module`` node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def _timm_convnext_block(block: nn.Module, kwargs: dict) -> Plan:
    """timm's ConvNeXtBlock: ``drop_path(branch(x)) + x`` (identity shortcut only)."""
    if kwargs or not isinstance(block.shortcut, nn.Identity):
        return None

    def branch(t: Tensor) -> Tensor:
        t = block.conv_dw(t)
        if block.use_conv_mlp:
            t = block.mlp(block.norm(t))
        else:
            t = block.mlp(block.norm(t.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        if block.gamma is not None:
            t = t.mul(block.gamma.reshape(1, -1, 1, 1))
        return t

    return [(block.drop_path, branch)]


def _torchvision_cnblock(block: nn.Module, kwargs: dict) -> Plan:
    """torchvision's CNBlock: ``stochastic_depth(layer_scale * block(x)) + x``."""
    if kwargs:
        return None
    return [(block.stochastic_depth, lambda t: block.layer_scale * block.block(t))]


# (module, class qualname) -> form. Each entry states its block's residual structure; the tests
# check it against the installed package (training steps against the block converted without
# rewiring, eval outputs bit for bit).
_BLOCKS: dict[tuple[str, str], Form] = {
    ("timm.models.vision_transformer", "Block"): Chain(
        (("drop_path1", ("norm1", "attn", "ls1")), ("drop_path2", ("norm2", "mlp", "ls2"))),
        kwargs_to="attn",
    ),
    ("timm.models.vision_transformer", "ResPostBlock"): Chain(
        (("drop_path1", ("attn", "norm1")), ("drop_path2", ("mlp", "norm2"))), kwargs_to="attn"
    ),
    ("timm.models.cait", "LayerScaleBlock"): Chain(
        (("drop_path", ("norm1", "attn", "gamma_1")), ("drop_path", ("norm2", "mlp", "gamma_2")))
    ),
    ("timm.models.convit", "Block"): Chain(
        (("drop_path", ("norm1", "attn")), ("drop_path", ("norm2", "mlp")))
    ),
    ("timm.models.convnext", "ConvNeXtBlock"): Custom(_timm_convnext_block),
    ("torchvision.models.convnext", "CNBlock"): Custom(_torchvision_cnblock),
    ("torchvision.models.swin_transformer", "SwinTransformerBlock"): Chain(
        (("stochastic_depth", ("norm1", "attn")), ("stochastic_depth", ("norm2", "mlp")))
    ),
    ("torchvision.models.swin_transformer", "SwinTransformerBlockV2"): Chain(
        (("stochastic_depth", ("attn", "norm1")), ("stochastic_depth", ("mlp", "norm2")))
    ),
}


def _known_blocks() -> dict[type, Form]:
    """Class -> form for the blocks whose package is imported (never imports one)."""
    table = {}
    for (module_name, qualname), form in _BLOCKS.items():
        cls = getattr(sys.modules.get(module_name), qualname, None)
        if isinstance(cls, type):
            table[cls] = form
    return table


# ---------------------------------------------------------------- rewired classes


@dataclass(frozen=True)
class Rewiring:
    """What a rewired block does instead of its forward: ``skip_mode`` (``"sample"`` or
    ``"subset"``): run each branch on the kept samples only in training (None: not);
    ``fuse_norm``: compute dropout + add + norm as one op. Where both apply (a training forward
    with a drop probability above 0), skipping wins: it saves the dropped samples' branch."""

    form: Form
    skip_mode: str | None = None
    fuse_norm: bool = False


_ATTR = "_fused_dropout_rewiring"  # the instance attribute holding its Rewiring
_rewired: dict[type, type] = {}  # original class -> rewired class


def _class_name(original: type) -> str:
    # Not an identifier, so that it cannot clash with one; no "." (pickle splits qualnames on
    # it): "Rewired(timm/models/vision_transformer:Block)".
    where = original.__module__.replace(".", "/")
    return f"Rewired({where}:{original.__qualname__.replace('.', '/')})"


def rewired_class(original: type) -> type:
    """``original`` with a forward that does what the instance's :class:`Rewiring` says."""
    if original in _rewired:
        return _rewired[original]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        how: Rewiring = self.__dict__[_ATTR]
        out = None
        if how.skip_mode is not None and self.training:
            out = _skip_forward(self, how, args, kwargs)
        if out is None and how.fuse_norm:
            out = how.form.fuse(self, args, kwargs)
        return original.forward(self, *args, **kwargs) if out is None else out

    forward.__doc__ = f"{original.__qualname__}.forward, rewired by fused_dropout.convert."
    cls = type(
        original.__name__,  # repr unchanged
        (original,),
        {"__module__": __name__, "__qualname__": _class_name(original), "forward": forward},
    )
    _rewired[original] = cls
    return cls


def __getattr__(attr: str) -> type:
    """The rewired classes, for unpickling (imports the original class's module)."""
    if attr.startswith("Rewired(") and attr.endswith(")") and ":" in attr:
        where, qualname = attr[len("Rewired(") : -1].split(":", 1)
        original: Any = importlib.import_module(where.replace("/", "."))
        for part in qualname.split("/"):
            original = getattr(original, part)
        return rewired_class(original)
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def _original_class(block: nn.Module) -> type:
    cls = type(block)
    return cls.__bases__[0] if _ATTR in block.__dict__ else cls


# ---------------------------------------------------------------- skip_dropped


def _drop_params(layer: nn.Module) -> tuple[float, bool] | None:
    """(p, scale_by_keep) of a per-sample drop layer in training; None for one we cannot skip."""
    if isinstance(layer, nn.Identity) or not layer.training:
        return 0.0, True
    kind = _layers.drop_kind(layer)
    if kind == "DropPath":
        return float(layer.drop_prob), bool(layer.scale_by_keep)
    if kind == "StochasticDepth" and layer.mode == "row":
        return float(layer.p), True
    return None  # torchvision's mode="batch", or a layer we do not know


def _skip_forward(block: nn.Module, how: Rewiring, args: tuple, kwargs: dict) -> Tensor | None:
    """The training forward running each branch on its kept samples, or None (cannot)."""
    if len(args) != 1:
        return None
    plan = how.form.skip_plan(block, kwargs)
    params = None if plan is None else [_drop_params(drop) for drop, _ in plan]
    if params is None or any(q is None for q in params) or all(q[0] == 0 for q in params):
        return None  # nothing to skip: the original forward (or the fused one) does the same
    x = args[0]
    for (_, branch), (p, scale_by_keep) in zip(plan, params):
        x = skip.drop_path_residual(x, branch, p, mode=how.skip_mode, scale_by_keep=scale_by_keep)
    return x


def _has_batchnorm(block: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in block.modules())


# ---------------------------------------------------------------- rewire


def rewire(
    model: nn.Module,
    *,
    skip_mode: str | None = None,
    allow_batchnorm: bool = False,
    fuse_norm: bool = False,
) -> dict[str, int]:
    """Rewire the known blocks of ``model`` in place, as ``convert`` asks; returns counts.

    - ``skip_mode`` (``"sample"`` or ``"subset"``): a known block (timm's ViT ``Block`` and
      ``ResPostBlock``, CaiT ``LayerScaleBlock``, ConViT ``Block``, ``ConvNeXtBlock``;
      torchvision's ``CNBlock`` and Swin blocks) holding a drop layer gets a training forward
      that calls :func:`~fused_dropout.skip.drop_path_residual` with the drop layer's
      probability; outside training it runs the original forward. A block whose branch holds a
      BatchNorm is left unless ``allow_batchnorm``: its batch statistics would come from the
      kept samples only. Counts: ``"skip_dropped:<Class>"`` for rewired blocks,
      ``"not_skipped:<Class>"`` for the other modules that hold a drop-path layer (unknown
      blocks, or BatchNorm), also named in one ``UserWarning``.
    - ``fuse_norm``: a known block in which a residual add is followed by a LayerNorm or
      RMSNorm of the sum (see :class:`Chain` and :class:`PostNorm`) computes dropout (or drop
      path) + add + norm as one op, in training and in eval. Counts: ``"fuse_norm:<Class>"``
      for rewired blocks, ``"not_fused:<Class>"`` for the other modules holding both a
      dropout-family layer and a norm (no warning: many, as BERT's embeddings, normalize
      before their dropout).

    A block rewired before is neither changed nor counted again for what it does already.
    """
    if skip_mode is not None and skip_mode not in skip.MODES:
        raise ValueError(f"mode has to be one of {skip.MODES}, but got {skip_mode!r}")
    known = _known_blocks()
    if skip_mode is not None:
        skip._prepare_compile()
    norms = tuple(_layers.norm_classes())
    counts: dict[str, int] = {}
    left: dict[str, list[str]] = {}

    def count(key: str) -> None:
        counts[key] = counts.get(key, 0) + 1

    def update(module: nn.Module, cls: type, how: Rewiring) -> None:
        module.__class__ = rewired_class(cls)
        module.__dict__[_ATTR] = how

    for path, module in model.named_modules():
        cls = _original_class(module)
        how: Rewiring | None = module.__dict__.get(_ATTR)
        form = how.form if how is not None else known.get(cls)
        children = list(module.children())
        if skip_mode is not None and not (how and how.skip_mode):
            if any(_layers.drop_kind(child) for child in children):
                if form is not None and (allow_batchnorm or not _has_batchnorm(module)):
                    how = replace(how, skip_mode=skip_mode) if how else Rewiring(form, skip_mode)
                    update(module, cls, how)
                    count(f"skip_dropped:{cls.__name__}")
                else:
                    why = "its branch holds a BatchNorm" if form is not None else "unknown block"
                    left.setdefault(f"{_describe(cls)} ({why})", []).append(path)
                    count(f"not_skipped:{cls.__name__}")
        if fuse_norm and not (how and how.fuse_norm):
            if form is None:
                form = PostNorm.find(module)
            if form is not None and form.fusions(module):
                how = replace(how, fuse_norm=True) if how else Rewiring(form, fuse_norm=True)
                update(module, cls, how)
                count(f"fuse_norm:{cls.__name__}")
            elif any(isinstance(c, norms) for c in children) and any(
                _layers.layer_kind(c) for c in children
            ):
                count(f"not_fused:{cls.__name__}")
    if left:
        listed = "; ".join(
            f"{what} at {', '.join(repr(p) for p in paths[:3])}"
            + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
            for what, paths in left.items()
        )
        warnings.warn(
            f"fused_dropout.convert(skip_dropped=True) left these blocks computing every sample: "
            f"{listed}",
            UserWarning,
            stacklevel=3,
        )
    return counts


def _describe(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
