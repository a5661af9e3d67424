"""Writing files so that nothing is lost: a file replaced atomically, and one writer per folder at a time.

- :func:`atomic_write` writes through a temporary in the same folder, fsyncs it, renames it over the target and
  fsyncs the folder: a crash leaves the old file or the new one.
- :func:`locked` holds an exclusive ``flock`` on a lock file while a writer works in a folder. A second writer
  (another process or thread) waits for it, up to :data:`LOCK_SECONDS`, then gets an AdapterFileError; the kernel
  releases the lock of a process that dies, so a stale lock file never blocks anyone. Each writer removes the
  temporaries of killed writers only while it holds the lock, so it never removes a live writer's. A flock
  belongs to an open file, so threads of one process wait for each other too. (Without ``fcntl``, on Windows,
  writers are not serialised.)
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import AdapterFileError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

LOCK_SECONDS = 60.0  # how long a writer waits for another one writing into the same folder


def fsync(path: Path) -> None:
    """Flush a file's (or a folder's) data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write through a temporary file in the same folder, fsync, rename: a crash leaves the old file or the new."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        fsync(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync(path.parent)


@contextlib.contextmanager
def locked(lock: Path, what: str) -> Iterator[None]:
    """Hold the exclusive lock ``lock`` (a file, created and removed here) while the block writes ``what``."""
    if fcntl is None:
        yield
        return
    fd = _acquire(lock, what, time.monotonic() + LOCK_SECONDS)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()  # while held: a waiter that opened this file sees it gone and takes a fresh one
        os.close(fd)


def _acquire(lock: Path, what: str, deadline: float) -> int:
    """An open descriptor of ``lock`` holding its flock, the file still being the one named ``lock``."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise AdapterFileError(f"another writer has been writing {what} for over {LOCK_SECONDS:g} s "
                                               f"(it holds {lock}); wait until it is done, or write elsewhere") from None
                    time.sleep(0.02)
            with contextlib.suppress(FileNotFoundError):
                if os.path.samestat(os.fstat(fd), os.stat(lock)):
                    return fd  # invariant: the holder's file is the one named lock, so no two writers hold one each
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the previous holder removed the file after we opened it: take the new one
