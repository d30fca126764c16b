"""Peak host and GPU memory of a block of code, for the benchmarks' figures.

    with PeakMemory() as peak:
        model = provider()
    figures.update(peak.figures("import"))

Host: the process's resident set size (RSS), sampled every 2 ms by a thread, reported as the peak
and as the peak above what the process held when the block started (what the block itself
needed); and the same for its anonymous memory (RSS less file-backed pages, so memory-mapped
checkpoint pages, which the kernel can drop at any time, are not counted). GPU: ``torch.cuda.max_memory_allocated`` over the block, reset at its start.
"""

from __future__ import annotations

import threading
import time

import psutil
import torch

GB = 1e9


class PeakMemory:
    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s = interval_s
        self._process = psutil.Process()
        self._stop = threading.Event()
        self.start_rss = self.peak_rss = self.start_anon = self.peak_anon = 0
        self.start_gpu = self.peak_gpu = 0

    def __enter__(self) -> PeakMemory:  # noqa: PYI034 (benchmarks run on Python >= 3.10)
        self.start_rss, self.start_anon = self._read()
        self.peak_rss, self.peak_anon = self.start_rss, self.start_anon
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start_gpu = torch.cuda.memory_allocated()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.peak_gpu = torch.cuda.max_memory_allocated()
        self._stop.set()
        self._thread.join()
        self._update()

    def _read(self) -> tuple[int, int]:
        info = self._process.memory_info()
        return info.rss, info.rss - info.shared

    def _update(self) -> None:
        rss, anon = self._read()
        self.peak_rss, self.peak_anon = max(self.peak_rss, rss), max(self.peak_anon, anon)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._update()
            time.sleep(self.interval_s)

    def figures(self, prefix: str) -> dict[str, float]:
        """Peak RSS, RSS and anonymous memory added, and on a GPU peak and added allocated memory."""
        out = {f"{prefix}_host_peak_gb": round(self.peak_rss / GB, 2),
               f"{prefix}_host_added_gb": round((self.peak_rss - self.start_rss) / GB, 2),
               f"{prefix}_host_anon_added_gb": round((self.peak_anon - self.start_anon) / GB, 2)}
        if torch.cuda.is_available():
            out[f"{prefix}_gpu_peak_gb"] = round(self.peak_gpu / GB, 2)
            out[f"{prefix}_gpu_added_gb"] = round((self.peak_gpu - self.start_gpu) / GB, 2)
        return out
