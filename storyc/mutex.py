"""Exclusive locks between storyc processes: one build per build folder, one trainer per cache entry.

``filelock`` takes an OS lock (flock) that dies with its process, so a lock left by a killed build is free
again at once; a pid file beside it names the holder in the message a second build prints.
"""
from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

from .errors import StorycError


def _holder(path: Path) -> str:
    try:
        pid, _, host = path.with_suffix(".pid").read_text("utf-8").strip().partition(" ")
        return f" (pid {int(pid)}{' on ' + host if host and host != socket.gethostname() else ''})"
    except (OSError, ValueError):
        return ""


@contextlib.contextmanager
def exclusive(path: Path, what: str, wait: bool = False, on_wait=None):
    """Hold ``path`` exclusively. Held by another process: refuse (``wait=False``) with a clear error naming
    it, or call ``on_wait(holder)`` and block until it is free."""
    from filelock import FileLock, Timeout

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        holder = _holder(path)
        if not wait:
            raise StorycError(f"another storyc process{holder} is running {what}",
                              "wait for it to finish (or stop it), then run the same command") from None
        if on_wait:
            on_wait(holder)
        lock.acquire()
    try:
        try:
            path.with_suffix(".pid").write_text(f"{os.getpid()} {socket.gethostname()}\n", "utf-8")
        except OSError:
            pass
        yield
    finally:
        lock.release()
