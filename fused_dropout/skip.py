"""Stochastic depth that skips the compute of dropped samples.

``drop_path_residual(x, branch, p)`` returns ``x + drop_path(branch(x), p)`` but calls ``branch``
only on the samples it keeps. The per-sample decisions are those of the RNG contract, computed on
the CPU by the library's own kernel before the branch runs: a mask is a pure function of
``(seed, offset, p, batch size)``, so no device sync is needed, and a change of the contract
carries over here unchanged. ``convert(model, skip_dropped=True)`` rewires the residual blocks it
knows (see :func:`rewire`) to call it.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fused_dropout import _impl, ops

__all__ = ["DropPathResidual", "count_skipped", "drop_path_residual", "kept_samples", "rewire"]

Branch = Callable[[Tensor], Tensor]
MODES = ("sample", "subset")
_UINT64 = 1 << 64
_TWO32 = 1 << 32

# ---------------------------------------------------------------- decisions


def _draw_seed_offset(device: torch.device, generator: torch.Generator | None) -> tuple[int, int]:
    """The pair an op call on ``device`` would draw now, advancing the generator the same way."""
    seed, offset = torch.ops.fused_dropout.draw_seed_offset(device, generator)
    return seed % _UINT64, offset


def _keeps(batch: int, p: float, seed_offset: tuple[int, int]) -> Tensor:
    """Bool (batch,): what drop_path keeps at ``p`` for this pair, computed by the library's CPU
    kernel on a vector of ones (so the decisions follow the contract wherever it goes)."""
    return ops.dropout(torch.ones(batch), p, 1, False, seed_offset=seed_offset)[0] != 0


def _keeps_below(batch: int, threshold: int, seed_offset: tuple[int, int]) -> Tensor:
    """Bool (batch,): keep iff the contract word is below ``threshold`` (1 <= threshold < 2^32)."""
    # 1 - threshold/2^32 is exact in double, and the kernel's T = floor((1 - p) * 2^32) maps it
    # back to `threshold`.
    return _keeps(batch, 1.0 - threshold / _TWO32, seed_offset)


def _smallest_words(batch: int, k: int, seed_offset: tuple[int, int]) -> Tensor:
    """Bool (batch,): the ``k`` samples with the smallest contract words (ties: lowest index),
    found by bisecting the keep threshold, so that the words come from the kernel itself."""
    lo, hi = 0, _TWO32  # count(lo) < k <= count(hi); count(2^32) = batch (every word is < 2^32)
    keep_lo = torch.zeros(batch, dtype=torch.bool)
    keep_hi = torch.ones(batch, dtype=torch.bool)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        keep = _keeps_below(batch, mid, seed_offset)
        n = int(keep.sum())
        if n == k:
            return keep
        if n < k:
            lo, keep_lo = mid, keep
        else:
            hi, keep_hi = mid, keep
    # Words equal to lo (a tie, or the word 2^32 - 1 that no threshold keeps): lowest index first.
    tied = (keep_hi & ~keep_lo).nonzero().squeeze(1)
    keep_lo[tied[: k - int(keep_lo.sum())]] = True
    return keep_lo


def kept_samples(
    batch: int,
    p: float,
    mode: str = "sample",
    scale_by_keep: bool = True,
    *,
    seed_offset: tuple[int, int],
) -> tuple[Tensor, float]:
    """The kept sample indices (sorted, int64, CPU) and the scale of their branch outputs.

    ``"sample"``: sample ``i`` is kept iff ``drop_path(..., seed_offset=seed_offset)`` keeps it,
    scale ``1 / (1 - p)``. ``"subset"``: the ``max(int(batch * (1 - p)), 1)`` samples with the
    smallest contract words (a uniformly random subset), scale ``batch / k``; ``p == 1`` keeps none.
    """
    _impl.check_p(p, "drop probability")
    if mode not in MODES:
        raise ValueError(f"mode has to be one of {MODES}, but got {mode!r}")
    if p == 0.0 or batch == 0:
        return torch.arange(batch), 1.0
    if p == 1.0:
        return torch.zeros(0, dtype=torch.int64), 1.0
    if mode == "sample":
        keep = _keeps(batch, p, seed_offset)
        scale = 1.0 / (1.0 - p)
    else:
        k = max(int(batch * (1 - p)), 1)
        keep = _smallest_words(batch, k, seed_offset)
        scale = batch / k
    return keep.nonzero().squeeze(1), scale if scale_by_keep else 1.0


# ---------------------------------------------------------------- the residual


@dataclass
class _Counts:
    samples: int = 0
    skipped: int = 0


_counters: list[_Counts] = []


@contextlib.contextmanager
def count_skipped() -> Iterator[_Counts]:
    """Counts, inside the ``with`` block, the samples that ``drop_path_residual`` is given in
    training with ``p > 0`` (``samples``) and those whose branch it skips (``skipped``)."""
    counts = _Counts()
    _counters.append(counts)
    try:
        yield counts
    finally:
        _counters.remove(counts)


def _record(batch: int, kept: int) -> None:
    for c in _counters:
        c.samples += batch
        c.skipped += batch - kept


# torch.compile graph-breaks at the host-side decision: _decide wrapped by torch.compiler.disable,
# made by the module form and convert(skip_dropped=True) (outside any compiled region, and not
# at import: it imports torch._dynamo, which takes seconds).
_NOT_COMPILED = (
    "fused_dropout.drop_path_residual decides on the host which samples to keep. Without "
    "fullgraph=True the branch is still compiled (mode='subset' keeps static shapes; 'sample' "
    "compiles a dynamic batch); for one graph use drop_path_add (convert(model) without "
    "skip_dropped)."
)
_decide_uncompiled: Callable | None = None


def _prepare_compile() -> None:
    global _decide_uncompiled
    if _decide_uncompiled is None:
        _decide_uncompiled = torch.compiler.disable(_decide, reason=_NOT_COMPILED)


def _decide(
    x: Tensor,
    p: float,
    mode: str,
    scale_by_keep: bool,
    generator: torch.Generator | None,
    seed_offset: tuple[int, int] | None,
) -> tuple[Tensor | None, int, float]:
    """(indices on x's device, or None when every sample is kept; how many; scale)."""
    batch = x.shape[0]
    if seed_offset is None:
        seed_offset = _draw_seed_offset(x.device, generator)
    else:
        ops.split_seed_offset(seed_offset)  # validate
    idx, scale = kept_samples(batch, p, mode, scale_by_keep, seed_offset=seed_offset)
    k = idx.numel()
    _record(batch, k)
    if k == batch:
        return None, k, scale
    if x.device.type != "cpu" and k:
        # pinned, so that the copy does not block; the caching host allocator keeps the buffer
        # alive until the copy is done.
        idx = idx.pin_memory().to(x.device, non_blocking=True)
    return idx, k, scale


def _add_scaled(x: Tensor, x_kept: Tensor, out: Tensor, idx: Tensor | None, scale: float):
    """``x`` with ``x_kept + scale * out`` at rows ``idx`` (all rows when None), rounded as
    drop_path_add rounds: scale*out and the add in the compute type, one rounding to the dtype."""
    dtype = torch.promote_types(x.dtype, out.dtype)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    if dtype == compute:  # fp32/fp64: scale*out rounds once, the add rounds once
        x, out = x.to(dtype), out.to(dtype)
        scaled = out if scale == 1.0 else out * scale
        return x + scaled if idx is None else x.index_add(0, idx, scaled)
    rows = (x_kept.to(compute) + out.to(compute) * scale).to(dtype)
    return rows if idx is None else x.to(dtype).index_copy(0, idx, rows)


def drop_path_residual(
    x: Tensor,
    branch: Branch,
    p: float,
    training: bool = True,
    *,
    mode: str = "sample",
    scale_by_keep: bool = True,
    generator: torch.Generator | None = None,
    seed_offset: tuple[int, int] | None = None,
) -> Tensor:
    """``x + drop_path(branch(x), p)``, calling ``branch`` only on the kept samples (dim 0).

    The kept samples are gathered, ``branch`` runs on them, and ``scale * branch(...)`` is added
    into a copy of ``x`` at their rows; autograd flows through all of it.

    - ``mode="sample"`` (timm's): each sample is kept with probability ``1 - p``, exactly where
      ``drop_path(..., seed_offset=pair)`` keeps it for the same pair, scaled by ``1 / (1 - p)``.
    - ``mode="subset"`` (DINOv2's): exactly ``max(int(B * (1 - p)), 1)`` samples, a uniformly
      random subset (those with the smallest contract words), scaled by ``B / k``: a static
      shape. ``p == 1`` keeps none (DINOv2's formula would keep one).
    - The pair is ``seed_offset``, else drawn from ``generator`` (or the default generator of
      ``x``'s device) on the host, advancing it as one op call does. Decisions are made on the
      CPU; on CUDA the index tensor is sent from pinned memory without blocking.
    - No sample kept (or ``p == 1``): ``branch`` is not called and a copy of ``x`` is returned.
      Outside training (or ``p == 0``): ``x + branch(x)``, nothing drawn.
    - ``branch`` must be per-sample (no batch statistics such as BatchNorm's, which then see only
      the kept samples) and return ``x``'s shape.
    - torch.compile: graph-breaks at the host-side decision; ``"subset"`` keeps static shapes,
      ``"sample"`` recompiles once for a dynamic batch size. ``fullgraph=True`` raises, naming
      ``drop_path_add`` (for a bare functional call compiled first: dynamo's generic message).
      CUDA graph capture raises (use ``drop_path_add``, which captures).
    """
    _impl.check_p(p, "drop probability")
    if mode not in MODES:
        raise ValueError(f"mode has to be one of {MODES}, but got {mode!r}")
    if x.dim() == 0:
        raise RuntimeError("drop_path_residual: expected an input with a batch dimension, got 0-D")
    if not training or p == 0.0:
        return x + branch(x)
    if x.numel() == 0:
        return x.clone()
    decide = _decide
    if torch.compiler.is_compiling():
        # Prepared: a graph break that names the alternative. Not (a bare functional call
        # compiled first): the wrapper is made here, itself a graph break.
        decide = _decide_uncompiled or torch.compiler.disable(_decide, reason=_NOT_COMPILED)
    idx, k, scale = decide(x, p, mode, scale_by_keep, generator, seed_offset)
    if k == 0:
        return x.clone()
    x_kept = x if idx is None else x.index_select(0, idx)
    out = branch(x_kept)
    if out.shape != x_kept.shape:
        raise RuntimeError(
            f"drop_path_residual: branch returned shape {tuple(out.shape)} for an input of shape "
            f"{tuple(x_kept.shape)}; it must keep the shape"
        )
    return _add_scaled(x, x_kept, out, idx, scale)


class DropPathResidual(nn.Module):
    """``x + drop_path(branch(x))`` with ``branch`` run only on the kept samples."""

    def __init__(
        self,
        branch: nn.Module,
        drop_prob: float = 0.0,
        mode: str = "sample",
        scale_by_keep: bool = True,
    ) -> None:
        super().__init__()
        _impl.check_p(drop_prob, "drop probability")
        if mode not in MODES:
            raise ValueError(f"mode has to be one of {MODES}, but got {mode!r}")
        _prepare_compile()
        self.branch = branch
        self.drop_prob = drop_prob
        self.mode = mode
        self.scale_by_keep = scale_by_keep

    def forward(self, x: Tensor) -> Tensor:
        return drop_path_residual(
            x, self.branch, self.drop_prob, self.training, mode=self.mode,
            scale_by_keep=self.scale_by_keep,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"drop_prob={round(self.drop_prob, 3):0.3f}, mode={self.mode!r}"


# ---------------------------------------------------------------- rewiring known blocks

# A block's training forward as residuals: for each, the drop-path layer that decides it and the
# branch. None: run the block's own forward (arguments we cannot split per sample).
Plan = list[tuple[nn.Module, Branch]] | None
Spec = Callable[[nn.Module, dict], Plan]


def _chain(*residuals: tuple[str, tuple[str, ...]], kwargs_to: str = "") -> Spec:
    """The plan of a block whose forward is ``x = x + drop(f_n(...f_1(x)))`` per residual, each
    ``f`` a submodule (called) or a parameter (multiplied). The block's keyword arguments go to
    the submodule ``kwargs_to``; a per-sample ``attn_mask`` falls back to the block's forward."""

    def plan(block: nn.Module, kwargs: dict) -> Plan:
        if kwargs.get("attn_mask") is not None or (kwargs and not kwargs_to):
            return None

        def branch(names: tuple[str, ...]) -> Branch:
            def run(t: Tensor) -> Tensor:
                for name in names:
                    f = getattr(block, name)
                    if isinstance(f, Tensor):
                        t = f * t
                    else:
                        t = f(t, **kwargs) if name == kwargs_to else f(t)
                return t

            return run

        return [(getattr(block, drop), branch(names)) for drop, names in residuals]

    return plan


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


# (module, class qualname) -> plan. Each entry states its block's residual structure; the tests
# check it against the installed package (training steps against the block converted without
# skipping, eval outputs bit for bit).
_BLOCKS: dict[tuple[str, str], Spec] = {
    ("timm.models.vision_transformer", "Block"): _chain(
        ("drop_path1", ("norm1", "attn", "ls1")),
        ("drop_path2", ("norm2", "mlp", "ls2")),
        kwargs_to="attn",
    ),
    ("timm.models.vision_transformer", "ResPostBlock"): _chain(
        ("drop_path1", ("attn", "norm1")), ("drop_path2", ("mlp", "norm2")), kwargs_to="attn"
    ),
    ("timm.models.cait", "LayerScaleBlock"): _chain(
        ("drop_path", ("norm1", "attn", "gamma_1")), ("drop_path", ("norm2", "mlp", "gamma_2"))
    ),
    ("timm.models.convit", "Block"): _chain(
        ("drop_path", ("norm1", "attn")), ("drop_path", ("norm2", "mlp"))
    ),
    ("timm.models.convnext", "ConvNeXtBlock"): _timm_convnext_block,
    ("torchvision.models.convnext", "CNBlock"): _torchvision_cnblock,
    ("torchvision.models.swin_transformer", "SwinTransformerBlock"): _chain(
        ("stochastic_depth", ("norm1", "attn")), ("stochastic_depth", ("norm2", "mlp"))
    ),
    ("torchvision.models.swin_transformer", "SwinTransformerBlockV2"): _chain(
        ("stochastic_depth", ("attn", "norm1")), ("stochastic_depth", ("mlp", "norm2"))
    ),
}

_CLASS_PREFIX = "SkipDropped__"
_skip_classes: dict[type, type] = {}


def _class_name(key: tuple[str, str]) -> str:
    return _CLASS_PREFIX + "__".join(key).replace(".", "_")


def _drop_params(layer: nn.Module) -> tuple[float, bool] | None:
    """(p, scale_by_keep) of a per-sample drop layer in training; None for one we cannot skip."""
    if isinstance(layer, nn.Identity) or not layer.training:
        return 0.0, True
    kind = _drop_kind(layer)
    if kind == "DropPath":
        return float(layer.drop_prob), bool(layer.scale_by_keep)
    if kind == "StochasticDepth" and layer.mode == "row":
        return float(layer.p), True
    return None  # torchvision's mode="batch", or a layer we do not know


def _drop_kind(layer: nn.Module) -> str | None:
    """ "DropPath" / "StochasticDepth" for timm's, torchvision's and our layers, else None."""
    return _drop_kind_of(type(layer))


@functools.cache
def _drop_kind_of(cls: type) -> str | None:
    # By type, once: a timm/torchvision layer's package is imported before the layer exists.
    from fused_dropout import modules
    from fused_dropout.convert import _replaceable

    for name in ("DropPath", "StochasticDepth"):
        if issubclass(cls, getattr(modules, name)):
            return name
    name = _replaceable().get(cls)
    return name if name in ("DropPath", "StochasticDepth") else None


def _skip_class(original: type, spec: Spec, key: tuple[str, str]) -> type:
    """``original`` with a training forward that runs each branch on its kept samples only."""
    if original in _skip_classes:
        return _skip_classes[original]

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        plan = None if args or not self.training else spec(self, kwargs)
        params = None if plan is None else [_drop_params(drop) for drop, _ in plan]
        if plan is None or any(q is None for q in params):
            return original.forward(self, x, *args, **kwargs)
        mode = self.__dict__.get("drop_path_mode", "sample")
        for (_, branch), (p, scale_by_keep) in zip(plan, params):
            x = drop_path_residual(x, branch, p, mode=mode, scale_by_keep=scale_by_keep)
        return x

    forward.__doc__ = f"{original.__qualname__}.forward, running each branch on kept samples only."
    cls = type(
        original.__name__,  # repr unchanged
        (original,),
        {"__module__": __name__, "__qualname__": _class_name(key), "forward": forward},
    )
    _skip_classes[original] = cls
    return cls


def __getattr__(attr: str) -> type:
    """The rewired block classes, for unpickling (imports the block's package)."""
    if attr.startswith(_CLASS_PREFIX):
        import importlib

        for key, spec in _BLOCKS.items():
            if _class_name(key) == attr:
                original = getattr(importlib.import_module(key[0]), key[1])
                return _skip_class(original, spec, key)
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def _known_blocks() -> dict[type, tuple[Spec, tuple[str, str]]]:
    """Class -> (spec, key) for the blocks whose package is imported (never imports one)."""
    table = {}
    for key, spec in _BLOCKS.items():
        cls = getattr(sys.modules.get(key[0]), key[1], None)
        if isinstance(cls, type):
            table[cls] = (spec, key)
    return table


def _has_batchnorm(block: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in block.modules())


def rewire(model: nn.Module, mode: str = "sample", allow_batchnorm: bool = False) -> dict[str, int]:
    """Make the known residual blocks of ``model`` (in place) run each branch on its kept samples.

    A known block (timm's ViT ``Block`` and ``ResPostBlock``, CaiT ``LayerScaleBlock``, ConViT
    ``Block``, ``ConvNeXtBlock``; torchvision's ``CNBlock`` and Swin blocks) holding a drop layer
    gets a subclass of its class (same ``repr``, ``state_dict`` and ``isinstance``; it pickles)
    whose training forward calls :func:`drop_path_residual` with the drop layer's probability;
    outside training it runs the original forward. A block whose branch holds a BatchNorm is left
    unless ``allow_batchnorm``: its batch statistics would come from the kept samples only.

    Returns counts: ``"skip_dropped:<Class>"`` for rewired blocks, ``"not_skipped:<Class>"`` for
    the other modules that hold a drop-path layer (unknown blocks, or BatchNorm), also named in
    one ``UserWarning``.
    """
    if mode not in MODES:
        raise ValueError(f"mode has to be one of {MODES}, but got {mode!r}")
    known = _known_blocks()
    _prepare_compile()
    counts: dict[str, int] = {}
    left: dict[str, list[str]] = {}
    for path, module in model.named_modules():
        cls = type(module)
        if cls in _skip_classes.values():
            continue  # rewired already
        holds_drop = any(_drop_kind(child) for child in module.children())
        if not holds_drop:
            continue
        if cls in known and (allow_batchnorm or not _has_batchnorm(module)):
            spec, key = known[cls]
            module.__class__ = _skip_class(cls, spec, key)
            module.drop_path_mode = mode
            key_name = f"skip_dropped:{cls.__name__}"
        else:
            why = "its branch holds a BatchNorm" if cls in known else "unknown block"
            left.setdefault(f"{cls.__module__}.{cls.__qualname__} ({why})", []).append(path)
            key_name = f"not_skipped:{cls.__name__}"
        counts[key_name] = counts.get(key_name, 0) + 1
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
