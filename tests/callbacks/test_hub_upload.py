"""HubUploader's retries (which failures, how long to wait), its token masking, and the file helpers."""

from __future__ import annotations

import time

import pytest
from huggingface_hub.errors import HfHubHTTPError

from lightning_bridge.callbacks.hub_upload import BackgroundPush, HubUploader, PushResult, describe, open_files

TOKEN = "hf_HubUploadTestToken_42ab"


def _transport():
    """The HTTP client module huggingface_hub uses: httpx2 (2.x) or httpx (1.x)."""
    try:
        import httpx2

        return httpx2
    except ImportError:
        import httpx

        return httpx


def http_error(status: int, headers: dict | None = None) -> HfHubHTTPError:
    transport = _transport()
    request = transport.Request("POST", "http://127.0.0.1/api/x")
    return HfHubHTTPError(f"{status}", response=transport.Response(status, headers=headers, request=request))


class FailingApi:
    """An HfApi whose create_repo raises ``failures`` in turn, then succeeds; list_repo_refs then stops the push."""

    def __init__(self, *failures: BaseException) -> None:
        self.failures = list(failures)
        self.create_repo_calls = 0

    def create_repo(self, *args, **kwargs):
        self.create_repo_calls += 1
        if self.failures:
            raise self.failures.pop(0)

    def list_repo_refs(self, *args, **kwargs):
        raise ValueError("stop here")


def _push(*failures: BaseException, max_retries: int = 5) -> tuple[PushResult, str, FailingApi]:
    uploader = HubUploader("me/tiny", private=False, token=TOKEN, endpoint=None, max_retries=max_retries,
                           retry_backoff_s=0.0)
    api = FailingApi(*failures)
    uploader.api = lambda: api
    result = PushResult(folder="x", revision="main")
    with pytest.raises(Exception) as raised:
        uploader.push({}, "main", "message", result)
    return result, str(raised.value), api


def wrapped(cause: BaseException) -> RuntimeError:
    """huggingface_hub wraps LFS upload errors in a RuntimeError: the cause decides."""
    try:
        try:
            raise cause
        except BaseException as exc:
            raise RuntimeError("Error while uploading 'x' to the Hub.") from exc
    except RuntimeError as error:
        return error


@pytest.mark.parametrize("failure", [http_error(500), http_error(502), http_error(503), http_error(408),
                                     http_error(429), ConnectionResetError(), TimeoutError(),
                                     _transport().RemoteProtocolError("dropped"), wrapped(http_error(502))],
                         ids=lambda f: describe(f)[:40])
def test_transient_failures_are_retried(failure, monkeypatch):
    monkeypatch.setattr(time, "sleep", lambda s: None)
    result, error, api = _push(failure)
    assert result.retries == 1 and api.create_repo_calls == 2
    assert error == "list_repo_refs failed: ValueError: stop here"  # the push went on past create_repo


@pytest.mark.parametrize("failure,shown", [(http_error(404), "404"), (http_error(401), "401"),
                                           (FileNotFoundError("x"), "FileNotFoundError: x"),
                                           (PermissionError("x"), "PermissionError: x"), (ValueError("bad"), "bad")])
def test_client_and_local_failures_are_not_retried(failure, shown):
    result, error, api = _push(failure)
    assert result.retries == 0 and api.create_repo_calls == 1
    assert error.startswith("create_repo failed: ") and shown in error


def test_retries_wait_as_the_server_says_then_back_off_exponentially(monkeypatch):
    waits: list[float] = []
    monkeypatch.setattr(time, "sleep", waits.append)
    uploader = HubUploader("me/tiny", private=False, token=None, endpoint=None, max_retries=5, retry_backoff_s=0.5)
    api = FailingApi(http_error(429, {"Retry-After": "7"}), http_error(503, {"Retry-After": "Thu, 01 Jan 1970 "
                                                                             "00:00:00 GMT"}), http_error(500),
                     http_error(500))
    uploader.api = lambda: api
    with pytest.raises(Exception, match="stop here"):
        uploader.push({}, "main", "m", PushResult(folder="x", revision="main"))
    assert waits == [7.0, 0.0, 0.5 * 2 ** 2, 0.5 * 2 ** 3]  # Retry-After seconds, a past date, then backoff


def test_retries_stop_after_max_retries_naming_the_attempts(monkeypatch):
    monkeypatch.setattr(time, "sleep", lambda s: None)
    result, error, api = _push(*[http_error(500)] * 3, max_retries=2)
    assert result.retries == 2 and api.create_repo_calls == 3
    assert error == "create_repo failed after 3 attempts: HfHubHTTPError: 500"


def test_the_token_and_bearer_headers_are_masked(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    uploader = HubUploader("me/tiny", private=False, token=TOKEN, endpoint="http://hub", max_retries=0,
                           retry_backoff_s=0.0)
    assert uploader.redact(f"token={TOKEN}; Authorization: Bearer abc.def") == "token=***; Authorization: Bearer ***"
    assert uploader.endpoint_url() == "http://hub"
    result, error, _ = _push(ConnectionResetError(f"reset while sending {TOKEN}"), max_retries=0)
    assert TOKEN not in error and "***" in error


def test_open_files_skips_hidden_files_and_names_a_missing_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "model.safetensors").write_bytes(b"w")
    (tmp_path / "sub" / "a.txt").write_text("a")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "x").write_text("x")
    handles: list = []
    files = open_files(tmp_path, handles)
    try:
        assert sorted(files) == ["model.safetensors", "sub/a.txt"] and len(handles) == 2
        assert files["sub/a.txt"].read() == b"a"
    finally:
        for handle in handles:
            handle.close()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_files(tmp_path / "missing", [])


def test_background_push_runs_one_push_and_join_waits_for_it():
    import threading

    release, done = threading.Event(), []
    push = BackgroundPush()
    assert not push.running and push.name is None
    push.start("PushToHub-step-3", lambda value: (release.wait(5), done.append(value)), 3)
    assert push.running and push.name == "PushToHub-step-3"
    release.set()
    push.join()
    assert done == [3] and not push.running


def test_a_push_result_is_ok_only_with_a_commit_and_no_error():
    assert not PushResult(folder="x", revision="main").ok
    assert PushResult(folder="x", revision="main", commit_id="abc").ok
    assert not PushResult(folder="x", revision="main", commit_id="abc", error="failed").ok
    assert describe(ValueError("bad")) == "ValueError: bad" and describe(KeyError()) == "KeyError"
