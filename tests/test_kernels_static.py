"""Static checks of the CUDA kernels, from their binaries (no GPU needed; nvcc and cuobjdump).

For every arch we ship: no register spills, and 16-byte global loads and stores in the
contiguous kernels (bench/kernels.py compiles csrc/cuda/*.cu and reads the SASS).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import kernels  # noqa: E402

needs_tools = pytest.mark.skipif(
    kernels.find_tool("nvcc") is None or kernels.find_tool("cuobjdump") is None,
    reason="needs nvcc and cuobjdump (pip install nvidia-cuda-cuobjdump)",
)


@needs_tools
@pytest.mark.parametrize("arch", kernels.ARCHS)
def test_kernels_do_not_spill_and_use_vector_io(arch):
    found = kernels.analyze(arch)
    assert found, "no kernels in csrc/cuda/*.cu"
    assert kernels.check(found) == []
    assert all(k.philox_calls >= 1 for k in found)
