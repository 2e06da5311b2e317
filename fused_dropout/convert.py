"""Swap the dropout-family layers of an existing model for fused_dropout's modules."""

from __future__ import annotations

import importlib
import warnings

import torch
from torch import nn

from fused_dropout import _layers, blocks
from fused_dropout import modules as fused_modules

__all__ = ["convert"]

# The swapped-in class for each external one: ours made a subclass of theirs too. Each is
# an attribute of this module (created on first use, see __getattr__), so models holding
# one pickle and unpickle (torch.save of a whole model).
_MIXED_NAMES = {"DropPath": "TimmDropPath", "StochasticDepth": "TorchvisionStochasticDepth"}
_mixed: dict[str, type] = {}


def _fused_class(name: str, replaced_cls: type) -> type:
    """Our module ``name``, made a subclass of timm's/torchvision's ``replaced_cls`` as well.

    The package never imports timm or torchvision, so its DropPath and StochasticDepth
    cannot subclass theirs; the modules ``convert`` puts into a model do, so that
    ``isinstance(m, timm.layers.DropPath)`` still holds there.
    """
    if name not in _mixed:
        _mixed[name] = type(
            name,  # repr unchanged
            (getattr(fused_modules, name), replaced_cls),
            {"__module__": __name__, "__qualname__": _MIXED_NAMES[name]},
        )
    return _mixed[name]


def __getattr__(attr: str) -> type:
    """``TimmDropPath`` / ``TorchvisionStochasticDepth``, for unpickling (imports the package)."""
    for name, mixed_name in _MIXED_NAMES.items():
        if attr == mixed_name:
            module = importlib.import_module(_layers.EXTERNAL[name][0])
            return _fused_class(name, getattr(module, name))
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def _describe(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def convert(
    model: nn.Module,
    functional: bool = False,
    *,
    skip_dropped: bool = False,
    skip_mode: str = "sample",
    allow_batchnorm: bool = False,
    fuse_norm: bool = False,
) -> tuple[nn.Module, dict[str, int]]:
    """Replace, in place, every dropout-family layer of ``model`` by fused_dropout's module.

    Replaced are the modules whose type is *exactly* one of ``torch.nn.Dropout``,
    ``Dropout1d``, ``Dropout2d``, ``Dropout3d``, ``AlphaDropout``, ``FeatureAlphaDropout``,
    timm's ``DropPath`` (``timm.layers.DropPath``, alias ``timm.models.layers.DropPath``) and
    torchvision's ``torchvision.ops.StochasticDepth``. Each becomes the fused_dropout module of
    the same name (``fused_dropout.modules.Dropout``, ...), a subclass of the class it
    replaces (for timm's and torchvision's, made at conversion), so ``isinstance`` checks
    still hold, and ``repr`` and ``state_dict`` (empty) are unchanged.
    The new module gets the same parameters (``p``, ``inplace``, ``drop_prob``,
    ``scale_by_keep``, ``mode``), the same ``training`` flag, and keeps every other attribute
    of the old one (hooks included). A module registered at several places is replaced by one
    new module, shared the same way.

    timm and torchvision are never imported: their classes are found in ``sys.modules`` (a
    model holding such a layer has imported its package already).

    Args:
        model: the model to convert. Changed in place. If ``model`` itself is a layer to
            replace, it cannot be replaced in place and the new module is returned instead,
            so always use the returned model. TorchScript modules raise ``TypeError``.
        functional: also run torch's functional dropout calls made inside the model's
            forward (``F.dropout`` in attention code, ...) with our kernels:
            ``fused_dropout.mode()`` is entered whenever the model or one of its submodules is
            called (see ``fused_dropout.functional_mode``); undo it with
            ``fused_dropout.functional_mode.detach(model)``.
        skip_dropped: also rewire the residual blocks it knows (timm's ViT ``Block``,
            ``ConvNeXtBlock``, torchvision's ``CNBlock``, ...; see
            :func:`fused_dropout.blocks.rewire`) so that in training each branch runs only on
            the samples its drop-path layer keeps (``skip_mode``: ``"sample"``, timm's
            semantics, or ``"subset"``, DINOv2's fixed-size subset). Blocks whose branch holds
            a BatchNorm are left unless ``allow_batchnorm`` (its statistics would then come
            from the kept samples only). Eval outputs and ``state_dict`` are unchanged.
        fuse_norm: also rewire the blocks it knows in which a residual add is followed by a
            LayerNorm or RMSNorm of the sum, so that dropout (or drop path) + add + norm run as
            one op (:func:`fused_dropout.functional.dropout_add_layer_norm`), in training and in
            eval: the Hugging Face BERT family's ``SelfOutput``/``Output`` and any module whose
            forward is ``norm(dropout(f(a)) + b)`` (found by tracing it), timm's ViT ``Block``,
            CaiT ``LayerScaleBlock`` and ConViT ``Block``, torchvision's
            ``SwinTransformerBlock`` (their first residual with ``norm2``, prenorm); see
            :func:`fused_dropout.blocks.rewire`. ``state_dict`` is unchanged; eval outputs
            change by the norm's rounding. With ``skip_dropped`` too, a block skips dropped
            samples where it can (training, drop probability above 0) and fuses otherwise.

    Returns:
        ``(model, counts)``. ``counts`` maps the name of each kind of layer replaced to the
        number of modules replaced (distinct module objects), for example
        ``{"Dropout": 12, "DropPath": 11}``. A module whose class *subclasses* one of the
        classes above without being exactly it is left alone (its ``forward`` may do
        something else), counted under ``"skipped:<ClassName>"``, and named in one
        ``UserWarning``. Modules that already are fused_dropout's (or subclass them) are
        neither replaced nor counted, so converting twice changes nothing and the second
        call returns no replacement counts.
        With ``skip_dropped``, also ``"skip_dropped:<Block>"`` (blocks rewired) and
        ``"not_skipped:<Block>"`` (other modules holding a drop-path layer, named in a
        ``UserWarning``). With ``fuse_norm``, also ``"fuse_norm:<Block>"`` (blocks rewired) and
        ``"not_fused:<Class>"`` (other modules holding both a dropout-family layer and a norm).

    Note:
        Without ``functional=True`` only modules are swapped: dropout called functionally
        inside a ``forward`` (``torch.nn.functional.dropout``, ``F.dropout2d``, ...) stays
        torch's. With it, torch's dropout functions are routed too; timm's ``drop_path``
        *function* (torch ops, not a dropout call) and the attention dropout inside
        ``F.scaled_dot_product_attention`` (inside torch's kernel) still stay as they are.

    Example::

        model, counts = fused_dropout.convert(model)
        print(counts)  # {'Dropout': 25, 'DropPath': 12}
    """
    table = _layers.replaceable()
    known = tuple(table)
    fused = tuple(getattr(fused_modules, name) for name in _layers.PARAMS)

    counts: dict[str, int] = {}
    skipped: dict[type, list[str]] = {}
    replaced: dict[int, nn.Module] = {}  # id(old module) -> its replacement
    seen_skipped: set[int] = set()

    def new_module(old: nn.Module, path: str) -> nn.Module | None:
        """The replacement of ``old`` (memoised), or None to leave it alone."""
        if id(old) in replaced:
            return replaced[id(old)]
        if isinstance(old, fused):
            return None
        cls = type(old)
        name = table.get(cls)
        if name is None:
            if isinstance(old, known):
                if id(old) not in seen_skipped:
                    seen_skipped.add(id(old))
                    key = f"skipped:{cls.__name__}"
                    counts[key] = counts.get(key, 0) + 1
                skipped.setdefault(cls, []).append(path or "<model>")
            return None
        external = name in _layers.EXTERNAL
        fused_cls = _fused_class(name, cls) if external else getattr(fused_modules, name)
        new = fused_cls(**{attr: getattr(old, attr) for attr in _layers.PARAMS[name]})
        # Same training flag, hooks and any other attribute set on the old module.
        new.__dict__.update(old.__dict__)
        replaced[id(old)] = new
        counts[name] = counts.get(name, 0) + 1
        return new

    visited: set[int] = set()

    def visit(parent: nn.Module, prefix: str) -> None:
        if id(parent) in visited:
            return
        visited.add(id(parent))
        for child_name, child in list(parent._modules.items()):
            if child is None:
                continue
            path = f"{prefix}.{child_name}" if prefix else child_name
            new = new_module(child, path)
            if new is not None:
                setattr(parent, child_name, new)
            else:
                visit(child, path)

    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError("fused_dropout.convert: TorchScript modules cannot be converted")
    if skip_dropped or fuse_norm:
        counts.update(
            blocks.rewire(
                model,
                skip_mode=skip_mode if skip_dropped else None,
                allow_batchnorm=allow_batchnorm,
                fuse_norm=fuse_norm,
            )
        )
    root = new_module(model, "")
    if root is not None:
        model = root
    else:
        visit(model, "")

    if skipped:
        listed = "; ".join(
            f"{_describe(cls)} at {', '.join(repr(p) for p in paths[:5])}"
            + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
            for cls, paths in skipped.items()
        )
        warnings.warn(
            "fused_dropout.convert left these modules unconverted: their classes subclass a "
            f"supported dropout layer without being it, so their forward may differ: {listed}",
            UserWarning,
            stacklevel=2,
        )
    if functional:
        from fused_dropout import functional_mode

        functional_mode.attach(model)
    return model, counts
