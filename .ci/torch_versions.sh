#!/usr/bin/env bash
# The torch-version matrix of README's "Tested torch versions", reproduced:
#
#   bash .ci/torch_versions.sh 2.6.0 2.15.0
#
# For each torch version given: a venv of its own ($FUSED_DROPOUT_VERSIONS_DIR/torch-<version>,
# default ~/.cache/fused_dropout-versions; reused when it exists), torch and its torchvision from
# the package index, this checkout installed there with its test extra (editable), then
#   - `python -m fused_dropout`, the environment report,
#   - the default test suite, `python -m pytest -q -m "not slow"`,
# each with its log under $FUSED_DROPOUT_VERSIONS_DIR/results/. One summary line per version goes
# to stdout and to results/summary.txt. The exit status is 0 only if every version passed.
#
# Not part of CI (.ci/run tests torch 2.14.1 only): each version is 4-6 GB of downloads (a CUDA
# build of torch and the nvidia packages) and about 10-15 minutes of tests on 2 cores, beyond
# CI's 90-minute budget once the main suite has run. Versions run one after the other.
#
# The extension is built cold for each version into results/build-<version> (MAX_JOBS defaults
# to 1 here: the machine is shared). torch newer than this machine's pip cap (/etc/xdg/pip, see
# README) installs all the same: the constraints file given to pip below replaces the cap for
# these pip commands only.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO="$PWD"

if [ "$#" -eq 0 ]; then
    echo "usage: bash .ci/torch_versions.sh TORCH_VERSION... (e.g. 2.6.0 2.15.0)" >&2
    exit 2
fi

DIR="${FUSED_DROPOUT_VERSIONS_DIR:-$HOME/.cache/fused_dropout-versions}"
RESULTS="$DIR/results"
mkdir -p "$RESULTS"
PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"
export MAX_JOBS="${MAX_JOBS:-1}"
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
    export CUDA_HOME=/usr/local/cuda
fi

# The torchvision release built for each torch (torchvision's README table); none for a
# version not listed (its torchvision tests then skip). PyPI has no
# torchvision for 2.15 yet (2026-12-05): 0.29.2 asks for torch>=2.14.0, and its C++ ops
# load and run on 2.15.0 (torchvision.ops.nms checked).
torchvision_for() {
    case "$1" in
        2.4.0) echo 0.19.0 ;;
        2.4.1) echo 0.19.1 ;;
        2.5.0) echo 0.20.0 ;;
        2.5.1) echo 0.20.1 ;;
        2.6.0) echo 0.21.0 ;;
        2.7.0) echo 0.22.0 ;;
        2.7.1) echo 0.22.1 ;;
        2.8.0) echo 0.23.0 ;;
        2.9.0) echo 0.24.0 ;;
        2.9.1) echo 0.24.1 ;;
        2.14.1) echo 0.29.1 ;;
        2.15.0) echo 0.29.2 ;;
        *) echo "" ;;
    esac
}

summary() {
    echo "$1" | tee -a "$RESULTS/summary.txt"
}

status=0
for version in "$@"; do
    venv="$DIR/torch-$version"
    log="$RESULTS/torch-$version"
    tv="$(torchvision_for "$version")"
    constraints="$RESULTS/torch-$version.constraints"
    {
        echo "torch==$version"
        if [ -n "$tv" ]; then echo "torchvision==$tv"; fi
    } >"$constraints"
    echo "== torch $version (torchvision ${tv:-none}): venv $venv, logs $log.*"

    if [ ! -x "$venv/bin/python" ]; then
        "$PY" -m venv "$venv" || { summary "torch $version: FAILED to create the venv"; status=1; continue; }
    fi
    # PIP_CONSTRAINT replaces the configured constraints (the machine's cap) for these commands.
    # The package goes in with --no-deps, its dependencies and test extra apart (all but torch,
    # from pyproject.toml), so that a torch below pyproject's floor can be tried as well.
    if ! PIP_CONSTRAINT="$constraints" "$venv/bin/python" -m pip install --progress-bar off \
            -U setuptools wheel "torch==$version" ${tv:+"torchvision==$tv"} >"$log.install.log" 2>&1 ||
       ! deps="$("$venv/bin/python" - "$REPO/pyproject.toml" <<'PY'
import re, sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
for dep in project["dependencies"] + project["optional-dependencies"]["test"]:
    if re.split(r"[<>=~!;\[ ]", dep)[0] != "torch":
        print(dep)
PY
)" ||
       ! PIP_CONSTRAINT="$constraints" "$venv/bin/python" -m pip install --progress-bar off \
            $deps >>"$log.install.log" 2>&1 ||  # word-split on purpose
       ! PIP_CONSTRAINT="$constraints" "$venv/bin/python" -m pip install --progress-bar off \
            --no-deps --no-build-isolation -e "$REPO" >>"$log.install.log" 2>&1; then
        summary "torch $version: FAILED to install (see $log.install.log)"
        status=1
        continue
    fi

    export TORCH_EXTENSIONS_DIR="$RESULTS/build-$version"
    export TORCHINDUCTOR_CACHE_DIR="$RESULTS/inductor-$version"
    rm -rf "$TORCH_EXTENSIONS_DIR"

    # Build first (the first import builds the extension): a build failure is reported as one.
    start=$SECONDS
    if ! "$venv/bin/python" -c "import fused_dropout" >"$log.build.log" 2>&1; then
        summary "torch $version: extension FAILED to build or import (see $log.build.log)"
        status=1
        continue
    fi
    build_s=$((SECONDS - start))

    report="ok"
    "$venv/bin/python" -m fused_dropout >"$log.report.log" 2>&1 || report="FAILED"

    start=$SECONDS
    "$venv/bin/python" -m pytest -q -m "not slow" -p no:cacheprovider >"$log.pytest.log" 2>&1
    rc=$?
    counts="$(grep -E '^=*.* in [0-9.]+s' "$log.pytest.log" | tail -n 1 | sed 's/=//g; s/^ *//; s/ *$//')"
    versions="$("$venv/bin/python" -c 'import sys, torch
try:
    import torchvision; tv = torchvision.__version__
except Exception as e: tv = f"not importable ({type(e).__name__})"
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, torchvision {tv}")' 2>&1 | tail -n 1)"
    result="passed"
    if [ "$rc" -ne 0 ] || [ "$report" != ok ]; then
        result="FAILED"
        status=1
    fi
    summary "torch $version: $result ($versions; build ${build_s}s; python -m fused_dropout $report; pytest exit $rc: ${counts:-no summary line}, $((SECONDS - start))s)"
done
exit "$status"
