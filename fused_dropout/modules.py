"""Drop-in modules: each subclasses the layer it replaces, so isinstance, repr and
state_dict are unchanged."""

from __future__ import annotations

import torch
from torch import Tensor

from fused_dropout import functional as F

__all__ = ["Dropout"]


class Dropout(torch.nn.Dropout):
    """``torch.nn.Dropout`` computed by fused_dropout's kernels."""

    def forward(self, input: Tensor) -> Tensor:
        return F.dropout(input, self.p, self.training, self.inplace)
