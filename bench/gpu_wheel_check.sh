#!/usr/bin/env bash
# The CUDA wheel on a machine with a GPU, in one command (prints everything; about 5 minutes):
#
#   bench/gpu_wheel_check.sh
#
# Builds FUSED_DROPOUT_AOT=1 FUSED_DROPOUT_BUILD_CUDA=1 pip wheel with the default wheel archs
# (TORCH_CUDA_ARCH_LIST honoured) from a copy of this checkout, timed; shows its size and the
# archs it holds (cuobjdump); installs it into a fresh venv (torch from this python by a .pth
# file) and, with no compiler, ninja or nvcc on PATH: imports it, checks that the GPU gives the
# bits of every CPU path (dropout, dropout_add with a bias, a row mask; four dtypes), and prints
# python -m fused_dropout. Needs torch (a CUDA build), nvcc and pip; no network.
set -u -o pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
echo "== $(grep -m1 'model name' /proc/cpuinfo), $(nproc) cores; $(nvidia-smi -L 2>&1 | head -1)"
"$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__)"

mkdir "$WORK/src"
cp -r "$REPO"/{setup.py,pyproject.toml,README.md,MANIFEST.in,csrc,fused_dropout} "$WORK/src/"
echo "== building the wheel (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-unset, so the default wheel list})"
start=$SECONDS
(cd "$WORK/src" && FUSED_DROPOUT_AOT=1 FUSED_DROPOUT_BUILD_CUDA=1 \
    "$PY" -m pip wheel --no-build-isolation --no-deps -w "$WORK/dist" . >"$WORK/build.log" 2>&1) ||
    { tail -n 40 "$WORK/build.log"; exit 1; }
WHL=$(ls "$WORK"/dist/*.whl)
echo "built in $((SECONDS - start)) s: $(basename "$WHL"), $(stat -c %s "$WHL") bytes"
mkdir "$WORK/unzipped" && (cd "$WORK/unzipped" && "$PY" -m zipfile -e "$WHL" .)
SO=$(ls "$WORK"/unzipped/fused_dropout/_C*.so)
cat "$WORK/unzipped/fused_dropout/_C_build_info.json"
CUOBJDUMP=$(cd "$REPO" && "$PY" -c "from bench.kernels import find_tool; print(find_tool('cuobjdump'))")
echo "SASS: $("$CUOBJDUMP" --list-elf "$SO" | grep -o 'sm_[0-9a-z]*' | sort -u | tr '\n' ' ')"
echo "PTX: $("$CUOBJDUMP" --list-ptx "$SO" | grep -o 'sm_[0-9a-z]*' | sort -u | tr '\n' ' ')"

echo "== installed into a fresh venv; run with no compiler on PATH"
"$PY" -m venv --without-pip "$WORK/venv"
SITE=$("$WORK/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
"$PY" -c "import pathlib, torch; print(pathlib.Path(torch.__file__).parent.parent)" >"$SITE/torch.pth"
"$PY" -m pip --python "$WORK/venv/bin/python" install -q --no-deps --no-index "$WHL" || exit 1
cd "$WORK" || exit 1
run() {
    env PATH="$WORK/venv/bin" CXX=/nonexistent CUDA_HOME=/nonexistent \
        TORCH_EXTENSIONS_DIR="$WORK/extensions" "$WORK/venv/bin/python" "$@"
}
run - <<'PY' || exit 1
import time

import torch

t = time.perf_counter()
import fused_dropout

seconds = time.perf_counter() - t
from fused_dropout import _loader, ops

lib = _loader.loaded()
print(f"import {seconds:.3f} s: {lib.plan.kind} {lib.plan.path}, CUDA kernels {lib.with_cuda}")
paths = [c for c in ops.cpu_capabilities() if not ops.cpu_capability_missing(c)]
ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def calls(x, r, b):
    return [
        ops.dropout(x, 0.3, seed_offset=(7, 8))[0],
        ops.dropout_add(x, r, b, 0.3, seed_offset=(9, 4))[0],
        ops.dropout(x, 0.3, mask_ndim=1, seed_offset=(5, 0))[0],
    ]


failed = False
for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
    x = torch.randn(3, 1000003).to(dtype)
    r, b = torch.randn_like(x), torch.randn(1000003).to(dtype)
    got = calls(x.cuda(), r.cuda(), b.cuda())
    for path in paths:
        ops.set_cpu_capability(path)
        for want, have in zip(calls(x, r, b), got):
            bits = ints[want.element_size()]
            failed |= not torch.equal(want.view(bits), have.cpu().view(bits))
    print(f"{dtype}: GPU == CPU paths {', '.join(paths)}: {not failed}")
raise SystemExit(1 if failed else 0)
PY
run -m fused_dropout
[ -e "$WORK/extensions" ] && { echo "FAILED: something was built into $WORK/extensions"; exit 1; }
echo "== OK (nothing built on import; $WORK)"
