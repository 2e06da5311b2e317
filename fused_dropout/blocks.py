"""The residual blocks ``convert`` rewires, and how their rewired classes are made and pickled.

``convert(model, skip_dropped=True)`` makes a known block run each residual branch on the
samples its drop-path layer keeps only (:func:`fused_dropout.skip.drop_path_residual`). The
block's class is swapped, in place, for a subclass (:func:`rewired_class`, one per block class:
same name, so ``repr``, ``state_dict`` and ``isinstance`` hold) whose ``forward`` reads what to
do from the instance's :class:`Rewiring` and otherwise runs the original ``forward``. Each
rewired class is an attribute of this module, made on first use, so models holding one pickle.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from torch import Tensor, nn

from fused_dropout import _layers, skip

__all__ = ["Rewiring", "rewire", "rewired_class"]

Branch = Callable[[Tensor], Tensor]
# A block's training forward as residuals: for each, the drop-path layer that decides it and the
# branch. None: run the block's own forward (arguments we cannot split per sample).
Plan = list[tuple[nn.Module, Branch]] | None


class Form:
    """What a known block's forward computes, as far as the rewiring needs to know."""

    def skip_plan(self, block: nn.Module, kwargs: dict) -> Plan:
        """The residuals of ``block``'s forward on ``x`` with keywords ``kwargs``, or None."""
        raise NotImplementedError


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
    ``"subset"``): run each branch on the kept samples only in training (None: not)."""

    form: Form
    skip_mode: str | None = None


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
        if how.skip_mode is not None and self.training:
            out = _skip_forward(self, how, args, kwargs)
            if out is not None:
                return out
        return original.forward(self, *args, **kwargs)

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
    if params is None or any(q is None for q in params):
        return None
    x = args[0]
    for (_, branch), (p, scale_by_keep) in zip(plan, params):
        x = skip.drop_path_residual(x, branch, p, mode=how.skip_mode, scale_by_keep=scale_by_keep)
    return x


def _has_batchnorm(block: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in block.modules())


# ---------------------------------------------------------------- rewire


def rewire(
    model: nn.Module, *, skip_mode: str | None = None, allow_batchnorm: bool = False
) -> dict[str, int]:
    """Rewire the known blocks of ``model`` in place, as ``convert`` asks; returns counts.

    ``skip_mode`` (``"sample"`` or ``"subset"``): a known block (timm's ViT ``Block`` and
    ``ResPostBlock``, CaiT ``LayerScaleBlock``, ConViT ``Block``, ``ConvNeXtBlock``;
    torchvision's ``CNBlock`` and Swin blocks) holding a drop layer gets a training forward that
    calls :func:`~fused_dropout.skip.drop_path_residual` with the drop layer's probability;
    outside training it runs the original forward. A block whose branch holds a BatchNorm is
    left unless ``allow_batchnorm``: its batch statistics would come from the kept samples only.
    Counts: ``"skip_dropped:<Class>"`` for rewired blocks, ``"not_skipped:<Class>"`` for the
    other modules that hold a drop-path layer (unknown blocks, or BatchNorm), also named in one
    ``UserWarning``. A block rewired before is neither changed nor counted.
    """
    if skip_mode is not None and skip_mode not in skip.MODES:
        raise ValueError(f"mode has to be one of {skip.MODES}, but got {skip_mode!r}")
    known = _known_blocks()
    if skip_mode is not None:
        skip._prepare_compile()
    counts: dict[str, int] = {}
    left: dict[str, list[str]] = {}

    def count(key: str) -> None:
        counts[key] = counts.get(key, 0) + 1

    for path, module in model.named_modules():
        how: Rewiring | None = module.__dict__.get(_ATTR)
        cls = _original_class(module)
        form = how.form if how is not None else known.get(cls)
        if skip_mode is None or (how is not None and how.skip_mode is not None):
            continue
        if not any(_layers.drop_kind(child) for child in module.children()):
            continue
        if form is not None and (allow_batchnorm or not _has_batchnorm(module)):
            how = replace(how, skip_mode=skip_mode) if how else Rewiring(form, skip_mode)
            module.__dict__[_ATTR] = how
            module.__class__ = rewired_class(cls)
            count(f"skip_dropped:{cls.__name__}")
        else:
            why = "its branch holds a BatchNorm" if form is not None else "unknown block"
            left.setdefault(f"{cls.__module__}.{cls.__qualname__} ({why})", []).append(path)
            count(f"not_skipped:{cls.__name__}")
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
