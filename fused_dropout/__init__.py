"""fused_dropout: fused, mask-free dropout kernels for PyTorch (CPU and CUDA).

``import fused_dropout`` builds the C++/CUDA extension on first use (cached) and
registers the ops under ``torch.ops.fused_dropout``.
"""

from fused_dropout import _loader

_loader.load()

from fused_dropout import blocks, functional, functional_mode, ops, skip  # noqa: E402  (needs the loaded ops)
from fused_dropout.convert import convert  # noqa: E402
from fused_dropout.functional_mode import mode  # noqa: E402
from fused_dropout.modules import (  # noqa: E402
    AlphaDropout,
    BiasDropoutAdd,
    Dropout,
    Dropout1d,
    Dropout2d,
    Dropout3d,
    DropoutAdd,
    DropoutAddLayerNorm,
    DropoutAddRMSNorm,
    DropPath,
    DropPathAdd,
    FeatureAlphaDropout,
    StochasticDepth,
)
from fused_dropout.skip import DropPathResidual  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "AlphaDropout",
    "BiasDropoutAdd",
    "DropPath",
    "DropPathAdd",
    "DropPathResidual",
    "Dropout",
    "Dropout1d",
    "Dropout2d",
    "Dropout3d",
    "DropoutAdd",
    "DropoutAddLayerNorm",
    "DropoutAddRMSNorm",
    "FeatureAlphaDropout",
    "StochasticDepth",
    "blocks",
    "convert",
    "functional",
    "functional_mode",
    "mode",
    "ops",
    "skip",
]
