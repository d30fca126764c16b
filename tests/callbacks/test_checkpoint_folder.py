"""The shared checkpoint folder: step-<n> names, the latest pointer, atomic writes, single-process rank helpers."""

from __future__ import annotations

import os

from lightning_bridge.callbacks.checkpoint_folder import (
    OURS_TEMP,
    all_gather,
    atomic_write,
    broadcast,
    get_rank,
    get_world_size,
    has_latest,
    step_folders,
    step_of,
)


def test_step_folders_are_the_step_n_folders_only(tmp_path):
    for name in ("step-3", "step-12", "step-x", "latest-step-4"):
        (tmp_path / name).mkdir()
    (tmp_path / "step-7").write_text("a file, not a checkpoint")
    assert sorted(step_folders(tmp_path)) == [3, 12]
    assert step_of(tmp_path / "step-12") == 12 and step_of(tmp_path / "step-x") is None and step_of(None) is None


def test_has_latest_reads_a_path_and_refuses_anything_else(tmp_path):
    assert not has_latest(tmp_path)
    (tmp_path / "latest").write_text("step-3")
    assert has_latest(tmp_path) and has_latest(str(tmp_path))
    assert not has_latest(None) and not has_latest(3)


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "latest"
    atomic_write(target, b"step-3")
    atomic_write(target, b"step-5", durable=True)
    assert target.read_bytes() == b"step-5" and os.listdir(tmp_path) == ["latest"]


def test_our_temporaries_are_recognised_by_name():
    assert OURS_TEMP.match(".step-3.tmp-123-ab12")["final"] == "step-3"
    assert OURS_TEMP.match(".latest.old-9-ff")["pid"] == "9"
    assert OURS_TEMP.match("step-3") is None and OURS_TEMP.match(".other.tmp-1-ab") is None


def test_rank_helpers_without_torch_distributed():
    assert (get_rank(), get_world_size()) == (0, 1)
    assert all_gather({"a": 1}) == [{"a": 1}] and broadcast("x") == "x"
