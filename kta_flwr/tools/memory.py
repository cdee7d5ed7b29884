"""Peak resident memory of a process tree, sampled while a benchmark runs (Linux ``/proc``).

::

    with PeakRss(lambda: [superlink.pid]) as rss:
        ...  # the run
    print(rss.peak_mib)  # largest sum of RSS over the roots and all their descendants
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

from kta_flwr.tools.federation import descendants

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes(pid: int) -> int:
    """Resident memory of one process in bytes (0 if it is gone or not on Linux)."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def tree_rss_bytes(roots: list[int]) -> int:
    """Sum of the resident memory of ``roots`` and all their descendants (bytes)."""
    pids = set(roots)
    for root in roots:
        pids.update(descendants(root))
    return sum(rss_bytes(pid) for pid in pids)


class PeakRss:
    """Samples :func:`tree_rss_bytes` of ``roots()`` every ``interval`` seconds in a
    thread between ``__enter__`` and ``__exit__``; ``peak_mib`` is the largest sum seen."""

    def __init__(self, roots: Callable[[], list[int]], interval: float = 0.5) -> None:
        self.roots = roots
        self.interval = interval
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @property
    def peak_mib(self) -> float:
        """The peak in MiB."""
        return self.peak_bytes / 2**20

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, tree_rss_bytes(self.roots()))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
