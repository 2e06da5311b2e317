"""The layer classes of torch, timm and torchvision that fused_dropout recognizes in a model.

``convert`` swaps the dropout family (:func:`replaceable`); the block rewiring
(``fused_dropout.blocks``) reads drop-path layers (:func:`drop_kind`) and norms
(:func:`norm_kind`). timm's and torchvision's classes are looked up in ``sys.modules`` only: if
a model holds such a layer, its package is already imported, and nothing here imports timm or
torchvision.
"""

from __future__ import annotations

import functools
import sys

from torch import nn

from fused_dropout import modules as fused_modules

# Where timm and torchvision define (or re-export) the classes convert replaces.
EXTERNAL = {
    "DropPath": (
        "timm.layers",
        "timm.layers.drop",
        "timm.models.layers",
        "timm.models.layers.drop",
    ),
    "StochasticDepth": ("torchvision.ops", "torchvision.ops.stochastic_depth"),
}

# fused module name -> the attributes its constructor takes, read from the replaced module.
PARAMS = {
    "Dropout": ("p", "inplace"),
    "Dropout1d": ("p", "inplace"),
    "Dropout2d": ("p", "inplace"),
    "Dropout3d": ("p", "inplace"),
    "AlphaDropout": ("p", "inplace"),
    "FeatureAlphaDropout": ("p", "inplace"),
    "DropPath": ("drop_prob", "scale_by_keep"),
    "StochasticDepth": ("p", "mode"),
}


def _external_classes(name: str, module_names: tuple[str, ...]) -> list[type]:
    found = (getattr(sys.modules.get(module_name), name, None) for module_name in module_names)
    return [cls for cls in found if isinstance(cls, type) and issubclass(cls, nn.Module)]


def replaceable() -> dict[type, str]:
    """Exact class -> name of the fused module replacing it (the same name)."""
    table: dict[type, str] = {getattr(nn, name): name for name in PARAMS if name not in EXTERNAL}
    for name, module_names in EXTERNAL.items():
        for cls in _external_classes(name, module_names):
            table[cls] = name
    return table


def layer_kind(layer: nn.Module) -> str | None:
    """The dropout-family kind (a key of ``PARAMS``) of ``layer``: of a class ``convert``
    replaces, or of one of our modules (subclasses included); None for any other layer."""
    return _layer_kind_of(type(layer))


@functools.cache
def _layer_kind_of(cls: type) -> str | None:
    # By type, once: a timm/torchvision layer's package is imported before the layer exists.
    for name in PARAMS:
        if issubclass(cls, getattr(fused_modules, name)):
            return name
    return replaceable().get(cls)


def drop_kind(layer: nn.Module) -> str | None:
    """ "DropPath" / "StochasticDepth" for timm's, torchvision's and our layers, else None."""
    kind = layer_kind(layer)
    return kind if kind in ("DropPath", "StochasticDepth") else None


# The norms fuse_norm computes itself: classes whose forward is exactly torch's layer_norm or
# rms_norm of their weight (and bias) over ``normalized_shape``, by kind.
_NORMS = {"LayerNorm": (nn.LayerNorm, "LayerNorm"), "RMSNorm": (nn.RMSNorm, "RmsNorm")}
_TIMM_NORMS = ("timm.layers.norm",)


def norm_classes() -> dict[type, str]:
    """Exact class -> "LayerNorm" / "RMSNorm", for torch's norms and timm's (if imported)."""
    table: dict[type, str] = {}
    for kind, (torch_cls, timm_name) in _NORMS.items():
        table[torch_cls] = kind
        for cls in _external_classes(timm_name, _TIMM_NORMS):
            table[cls] = kind
    return table


def norm_kind(layer: nn.Module) -> str | None:
    """ "LayerNorm" / "RMSNorm" for those norms (exact classes) normalizing the last dim only;
    None for any other layer (several dims, subclasses, BatchNorm, ...)."""
    kind = norm_classes().get(type(layer))
    return kind if kind is not None and len(layer.normalized_shape) == 1 else None
