"""Tests for lightning_bridge.hf_io: validated safetensors reading and atomic sharded writing."""

import errno
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lightning_bridge.hf_io import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    HFCheckpointReader,
    ShardedSafetensorsWriter,
    TensorSpec,
    cleanup_stale_temp_dirs,
    is_complete_checkpoint,
    plan_shards,
)
from lightning_bridge.safetensors_stream import StreamedSafetensorsFile


def make_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(16, 8, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8, generator=g).to(torch.bfloat16),
        "model.layers.0.mlp.up_proj.weight": torch.randn(12, 8, generator=g),
        "model.layers.1.self_attn.q_proj.weight": torch.randn(8, 8, generator=g).half(),
        "model.norm.weight": torch.randn(8, generator=g),
        "lm_head.weight": torch.randn(16, 8, generator=g),
        "position_ids": torch.arange(10),
    }


def specs_of(tensors: dict[str, torch.Tensor]) -> list[TensorSpec]:
    return [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]


def write(folder: Path, tensors: dict[str, torch.Tensor], max_shard_size: int = 2**30, **kwargs) -> Path:
    plan = plan_shards(specs_of(tensors), max_shard_size=max_shard_size)
    with ShardedSafetensorsWriter(folder, plan, **kwargs) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
        return writer.finalize()


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# --- plan_shards ------------------------------------------------------------------------------------
def test_plan_single_file_when_everything_fits():
    specs = specs_of(make_tensors())
    assert plan_shards(specs) == {SAFE_WEIGHTS_NAME: [s.name for s in specs]}


def test_plan_greedy_multi_shard_in_spec_order():
    specs = [TensorSpec(f"t{i}", (100,), torch.float32) for i in range(5)]
    specs.append(TensorSpec("big", (1000,), torch.float32))
    assert specs[0].nbytes == 400
    plan = plan_shards(specs, max_shard_size=1000)
    assert plan == {
        "model-00001-of-00004.safetensors": ["t0", "t1"],
        "model-00002-of-00004.safetensors": ["t2", "t3"],
        "model-00003-of-00004.safetensors": ["t4"],
        "model-00004-of-00004.safetensors": ["big"],  # bigger than the limit: a shard of its own
    }


def test_plan_keeps_source_layout_and_appends_extras():
    specs = [TensorSpec(n, (4,), torch.float32) for n in ["c", "a", "new1", "b", "x", "new2"]]
    source = {"a": "model-00001-of-00003.safetensors", "b": "model-00002-of-00003.safetensors",
              "c": "model-00001-of-00003.safetensors", "gone": "model-00003-of-00003.safetensors",
              "x": "model-extra-00001.safetensors"}
    plan = plan_shards(specs, source_weight_map=source, max_shard_size=32)
    assert plan == {
        "model-00001-of-00003.safetensors": ["c", "a"],  # source grouping, order of the specs
        "model-00002-of-00003.safetensors": ["b"],  # the emptied third source shard is dropped
        "model-extra-00001.safetensors": ["x"],
        "model-extra-00002.safetensors": ["new1", "new2"],  # does not collide with the source's names
    }


def test_plan_single_file_source_stays_single_file():
    specs = [TensorSpec(n, (1000,), torch.float32) for n in ["a", "b", "new"]]
    source = {"a": SAFE_WEIGHTS_NAME, "b": SAFE_WEIGHTS_NAME}
    plan = plan_shards(specs, source_weight_map=source, max_shard_size=10)
    assert plan == {SAFE_WEIGHTS_NAME: ["a", "b", "new"]}


def test_plan_renames_bin_source_files():
    specs = [TensorSpec(n, (4,), torch.float32) for n in ["a", "b"]]
    source = {"a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}
    assert plan_shards(specs, source_weight_map=source) == {
        "model-00001-of-00002.safetensors": ["a"], "model-00002-of-00002.safetensors": ["b"]}


def test_plan_rejects_duplicate_names():
    with pytest.raises(ValueError, match="repeat"):
        plan_shards([TensorSpec("a", (1,), torch.float32)] * 2)


# --- round trips ------------------------------------------------------------------------------------
def test_round_trip_multi_shard(tmp_path):
    tensors = make_tensors()
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text('{"tok": 1}')
    plan = plan_shards(specs_of(tensors), max_shard_size=600)
    assert len(plan) > 2
    out = tmp_path / "out"
    writer = ShardedSafetensorsWriter(out, plan, metadata={"producer": "test"})
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    writer.add_file("config.json", '{"model_type": "llama"}')
    writer.copy_file(tokenizer)
    assert writer.finalize() == out.absolute()

    assert leftovers(tmp_path) == []
    assert (out / "config.json").read_text() == '{"model_type": "llama"}'
    assert (out / "tokenizer.json").read_text() == '{"tok": 1}'
    index = json.loads((out / SAFE_WEIGHTS_INDEX_NAME).read_text())
    expected_map = {name: file for file, names in plan.items() for name in names}
    assert list(index["weight_map"]) == sorted(tensors)
    assert index["weight_map"] == expected_map
    assert index["metadata"] == {"total_size": sum(t.nbytes for t in tensors.values())}
    with safe_open(out / next(iter(plan)), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "producer": "test"}

    with HFCheckpointReader(out) as reader:
        assert reader.has_index and reader.metadata == index["metadata"]
        assert reader.names() == sorted(tensors) and reader.weight_map == index["weight_map"]
        assert "lm_head.weight" in reader and "nope" not in reader
        for name, tensor in tensors.items():
            assert reader.shape(name) == tuple(tensor.shape)
            assert reader.dtype(name) == tensor.dtype
            got = reader.get(name)
            assert got.dtype == tensor.dtype and torch.equal(got, tensor)
        with pytest.raises(KeyError, match="nope"):
            reader.get("nope")
    assert is_complete_checkpoint(out)


def test_round_trip_single_file_keeps_header_order(tmp_path):
    tensors = make_tensors()
    out = write(tmp_path / "out", tensors)
    assert sorted(p.name for p in out.iterdir()) == [SAFE_WEIGHTS_NAME]
    reader = HFCheckpointReader(out)
    assert not reader.has_index and reader.metadata == {}
    with open(out / SAFE_WEIGHTS_NAME, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert reader.names() == [k for k in header if k != "__metadata__"]
    assert sorted(reader.names()) == sorted(tensors)
    assert all(torch.equal(reader.get(n), t) for n, t in tensors.items())


def test_writer_handles_tied_and_view_tensors(tmp_path):
    base = torch.randn(6, 4)
    tensors = {"embed": base, "lm_head": base, "half": base[:3], "t": base.t()}
    out = write(tmp_path / "out", tensors)
    reader = HFCheckpointReader(out)
    assert all(torch.equal(reader.get(n), t) for n, t in tensors.items())


# --- reader validation ------------------------------------------------------------------------------
def write_index(folder: Path, weight_map: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.*does not exist"):
        HFCheckpointReader(tmp_path / "nowhere")


def test_no_weights_lists_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "README.md").write_text("hi")
    with pytest.raises(ValueError, match=r"No weights.*README\.md, config\.json"):
        HFCheckpointReader(tmp_path)


@pytest.mark.parametrize("name", ["../x.safetensors", "/tmp/x.safetensors", "sub/../../x.safetensors"])
def test_index_pointing_outside(tmp_path, name):
    write_index(tmp_path / "ckpt", {"a": name})
    with pytest.raises(ValueError, match="points outside the checkpoint folder") as info:
        HFCheckpointReader(tmp_path / "ckpt")
    assert name in str(info.value)


def test_index_symlink_outside(tmp_path):
    save_file({"a": torch.zeros(2)}, tmp_path / "elsewhere.safetensors")
    write_index(tmp_path / "ckpt", {"a": "model-00001-of-00001.safetensors"})
    (tmp_path / "ckpt" / "model-00001-of-00001.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(ValueError, match="points outside the checkpoint folder.*symlink"):
        HFCheckpointReader(tmp_path / "ckpt")


def test_hf_cache_symlinks_are_allowed(tmp_path):
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    save_file({"a": torch.ones(2)}, repo / "blobs" / "abc123")
    write_index(repo / "snapshots" / "rev", {"a": "model-00001-of-00001.safetensors"})
    (repo / "snapshots" / "rev" / "model-00001-of-00001.safetensors").symlink_to("../../blobs/abc123")
    assert torch.equal(HFCheckpointReader(repo / "snapshots" / "rev").get("a"), torch.ones(2))


def test_index_missing_shard(tmp_path):
    write_index(tmp_path, {"a": "model-00001-of-00002.safetensors"})
    with pytest.raises(ValueError, match="model-00001-of-00002.safetensors.*does not exist.*re-download"):
        HFCheckpointReader(tmp_path)


def test_tensor_in_two_shards(tmp_path):
    save_file({"a": torch.zeros(2), "b": torch.zeros(2)}, tmp_path / "s1.safetensors")
    save_file({"a": torch.zeros(2)}, tmp_path / "s2.safetensors")
    write_index(tmp_path, {"a": "s2.safetensors", "b": "s1.safetensors"})
    with pytest.raises(ValueError, match="'a' is in two shards"):
        HFCheckpointReader(tmp_path)


def test_index_names_tensor_missing_from_shard(tmp_path):
    save_file({"a": torch.zeros(2)}, tmp_path / "s1.safetensors")
    write_index(tmp_path, {"a": "s1.safetensors", "b": "s1.safetensors"})
    with pytest.raises(ValueError, match="'b' in s1.safetensors, which does not hold it"):
        HFCheckpointReader(tmp_path)


def test_truncated_file(tmp_path):
    out = write(tmp_path / "out", make_tensors())
    path = out / SAFE_WEIGHTS_NAME
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="model.safetensors is corrupt or truncated.*Re-download"):
        HFCheckpointReader(out)
    assert not is_complete_checkpoint(out)


@pytest.mark.parametrize("content", [
    (20).to_bytes(8, "little") + b"this is not json!!!!",
    (2**40).to_bytes(8, "little") + b"{}",
    b"\x01\x02",
    (4).to_bytes(8, "little") + b"[1 ]",
])
def test_garbage_header(tmp_path, content):
    (tmp_path / SAFE_WEIGHTS_NAME).write_bytes(content)
    with pytest.raises(ValueError, match="corrupt or truncated"):
        HFCheckpointReader(tmp_path)


def test_pickled_weights_refused_then_allowed(tmp_path):
    tensors = make_tensors()
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="arbitrary code.*allow_pickle=True.*safetensors"):
        HFCheckpointReader(tmp_path)
    reader = HFCheckpointReader(tmp_path, allow_pickle=True)
    assert reader.names() == list(tensors) and not reader.has_index
    for name, tensor in tensors.items():
        assert reader.shape(name) == tuple(tensor.shape) and reader.dtype(name) == tensor.dtype
        assert torch.equal(reader.get(name), tensor)


def test_pickled_sharded_weights(tmp_path):
    torch.save({"a": torch.ones(3)}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({"b": torch.zeros(2, dtype=torch.int64)}, tmp_path / "pytorch_model-00002-of-00002.bin")
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {
        "b": "pytorch_model-00002-of-00002.bin", "a": "pytorch_model-00001-of-00002.bin"}}))
    with pytest.raises(ValueError, match="allow_pickle=True"):
        HFCheckpointReader(tmp_path)
    reader = HFCheckpointReader(tmp_path, allow_pickle=True)
    assert reader.names() == ["b", "a"] and reader.has_index
    assert reader.dtype("b") == torch.int64 and torch.equal(reader.get("a"), torch.ones(3))
    specs = specs_of({"a": torch.ones(3), "b": torch.ones(2)})
    assert plan_shards(specs, source_weight_map=reader.weight_map) == {
        "model-00001-of-00002.safetensors": ["b"], "model-00002-of-00002.safetensors": ["a"]}


# --- writer -----------------------------------------------------------------------------------------
def test_existing_dir_refused_early(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="overwrite=True.*another directory"):
        ShardedSafetensorsWriter(tmp_path / "out", {SAFE_WEIGHTS_NAME: ["a"]})
    assert leftovers(tmp_path) == []


def test_unknown_and_duplicate_tensor(tmp_path):
    with ShardedSafetensorsWriter(tmp_path / "out", {"s1.safetensors": ["a", "b"]}) as writer:
        with pytest.raises(ValueError, match="'zzz' is not in the shard plan"):
            writer.add("zzz", torch.zeros(1))
        writer.add("a", torch.zeros(1))
        with pytest.raises(ValueError, match="'a' was already added"):
            writer.add("a", torch.zeros(1))
        with pytest.raises(ValueError, match="outside"):
            writer.add_file("../evil.txt", "x")
        writer.abort()
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_missing_tensors_at_finalize(tmp_path):
    plan = {"s1.safetensors": ["a", "b"], "s2.safetensors": ["c"]}
    with ShardedSafetensorsWriter(tmp_path / "out", plan) as writer:
        writer.add("a", torch.zeros(1))
        with pytest.raises(ValueError, match=r"2 planned tensors were never added: b, c"):
            writer.finalize()
        writer.add("b", torch.zeros(1))
        writer.add("c", torch.zeros(1))
        writer.finalize()  # the caller may still complete it
    assert HFCheckpointReader(tmp_path / "out").names() == ["a", "b", "c"]


def test_shard_written_as_soon_as_complete(tmp_path):
    plan = {"s1.safetensors": ["a", "b"], "s2.safetensors": ["c"]}
    writer = ShardedSafetensorsWriter(tmp_path / "out", plan)
    writer.add("a", torch.zeros(1))
    assert not (writer.tmp_dir / "s1.safetensors").exists()
    writer.add("b", torch.zeros(1))
    assert (writer.tmp_dir / "s1.safetensors").exists() and "s1.safetensors" not in writer._pending
    writer.abort()


def test_exception_midway_leaves_nothing(tmp_path):
    tensors = make_tensors()
    with pytest.raises(RuntimeError, match="boom"):
        plan = plan_shards(specs_of(tensors), max_shard_size=600)
        with ShardedSafetensorsWriter(tmp_path / "out", plan) as w:
            for i, (name, tensor) in enumerate(tensors.items()):
                if i == 4:
                    raise RuntimeError("boom")
                w.add(name, tensor)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_keeps_old_until_new_is_complete(tmp_path):
    old = write(tmp_path / "out", {"a": torch.zeros(3)})
    new_tensors = make_tensors()
    plan = plan_shards(specs_of(new_tensors), max_shard_size=600)
    writer = ShardedSafetensorsWriter(old, plan, overwrite=True)
    for name, tensor in new_tensors.items():
        writer.add(name, tensor)
        assert HFCheckpointReader(old).names() == ["a"]  # still the old, complete checkpoint
    writer.finalize()
    assert sorted(HFCheckpointReader(old).names()) == sorted(new_tensors)
    assert leftovers(tmp_path) == []


def test_disk_full_gives_clear_error_and_no_output(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(StreamedSafetensorsFile, "_write_at", full)  # the one write path
    with pytest.raises(OSError, match=r"out.*no space left on device.*free disk space") as info:
        write(tmp_path / "out", make_tensors(), max_shard_size=600)
    assert info.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


def test_disk_full_on_overwrite_keeps_old(tmp_path, monkeypatch):
    out = write(tmp_path / "out", {"a": torch.zeros(3)})
    def denied(*args, **kwargs):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(StreamedSafetensorsFile, "_write_at", denied)
    with pytest.raises(OSError, match="permission denied.*writable"):
        write(out, {"b": torch.ones(2)}, overwrite=True)
    assert HFCheckpointReader(out).names() == ["a"] and leftovers(tmp_path) == []


# --- crash helpers ----------------------------------------------------------------------------------
def test_is_complete_checkpoint(tmp_path):
    out = write(tmp_path / "out", make_tensors(), max_shard_size=600)
    assert is_complete_checkpoint(out)
    next(out.glob("model-00002-*.safetensors")).unlink()
    assert not is_complete_checkpoint(out)
    assert not is_complete_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    assert not is_complete_checkpoint(tmp_path / "empty")


def test_cleanup_stale_temp_dirs(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".ckpt.tmp-{dead.pid}-abcd1234"
    live = tmp_path / f".ckpt.tmp-{os.getpid()}-abcd1234"
    other = [tmp_path / ".hidden", tmp_path / "ckpt.tmp-1-ab", tmp_path / ".ckpt.tmp-x-ab"]
    for path in [stale, live, *other]:
        path.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    assert cleanup_stale_temp_dirs(tmp_path) == [stale]
    assert not stale.exists() and live.exists() and all(p.exists() for p in other)


def test_cleanup_restores_old_checkpoint_after_crash_mid_publish(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    out = write(tmp_path / "out", {"a": torch.zeros(3)})
    out.rename(tmp_path / f".out.old-{dead.pid}-abcd")  # crashed between the two renames
    assert cleanup_stale_temp_dirs(tmp_path) == []
    assert HFCheckpointReader(out).names() == ["a"] and leftovers(tmp_path) == []


# --- streamed shards (specs known in advance) ------------------------------------------------------
def test_streamed_shards_equal_buffered_ones_byte_for_byte(tmp_path):
    tensors = make_tensors()
    buffered = write(tmp_path / "buffered", tensors, max_shard_size=600)
    plan = plan_shards(specs_of(tensors), max_shard_size=600)
    with ShardedSafetensorsWriter(tmp_path / "streamed", plan, specs=specs_of(tensors)) as writer:
        for name in reversed(list(tensors)):  # arrival order does not matter
            writer.add(name, tensors[name])
        writer.finalize()
    files = sorted(p.name for p in buffered.iterdir())
    assert files == sorted(p.name for p in (tmp_path / "streamed").iterdir()) and len(files) > 2
    for file in files:
        assert (tmp_path / "streamed" / file).read_bytes() == (buffered / file).read_bytes(), file


def test_streamed_disk_full_gives_clear_error_and_no_output(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(StreamedSafetensorsFile, "_write_at", full)
    tensors = make_tensors()
    plan = plan_shards(specs_of(tensors), max_shard_size=600)
    with pytest.raises(OSError, match=r"streamed.*no space left on device.*free disk space"):
        with ShardedSafetensorsWriter(tmp_path / "streamed", plan, specs=specs_of(tensors)) as writer:
            for name, tensor in tensors.items():
                writer.add(name, tensor)
    assert list(tmp_path.iterdir()) == []


def test_streamed_finalize_names_the_missing_tensors(tmp_path):
    tensors = make_tensors()
    plan = plan_shards(specs_of(tensors), max_shard_size=600)
    writer = ShardedSafetensorsWriter(tmp_path / "streamed", plan, specs=specs_of(tensors))
    writer.add("lm_head.weight", tensors["lm_head.weight"])
    with pytest.raises(ValueError, match=r"6 planned tensors were never added: .*position_ids"):
        writer.finalize()
    writer.abort()
    assert list(tmp_path.iterdir()) == []
