"""Tests for the local Hub emulator (lightning_bridge.testing.HubEmulator), driven by huggingface_hub.

Everything runs on 127.0.0.1 with ephemeral ports. A few fault tests wait for huggingface_hub's own
retry back-off (1 s per retry).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    constants,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from lightning_bridge.testing import HubEmulator
from lightning_bridge.testing import hub_emulator as hub_emulator_module

TOKEN = "test-token"


@pytest.fixture(autouse=True)
def hf_client_env(monkeypatch, tmp_path):
    """Client settings the emulator needs: no Xet, not offline, no stray token, cache under tmp."""
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-token"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture
def emu():
    with HubEmulator() as server:
        yield server


@pytest.fixture
def api(emu):
    return HfApi(endpoint=emu.endpoint, token=TOKEN)


def _download(emu, repo_id, filename, cache_dir, **kwargs) -> bytes:
    kwargs.setdefault("token", TOKEN)
    path = hf_hub_download(repo_id, filename, endpoint=emu.endpoint, cache_dir=cache_dir, **kwargs)
    return Path(path).read_bytes()


def _safetensors_bytes(tmp_path: Path) -> bytes:
    import numpy as np
    from safetensors.numpy import save_file

    path = tmp_path / "weights.safetensors"
    save_file(
        {"w": np.arange(600, dtype=np.float32).reshape(20, 30), "b": np.ones(7, dtype=np.float16)}, str(path)
    )
    return path.read_bytes()


def _raw(emu, method, path, *, body=None, headers=None, token=TOKEN):
    """A plain urllib request; returns (status, headers, body bytes) without raising on HTTP errors."""
    req = urllib.request.Request(emu.endpoint + path, data=body, method=method, headers=dict(headers or {}))
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


# --------------------------------------------------------------------------------------------------
# repos and round trips
# --------------------------------------------------------------------------------------------------


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


def test_upload_folder_then_snapshot_download_is_byte_identical(emu, api, tmp_path):
    folder = tmp_path / "ckpt"
    (folder / "nested").mkdir(parents=True)
    files = {
        "model.safetensors": _safetensors_bytes(tmp_path),
        "config.json": json.dumps({"model_type": "llama", "hidden_size": 30}).encode(),
        "README.md": b"---\nlicense: apache-2.0\nlibrary_name: transformers\ntags:\n- tiny\n---\n# Tiny\n",
        "nested/notes.txt": "h\u00e9llo\n".encode(),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)

    api.create_repo("alice/ckpt")
    commit = api.upload_folder(repo_id="alice/ckpt", folder_path=folder, commit_message="Upload checkpoint")
    assert len(commit.oid) == 40

    # the safetensors file took the LFS path (batch + PUT), the others went inline
    methods_paths = [(r.method, r.path, r.status) for r in emu.requests]
    assert ("POST", "/alice/ckpt.git/info/lfs/objects/batch", 200) in methods_paths
    lfs_oid = hashlib.sha256(files["model.safetensors"]).hexdigest()
    assert ("PUT", f"/_lfs/{lfs_oid}", 200) in methods_paths
    assert sum(1 for r in emu.requests if r.method == "PUT") == 1

    assert sorted(api.list_repo_files("alice/ckpt")) == sorted([".gitattributes", *files])
    info = api.model_info("alice/ckpt", files_metadata=True)
    assert info.sha == commit.oid
    siblings = {s.rfilename: s for s in info.siblings}
    assert siblings["model.safetensors"].lfs.sha256 == lfs_oid
    assert siblings["model.safetensors"].size == len(files["model.safetensors"])
    assert siblings["config.json"].lfs is None
    assert info.card_data is not None and info.card_data.license == "apache-2.0"

    snapshot = Path(
        snapshot_download(
            "alice/ckpt", revision="main", endpoint=emu.endpoint, token=TOKEN, cache_dir=tmp_path / "c"
        )
    )
    assert snapshot.name == commit.oid
    for name, data in files.items():
        assert (snapshot / name).read_bytes() == data, name
    assert _download(emu, "alice/ckpt", "model.safetensors", tmp_path / "c2") == files["model.safetensors"]


def test_upload_file_variants_dataset_and_range(emu, api, tmp_path):
    api.create_repo("alice/data", repo_type="dataset")
    big_text = ("line of text\n" * 1000).encode()
    api.upload_file(
        path_or_fileobj=io.BytesIO(big_text),
        path_in_repo="data/train.txt",
        repo_id="alice/data",
        repo_type="dataset",
    )
    api.upload_file(
        path_or_fileobj=b"\x00\x01binary", path_in_repo="blob.dat", repo_id="alice/data", repo_type="dataset"
    )  # NUL bytes -> LFS
    assert _download(emu, "alice/data", "data/train.txt", tmp_path / "c", repo_type="dataset") == big_text
    assert _download(emu, "alice/data", "blob.dat", tmp_path / "c", repo_type="dataset") == b"\x00\x01binary"
    assert any(r.path == "/datasets/alice/data.git/info/lfs/objects/batch" for r in emu.requests)

    status, headers, body = _raw(
        emu, "GET", "/datasets/alice/data/resolve/main/data/train.txt", headers={"Range": "bytes=5-11"}
    )
    assert status == 206 and body == big_text[5:12]
    assert headers["Content-Range"] == f"bytes 5-11/{len(big_text)}"
    assert len(headers["X-Repo-Commit"]) == 40

    status, headers, _ = _raw(emu, "HEAD", "/datasets/alice/data/resolve/main/blob.dat")
    assert status == 200 and headers["X-Linked-Size"] == "8"
    blob_sha = hashlib.sha256(b"\x00\x01binary").hexdigest()
    assert headers["X-Linked-Etag"] == f'"{blob_sha}"'
    assert not any(k.lower().startswith("x-xet") for k in headers)  # Xet never advertised


# --------------------------------------------------------------------------------------------------
# commits
# --------------------------------------------------------------------------------------------------


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
    status, headers, payload = _raw(
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
    assert _download(emu, "alice/atomic", "a.txt", tmp_path / "c") == b"v1"

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
    assert _download(emu, "alice/pre", "weights.bin", tmp_path / "c") == weights
    assert _download(emu, "alice/pre", "notes.txt", tmp_path / "c") == b"small text"

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


# --------------------------------------------------------------------------------------------------
# branches, lookups, errors
# --------------------------------------------------------------------------------------------------


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
    assert _download(emu, "alice/br", "model.txt", tmp_path / "c", revision="dev") == b"dev v2"
    assert _download(emu, "alice/br", "model.txt", tmp_path / "c", revision="main") == b"main v1"
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
    assert _download(emu, "alice/br", "dev.txt", tmp_path / "c", revision="v1.0") == b"only on dev"

    pr = api.create_commit(
        "alice/br", [CommitOperationAdd("pr.txt", b"pr")], commit_message="PR", create_pr=True
    )
    assert pr.pr_revision == "refs/pr/1"
    assert "pr.txt" in api.list_repo_files("alice/br", revision=pr.pr_revision)
    assert "pr.txt" not in api.list_repo_files("alice/br")

    api.delete_branch("alice/br", branch="dev")
    assert not api.revision_exists("alice/br", "dev")
    assert api.revision_exists("alice/br", "v1.0")


def test_errors_map_to_client_exceptions(emu, api, tmp_path):
    api.create_repo("alice/err")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("alice/missing")
    with pytest.raises(RevisionNotFoundError):
        api.model_info("alice/err", revision="no-such-branch")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("alice/err", "nope.txt", endpoint=emu.endpoint, token=TOKEN, cache_dir=tmp_path / "c")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(
            "alice/missing", "x.txt", endpoint=emu.endpoint, token=TOKEN, cache_dir=tmp_path / "c"
        )
    with pytest.raises(RevisionNotFoundError):
        api.upload_file(
            path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="alice/err", revision="no-such-branch"
        )
    assert not api.file_exists("alice/missing", "x.txt")
    api.delete_repo("alice/err")
    assert not api.repo_exists("alice/err")


def test_token_required(tmp_path):
    with HubEmulator(tmp_path / "root", token="s3cret") as emu:
        with pytest.raises(HfHubHTTPError) as excinfo:
            HfApi(endpoint=emu.endpoint, token="wrong").create_repo("bob/secret")
        assert excinfo.value.response.status_code == 401
        with pytest.raises(HfHubHTTPError):
            HfApi(endpoint=emu.endpoint, token="wrong").whoami()
        with pytest.raises(HfHubHTTPError) as excinfo:
            HfApi(endpoint=emu.endpoint, token=False).list_repo_files("bob/secret")
        assert excinfo.value.response.status_code == 401

        good = HfApi(endpoint=emu.endpoint, token="s3cret")
        good.create_repo("bob/secret")
        payload = os.urandom(2048)  # .bin -> LFS: the signed upload URL works without the bearer token
        good.upload_file(path_or_fileobj=payload, path_in_repo="w.bin", repo_id="bob/secret")
        assert _download(emu, "bob/secret", "w.bin", tmp_path / "c", token="s3cret") == payload
        with pytest.raises(HfHubHTTPError):
            hf_hub_download(
                "bob/secret", "w.bin", endpoint=emu.endpoint, token="wrong", cache_dir=tmp_path / "c2"
            )

        # an unsigned LFS PUT is refused
        status, headers, _ = _raw(
            emu, "PUT", f"/_lfs/{hashlib.sha256(b'x').hexdigest()}", body=b"x", token=None
        )
        assert status == 401 and headers["X-Error-Message"]
        assert all(len(r) == 3 for r in emu.requests)
        assert "s3cret" not in repr(emu.requests)
    # a later emulator on the same root serves the same repos
    with HubEmulator(tmp_path / "root") as emu2:
        assert _download(emu2, "bob/secret", "w.bin", tmp_path / "c3") == payload


# --------------------------------------------------------------------------------------------------
# fault injection
# --------------------------------------------------------------------------------------------------


def test_fault_status_500_is_retried_by_http_backoff(emu, api):
    api.create_repo("alice/flaky")
    emu.inject_fault("status", path_regex=r"/preupload/", status=500)
    api.upload_file(path_or_fileobj=b"ok", path_in_repo="ok.txt", repo_id="alice/flaky")
    pre = [r.status for r in emu.requests if "/preupload/" in r.path]
    assert pre == [500, 200]
    assert emu.pending_faults == 0
    assert api.file_exists("alice/flaky", "ok.txt")


def test_fault_status_on_commit_is_not_retried_and_changes_nothing(emu, api):
    api.create_repo("alice/flaky")
    head = api.model_info("alice/flaky").sha
    emu.inject_fault("status", path_regex=r"/commit/main$", method="POST", status=503)
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="alice/flaky")
    assert excinfo.value.response.status_code == 503
    assert api.model_info("alice/flaky").sha == head
    api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="alice/flaky")  # fault used up
    assert [r.status for r in emu.requests if r.path.endswith("/commit/main")] == [503, 200]


def test_fault_429_and_drop_are_retried(emu, api):
    # Both the LFS batch call and the LFS PUT go through huggingface_hub's http_backoff (1.33 .. 2.x).
    api.create_repo("alice/flaky")
    emu.inject_fault("status", path_regex=r"/info/lfs/objects/batch$", status=429)
    emu.inject_fault("drop", path_regex=r"^/_lfs/[0-9a-f]+$", method="PUT")
    payload = os.urandom(1000)
    api.upload_file(path_or_fileobj=payload, path_in_repo="w.safetensors", repo_id="alice/flaky")
    assert [r.status for r in emu.requests if r.path.endswith("/objects/batch")] == [429, 200]
    assert [r.status for r in emu.requests if r.method == "PUT"] == [None, 200]
    info = api.model_info("alice/flaky", files_metadata=True)
    assert {s.rfilename: s.size for s in info.siblings}["w.safetensors"] == 1000


def test_fault_on_download_head_and_delay(emu, api, tmp_path):
    api.create_repo("alice/slow")
    api.upload_file(path_or_fileobj=b"content", path_in_repo="f.txt", repo_id="alice/slow")
    emu.inject_fault("status", path_regex=r"/resolve/", method="HEAD", status=502)
    assert _download(emu, "alice/slow", "f.txt", tmp_path / "c") == b"content"
    assert [r.status for r in emu.requests if r.method == "HEAD"] == [502, 200]

    emu.inject_fault("delay", path_regex=r"^/api/models/alice/slow$", delay=0.3, times=2)
    start = time.monotonic()
    api.model_info("alice/slow")
    api.model_info("alice/slow")
    assert time.monotonic() - start >= 0.6
    assert emu.pending_faults == 0

    emu.inject_fault("status", path_regex=r"^/api/models/", times=None, status=500)
    with pytest.raises(HfHubHTTPError):
        api.model_info("alice/slow")
    emu.clear_faults()
    assert api.model_info("alice/slow").id == "alice/slow"
    with pytest.raises(ValueError):
        emu.inject_fault("explode")


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def test_main_argument_errors():
    with pytest.raises(SystemExit) as excinfo:
        hub_emulator_module.main(["serve", "--port", "not-a-number"])
    assert excinfo.value.code == 2
    with pytest.raises(SystemExit):
        hub_emulator_module.main([])


def test_main_serves_until_interrupted(tmp_path):
    # Run the package on its own (`python -m hub_emulator`, not through lightning_bridge, which imports
    # torch): it only needs the standard library, so the subprocess starts fast.
    package_parent = Path(hub_emulator_module.__file__).parent.parent
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hub_emulator",
            "serve",
            "--root",
            str(tmp_path / "root"),
            "--port",
            "0",
            "--token",
            "cli-token",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(package_parent)},
    )
    # a safety net against a hung server only: a loaded 2-core CI machine can take long to start Python
    watchdog = threading.Timer(180, proc.kill)
    watchdog.start()
    try:
        lines = [proc.stdout.readline() for _ in range(2)]
        assert " at http://127.0.0.1:" in lines[0], lines
        endpoint = lines[0].rsplit(" at ", 1)[1].strip()
        assert f"HF_ENDPOINT={endpoint}" in lines[1] and "HF_HUB_DISABLE_XET=1" in lines[1]
        api = HfApi(endpoint=endpoint, token="cli-token")
        assert api.whoami()["name"]
        api.create_repo("cli/repo")
        assert api.list_repo_files("cli/repo") == [".gitattributes"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (tmp_path / "root" / "repos" / "models" / "cli" / "repo" / "refs.json").is_file()
