"""The emulator's request dispatch: the token check before any endpoint."""

from __future__ import annotations

import hashlib
import os

import pytest
from huggingface_hub import (
    HfApi,
    hf_hub_download,
)
from huggingface_hub.errors import HfHubHTTPError
from testing.hub_fixtures import download, emu, hf_client_env, raw  # noqa: F401 - fixtures

from lightning_bridge.testing import HubEmulator


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
        assert download(emu, "bob/secret", "w.bin", tmp_path / "c", token="s3cret") == payload
        with pytest.raises(HfHubHTTPError):
            hf_hub_download(
                "bob/secret", "w.bin", endpoint=emu.endpoint, token="wrong", cache_dir=tmp_path / "c2"
            )

        # an unsigned LFS PUT is refused
        status, headers, _ = raw(
            emu, "PUT", f"/_lfs/{hashlib.sha256(b'x').hexdigest()}", body=b"x", token=None
        )
        assert status == 401 and headers["X-Error-Message"]
        assert all(len(r) == 3 for r in emu.requests)
        assert "s3cret" not in repr(emu.requests)
    # a later emulator on the same root serves the same repos
    with HubEmulator(tmp_path / "root") as emu2:
        assert download(emu2, "bob/secret", "w.bin", tmp_path / "c3") == payload
