"""Drop-in modules. Each torch layer is subclassed, so isinstance, repr and state_dict
are unchanged. DropPath and StochasticDepth copy timm's and torchvision's attributes and
repr without importing those packages (``convert`` makes the modules it swaps in
subclasses of theirs too)."""

from __future__ import annotations

from torch import Tensor, nn

from fused_dropout import functional as F

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
    "FeatureAlphaDropout",
    "StochasticDepth",
]


class Dropout(nn.Dropout):
    """``torch.nn.Dropout`` computed by fused_dropout's kernels."""

    def forward(self, input: Tensor) -> Tensor:
        return F.dropout(input, self.p, self.training, self.inplace)


class Dropout1d(nn.Dropout1d):
    """``torch.nn.Dropout1d`` computed by fused_dropout's kernels."""

    def forward(self, input: Tensor) -> Tensor:
        return F.dropout1d(input, self.p, self.training, self.inplace)


class Dropout2d(nn.Dropout2d):
    """``torch.nn.Dropout2d`` computed by fused_dropout's kernels."""

    def forward(self, input: Tensor) -> Tensor:
        return F.dropout2d(input, self.p, self.training, self.inplace)


class Dropout3d(nn.Dropout3d):
    """``torch.nn.Dropout3d`` computed by fused_dropout's kernels."""

    def forward(self, input: Tensor) -> Tensor:
        return F.dropout3d(input, self.p, self.training, self.inplace)


class AlphaDropout(nn.AlphaDropout):
    """``torch.nn.AlphaDropout`` computed by fused_dropout's kernels (ignores inplace, as torch)."""

    def forward(self, input: Tensor) -> Tensor:
        return F.alpha_dropout(input, self.p, self.training)


class FeatureAlphaDropout(nn.FeatureAlphaDropout):
    """``torch.nn.FeatureAlphaDropout`` computed by fused_dropout's kernels."""

    def forward(self, input: Tensor) -> Tensor:
        return F.feature_alpha_dropout(input, self.p, self.training)


class DropPath(nn.Module):
    """timm's ``DropPath``: drops whole samples, scaling the kept ones by ``1/keep``."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True) -> None:
        nn.Module.__init__(self)  # not super(): convert() may put timm's class next in the MRO
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x: Tensor) -> Tensor:
        return F.drop_path(x, self.drop_prob, self.training, self.scale_by_keep)

    def extra_repr(self) -> str:
        return f"drop_prob={round(self.drop_prob, 3):0.3f}"


class DropPathAdd(DropPath):
    """``residual + drop_path(branch)`` in one pass: ``DropPathAdd(p)(residual, branch)``."""

    def forward(self, residual: Tensor, branch: Tensor) -> Tensor:  # type: ignore[override]
        return F.drop_path_add(residual, branch, self.drop_prob, self.training, self.scale_by_keep)


class StochasticDepth(nn.Module):
    """torchvision's ``StochasticDepth`` (modes ``"row"`` and ``"batch"``)."""

    def __init__(self, p: float, mode: str) -> None:
        nn.Module.__init__(self)  # not super(): see DropPath
        self.p = p
        self.mode = mode

    def forward(self, input: Tensor) -> Tensor:
        return F.stochastic_depth(input, self.p, self.mode, self.training)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(p={self.p}, mode={self.mode})"


class DropoutAdd(nn.Module):
    """``residual + dropout(input)`` in one pass: ``DropoutAdd(p)(input, residual)``."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        F._check_p(p)
        self.p = p

    def forward(self, input: Tensor, residual: Tensor) -> Tensor:
        return F.dropout_add(input, residual, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class BiasDropoutAdd(DropoutAdd):
    """``residual + dropout(input + bias)`` in one pass: ``BiasDropoutAdd(p)(x, b, r)``."""

    def forward(self, input: Tensor, bias: Tensor, residual: Tensor) -> Tensor:  # type: ignore[override]
        return F.bias_dropout_add(input, bias, residual, self.p, self.training)
