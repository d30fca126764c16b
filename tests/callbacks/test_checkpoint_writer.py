"""Tests for lightning_bridge.callbacks.checkpoint_writer: one save's staging queue and writer thread,
run without the callback (it is given the folder, a pinned-buffer source and a publish hook)."""

from __future__ import annotations

import ast
import errno
import inspect

import pytest
import torch

from lightning_bridge.callbacks import checkpoint_writer
from lightning_bridge.callbacks.checkpoint_writer import Layout, SaveJob, distribute_plan
from lightning_bridge.hf_io import SAFE_WEIGHTS_NAME, HFCheckpointReader, TensorSpec
from lightning_bridge.publish import temp_token

TENSORS = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}


def _layout() -> Layout:
    nbytes = {n: t.nbytes for n, t in TENSORS.items()}
    return Layout({SAFE_WEIGHTS_NAME: list(TENSORS)}, {SAFE_WEIGHTS_NAME: 0}, list(TENSORS), nbytes,
                  {n: tuple(t.shape) for n, t in TENSORS.items()}, {n: t.dtype for n, t in TENSORS.items()},
                  sum(nbytes.values()), budget=2**20, extra_files={"config.json": "{}"})


def _save(tmp_path, after_publish) -> SaveJob:
    def no_pinning(*args):
        raise AssertionError("a CPU save pins no buffer")

    job = SaveJob(_layout(), 3, dirpath=tmp_path, token=temp_token(), pinned=no_pinning,
                  after_publish=after_publish)
    job.start()
    for name, tensor in TENSORS.items():
        job.put(name, tensor)
    job.close()
    job.own_done.wait()
    job.join()
    return job


def test_the_writer_does_not_know_the_callback():
    tree = ast.parse(inspect.getsource(checkpoint_writer))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "lightning_bridge.callbacks.hf_checkpoint" not in imported


def test_a_save_writes_the_step_folder_then_calls_the_publish_hook(tmp_path):
    published = []
    job = _save(tmp_path, published.append)
    assert job.error is None and job.published and published == [tmp_path / "step-3"]
    with HFCheckpointReader(tmp_path / "step-3") as reader:
        assert all(torch.equal(reader.get(n), t) for n, t in TENSORS.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-3"]
    assert (tmp_path / "step-3" / "config.json").read_text() == "{}"


def test_a_full_disk_fails_the_save_and_leaves_nothing(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("lightning_bridge.safetensors_stream.StreamedSafetensorsFile._write_at", full)
    published = []
    job = _save(tmp_path, published.append)
    assert "no space left on device" in job.error and str(tmp_path / "step-3") in job.error
    assert published == [] and list(tmp_path.iterdir()) == []


def test_a_failing_publish_hook_is_reported_with_the_checkpoint_kept(tmp_path):
    def hook(folder):
        raise PermissionError(errno.EACCES, "Permission denied")

    job = _save(tmp_path, hook)
    assert job.error.startswith(f"the checkpoint {tmp_path / 'step-3'} is complete, but updating latest")
    assert (tmp_path / "step-3" / SAFE_WEIGHTS_NAME).is_file()


def test_distribute_plan_numbers_each_ranks_shards_globally():
    specs = [TensorSpec(n, (4,), torch.float32) for n in "abcd"]
    plan, owner = distribute_plan(specs, {"a": 0, "b": 0, "c": 1, "d": 1}, max_shard_size=32)
    assert plan == {"model-00001-of-00002.safetensors": ["a", "b"], "model-00002-of-00002.safetensors": ["c", "d"]}
    assert owner == {"model-00001-of-00002.safetensors": 0, "model-00002-of-00002.safetensors": 1}
    with pytest.raises(ValueError, match="repeat"):
        distribute_plan([specs[0], specs[0]], {"a": 0}, max_shard_size=16)
