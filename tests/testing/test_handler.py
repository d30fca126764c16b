"""The emulator's HTTP plumbing: Hub errors answered so huggingface_hub raises its usual exceptions."""

from __future__ import annotations

import pytest
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from testing.hub_fixtures import TOKEN, api, emu, hf_client_env  # noqa: F401 - fixtures


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
