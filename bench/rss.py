"""Resident memory of this process, sampled in a thread: the peak inside each named phase.

    sampler = Sampler().start()
    with sampler.phase("generation", task=3):
        ...
    sampler.stop(); sampler.spans   # [{"phase", "entry_mb", "peak_mb", "exit_mb", "seconds", ...}]
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


class Sampler:
    """Samples RSS in a thread; :meth:`phase` charges the samples taken inside it to a name."""

    def __init__(self, every_s: float = 0.005) -> None:
        self.every_s = every_s
        self.current = "other"
        self.spans: list[dict] = []
        self._peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, rss_mb())
            time.sleep(self.every_s)

    def start(self) -> "Sampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    @contextmanager
    def phase(self, name: str, **extra):
        outer, self.current = self.current, name
        entry = rss_mb()
        self._peak = entry
        start = time.perf_counter()
        try:
            yield
        finally:
            self._peak = max(self._peak, rss_mb())
            self.spans.append({"phase": name, "entry_mb": entry, "peak_mb": self._peak, "exit_mb": rss_mb(),
                               "seconds": time.perf_counter() - start, **extra})
            self.current = outer
            self._peak = rss_mb()
