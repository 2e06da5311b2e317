"""Route torch's own dropout calls to fused_dropout: ``with fused_dropout.mode(): ...``.

``convert`` swaps modules; a ``F.dropout`` call written inside some ``forward`` (Hugging Face
attention, many research models) is code, and only a ``torch.overrides.TorchFunctionMode`` can
reach it. In the scope of :func:`mode` (or, after ``convert(model, functional=True)``, while
``model`` or one of its submodules runs) these calls run our kernels instead:

- ``torch.nn.functional``: ``dropout``, ``dropout1d``, ``dropout2d``, ``dropout3d``,
  ``alpha_dropout``, ``feature_alpha_dropout``;
- ``torch``: ``dropout``, ``feature_dropout``, ``alpha_dropout``, ``feature_alpha_dropout`` and
  their in-place ``*_`` forms (``torch.nn.functional`` calls these through ``_VF``);
- ``torch.ops.aten`` ops of those names (packet and ``.default`` overload).

Same arguments, same result semantics as ``fused_dropout.functional`` (dropped elements exactly
0; the mask is ours, so it differs from torch's), no mask saved for backward. A call is routed
only when it trains and draws (``training=True``, ``0 < p <= 1``) with a plain tensor (or
``nn.Parameter``) of a dtype and device we have kernels for, well-formed arguments, and a shape
torch takes without a warning; everything else (``training=False``, integer or complex dtypes,
meta/MPS/XLA tensors, tensor subclasses, FX proxies, wrong ranks, bad ``p``)
goes to torch unchanged, so errors and warnings are torch's own. ``torch.native_dropout``
returns its mask, so it is never routed; neither is the dropout inside
``F.scaled_dot_product_attention`` (it happens inside torch's attention kernel).
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from fused_dropout import _impl, _loader

__all__ = ["FusedDropoutMode", "active", "attach", "detach", "is_attached", "mode"]

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_PASS = object()  # a route's answer for "not ours: let torch run it"


def _ours(input: Any) -> bool:
    """Whether our kernels take ``input``: a plain strided float CPU/CUDA tensor."""
    return (
        type(input) in (Tensor, nn.Parameter)
        and input.layout == torch.strided
        and input.dtype in _FLOATS
        and (input.device.type == "cpu" or (input.is_cuda and _loader.built_with_cuda()))
        and not input.is_nested
    )


def _draws(p: Any, training: Any, inplace: Any) -> bool:
    """Well-formed arguments of a call that draws a mask."""
    return (
        type(p) in (float, int)
        and 0 < p <= 1
        and type(training) is bool
        and training
        and type(inplace) is bool
    )


def _bind(
    names: tuple[str, ...], defaults: dict[str, Any], args: tuple, kwargs: dict
) -> dict[str, Any] | None:
    """``args``/``kwargs`` by parameter name, or None if they do not fit the signature."""
    if len(args) > len(names) or any(k not in names for k in kwargs):
        return None
    bound = dict(zip(names, args))
    for name in names:
        if name in kwargs:
            if name in bound:
                return None
            bound[name] = kwargs[name]
        elif name not in bound:
            if name not in defaults:
                return None
            bound[name] = defaults[name]
    return bound


# torch.nn.functional spellings: (input, p, training, inplace).
_F_NAMES = ("input", "p", "training", "inplace")
# torch.* / aten spellings: (input, p, train); in place for the names ending in "_".
_TORCH_NAMES = ("input", "p", "train")

Impl = Callable[[Tensor, float, bool, bool], Tensor]
_ROUTES: dict[Any, Callable[[tuple, dict], Any]] = {}


def _add_functional(
    func: Any, impl: Impl, training_default: bool, takes_rank: Callable[[int], bool]
) -> None:
    defaults = {"p": 0.5, "training": training_default, "inplace": False}

    def route(args: tuple, kwargs: dict) -> Any:
        a = _bind(_F_NAMES, defaults, args, kwargs)
        if a is None or not _ours(a["input"]) or not _draws(a["p"], a["training"], a["inplace"]):
            return _PASS
        if not takes_rank(a["input"].dim()):
            return _PASS
        return impl(a["input"], float(a["p"]), True, a["inplace"])

    _ROUTES[func] = route


def _add_torch(name: str, impl: Impl, min_rank: int) -> None:
    inplace = name.endswith("_")
    packet = getattr(torch.ops.aten, name)

    def route(args: tuple, kwargs: dict) -> Any:
        a = _bind(_TORCH_NAMES, {}, args, kwargs)
        if a is None or not _ours(a["input"]) or not _draws(a["p"], a["train"], inplace):
            return _PASS
        if a["input"].dim() < min_rank:
            return _PASS
        return impl(a["input"], float(a["p"]), True, inplace)

    for func in (getattr(torch, name), packet, packet.default):
        _ROUTES[func] = route


def _feature_dropout(input: Tensor, p: float, training: bool, inplace: bool) -> Tensor:
    return _impl.feature_masked(input, p, training, inplace, False)


# The ranks routed are those torch takes without a warning or an error.
_F = torch.nn.functional
_add_functional(_F.dropout, _impl.dropout, True, lambda rank: True)
_add_functional(_F.alpha_dropout, _impl.alpha_dropout, False, lambda rank: True)
_add_functional(_F.feature_alpha_dropout, _impl.feature_alpha_dropout, False, lambda r: r >= 2)
_add_functional(_F.dropout1d, _impl.dropout1d, True, lambda rank: rank in (2, 3))
_add_functional(_F.dropout2d, _impl.dropout2d, True, lambda rank: rank == 4)
_add_functional(_F.dropout3d, _impl.dropout3d, True, lambda rank: rank in (4, 5))
for _name, _fn, _min_rank in (
    ("dropout", _impl.dropout, 0),
    ("feature_dropout", _feature_dropout, 2),
    ("alpha_dropout", _impl.alpha_dropout, 0),
    ("feature_alpha_dropout", _impl.feature_alpha_dropout, 2),
):
    _add_torch(_name, _fn, _min_rank)
    _add_torch(_name + "_", _fn, _min_rank)
del _name, _fn, _min_rank


class FusedDropoutMode(TorchFunctionMode):
    """A ``TorchFunctionMode`` running torch's dropout calls with fused_dropout's kernels."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        route = _ROUTES.get(func)
        if route is not None:
            out = route(args, kwargs)
            if out is not _PASS:
                return out
        return func(*args, **kwargs)


def active() -> bool:
    """Whether a :class:`FusedDropoutMode` is on this thread's torch-function mode stack."""
    # A loop, not any(generator): torch.compile traces this (the module hooks), and torch 2.6's
    # dynamo cannot trace a generator.
    for m in torch.overrides._get_current_function_mode_stack():
        if isinstance(m, FusedDropoutMode):
            return True
    return False


@contextlib.contextmanager
def mode() -> Iterator[FusedDropoutMode]:
    """Route torch's functional dropout calls in this scope to fused_dropout (see the module)."""
    with FusedDropoutMode() as m:
        yield m


# ---------------------------------------------------------------- convert(model, functional=True)
#
# The mode is entered when an attached module is called and no FusedDropoutMode is active yet,
# and left when that call returns or raises. The hooks are torch's *global* module hooks, not
# hooks on the model: torch.jit.script compiles a module's own hooks (and fails on Python ones),
# and every submodule is attached, so that activation checkpointing, which reruns a submodule
# during backward (outside the root's forward), reruns it under the mode too.

# The attached modules, held weakly, by id: the hooks run inside compiled forwards, and torch
# 2.6's dynamo cannot trace a weakref.WeakSet's __contains__ (it traces id() and a dict).
_attached: dict[int, weakref.ref[nn.Module]] = {}


def _forget(key: int) -> Callable[[weakref.ref], None]:
    # Called when the module dies, before its id can be reused.
    return lambda _ref: _attached.pop(key, None)


_hooks: list[RemovableHandle] = []
_local = threading.local()  # .frames: (id(module), the mode its call entered or None) per call


def _frames() -> list[tuple[int, FusedDropoutMode | None]]:
    if not hasattr(_local, "frames"):
        _local.frames = []
    return _local.frames


def _is_attached(module: nn.Module) -> bool:
    # torch.compile(model) wraps an attached model: its wrapper enters the mode, eagerly, so
    # that dynamo traces the forward with the mode active.
    orig = getattr(module, "_orig_mod", None)
    return id(module) in _attached or (orig is not None and id(orig) in _attached)


def _enter(module: nn.Module, args: tuple) -> None:
    if not _is_attached(module):
        return
    entered = None
    if not active():
        entered = FusedDropoutMode()
        entered.__enter__()
    _frames().append((id(module), entered))


def _leave(module: nn.Module, args: tuple, output: Any) -> None:
    frames = _frames()
    if frames and frames[-1][0] == id(module):
        entered = frames.pop()[1]
        if entered is not None:
            entered.__exit__(None, None, None)


def attach(model: nn.Module) -> nn.Module:
    """Keep :func:`mode` active while ``model`` or any of its current submodules runs."""
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            "fused_dropout.functional_mode.attach: TorchScript modules run no Python modes"
        )
    for module in model.modules():
        _attached[id(module)] = weakref.ref(module, _forget(id(module)))
    if not _hooks:
        _hooks.append(nn.modules.module.register_module_forward_pre_hook(_enter))
        _hooks.append(nn.modules.module.register_module_forward_hook(_leave, always_call=True))
    return model


def detach(model: nn.Module) -> nn.Module:
    """Undo :func:`attach` (``convert(model, functional=True)``) for ``model``'s modules."""
    for module in model.modules():
        _attached.pop(id(module), None)
    if not _attached:  # no global hooks left behind to slow every module call
        for handle in _hooks:
            handle.remove()
        _hooks.clear()
    return model


def is_attached(model: nn.Module) -> bool:
    """Whether ``model`` runs its forward under :func:`mode` (``convert(..., functional=True)``)."""
    return id(model) in _attached
