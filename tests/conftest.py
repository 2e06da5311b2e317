"""Shared test setup.

- The repository root is importable (also without ``pip install -e .``).
- The header (and the end of a ``-q`` run) says which torch ran, with how many threads, and
  whether the extension was built with CUDA kernels. Building it happens here, once, at the
  start of the session (importing ``fused_dropout`` builds it on a cold cache).
- torch.compile caches under ``.inductor-cache/<hash of csrc/ops.cpp>`` (see below).
- Marker ``gpu``: skipped when ``torch.cuda.is_available()`` is False. Marker ``slow``: CI runs
  them; ``-m 'not slow'`` leaves them out. Marker ``cpu_paths``: a test that compares kernel
  output bit for bit runs once on each CPU path (default, avx2, avx512, avx512bf16) this CPU can
  run, from the one build (ids ``cpu_<path>``).
- The whole suite runs on two processes (pytest-xdist, whole files each; see WORKERS).
- Fixtures: ``device`` ("cpu", and "cuda" marked ``gpu``), ``extension_built_with_cuda``.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# torch.compile's on-disk cache, keyed by our op schemas: inductor's own key does not cover a
# custom op's schema, so a graph cached under /tmp by another version of this code is replayed
# against these ops ("fused_dropout::dropout() expected at most 8 argument(s) but received 10").
# Set before torch is imported; an explicit TORCHINDUCTOR_CACHE_DIR wins.
os.environ.setdefault(
    "TORCHINDUCTOR_CACHE_DIR",
    str(
        REPO
        / ".inductor-cache"
        / hashlib.sha1((REPO / "csrc" / "ops.cpp").read_bytes()).hexdigest()[:12]
    ),
)

import torch  # noqa: E402

HAS_GPU = torch.cuda.is_available()
_summary: list[str] = []


def _describe_build() -> list[str]:
    if _summary:
        return _summary
    _summary.append(
        f"torch {torch.__version__} (CUDA {torch.version.cuda}), GPU visible: {HAS_GPU}, "
        f"threads: {torch.get_num_threads()}, "
        f"FUSED_DROPOUT_BUILD_CUDA={os.environ.get('FUSED_DROPOUT_BUILD_CUDA', '(unset)')}"
    )
    try:
        from fused_dropout import _loader  # the package's __init__ builds and loads the library

        path = _loader.load()
        from fused_dropout import ops

        _summary.append(
            f"fused_dropout extension: {path}; CUDA kernels built: {_loader.built_with_cuda()}; "
            f"CPU path: {ops.cpu_capability()} (cpu_paths tests: {', '.join(_cpu_paths())})"
        )
    except Exception as e:  # report it; the tests that need the library fail on their own
        text = str(e).strip()
        first = text.splitlines()[0] if text else ""
        _summary.append(f"fused_dropout extension NOT LOADED: {type(e).__name__}: {first}")
    return _summary


# The whole suite (no paths named) runs on two worker processes, each taking whole files (a
# file's module-scoped builds run once): CI's 2 cores. Named files or tests, `-n N` (0: one
# process) or a missing pytest-xdist run as asked.
WORKERS = 2


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    if (
        config.args_source == pytest.Config.ArgsSource.ARGS
        or not config.pluginmanager.hasplugin("xdist")
        or config.getoption("numprocesses", None) is not None
        or config.getoption("dist", "no") != "no"
        or config.getoption("collectonly")
        or hasattr(config, "workerinput")
    ):
        return
    config.option.numprocesses = WORKERS
    config.option.dist = "loadfile"
    config.option.tx = ["popen"] * WORKERS


def pytest_report_header(config):
    return _describe_build()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if config.get_verbosity() < 0:  # -q hides the header: repeat it at the end
        for line in _describe_build():
            terminalreporter.write_line(line)


def _cpu_paths() -> list[str]:
    """The CPU paths of the built library this CPU can run (none if it does not load)."""
    try:
        from fused_dropout import ops
    except Exception:  # reported in the header; the tests fail on their own
        return []
    return [c for c in ops.cpu_capabilities() if not ops.cpu_capability_missing(c)]


def pytest_generate_tests(metafunc):
    if metafunc.definition.get_closest_marker("cpu_paths") is None:
        return
    paths = _cpu_paths()
    if paths:
        metafunc.parametrize("cpu_path", paths, indirect=True, ids=[f"cpu_{p}" for p in paths])


@pytest.fixture(autouse=True)
def cpu_path(request):
    """The CPU path a ``cpu_paths`` test runs on (None, the one chosen at load, for others)."""
    path = getattr(request, "param", None)
    if path is None:
        yield None
        return
    from fused_dropout import ops

    previous = ops.set_cpu_capability(path)
    try:
        yield path
    finally:
        ops.set_cpu_capability(previous)


# The files that take longest (builds), started first so that no worker is left with one of
# them at the end.
SLOWEST_FILES = ("test_kernels_static.py", "test_wheel.py", "test_build.py", "test_cuda_host.py")


def pytest_collection_modifyitems(config, items):
    first = {name: i for i, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))  # stable: else as found
    if HAS_GPU:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request) -> str:
    """Run a test on the CPU and, where a GPU is visible, on CUDA."""
    return request.param


@pytest.fixture(scope="session")
def extension_built_with_cuda() -> bool:
    from fused_dropout import _loader

    return _loader.built_with_cuda()
