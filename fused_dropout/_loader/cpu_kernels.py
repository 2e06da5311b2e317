"""The CPU kernel files, compiled once per CPU capability (for the JIT build and setup.py).

``torch.utils.cpp_extension`` gives every source the same flags, so the loader compiles these
itself, ``MAX_JOBS`` (else one per core) at a time, and links the objects into the library:
``<out>/cpu/<stem>.<capability>.o``.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .checks import compile_failed
from .config import BuildConfig, kernel_files


def commands(cfg: BuildConfig, out_dir: Path) -> list[tuple[list[str], Path]]:
    """(compiler command, object) for every kernel file and capability."""
    out = []
    for src in kernel_files(cfg.source_dir):
        for cap in cfg.cpu_capabilities:
            obj = out_dir / "cpu" / f"{src.stem}.{cap.name}.o"
            cmd = [cfg.cxx, *cfg.kernel_flags, *cap.flags, f"-I{cfg.source_dir}"]
            out.append(([*cmd, "-c", str(src), "-o", str(obj)], obj))
    return out


def compile_cpu_kernels(cfg: BuildConfig, out_dir: Path, verbose: bool) -> list[Path]:
    """Compile them into out_dir/cpu; returns the objects. A failure raises BuildError with the
    compiler's output (all of it in out_dir/build.log)."""
    jobs = commands(cfg, out_dir)
    (out_dir / "cpu").mkdir(parents=True, exist_ok=True)

    def run(cmd: list[str]) -> tuple[int, str]:
        if verbose:
            print(shlex.join(cmd), file=sys.stderr, flush=True)
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        return r.returncode, r.stdout

    workers = max(1, int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(run, [cmd for cmd, _ in jobs]))
    failed = [(cmd, out) for (cmd, _), (rc, out) in zip(jobs, results) if rc != 0]
    if failed:
        text = "\n".join(f"$ {shlex.join(cmd)}\n{out}" for cmd, out in failed)
        raise compile_failed(text, out_dir / "build.log", with_cuda=cfg.with_cuda)
    if verbose:
        for _, out in results:
            if out.strip():
                print(out, file=sys.stderr, end="", flush=True)
    return [obj for _, obj in jobs]
