"""Tensors as views of a private memory map: exact bytes, writes that never reach the file, and
released pages that leave the process's resident memory but stay readable."""

from __future__ import annotations

import psutil
import pytest
import torch
from factories import every_dtype_tensors
from safetensors import safe_open
from safetensors.torch import save_file

from lightning_bridge.hf_io import HFCheckpointReader
from lightning_bridge.mapped_read import MappedFile

MB = 2**20


@pytest.fixture
def checkpoint(tmp_path):
    save_file(every_dtype_tensors(), tmp_path / "model.safetensors", metadata={"format": "pt"})
    return tmp_path


def test_every_dtype_and_shape_reads_bitwise_on_the_cpu(checkpoint):
    reader = HFCheckpointReader(checkpoint)
    with safe_open(checkpoint / "model.safetensors", framework="pt") as f:
        for name in reader.names():
            got, expected = reader.get(name), f.get_tensor(name)
            assert got.dtype == expected.dtype and got.shape == expected.shape, name
            as_bytes = [tensor.reshape(-1).view(torch.uint8) for tensor in (got, expected)]
            assert torch.equal(*as_bytes), name


def test_writing_to_a_read_tensor_never_changes_the_file(checkpoint):
    before = (checkpoint / "model.safetensors").read_bytes()
    tensor = HFCheckpointReader(checkpoint).get("f32")
    tensor.add_(1.0)
    assert (checkpoint / "model.safetensors").read_bytes() == before
    assert torch.equal(HFCheckpointReader(checkpoint).get("f32"), every_dtype_tensors()["f32"])


def test_a_header_whose_sizes_disagree_is_called_corrupt_on_the_cpu_too(checkpoint):
    reader = HFCheckpointReader(checkpoint)
    reader._headers["model.safetensors"]["f32"]["shape"] = (5, 7, 4)  # the bytes say (5, 7, 3)
    with pytest.raises(ValueError, match=r"corrupt or truncated .*'f32' has 420 bytes for shape \[5, 7, 4\]"):
        reader.get("f32")


def _resident_bytes() -> int:
    return psutil.Process().memory_info().rss


def test_released_pages_leave_the_process_and_views_stay_readable(tmp_path):
    generator = torch.Generator().manual_seed(1)
    data = torch.randint(0, 256, (64 * MB + 3,), dtype=torch.uint8, generator=generator)
    (tmp_path / "data.bin").write_bytes(data.numpy().tobytes())
    mapped = MappedFile(tmp_path / "data.bin")
    view = mapped.tensor(3, 64 * MB, torch.uint8, (64 * MB,))  # an offset not on a page boundary
    before = _resident_bytes()
    assert int(view.sum()) == int(data[3:].sum())  # touching every page maps it in
    touched = _resident_bytes()
    mapped.release(3, 64 * MB)
    released = _resident_bytes()
    assert touched - before > 48 * MB and touched - released > 48 * MB
    assert torch.equal(view, data[3:])  # read again from the file


def test_the_reader_releases_the_byte_range_of_a_tensor(checkpoint, monkeypatch):
    released = []
    monkeypatch.setattr(MappedFile, "release", lambda self, offset, nbytes: released.append((offset, nbytes)))
    reader = HFCheckpointReader(checkpoint)
    reader.release("f16")  # nothing mapped yet: nothing to release
    reader.get("f16")
    reader.release("f16")
    assert released == [reader._byte_range("f16", "model.safetensors")] and released[0][1] == 2000


def test_zero_size_tensors_need_no_map(tmp_path):
    (tmp_path / "data.bin").write_bytes(b"x" * 16)
    assert MappedFile(tmp_path / "data.bin").tensor(16, 0, torch.float32, (0, 4)).shape == (0, 4)
