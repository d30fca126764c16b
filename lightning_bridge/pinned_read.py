"""Read byte ranges of a file onto a CUDA device through a few reused pinned host buffers.

Copying a memory-mapped tensor with ``.to("cuda")`` goes through pageable memory: a page fault
per 4 KiB, then the CUDA driver's own staging copy, which it serialises across threads (4-5 GB/s
on an H200 host, however many threads read). Here each thread ``pread``\\ s the file into its own
pinned buffers, which are reused, and copies them to the device asynchronously, so several
threads read from the page cache while the copy engine runs (12-17 GB/s on the same host, see
``benchmarks/import_profile.py``).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

CHUNK_BYTES = 16 * 2**20  # the size of one pinned buffer
BUFFERS_PER_THREAD = 2  # one is filled from the file while the other is copied to the device


class _ThreadBuffers(threading.local):
    """A reading thread's pinned buffers and, for each, the event of the copy that last used it."""

    def __init__(self) -> None:
        self.buffers: list[torch.Tensor] = []
        self.views: list[memoryview] = []
        self.copied: list[torch.cuda.Event | None] = []
        self.turn = 0

    def next_buffer(self) -> int:
        if not self.buffers or len(self.views[0]) != CHUNK_BYTES:  # first use, or the size was changed
            self.buffers = [torch.empty(CHUNK_BYTES, dtype=torch.uint8, pin_memory=True)
                            for _ in range(BUFFERS_PER_THREAD)]
            self.views = [memoryview(buffer.numpy()) for buffer in self.buffers]
            self.copied = [None] * BUFFERS_PER_THREAD
        index = self.turn % len(self.buffers)
        self.turn += 1
        if self.copied[index] is not None:
            self.copied[index].synchronize()  # its previous copy to the device has finished
        return index


_buffers = _ThreadBuffers()


def release_buffers() -> None:
    """Drop this thread's pinned buffers (the next read makes new ones)."""
    global _buffers
    _buffers = _ThreadBuffers()


def read_to_device(path: str | os.PathLike, offset: int, nbytes: int, device: torch.device) -> torch.Tensor:
    """``nbytes`` bytes of the file at ``offset``, as a uint8 tensor on the CUDA ``device``.

    The copies run on the device's current stream and have finished when this returns, so the
    tensor is safe to use from any stream or thread. Raises ``EOFError`` if the file is shorter.
    """
    stream = torch.cuda.current_stream(device)
    out = torch.empty(nbytes, dtype=torch.uint8, device=device)
    last: torch.cuda.Event | None = None
    fd = os.open(path, os.O_RDONLY)
    try:
        with torch.cuda.stream(stream):
            start = 0
            while start < nbytes:
                index = _buffers.next_buffer()
                size = min(len(_buffers.views[index]), nbytes - start)
                read_exactly(fd, _buffers.views[index][:size], offset + start, path)
                out[start:start + size].copy_(_buffers.buffers[index][:size], non_blocking=True)
                last = torch.cuda.Event()
                last.record(stream)
                _buffers.copied[index] = last
                start += size
    finally:
        os.close(fd)
    if last is not None:
        last.synchronize()
    return out


def read_exactly(fd: int, view: memoryview, offset: int, path: str | os.PathLike) -> None:
    """Fill ``view`` with the file's bytes from ``offset`` (``pread``), or raise EOFError naming where it ends."""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise EOFError(f"{Path(path)} ends at byte {offset + done}, before the {len(view) - done} "
                           "bytes still expected there")
        done += got
