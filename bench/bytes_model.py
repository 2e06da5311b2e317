"""The bytes-moved model: the one place that says what each implementation reads
and writes in main memory (bench/README.md explains it).

Every kernel an implementation launches reads each of its tensor operands once
and writes each result once; caches, and temporaries inside a kernel, are
ignored. Units: T = one full tensor (numel * itemsize), K = the noise/mask
tensor in the input's dtype (mask elements * itemsize), B = a bool mask
(1 byte per mask element), b = the bias (and a norm's weight).
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.ops import VECTORS, Op, full_inputs, mask_numel


@dataclass(frozen=True)
class Dims:
    T: int  # bytes of one full-size tensor
    K: int  # bytes of the mask in the input dtype
    B: int  # bytes of a bool mask
    b: int  # bytes of the bias and weight vectors (0 if none)
    inputs: int  # full-size inputs read by the forward (1, or 2 for the fused adds)


def dims_of(op: Op, inputs) -> Dims:
    full = full_inputs(op, inputs)
    x, m = full[0], mask_numel(op, tuple(full[0].shape))
    bias = sum(t.nbytes for a, t in zip(op.args, inputs) if a in VECTORS)
    return Dims(x.nbytes, m * x.element_size(), m, bias, len(full))


Step = tuple[str, int, int]  # (kernel, bytes read, bytes written)


def _torch_dropout(d: Dims, alpha: bool) -> tuple[list[Step], list[Step]]:
    """aten's _dropout_impl (all CPU dropouts, and CUDA's feature/alpha ones), which is
    also how timm's drop_path and torchvision's stochastic_depth are written."""
    T, K = d.T, d.K
    if alpha:
        noise = [
            ("bernoulli_", 0, K),
            ("noise.add(-1)", K, K),
            ("b.mul_", K, K),
            ("b.add_", K, K),
            ("noise.mul_", K, K),
        ]
        fwd = noise + [("x * noise", T + K, T), ("+ b", T + K, T)]
    else:
        fwd = [("bernoulli_", 0, K), ("noise.div_", K, K), ("x * noise", T + K, T)]
    return fwd, [("grad * noise", T + K, T)]


def _eager_dropout(op: Op, d: Dims, device: str) -> tuple[list[Step], list[Step]]:
    if device == "cuda" and op.kind in ("elementwise", "bias") and not op.alpha:
        return ([("native_dropout", d.T, d.T + d.B)], [("native_dropout_backward", d.T + d.B, d.T)])
    return _torch_dropout(d, op.alpha)


def _eager(op: Op, d: Dims, device: str) -> tuple[list[Step], list[Step]]:
    fwd, bwd = _eager_dropout(op, d, device)
    if d.b:
        fwd = [("x + bias", d.T + d.b, d.T)] + fwd
        bwd = bwd + [("sum(grad) for bias", d.T, d.b)]
    if op.fused_add:  # the residual's gradient is the incoming gradient itself: no traffic
        fwd = fwd + [("residual + y", 2 * d.T, d.T)]
    return fwd, bwd


def _fused(d: Dims, mask: int) -> tuple[list[Step], list[Step]]:
    """One kernel each way; `mask` bytes saved by the forward and read by the backward."""
    fwd = [("fused kernel", d.inputs * d.T + d.b, d.T + mask)]
    bwd = [("fused kernel", d.T + mask, d.T)]
    if d.b:
        bwd.append(("sum(grad) for bias", d.T, d.b))
    return fwd, bwd


def _compiled_mask(op: Op, d: Dims) -> int:
    """What torch.compile saves for backward (measured: bench/run.py's saved column): a bool
    mask for dropout's decomposition, else torch's noise tensor in the input dtype."""
    return d.B if op.kind in ("elementwise", "bias") and not op.alpha else d.K


def _limit(d: Dims) -> tuple[list[Step], list[Step]]:
    name = "a + b" if d.inputs == 2 else "x * 2"
    return [(name, d.inputs * d.T, d.T)], [("grad * 2", d.T, d.T)]


def _norm(op: Op, impl: str, d: Dims, device: str) -> tuple[list[Step], list[Step]]:
    """dropout + add + LayerNorm. Backward keeps h (T): LayerNorm's input, or the fused op's."""
    T, b = d.T, d.b
    norm_fwd = [("layer_norm", T + b, T + T)]  # reads h, writes y and keeps h alive
    norm_bwd = [("layer_norm_backward", 2 * T + b, T + b)]  # dy, h -> dh, dweight, dbias
    if impl == "ours":  # one pass each way; the mask comes back from the pair
        return [("fused kernel", 2 * T + b, 2 * T)], [("fused backward", 2 * T + b, 2 * T + b)]
    if impl == "compile":  # one forward kernel writing y, h and a bool mask
        fwd = [("fused kernel", 2 * T + b, 2 * T + d.B)]
        return fwd, [("fused backward", 2 * T + d.B + b, 2 * T + b)]
    if impl == "unfused":  # our dropout_add, then torch's LayerNorm
        return [("dropout_add", 2 * T, T)] + norm_fwd, norm_bwd + [("dropout backward", T, T)]
    fwd, bwd = _eager_dropout(op, d, device)
    return fwd + [("residual + y", 2 * T, T)] + norm_fwd, norm_bwd + bwd


def steps(op: Op, impl: str, d: Dims, device: str) -> dict[str, list[Step]]:
    """{"fwd", "bwd", "fwdbwd"} -> the kernels of ``impl`` with their traffic."""
    if op.norm and impl != "limit":
        fwd, bwd = _norm(op, impl, d, device)
    elif impl == "ours":  # regenerates the mask in backward from 16 bytes
        fwd, bwd = _fused(d, 0)
    elif impl == "compile":  # inductor fuses, and saves a mask (see _compiled_mask)
        fwd, bwd = _fused(d, _compiled_mask(op, d))
    elif impl == "eager":
        fwd, bwd = _eager(op, d, device)
    elif impl == "limit":
        fwd, bwd = _limit(d)
    else:
        raise KeyError(impl)
    return {"fwd": fwd, "bwd": bwd, "fwdbwd": fwd + bwd}


def bytes_moved(op: Op, impl: str, d: Dims, device: str) -> dict[str, int]:
    """{pass: bytes read + written}."""
    return {k: sum(r + w for _, r, w in v) for k, v in steps(op, impl, d, device).items()}
