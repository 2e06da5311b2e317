"""Static checks of the CUDA kernels, from their binaries (no GPU needed; nvcc and cuobjdump).

The package is built with FUSED_DROPOUT_BUILD_CUDA=1 (compiled and linked for sm_80 and sm_90,
not run), and bench/kernels.py reads the kernels back from that library: for every arch we ship,
no register spills, 16-byte global loads and stores in the contiguous kernels, and one Philox
call per 8 elements on the steady-state path of every element-wise kernel. A planted bug shows
that the Philox check can fail. Every test here needs that build (minutes on 2 cores): ``slow``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cuda_host
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench import kernels  # noqa: E402

# The planted bug of the Philox check: no first draw (a constant block), only the tie draw.
NO_FIRST_DRAW = cuda_host.Mutation(
    "no first draw",
    "cuda/dropout.cu",
    "const PhiloxBlock b = stream.group(g);",
    "const PhiloxBlock b = {{0x3C6EF372u, 0xA54FF53Au, 0x510E527Fu, 0x9B05688Cu}};",
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        kernels.find_tool("nvcc") is None or kernels.find_tool("cuobjdump") is None,
        reason="needs nvcc and cuobjdump (pip install nvidia-cuda-cuobjdump)",
    ),
]


@pytest.fixture(scope="module")
def cuda_build(tmp_path_factory) -> dict:
    """FUSED_DROPOUT_BUILD_CUDA=1 on a machine without a GPU, in a fresh cache: the library's
    path and whether it has CUDA kernels. The one CUDA compile of this module."""
    if torch.version.cuda is None:
        pytest.skip("needs a CUDA build of torch")
    env = dict(
        os.environ,
        FUSED_DROPOUT_BUILD_CUDA="1",
        TORCH_EXTENSIONS_DIR=str(tmp_path_factory.mktemp("cuda_build")),
    )
    env.pop("TORCH_CUDA_ARCH_LIST", None)
    code = (
        "import json, fused_dropout\n"
        "from fused_dropout import _loader\n"
        "print(json.dumps({'path': _loader.load(), 'cuda': _loader.built_with_cuda()}))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert r.returncode == 0, r.stderr[-5000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def analyzed(cuda_build) -> dict[str, list[kernels.Kernel]]:
    """arch -> the kernels of the forced CUDA build, read from its library."""
    return kernels.read_library(Path(cuda_build["path"]))


def test_forced_cuda_build_of_the_package_links_sm80_sm90(cuda_build, analyzed):
    """The real extension compiles and links with every kernel for both archs (the next
    tests check those kernels: no spills, vector I/O). Compiled, not run."""
    assert cuda_build["cuda"] is True
    assert sorted(analyzed) == sorted(kernels.ARCHS)
    assert len(analyzed["sm_80"]) == len(analyzed["sm_90"]) >= 20  # every variant, both archs


@pytest.mark.parametrize("arch", kernels.ARCHS)
def test_kernels_do_not_spill_and_use_vector_io(analyzed, arch):
    """kernels.check: no spills (local memory) or stack frame, 16-byte I/O; contract v2's one
    Philox call per 8 mask elements on each element-wise kernel's steady-state path (a tile of
    16 fp16/bf16 or 8 fp32/fp64 elements: 2 or 1 calls), which only its p == 0 test skips."""
    found = analyzed[arch]
    assert found, "no kernels in the library"
    assert kernels.check(found) == []
    # every kernel draws its mask, but norm.cu's column totals (sums of partials: no mask)
    drawing = [k for k in found if "column_totals" not in k.name]
    assert len(drawing) < len(found) and all(k.philox_calls >= 1 for k in drawing)
    # 16-byte loads and stores in every kernel but the column totals (strided by design)
    assert all(k.ldg128 >= 1 and k.stg128 >= 1 for k in drawing)


def test_throughput_model_finds_the_steady_state_path_of_every_elementwise_kernel(analyzed):
    """bench/kernels.py's model: every element-wise kernel has a steady-state vector path
    (two 16-byte loads per operand; its Philox calls: the test above) and is memory-bound
    on an H200 with at least 1.5x headroom (issue 9's goal), the fp16/bf16 dropout forward
    (and every backward) at 16.5 instructions per element or fewer. A static model of the
    SASS (nvcc 13.0), not a measurement."""
    found = analyzed["sm_90"]
    elementwise = [k for k in found if (f := kernels.kernel_flags(k.name)) and f[1]]
    assert elementwise and all(k.tile and k.path_instrs > 0 for k in elementwise)
    for k in elementwise:
        dtype = kernels.kernel_flags(k.name)[0]
        loads = k.tile * kernels.ITEMSIZE[dtype] // 16
        assert loads >= 2, k.name  # two 16-byte loads per operand in flight per thread
        assert k.ldg128 >= loads, k.name
    h200 = next(g for g in kernels.GPUS if g.name == "H200")
    for k in elementwise:
        b = kernels.bounds(k, h200)
        assert b.bound == "memory" and b.headroom >= 1.5, (k.name, k.instrs_per_element)
    for dtype in ("half", "bfloat16"):
        (dropout,) = [k for k in elementwise if k.name == f"masked_kernel<{dtype}, 1, 0, 0, 0>"]
        assert dropout.instrs_per_element <= 16.5, dropout.instrs_per_element


def test_philox_check_fails_when_the_first_draw_is_gone(tmp_path):
    """Issue 20's planted bug: the first draw replaced by a constant block, so that the
    steady-state path runs no Philox and only the tie branch draws. Counting the whole
    kernel's multiplies passed it; the steady-state path's count (fp16/bf16: one call, not
    two) and its second way round the draws (the tie test; fp32/fp64) fail it."""
    src = tmp_path / "csrc"
    shutil.copytree(REPO / "csrc", src)
    kernel = src / NO_FIRST_DRAW.path
    kernel.write_text(NO_FIRST_DRAW.apply(kernel.read_text()))
    for other in (src / "cuda").glob("*.cu"):  # the bug is in dropout.cu: compile it alone
        if other != kernel:
            other.unlink()
    found = kernels.analyze("sm_90", src)
    problems = kernels.check(found)
    elementwise = [k for k in found if (f := kernels.kernel_flags(k.name)) and f[1]]
    assert len(elementwise) == 16
    for k in elementwise:
        dtype = kernels.kernel_flags(k.name)[0]
        expected = "Philox multiplies" if dtype in ("half", "bfloat16") else "branches skip"
        assert any(f" {k.name}: " in p and expected in p for p in problems), (k.name, problems)


def test_norm_model_finds_the_vector_paths_of_the_norm_kernels(analyzed):
    """bench/kernels.py's model of norm.cu (issue 18): the LayerNorm forward (h kept in
    registers) and backward (rows of whole aligned chunks) of fp32, fp16 and bf16 each have a
    vector path at every hidden size from 768 to 8192, the forward's with one Philox call per 8
    elements and every element squared once (norm_forward_path). Every one is memory-bound on
    an H200 with at least 1.5x headroom (fp16/bf16 forward 1.51-1.82x, fp16/bf16 backward
    1.65-1.76x). A static model of the SASS, not a measurement."""
    found = analyzed["sm_90"]
    norms = {k.name: k for k in found if kernels.is_modelled_norm(k)}
    assert sorted(norms) == sorted(
        f"norm_{kind}_kernel<{dtype}, 0, 0, {8 if kind == 'forward' else 1}>"
        for kind in ("forward", "backward")
        for dtype in ("float", "half", "bfloat16")
    )
    h200 = next(g for g in kernels.GPUS if g.name == "H200")
    for name, k in norms.items():
        assert sorted(k.norm_per_element) == sorted(kernels.NORM_HIDDEN), name
        for cols in kernels.NORM_HIDDEN:
            instrs, _ = k.norm_per_element[cols]
            # a whole turn of the row loop was found, not a fragment or several turns
            assert 20 < instrs < 200, (name, cols, instrs)
            headroom = kernels.norm_bounds(k, h200, cols).headroom
            assert headroom >= 1.5, (name, cols, headroom)


def test_sure_loads_counts_one_side_of_a_predicate():
    """The loads a block runs when the call has every operand: a weight in fp32 (@P0, two
    vectors) or in the dtype (@!P0, one) is one load; one under @P1 alone (an operand's) is
    one; a narrower load is none."""
    block = [
        "LDG.E.128 R4, desc[UR4][R2.64]",
        "@P0 LDG.E.128 R8, desc[UR4][R6.64]",
        "@P0 LDG.E.128 R12, desc[UR4][R6.64+0x10]",
        "@!P0 LDG.E.128 R16, desc[UR4][R10.64]",
        "@P1 LDG.E.128 R20, desc[UR4][R14.64]",
        "LDG.E R24, desc[UR4][R18.64]",
    ]
    assert kernels._sure_loads(block) == 3
    assert kernels._sure_loads(block[:4]) == 2  # the unpredicated one and one side of P0
