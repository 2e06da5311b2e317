"""Call every CUDA kernel variant once, on small tensors, and check each against the CPU.

    compute-sanitizer --tool memcheck python bench/gpu_variants.py

bench/gpu_check.sh runs it under compute-sanitizer's memcheck and racecheck. The variants:
every dtype x element-wise / broadcast mask x residual x bias x shift (alpha), with vector
and scalar (misaligned) paths, tails, in-place, backward, p = 0 and 1, an empty tensor, and a
CUDA graph capture and replay.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fused_dropout import ops  # noqa: E402

SO = (0xDEADBEEF12345678, 4 * 12345)
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def same(cuda: torch.Tensor, cpu: torch.Tensor, what: str) -> None:
    got = cuda.cpu().contiguous()
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[got.element_size()]
    if not torch.equal(got.view(ints), cpu.contiguous().view(ints)):
        raise AssertionError(f"{what}: CUDA and CPU differ")


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    calls = 0
    for dt in DTYPES:
        name = str(dt).removeprefix("torch.")
        for n in (1, 5, 4097):
            x = torch.randn(n + 1, dtype=torch.float64).to(dt)
            for label, t in (("aligned", x[:n]), ("misaligned", x[1:])):
                for p in (0.0, 0.5, 1.0):
                    out, pair = ops.dropout(t.cuda(), p, seed_offset=SO)
                    same(out, ops.dropout(t, p, seed_offset=SO)[0], f"dropout {name} {n} {label}")
                    grad = ops.dropout_backward(t.cuda(), pair, p)
                    same(grad, ops.dropout_backward(t, pair.cpu(), p), f"backward {name} {n}")
                    calls += 2
        x = torch.randn(3, 5, 7, 9, dtype=torch.float64).to(dt)
        for layout, t in (
            ("contiguous", x),
            ("channels_last", x.to(memory_format=torch.channels_last)),
        ):
            for k in (-1, 0, 1, 2):
                for alpha in (False, True):
                    got = ops.dropout(t.cuda(), 0.4, k, True, alpha, seed_offset=SO)[0]
                    want = ops.dropout(t, 0.4, k, True, alpha, seed_offset=SO)[0]
                    same(got, want, f"dropout {name} {layout} k={k} alpha={alpha}")
                    calls += 1
            inplace = t.cuda()
            ops.dropout_(inplace, 0.5, 2, seed_offset=SO)
            same(inplace, ops.dropout(t, 0.5, 2, seed_offset=SO)[0], f"dropout_ {name} {layout}")
            calls += 1
        x = torch.randn(4, 77, 96, dtype=torch.float64).to(dt)
        r = torch.randn(4 * 77 * 96 + 1, dtype=torch.float64).to(dt)
        bias = torch.randn(96, dtype=torch.float64).to(dt)
        for rl, res in (("aligned", r[:-1].view(x.shape)), ("misaligned", r[1:].view(x.shape))):
            for b in (None, bias):
                for k in (-1, 1):
                    got = ops.dropout_add(
                        x.cuda(),
                        res.cuda(),
                        None if b is None else b.cuda(),
                        0.3,
                        k,
                        seed_offset=SO,
                    )[0]
                    want = ops.dropout_add(x, res, b, 0.3, k, seed_offset=SO)[0]
                    same(got, want, f"dropout_add {name} residual {rl} bias={b is not None} k={k}")
                    calls += 1
    empty = torch.empty(0, device="cuda")
    assert ops.dropout(empty, 0.5, seed_offset=(5, 8))[1].tolist() == [5, 8]
    x = torch.ones(1 << 16, device="cuda")
    ops.dropout(x, 0.5)  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, pair = ops.dropout(x, 0.5)
    for _ in range(2):
        graph.replay()
        seed, offset = (int(v) for v in pair.cpu())
        same(out, ops.dropout(x.cpu(), 0.5, seed_offset=(seed % (1 << 64), offset))[0], "graph")
    torch.cuda.synchronize()
    print(f"{calls} kernel calls, every variant: CUDA matches the CPU bit for bit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
