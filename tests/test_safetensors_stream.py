"""A safetensors file written tensor by tensor is byte for byte the file ``save_file`` writes."""

import random

import pytest
import torch
from safetensors.torch import save_file

from lightning_bridge.hf_io import TensorSpec
from lightning_bridge.safetensors_stream import DTYPE_CODES, StreamedSafetensorsFile


def _mixed(seed: int) -> dict[str, torch.Tensor]:
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for i, dtype in enumerate(rng.sample(list(DTYPE_CODES), len(DTYPE_CODES))):
        shape = rng.choice([(), (0,), (3,), (2, 5), (4, 1, 3)])
        values = torch.randn(shape, generator=generator) * 50
        tensors[f"{rng.choice('abxyz')}.{i}"] = values.to(dtype)
    return tensors


def _stream(path, tensors, order, metadata=None):
    specs = [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    file = StreamedSafetensorsFile(path, specs, metadata)
    for name in order:
        file.write(name, tensors[name])
    assert file.complete
    file.close()


@pytest.mark.parametrize("seed", range(6))
def test_every_dtype_in_any_write_order_gives_save_files_bytes(tmp_path, seed):
    tensors = _mixed(seed)
    save_file(tensors, tmp_path / "reference.safetensors", metadata={"format": "pt"})
    order = list(tensors)
    random.Random(seed).shuffle(order)
    _stream(tmp_path / "streamed.safetensors", tensors, order, {"format": "pt"})
    reference = (tmp_path / "reference.safetensors").read_bytes()
    assert (tmp_path / "streamed.safetensors").read_bytes() == reference


def test_without_metadata_too(tmp_path):
    tensors = {"w": torch.ones(3, 2), "b": torch.zeros(2, dtype=torch.bfloat16)}
    save_file(tensors, tmp_path / "reference.safetensors")
    _stream(tmp_path / "streamed.safetensors", tensors, ["b", "w"])
    reference = (tmp_path / "reference.safetensors").read_bytes()
    assert (tmp_path / "streamed.safetensors").read_bytes() == reference


def test_a_tensor_unlike_its_plan_or_written_twice_is_refused(tmp_path):
    file = StreamedSafetensorsFile(tmp_path / "x.safetensors", [TensorSpec("w", (2, 3), torch.float32)])
    with pytest.raises(ValueError, match=r"'w' is \(3, 2\) torch.float32 but was planned as \(2, 3\)"):
        file.write("w", torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"'w' is \(2, 3\) torch.bfloat16 but was planned as"):
        file.write("w", torch.zeros(2, 3, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"'v' is not in this file's plan"):
        file.write("v", torch.zeros(1))
    file.write("w", torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"'w' is already written"):
        file.write("w", torch.zeros(2, 3))
    file.close()


def test_a_dtype_safetensors_cannot_store_is_refused_before_the_file_is_made(tmp_path):
    specs = [TensorSpec("w", (2,), torch.float32), TensorSpec("c", (2,), torch.complex64)]
    with pytest.raises(ValueError, match=r"'c' has dtype torch.complex64, which safetensors cannot store"):
        StreamedSafetensorsFile(tmp_path / "x.safetensors", specs)
    assert not (tmp_path / "x.safetensors").exists()
