"""One writer per folder: an exclusive lock that names its holder.

A run folder is written by the ServerApp that runs (or resumes) it. If the SuperLink
dies, that ServerApp can live on for a while as an orphan, still writing; a second
ServerApp resuming the same folder would interleave its files with the orphan's.
:class:`FolderLock` prevents that: ``fcntl.flock`` on ``<folder>/writer.lock``, which the
kernel releases when the holding process ends, however it ends (SIGKILL included), so a
dead writer never leaves a stale lock behind. The file records the holder's pid, host and
start time, so a refusal can say who holds the folder. POSIX only (Linux, macOS).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fcntl

LOCK_FILE = "writer.lock"


class FolderBusy(RuntimeError):
    """Another live process holds the folder; ``holder`` is what it wrote (pid, host,
    since), possibly empty."""

    def __init__(self, folder: Path, holder: dict[str, Any]) -> None:
        self.folder = folder
        self.holder = holder
        since = holder.get("since")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if since else "?"
        super().__init__(
            f"{folder} is held by process {holder.get('pid', '?')} on host "
            f"{holder.get('host', '?')} (since {when})"
        )


class FolderLock:
    """An exclusive, non-blocking lock on ``folder`` for this process.

    Usage::

        with FolderLock(run_dir):   # FolderBusy if another live process holds it
            ...                     # write the folder
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> FolderLock:
        """Take the lock and write this process's pid, host and time into it.

        Raises:
            FolderBusy: another process holds it.
            FileNotFoundError: the folder does not exist.
        """
        if self._fd is not None:
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderBusy(self.folder, self.holder()) from None
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Let the folder go (the file stays, empty of meaning once unlocked)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def holder(self) -> dict[str, Any]:
        """What the current (or last) holder wrote: ``pid``, ``host``, ``since`` (empty
        if unreadable)."""
        try:
            found = json.loads(self.path.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            return {}
        return found if isinstance(found, dict) else {}

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Hold a blocking exclusive lock on ``path`` (created if needed) for a
    read-modify-write of a file that several processes may update."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
