"""fused_dropout: fused, mask-free dropout kernels for PyTorch (CPU and CUDA).

``import fused_dropout`` builds the C++/CUDA extension on first use (cached) and
registers the ops under ``torch.ops.fused_dropout``.
"""

__version__ = "0.1.0"

from fused_dropout import _loader

if not _loader.running_env_report():  # `python -m fused_dropout` loads the library itself
    _loader.load()

    import sys as _sys

    from fused_dropout import blocks, distributed, functional, functional_mode, ops, skip
    from fused_dropout.convert import convert
    from fused_dropout.functional_mode import mode
    from fused_dropout.modules import (
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
    from fused_dropout.skip import DropPathResidual

    if "torch.distributed.tensor" in _sys.modules:  # else distributed.enable_dtensor()
        from fused_dropout import _dtensor

        _dtensor.register()

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
    "distributed",
    "functional",
    "functional_mode",
    "mode",
    "ops",
    "skip",
]
