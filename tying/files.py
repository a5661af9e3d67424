"""Writing files so that nothing is lost: a file replaced atomically, one writer per folder at a time, and a folder
replaced whole.

- :func:`atomic_write` writes through a temporary in the same folder, fsyncs it, renames it over the target and
  fsyncs the folder: a crash leaves the old file or the new one.
- :func:`locked` holds an exclusive ``flock`` on a lock file while a writer works in a folder. A second writer
  (another process or thread) waits for it, up to :data:`LOCK_SECONDS`, then gets an AdapterFileError; the kernel
  releases the lock of a process that dies, so a stale lock file never blocks anyone. Each writer removes the
  temporaries of killed writers only while it holds the lock, so it never removes a live writer's. A flock
  belongs to an open file, so threads of one process wait for each other too. (Without ``fcntl``, on Windows,
  writers are not serialised.)
- :func:`replace_folder` builds the new content in a sibling folder and exchanges it with the old folder in one
  rename (``renameat2(RENAME_EXCHANGE)`` on Linux, ``renamex_np(RENAME_SWAP)`` on macOS): a folder whose files are
  read together (PEFT's ``adapter_config.json`` + ``adapter_model.safetensors``) is the old one or the new one, whole.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import secrets
import shutil
import stat
import sys
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


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all: a reader meanwhile sees the old file or the new one (results
    files that several processes read while one writes them)."""
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))


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


@functools.lru_cache(maxsize=1)
def _exchange_call() -> Callable[[str, str], int] | None:
    """The system call that exchanges two paths in one step, or None where there is none."""
    if sys.platform not in ("linux", "darwin"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # the process's own symbols: the C library's among them
    if sys.platform == "linux" and hasattr(libc, "renameat2"):  # glibc >= 2.28
        return lambda a, b: libc.renameat2(-100, a.encode(), -100, b.encode(), 2)  # AT_FDCWD, RENAME_EXCHANGE
    if sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        return lambda a, b: libc.renamex_np(a.encode(), b.encode(), 2)  # RENAME_SWAP
    return None


def _exchange(a: Path, b: Path) -> None:
    """Exchange the folders ``a`` and ``b`` in one step; where the system cannot, rename ``b`` aside and ``a`` in
    its place (a crash between the two leaves ``b`` as ``.<name>.old-*``, which the next replace_folder restores)."""
    call = _exchange_call()
    if call is not None and call(str(a), str(b)) == 0:
        return
    old = b.with_name(f".{b.name}.old-{secrets.token_hex(4)}")
    os.rename(b, old)
    os.rename(a, b)
    os.rename(old, a)


def replace_folder(out: Path, fill: Callable[[Path], None], own: tuple[str, ...]) -> None:
    """Replace the folder ``out`` whole by what ``fill(new)`` writes into a fresh sibling folder ``new``: the files
    named ``own``, which are read together.

    The other files of ``out`` are carried over as hard links (copies where the system has none); a subfolder cannot
    be carried in the one step, so it is refused. Holds a lock beside ``out`` (one writer at a time); on any failure
    ``out`` is as it was and the sibling is removed.
    """
    out = Path(out).resolve()  # a symlink to the folder stays one: its target is replaced
    with locked(out.parent / f".{out.name}.lock", str(out)):
        _recover(out)
        new = out.with_name(f".{out.name}.new-{secrets.token_hex(4)}")
        os.mkdir(new)
        try:
            if out.is_dir():
                others = [p for p in out.iterdir() if p.name not in own]
                sub = next((p for p in others if not p.is_file() or p.is_symlink()), None)
                if sub is not None:
                    raise AdapterFileError(f"{out} holds {sub.name!r}, which is not a plain file: the folder is replaced "
                                           "as a whole, so that it holds the old export or the new one; export into a "
                                           "folder of its own")
                os.chmod(new, stat.S_IMODE(out.stat().st_mode))
                for p in others:
                    try:
                        os.link(p, new / p.name)
                    except OSError:
                        shutil.copy2(p, new / p.name)
            fill(new)
            for p in new.iterdir():
                fsync(p)
            fsync(new)
            if out.is_dir():
                _exchange(new, out)  # from here on ``new`` holds the old content
            else:
                os.rename(new, out)
            fsync(out.parent)
        finally:
            shutil.rmtree(new, ignore_errors=True)


def _recover(out: Path) -> None:
    """Under the lock: put back a folder that a killed replace_folder left renamed aside, and remove the siblings
    that killed calls left."""
    siblings = sorted(out.parent.glob(f".{out.name}.old-*")) + sorted(out.parent.glob(f".{out.name}.new-*"))
    if not out.exists() and siblings and siblings[0].name.startswith(f".{out.name}.old-"):
        os.rename(siblings.pop(0), out)
    for p in siblings:
        shutil.rmtree(p, ignore_errors=True)
