"""What a user writes without fused_dropout: the eager compositions the benchmark
compares against (and hands to torch.compile), copied from their sources so the
benchmark needs neither timm nor torchvision nor Megatron.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


# timm/layers/drop.py (timm 1.0), verbatim apart from the annotations.
def drop_path(
    x: Tensor, drop_prob: float = 0.0, training: bool = False, scale_by_keep: bool = True
) -> Tensor:
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)  # work with diff dim tensors, not just 2D ConvNets
    random_tensor = x.new_empty(shape).bernoulli_(keep_prob)
    if keep_prob > 0.0 and scale_by_keep:
        random_tensor.div_(keep_prob)
    return x * random_tensor


# torchvision/ops/stochastic_depth.py (torchvision 0.2x), without the API-usage log.
def stochastic_depth(input: Tensor, p: float, mode: str, training: bool = True) -> Tensor:
    if p < 0.0 or p > 1.0:
        raise ValueError(f"drop probability has to be between 0 and 1, but got {p}")
    if mode not in ["batch", "row"]:
        raise ValueError(f"mode has to be either 'batch' or 'row', but got {mode}")
    if not training or p == 0.0:
        return input

    survival_rate = 1.0 - p
    if mode == "row":
        size = [input.shape[0]] + [1] * (input.ndim - 1)
    else:
        size = [1] * input.ndim
    noise = torch.empty(size, dtype=input.dtype, device=input.device)
    noise = noise.bernoulli_(survival_rate)
    if survival_rate > 0.0:
        noise.div_(survival_rate)
    return input * noise


# megatron/core/fusions/fused_bias_dropout.py: _bias_dropout_add_func (unfused path).
def bias_dropout_add(
    x: Tensor, bias: Tensor, residual: Tensor, prob: float, training: bool
) -> Tensor:
    out = F.dropout(x + bias, p=prob, training=training)
    out = residual + out
    return out


def dropout_add(x: Tensor, residual: Tensor, p: float) -> Tensor:
    """A transformer's ``x = x + self.dropout(branch)``."""
    return residual + F.dropout(x, p, True)


def dropout_add_layer_norm(
    x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor, p: float
) -> Tensor:
    """BERT's ``LayerNorm(dropout(dense(h)) + input)`` after the dense layer."""
    return F.layer_norm(residual + F.dropout(x, p, True), weight.shape, weight, bias)


def drop_path_add(residual: Tensor, branch: Tensor, p: float) -> Tensor:
    """timm's block: ``x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))``."""
    return residual + drop_path(branch, p, True)


def channel_dropout(x: Tensor, p: float) -> Tensor:
    """torch's channel-wise dropout matching the rank: dropout1d/2d/3d."""
    fn = {3: F.dropout1d, 4: F.dropout2d, 5: F.dropout3d}[x.ndim]
    return fn(x, p, True)
