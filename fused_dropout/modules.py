"""Drop-in modules. Each torch layer is subclassed, so isinstance, repr and state_dict
are unchanged. DropPath and StochasticDepth copy timm's and torchvision's attributes and
repr without importing those packages (``convert`` makes the modules it swaps in
subclasses of theirs too).

Every ``forward`` is TorchScript-compatible (it calls ``_impl``, which calls the registered
ops), and under ``torch.fx`` tracing each module is one ``call_module`` node, as torch's own
layers are: ``training`` stays a property of the module, not a constant of the graph.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fused_dropout import _impl

__all__ = [
    "AlphaDropout",
    "BiasDropoutAdd",
    "DropPath",
    "DropPathAdd",
    "Dropout",
    "Dropout1d",
    "Dropout2d",
    "Dropout3d",
    "DropoutAdd",
    "DropoutAddLayerNorm",
    "DropoutAddRMSNorm",
    "FeatureAlphaDropout",
    "StochasticDepth",
]


class _FXLeaf:
    """Makes a module one ``call_module`` node when FX traces through it (any tracer)."""

    @torch.jit.unused
    def _fx_node(self, inputs: list[Tensor]) -> Tensor | None:
        """The node standing for this call when an input is an FX proxy, else None."""
        # A list, not next() over a generator: torch.compile runs this too, and torch 2.6's
        # dynamo cannot trace next(generator, default).
        proxies = [t for t in inputs if isinstance(t, torch.fx.Proxy)]
        if not proxies:
            return None
        proxy = proxies[0]
        tracer = proxy.tracer
        path = tracer.path_of_module(self)
        if not path:
            raise NotImplementedError(
                f"torch.fx: {type(self).__name__} is a leaf of the models holding it and cannot "
                "be traced as the root itself; trace a model holding it (nn.Sequential(layer))"
            )
        return tracer.create_proxy("call_module", path, tuple(inputs), {})


class Dropout(_FXLeaf, nn.Dropout):
    """``torch.nn.Dropout`` computed by fused_dropout's kernels."""

    def forward(self, input: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            node = self._fx_node([input])
            if node is not None:
                return node
        return _impl.dropout(input, self.p, self.training, self.inplace)


class Dropout1d(_FXLeaf, nn.Dropout1d):
    """``torch.nn.Dropout1d`` computed by fused_dropout's kernels."""

    def forward(self, input: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            node = self._fx_node([input])
            if node is not None:
                return node
        return _impl.dropout1d(input, self.p, self.training, self.inplace)


class Dropout2d(_FXLeaf, nn.Dropout2d):
    """``torch.nn.Dropout2d`` computed by fused_dropout's kernels."""

    def forward(self, input: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            node = self._fx_node([input])
            if node is not None:
                return node
        return _impl.dropout2d(input, self.p, self.training, self.inplace)


class Dropout3d(_FXLeaf, nn.Dropout3d):
    """``torch.nn.Dropout3d`` computed by fused_dropout's kernels."""

    def forward(self, input: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            node = self._fx_node([input])
            if node is not None:
                return node
        return _impl.dropout3d(input, self.p, self.training, self.inplace)


class AlphaDropout(_FXLeaf, nn.AlphaDropout):
    """``torch.nn.AlphaDropout`` computed by fused_dropout's kernels (ignores inplace, as torch)."""

    def forward(self, input: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            node = self._fx_node([input])
            if node is not None:
                return node
        return _impl.alpha_dropout(input, self.p, self.training)


class FeatureAlphaDropout(_FXLeaf, nn.FeatureAlphaDropout):
    """``torch.nn.FeatureAlphaDropout`` computed by fused_dropout's kernels."""

    def forward(self, input: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            node = self._fx_node([input])
            if node is not None:
                return node
        return _impl.feature_alpha_dropout(input, self.p, self.training)


class DropPath(_FXLeaf, nn.Module):
    """timm's ``DropPath``: drops whole samples, scaling the kept ones by ``1/keep``."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True) -> None:
        nn.Module.__init__(self)  # not super(): convert() may put timm's class next in the MRO
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            node = self._fx_node([x])
            if node is not None:
                return node
        return _impl.drop_path(x, self.drop_prob, self.training, self.scale_by_keep)

    def extra_repr(self) -> str:
        return f"drop_prob={round(self.drop_prob, 3):0.3f}"


class DropPathAdd(DropPath):
    """``residual + drop_path(branch)`` in one pass: ``DropPathAdd(p)(residual, branch)``."""

    def forward(self, residual: Tensor, branch: Tensor) -> Tensor:  # type: ignore[override]
        if not torch.jit.is_scripting():
            node = self._fx_node([residual, branch])
            if node is not None:
                return node
        return _impl.drop_path_add(
            residual, branch, self.drop_prob, self.training, self.scale_by_keep
        )


class StochasticDepth(_FXLeaf, nn.Module):
    """torchvision's ``StochasticDepth`` (modes ``"row"`` and ``"batch"``)."""

    def __init__(self, p: float, mode: str) -> None:
        nn.Module.__init__(self)  # not super(): see DropPath
        self.p = p
        self.mode = mode

    def forward(self, input: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            node = self._fx_node([input])
            if node is not None:
                return node
        return _impl.stochastic_depth(input, self.p, self.mode, self.training)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(p={self.p}, mode={self.mode})"


class DropoutAdd(_FXLeaf, nn.Module):
    """``residual + dropout(input)`` in one pass: ``DropoutAdd(p)(input, residual)``."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        _impl.check_p(p)
        self.p = p

    def forward(self, input: Tensor, residual: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            node = self._fx_node([input, residual])
            if node is not None:
                return node
        return _impl.dropout_add(input, residual, None, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class BiasDropoutAdd(DropoutAdd):
    """``residual + dropout(input + bias)`` in one pass: ``BiasDropoutAdd(p)(x, b, r)``."""

    def forward(self, input: Tensor, bias: Tensor, residual: Tensor) -> Tensor:  # type: ignore[override]
        if not torch.jit.is_scripting():
            node = self._fx_node([input, bias, residual])
            if node is not None:
                return node
        return _impl.dropout_add(input, residual, bias, self.p, self.training)


def _check_last_dim(module: nn.Module) -> None:
    if len(module.normalized_shape) != 1:
        raise ValueError(
            f"{type(module).__name__} normalizes over the last dim only, so normalized_shape "
            f"must have one dim, got {tuple(module.normalized_shape)}"
        )


class DropoutAddLayerNorm(_FXLeaf, nn.LayerNorm):
    """``LayerNorm(residual + dropout(input))`` in one op (``prenorm``: ``(y, h)``)."""

    def __init__(
        self,
        normalized_shape: int | list[int] | torch.Size,
        p: float,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        prenorm: bool = False,
        residual_in_fp32: bool = False,
        memory_efficient: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        _impl.check_p(p)
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)
        _check_last_dim(self)
        self.p = p
        self.prenorm = prenorm
        self.residual_in_fp32 = residual_in_fp32
        self.memory_efficient = memory_efficient

    def forward(
        self, input: Tensor, residual: Tensor | None = None
    ) -> Tensor | tuple[Tensor, Tensor]:
        if not torch.jit.is_scripting():
            node = self._fx_node([input] if residual is None else [input, residual])
            if node is not None:
                return node
        y, h = _impl.dropout_add_norm(
            input, residual, self.weight, self.bias, None, self.p, self.training, self.eps,
            False, False, self.prenorm, self.residual_in_fp32, self.memory_efficient,
        )  # fmt: skip
        if self.prenorm:
            return y, h
        return y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p}" + _norm_options(self)


class DropoutAddRMSNorm(_FXLeaf, nn.RMSNorm):
    """``RMSNorm(residual + dropout(input))`` in one op (``prenorm``: ``(y, h)``)."""

    def __init__(
        self,
        normalized_shape: int | list[int] | torch.Size,
        p: float,
        eps: float | None = None,
        elementwise_affine: bool = True,
        prenorm: bool = False,
        residual_in_fp32: bool = False,
        memory_efficient: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        _impl.check_p(p)
        super().__init__(normalized_shape, eps, elementwise_affine, device, dtype)
        _check_last_dim(self)
        self.p = p
        self.prenorm = prenorm
        self.residual_in_fp32 = residual_in_fp32
        self.memory_efficient = memory_efficient

    def forward(
        self, input: Tensor, residual: Tensor | None = None
    ) -> Tensor | tuple[Tensor, Tensor]:
        if not torch.jit.is_scripting():
            node = self._fx_node([input] if residual is None else [input, residual])
            if node is not None:
                return node
        y, h = _impl.dropout_add_norm(
            input, residual, self.weight, None, None, self.p, self.training, self.eps,
            True, False, self.prenorm, self.residual_in_fp32, self.memory_efficient,
        )  # fmt: skip
        if self.prenorm:
            return y, h
        return y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p}" + _norm_options(self)


def _norm_options(module: nn.Module) -> str:
    names = ("prenorm", "residual_in_fp32", "memory_efficient")
    options = [name for name in names if getattr(module, name)]
    return "".join(f", {name}=True" for name in options)
