"""The lock around a JIT build, its attempt directories, publishing, and damaged caches.

A build that is killed leaves nothing that blocks the next one: the lock is an ``flock`` (the
kernel drops it with the process), each build attempt has its own directory, and the finished
build is published by an atomic rename. A cached library that is truncated or empty (checked
against its ELF headers before dlopen, which could crash on it) or fails to load is rebuilt.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
import time
from pathlib import Path

from .checks import say, unwritable


@contextlib.contextmanager
def flock(path: Path, where: Path):
    """An exclusive advisory lock that dies with its holder (never deleted: deleting races)."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # O_CLOEXEC: ninja does not inherit it
    except OSError as e:
        raise unwritable(where, e) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another process that is building in {where}...")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def load_cached(so: Path) -> bool:
    """Load a cached library; False (after saying why) when there is none or it is damaged,
    so that the caller rebuilds it."""
    import torch

    if not so.is_file():
        return False
    problem = elf_problem(so)
    if problem is None:
        try:
            torch.ops.load_library(str(so))
            return True
        except OSError as e:
            problem = str(e)
    say(f"the cached {so} is damaged ({problem}); rebuilding it")
    return False


def elf_problem(path: Path) -> str | None:
    """Why ``path`` is not a whole 64-bit ELF file (a truncated or empty copy), or None.

    dlopen maps a truncated library and can crash (SIGBUS) on the missing pages instead of
    failing, so its size is checked against its own headers first."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(64)
            if len(head) < 64 or head[:4] != b"\x7fELF":
                return f"not an ELF file, {size} bytes"
            if head[4] != 2:  # ELFCLASS32: not checked further
                return None
            end = "<" if head[5] == 1 else ">"
            phoff, shoff = struct.unpack_from(end + "QQ", head, 0x20)
            phentsize, phnum, shentsize, shnum = struct.unpack_from(end + "HHHH", head, 0x36)
            if shoff + shentsize * shnum > size or phoff + phentsize * phnum > size:
                return f"truncated to {size} bytes"
            f.seek(phoff)
            for _ in range(phnum):
                ph = f.read(phentsize)
                p_offset, _, _, p_filesz = struct.unpack_from(end + "QQQQ", ph, 8)
                if p_offset + p_filesz > size:
                    return f"truncated to {size} bytes"
    except (OSError, struct.error) as e:
        return str(e)
    return None


def new_attempt(key_dir: Path) -> Path:
    """A fresh directory to build in, under the lock; removes those of killed builds."""
    # Nothing holds the lock for them any more. (A compiler orphaned by a killed build may still
    # write there; that is why each attempt has its own directory.)
    for stale in key_dir.glob("build-*"):
        shutil.rmtree(stale, ignore_errors=True)
    attempt = key_dir / f"build-{os.getpid()}-{time.monotonic_ns()}"
    try:
        attempt.mkdir()
    except OSError as e:
        raise unwritable(key_dir, e) from None
    # torch < 2.9 guards its build dir with a lock file that outlives a killed build
    # (FileBaton); ours is new and we hold the flock, so such a file can only be stale.
    with contextlib.suppress(FileNotFoundError):
        (attempt / "lock").unlink()
    return attempt


def publish(attempt: Path, built: Path, so: Path) -> None:
    """Make the attempt the build: rename it to so's directory, the library named as so."""
    # torch names the library <name>_v<N>.so if this process built another source tree
    # before; the published name is fixed.
    if built.name != so.name:
        os.replace(built, attempt / so.name)
    with contextlib.suppress(FileNotFoundError):
        (attempt / "lock").unlink()
    if so.parent.exists():  # a build/ without the .so: not ours to keep
        shutil.rmtree(so.parent, ignore_errors=True)
    os.rename(attempt, so.parent)
