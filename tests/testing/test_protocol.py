"""The Hub protocol's vocabulary: which files go through LFS, valid repo paths, git ids, README front matter."""

from __future__ import annotations

import hashlib
import subprocess

import pytest

from lightning_bridge.testing.hub_emulator.protocol import (
    DEFAULT_GITATTRIBUTES,
    LFS_SIZE_THRESHOLD,
    HubError,
    check_repo_path,
    front_matter,
    front_matter_error,
    git_blob_oid,
    header_safe,
    is_true,
    lfs_pointer,
    now_iso,
    wants_lfs,
)


def test_git_blob_oid_is_gits_own(tmp_path):
    (tmp_path / "f").write_bytes(b"hello\n")
    done = subprocess.run(["git", "hash-object", str(tmp_path / "f")], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip("git is not installed")
    assert git_blob_oid(b"hello\n") == done.stdout.strip() == "ce013625030ba8dba906f756967f9e9ca394464a"


def test_lfs_pointer_and_the_default_gitattributes():
    sha = hashlib.sha256(b"x").hexdigest()
    assert lfs_pointer(sha, 1) == f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize 1\n".encode()
    assert "*.safetensors filter=lfs diff=lfs merge=lfs -text\n" in DEFAULT_GITATTRIBUTES


@pytest.mark.parametrize("path,size,sample,lfs", [
    ("model.safetensors", 10, b"x", True), ("sub/model.SAFETENSORS", 10, b"x", True),
    ("config.json", 10, b"{}", False), ("config.json", LFS_SIZE_THRESHOLD, b"{}", True),
    ("notes.txt", 3, b"a\x00b", True), ("saved_model/v1/graph.txt", 3, b"abc", True), ("a.png", 3, b"abc", True),
])
def test_wants_lfs_follows_the_hubs_patterns_size_and_binary_content(path, size, sample, lfs):
    assert wants_lfs(path, size, sample) is lfs


@pytest.mark.parametrize("bad", ["", "/abs", "a//b", "a/../b", "./a", ".git/config", "a\x00b", None, 3])
def test_a_bad_repo_path_is_a_400(bad):
    with pytest.raises(HubError, match="Invalid path in repo") as raised:
        check_repo_path(bad)
    assert raised.value.status == 400


def test_good_repo_paths_flags_headers_and_times():
    assert check_repo_path("sub/dir/model.safetensors") == "sub/dir/model.safetensors"
    assert is_true(["0", "1"]) and is_true(["True"]) and not is_true(["no"]) and not is_true(None)
    assert header_safe("two\nlines\tand ünïcode €") == "two lines and ünïcode ?" and len(header_safe("x" * 2000)) == 1000
    stamp = now_iso()
    assert len(stamp) == 24 and stamp.endswith("Z") and stamp[10] == "T"
    error = HubError(404, "Repository not found", code="RepoNotFound")
    assert (error.status, str(error), error.code, error.headers, error.body) == (404, "Repository not found",
                                                                                 "RepoNotFound", {}, {})


def test_readme_front_matter():
    assert front_matter("---\nlicense: mit\ntags: [a]\n---\n# Model\n") == {"license": "mit", "tags": ["a"]}
    assert front_matter("# no front matter\n") is None and front_matter("---\n- a list\n---\n") is None
    assert front_matter_error("---\nlicense: mit\n---\n") is None
    assert front_matter_error("---\nkey: [unclosed\n---\n").startswith("Invalid YAML: ")
