"""Tests for lightning_bridge.publish: staging names, atomic publishing with rollback, stale-temporary
clean-up, and one rank's error raised on every rank."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from processes import launch

from lightning_bridge import publish
from lightning_bridge.publish import (
    TEMP_NAME,
    cleanup_stale_temp_dirs,
    make_staging_folder,
    publish_folder,
    run_on_rank_zero,
    staging_path,
)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _folder(path, text):
    path.mkdir(parents=True)
    (path / "file").write_text(text)
    return path


def test_staging_names_carry_the_pid_and_a_random_part(tmp_path):
    first, second = staging_path(tmp_path / "out"), staging_path(tmp_path / "out", "old")
    assert first.parent == tmp_path and first != second
    assert TEMP_NAME.match(first.name).groupdict() == {"final": "out", "kind": "tmp", "pid": str(os.getpid())}
    assert TEMP_NAME.match(second.name)["kind"] == "old"


def test_publish_new_and_replace(tmp_path):
    final = tmp_path / "out"
    publish_folder(_folder(tmp_path / ".a", "one"), final)
    assert (final / "file").read_text() == "one"
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        publish_folder(_folder(tmp_path / ".b", "two"), final, overwrite=False)
    assert (final / "file").read_text() == "one"
    publish_folder(tmp_path / ".b", final)
    assert (final / "file").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failed_swap_puts_the_old_folder_back(tmp_path, monkeypatch):
    final = _folder(tmp_path / "out", "old")
    staging = _folder(tmp_path / ".new", "new")
    rename = os.rename

    def fail_second(src, dst):
        if src == staging:
            raise OSError(28, "No space left on device")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", fail_second)
    with pytest.raises(OSError, match="No space left"):
        publish_folder(staging, final)
    assert (final / "file").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".new", "out"]


def test_cleanup_removes_dead_writers_temporaries_only(tmp_path):
    dead = _dead_pid()
    stale = _folder(tmp_path / f".out.tmp-{dead}-abcd1234", "x")
    other = _folder(tmp_path / f".other.tmp-{dead}-abcd1234", "x")
    alive = _folder(tmp_path / f".out.tmp-{os.getpid()}-abcd1234", "x")
    restored = _folder(tmp_path / f".gone.old-{dead}-abcd1234", "kept")
    assert cleanup_stale_temp_dirs(tmp_path, final_name="out") == [stale]
    assert other.exists() and alive.exists() and restored.exists()
    assert cleanup_stale_temp_dirs(tmp_path) == [other]
    assert (tmp_path / "gone" / "file").read_text() == "kept" and not restored.exists()
    old = _folder(tmp_path / f".gone.old-{dead}-abcd1234", "older")
    assert cleanup_stale_temp_dirs(tmp_path, is_complete=lambda path: False) == []
    assert cleanup_stale_temp_dirs(tmp_path) == [old]


def test_staging_folder_in_one_process(tmp_path):
    dead = _dead_pid()
    stale = _folder(tmp_path / f".out.tmp-{dead}-abcd1234", "x")
    staging = make_staging_folder(tmp_path / "out")
    assert staging.is_dir() and TEMP_NAME.match(staging.name)["pid"] == str(os.getpid())
    assert not stale.exists()

    def refuse():
        raise FileExistsError("The output folder out already exists and is not empty.")

    with pytest.raises(RuntimeError, match="Saving the Megatron checkpoint failed: FileExistsError: The output"):
        make_staging_folder(tmp_path / "again", check=refuse)
    assert not any(p.name.startswith(".again") for p in tmp_path.iterdir())


def _on_two_ranks(folder: str) -> list[str]:
    """Rank 0 fails in each step; every rank must raise the same error (and none hang)."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    seen = []
    try:
        make_staging_folder(f"{folder}/out", check=lambda: (_ for _ in ()).throw(OSError("read-only")))
    except RuntimeError as exc:
        seen.append(str(exc))
    staging = make_staging_folder(f"{folder}/out")
    seen.append(staging.name)

    def fail():
        raise ValueError("bad metadata")

    try:
        run_on_rank_zero(fail, what="Saving the test checkpoint")
    except RuntimeError as exc:
        seen.append(str(exc))
    run_on_rank_zero(lambda: publish_folder(staging, f"{folder}/out"))
    seen.append(str(publish.rank()))
    return seen


def test_rank_zero_errors_reach_every_rank(tmp_path):
    results = launch(_on_two_ranks, 2, str(tmp_path))
    assert results[0][:3] == results[1][:3]
    assert results[0][0] == "Saving the Megatron checkpoint failed: OSError: read-only"
    assert TEMP_NAME.match(results[0][1])["final"] == "out"
    assert results[0][2] == "Saving the test checkpoint failed: ValueError: bad metadata"
    assert [r[3] for r in results] == ["0", "1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_checkpoint_io_error_names_the_path_and_the_fix(tmp_path):
    import errno
    import pickle

    from lightning_bridge.publish import CheckpointIOError, error_code, save_fault

    target = tmp_path / "out"
    full = save_fault(RuntimeError("Worker failure: [Errno 28] No space left on device"), target, f"write {target}")
    assert isinstance(full, CheckpointIOError) and isinstance(full, OSError) and isinstance(full, RuntimeError)
    assert str(full) == (f"Could not write {target}: no space left on device. The partial output was removed and "
                         f"{target} was not touched; free disk space on the filesystem of {tmp_path} (or choose a "
                         "bigger disk) and save again.")
    assert (full.errno, full.path) == (errno.ENOSPC, str(target))
    again = pickle.loads(pickle.dumps(full))
    assert (type(again), str(again), again.path) == (CheckpointIOError, str(full), str(target))
    read_only = save_fault(OSError(errno.EROFS, "Read-only file system"), target, "save")
    assert "read-only file system" in str(read_only) and f"make {tmp_path} writable" in str(read_only)
    assert save_fault(ValueError("bad config"), target, "save", probe=tmp_path) is None
    assert save_fault(OSError(errno.ENOENT, "gone"), target, "save") is None
    assert error_code(RuntimeError("safetensors: os error 13")) == errno.EACCES


def test_a_write_failure_without_errno_is_diagnosed_by_a_probe(tmp_path, monkeypatch):
    import errno

    from lightning_bridge.publish import save_fault

    lost = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    assert save_fault(lost, tmp_path / "out", "save", probe=tmp_path) is None  # the disk is fine: not ours

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    assert save_fault(lost, tmp_path / "out", "save", probe=tmp_path).errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []  # the probe file is gone


def test_raise_on_every_rank_keeps_a_checkpoint_io_error():
    from lightning_bridge.publish import CheckpointIOError, raise_on_every_rank

    with pytest.raises(CheckpointIOError, match="^Could not save x: disk full.$"):
        raise_on_every_rank(CheckpointIOError(28, "Could not save x: disk full.", "x"))
    with pytest.raises(RuntimeError, match="^Saving the Megatron checkpoint failed: KeyError: 'a'$"):
        raise_on_every_rank(KeyError("a"))
    raise_on_every_rank(None)
