"""Reading safetensors bytes straight onto the GPU: offsets, dtypes, chunking, and bad files.

The CPU tests replace the pinned copy with a plain ``pread`` into host memory, so what they check
is the reader's part (which bytes, which dtype and shape, which errors); the GPU test runs the
real pinned, chunked, multi-threaded path.
"""

import contextlib
import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from factories import every_dtype_tensors
from safetensors import safe_open
from safetensors.torch import save_file

from lightning_bridge import hf_io, pinned_read
from lightning_bridge.hf_io import HFCheckpointReader


@pytest.fixture
def checkpoint(tmp_path):
    save_file(every_dtype_tensors(), tmp_path / "model.safetensors", metadata={"format": "pt"})
    return tmp_path


@pytest.fixture
def host_reads(monkeypatch):
    """The reader's CUDA path with the pinned copy replaced by a pread into host memory."""
    def read_to_host(path, offset, nbytes, device):
        out = torch.empty(nbytes, dtype=torch.uint8)
        import os

        fd = os.open(path, os.O_RDONLY)
        try:
            pinned_read.read_exactly(fd, memoryview(out.numpy()), offset, path)
        finally:
            os.close(fd)
        return out

    monkeypatch.setattr(hf_io, "read_to_device", read_to_host)


def _expected(folder, name):
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        return f.get_tensor(name)


def test_every_dtype_and_shape_reads_bitwise(checkpoint, host_reads):
    reader = HFCheckpointReader(checkpoint)
    for name in reader.names():
        got = reader.get(name, device="cuda")
        expected = _expected(checkpoint, name)
        assert got.dtype == expected.dtype and got.shape == expected.shape, name
        assert torch.equal(got.reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8)), name


def test_a_header_whose_sizes_disagree_is_called_corrupt(checkpoint, host_reads):
    reader = HFCheckpointReader(checkpoint)
    entry = reader._headers["model.safetensors"]["f32"]
    entry["shape"] = (5, 7, 4)  # the bytes say (5, 7, 3)
    with pytest.raises(ValueError, match=r"corrupt or truncated .*'f32' has 420 bytes for shape \[5, 7, 4\].*"
                                         r"Re-download it"):
        reader.get("f32", device="cuda")


def test_a_file_cut_short_after_opening_is_called_truncated(checkpoint, host_reads):
    reader = HFCheckpointReader(checkpoint)  # header checked against the full file here
    path = checkpoint / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-300])
    last = max(reader.names(), key=lambda n: reader._headers["model.safetensors"][n]["data_offsets"][1])
    with pytest.raises(ValueError, match=r"corrupt or truncated .*ends at byte .*Re-download it"):
        reader.get(last, device="cuda")


def test_cpu_reads_still_come_from_the_memory_map(checkpoint, monkeypatch):
    monkeypatch.setattr(hf_io, "read_to_device", lambda *a: pytest.fail("CPU reads must not stage"))
    reader = HFCheckpointReader(checkpoint)
    assert torch.equal(reader.get("i64"), every_dtype_tensors()["i64"])


@pytest.fixture
def cuda_faked_on_cpu(monkeypatch):
    """read_to_device's chunk loop on the CPU: streams and events do nothing, "pinned" is plain."""
    class Event:
        def record(self, stream=None):
            pass

        def synchronize(self):
            pass

    real_empty = torch.empty
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch, "empty", lambda *a, pin_memory=False, **k: real_empty(*a, **k))
    pinned_read.release_buffers()  # buffers made with the faked torch.empty, then dropped
    yield
    pinned_read.release_buffers()


def test_the_chunk_loop_reads_every_byte_range_exactly(tmp_path, cuda_faked_on_cpu, monkeypatch):
    path = tmp_path / "data.bin"
    data = bytes(random.Random(0).randrange(256) for _ in range(5000))
    path.write_bytes(data)
    for chunk in (100, 7, 4096):  # the buffer size may change between reads in one thread
        monkeypatch.setattr(pinned_read, "CHUNK_BYTES", chunk)
        for offset, nbytes in [(0, 5000), (13, 1), (999, 2001), (4999, 1), (5000, 0), (0, 100), (1, 200)]:
            got = pinned_read.read_to_device(path, offset, nbytes, torch.device("cpu"))
            assert bytes(got.numpy()) == data[offset:offset + nbytes], (chunk, offset, nbytes)
    with pytest.raises(EOFError, match=r"data.bin ends at byte 5000, before the 10 bytes"):
        pinned_read.read_to_device(path, 4990, 20, torch.device("cpu"))


@pytest.mark.gpu
def test_pinned_chunks_from_many_threads_read_bitwise(checkpoint, monkeypatch):
    monkeypatch.setattr(pinned_read, "CHUNK_BYTES", 256)  # many chunks per tensor, buffers reused
    big = {f"w{i}": torch.randn(97, 31 + i) for i in range(12)}
    save_file(big, checkpoint / "model.safetensors")
    reader = HFCheckpointReader(checkpoint)
    with ThreadPoolExecutor(4) as pool:
        got = dict(zip(big, pool.map(lambda n: reader.get(n, device="cuda"), big)))
    for name, tensor in big.items():
        assert got[name].is_cuda and torch.equal(got[name].cpu(), tensor), name
