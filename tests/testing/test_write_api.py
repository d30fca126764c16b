"""The emulator's write endpoints: repos, commits (atomic, parent-checked, concurrent), uploads, refs."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
)
from testing.hub_fixtures import TOKEN, api, download, emu, hf_client_env, raw  # noqa: F401 - fixtures


def test_create_repo_exist_ok_and_info(emu, api):
    url = api.create_repo("alice/tiny", private=True)
    assert url.repo_id == "alice/tiny"
    assert url.startswith(emu.endpoint)

    with pytest.raises(HfHubHTTPError) as excinfo:
        api.create_repo("alice/tiny")
    assert excinfo.value.response.status_code == 409
    assert excinfo.value.response.json()["url"].endswith("/alice/tiny")  # exist_ok relies on it
    assert api.create_repo("alice/tiny", exist_ok=True).repo_id == "alice/tiny"

    info = api.model_info("alice/tiny")
    assert info.id == "alice/tiny" and info.private is True
    assert len(info.sha) == 40
    assert [s.rfilename for s in info.siblings] == [".gitattributes"]  # the Hub's initial commit
    assert api.repo_exists("alice/tiny") and not api.repo_exists("alice/nope")
    assert api.whoami()["name"] == api.whoami(token=TOKEN)["name"]

    # a repo id without namespace lands under the caller's user name
    assert api.create_repo("solo").repo_id == f"{api.whoami()['name']}/solo"
    assert ("POST", "/api/repos/create", 409) in emu.requests


def test_commit_with_missing_lfs_object_is_refused_atomically(emu, api, tmp_path):
    api.create_repo("alice/atomic")
    api.upload_file(path_or_fileobj=b"v1", path_in_repo="a.txt", repo_id="alice/atomic")
    head = api.model_info("alice/atomic").sha

    never_uploaded = hashlib.sha256(b"never uploaded").hexdigest()
    lines = [
        {"key": "header", "value": {"summary": "bad commit", "description": ""}},
        {
            "key": "file",
            "value": {"path": "a.txt", "content": base64.b64encode(b"v2").decode(), "encoding": "base64"},
        },
        {
            "key": "file",
            "value": {"path": "b.txt", "content": base64.b64encode(b"new").decode(), "encoding": "base64"},
        },
        {"key": "deletedFile", "value": {"path": ".gitattributes"}},
        {
            "key": "lfsFile",
            "value": {"path": "w.safetensors", "algo": "sha256", "oid": never_uploaded, "size": 14},
        },
    ]
    body = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    status, headers, payload = raw(
        emu,
        "POST",
        "/api/models/alice/atomic/commit/main",
        body=body,
        headers={"Content-Type": "application/x-ndjson"},
    )
    assert status == 400
    assert "LFS pointer" in headers["X-Error-Message"] and "error" in json.loads(payload)

    # nothing applied
    assert api.model_info("alice/atomic").sha == head
    assert sorted(api.list_repo_files("alice/atomic")) == [".gitattributes", "a.txt"]
    assert download(emu, "alice/atomic", "a.txt", tmp_path / "c") == b"v1"

    # client level: an add plus a delete of a missing file fails as a whole
    with pytest.raises(EntryNotFoundError):
        api.create_commit(
            "alice/atomic",
            [CommitOperationAdd("c.txt", b"c"), CommitOperationDelete("missing.txt")],
            commit_message="add and delete",
        )
    assert not api.file_exists("alice/atomic", "c.txt")
    assert api.model_info("alice/atomic").sha == head


def test_parent_commit_is_honoured(api):
    api.create_repo("alice/parent")
    first = api.model_info("alice/parent").sha
    second = api.create_commit(
        "alice/parent", [CommitOperationAdd("x.txt", b"x")], commit_message="x", parent_commit=first
    )
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.create_commit(
            "alice/parent", [CommitOperationAdd("y.txt", b"y")], commit_message="y", parent_commit=first
        )
    assert excinfo.value.response.status_code == 412
    assert api.model_info("alice/parent").sha == second.oid
    commits = api.list_repo_commits("alice/parent")
    assert [c.commit_id for c in commits] == [second.oid, first]


def test_preupload_lfs_files_then_create_commit(emu, api, tmp_path):
    api.create_repo("alice/pre")
    weights = os.urandom(4096)
    ops = [CommitOperationAdd("weights.bin", weights), CommitOperationAdd("notes.txt", b"small text")]
    api.preupload_lfs_files("alice/pre", additions=ops)
    puts = [r for r in emu.requests if r.method == "PUT"]
    assert [r.path for r in puts] == [f"/_lfs/{hashlib.sha256(weights).hexdigest()}"]
    assert sorted(api.list_repo_files("alice/pre")) == [".gitattributes"]  # nothing committed yet

    commit = api.create_commit("alice/pre", ops, commit_message="commit preuploaded")
    assert [r for r in emu.requests if r.method == "PUT"] == puts  # not uploaded twice
    assert download(emu, "alice/pre", "weights.bin", tmp_path / "c") == weights
    assert download(emu, "alice/pre", "notes.txt", tmp_path / "c") == b"small text"

    # the same content under another name: the LFS batch answers "already there", no PUT
    api.upload_file(path_or_fileobj=weights, path_in_repo="copy.bin", repo_id="alice/pre")
    assert [r for r in emu.requests if r.method == "PUT"] == puts
    # unchanged files are skipped by the client (preupload reports the remote oid)
    same = api.upload_file(path_or_fileobj=b"small text", path_in_repo="notes.txt", repo_id="alice/pre")
    assert same.oid == api.model_info("alice/pre").sha != commit.oid


def test_concurrent_commits_all_land(api):
    api.create_repo("alice/busy")

    def upload(i):
        return api.upload_file(
            path_or_fileobj=f"file {i}".encode(), path_in_repo=f"f{i}.txt", repo_id="alice/busy"
        )

    with ThreadPoolExecutor(max_workers=6) as pool:
        commits = list(pool.map(upload, range(6)))  # re-raises any failure
    assert len({c.oid for c in commits}) == 6
    assert sorted(api.list_repo_files("alice/busy")) == [".gitattributes"] + [f"f{i}.txt" for i in range(6)]
    assert len(api.list_repo_commits("alice/busy")) == 7


def test_branches_tags_and_pull_requests(emu, api, tmp_path):
    api.create_repo("alice/br")
    api.upload_file(path_or_fileobj=b"main v1", path_in_repo="model.txt", repo_id="alice/br")
    api.create_branch("alice/br", branch="dev")
    api.create_branch("alice/br", branch="dev", exist_ok=True)
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.create_branch("alice/br", branch="dev")
    assert excinfo.value.response.status_code == 409

    api.upload_file(path_or_fileobj=b"dev v2", path_in_repo="model.txt", repo_id="alice/br", revision="dev")
    api.upload_file(
        path_or_fileobj=b"only on dev", path_in_repo="dev.txt", repo_id="alice/br", revision="dev"
    )
    assert download(emu, "alice/br", "model.txt", tmp_path / "c", revision="dev") == b"dev v2"
    assert download(emu, "alice/br", "model.txt", tmp_path / "c", revision="main") == b"main v1"
    assert api.file_exists("alice/br", "dev.txt", revision="dev")
    assert not api.file_exists("alice/br", "dev.txt")
    snapshot = Path(
        snapshot_download(
            "alice/br", revision="dev", endpoint=emu.endpoint, token=TOKEN, cache_dir=tmp_path / "s"
        )
    )
    assert (snapshot / "dev.txt").read_bytes() == b"only on dev"

    # branch with a slash, from a starting point
    api.create_branch("alice/br", branch="release/v1", revision="dev")
    assert api.list_repo_files("alice/br", revision="release/v1") == api.list_repo_files(
        "alice/br", revision="dev"
    )
    refs = api.list_repo_refs("alice/br")
    assert {b.name for b in refs.branches} == {"main", "dev", "release/v1"}

    api.create_tag("alice/br", tag="v1.0", revision="dev")
    assert download(emu, "alice/br", "dev.txt", tmp_path / "c", revision="v1.0") == b"only on dev"

    pr = api.create_commit(
        "alice/br", [CommitOperationAdd("pr.txt", b"pr")], commit_message="PR", create_pr=True
    )
    assert pr.pr_revision == "refs/pr/1"
    assert "pr.txt" in api.list_repo_files("alice/br", revision=pr.pr_revision)
    assert "pr.txt" not in api.list_repo_files("alice/br")

    api.delete_branch("alice/br", branch="dev")
    assert not api.revision_exists("alice/br", "dev")
    assert api.revision_exists("alice/br", "v1.0")
