"""Injected faults: statuses, 429s, dropped connections and delays, and how huggingface_hub retries them."""

from __future__ import annotations

import os
import time

import pytest
from huggingface_hub.errors import HfHubHTTPError
from testing.hub_fixtures import api, download, emu, hf_client_env  # noqa: F401 - fixtures


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
    assert download(emu, "alice/slow", "f.txt", tmp_path / "c") == b"content"
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
