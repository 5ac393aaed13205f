"""Peak memory of a block of work, per job (a sweep's jobs share one process, so max-RSS says nothing per job).

CPU: a thread samples the resident set every few milliseconds (torch kernels release the GIL), above what was in use
when the block started. CUDA: the allocator's peak statistics, reset at the start.
"""

from __future__ import annotations

import resource
import threading
import time


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


class PeakMemory:
    def __init__(self, device: str = "cpu", interval_s: float = 0.002):
        self.device = str(device)
        self.interval_s = interval_s
        self.peak_mb = 0.0

    def __enter__(self) -> PeakMemory:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated() / 2**20
            return self
        self._base = self._max = rss_mb()
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.is_set():
                self._max = max(self._max, rss_mb())
                time.sleep(self.interval_s)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20 - self._base
            return
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self._max, rss_mb()) - self._base
