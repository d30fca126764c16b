"""The emulator's store on disk: content-addressed blobs, repos, refs and commits, revisions resolved."""

from __future__ import annotations

import hashlib

import pytest

from lightning_bridge.testing.hub_emulator.protocol import HubError
from lightning_bridge.testing.hub_emulator.storage import Repo, Store


def test_blobs_are_content_addressed_and_a_stream_must_match_its_sha(tmp_path):
    store = Store(tmp_path)
    sha = store.put_bytes(b"weights")
    assert sha == hashlib.sha256(b"weights").hexdigest() and store.put_bytes(b"weights") == sha
    assert store.blob_path(sha).read_bytes() == b"weights" and store.blob_size(sha) == 7
    assert store.blob_size("not-a-sha") is None and store.blob_size("0" * 64) is None
    data = b"abc" * 1000
    assert store.put_stream(iter([data[:10], data[10:]]), hashlib.sha256(data).hexdigest()) == 3000
    with pytest.raises(HubError, match="expected 0000") as raised:
        store.put_stream(iter([b"other"]), "0" * 64)
    assert raised.value.status == 400 and list((tmp_path / "tmp").iterdir()) == []  # no partial upload left


def test_a_new_repo_has_one_commit_on_main_with_the_default_gitattributes(tmp_path):
    store = Store(tmp_path)
    repo = store.create_repo("model", "alice/tiny", private=True, author="alice")
    assert store.get_repo("model", "alice/tiny") == repo == Repo("model", "alice/tiny", repo.dir)
    assert store.get_repo("dataset", "alice/tiny") is None and store.get_repo("model", "no-namespace") is None
    assert store.repo_meta(repo)["private"] is True
    main = store.refs(repo)["branches"]["main"]
    commit = store.commit(repo, main)
    assert commit["title"] == "initial commit" and commit["parents"] == [] and list(commit["tree"]) == [".gitattributes"]
    assert store.resolve(repo, "main") == store.resolve(repo, "refs/heads/main") == store.resolve(repo, main) == main
    assert store.resolve(repo, "missing") is None and store.commit(repo, "x") is None


def test_commits_tags_and_pull_request_refs_resolve(tmp_path):
    store = Store(tmp_path)
    repo = store.create_repo("model", "alice/tiny", private=False, author="alice")
    refs = store.refs(repo)
    parent = refs["branches"]["main"]
    oid = store.write_commit(repo, [parent], "add", "body", "alice", {})
    refs["tags"]["v1"], refs["pulls"]["1"] = oid, parent
    store.write_refs(repo, refs)
    assert store.resolve(repo, "v1") == store.resolve(repo, "refs/tags/v1") == oid
    assert store.resolve(repo, "refs/pr/1") == parent and store.commit(repo, oid)["parents"] == [parent]
    store.delete_repo(repo)
    assert store.get_repo("model", "alice/tiny") is None and not repo.dir.exists()
