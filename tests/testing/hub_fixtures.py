"""Fixtures and helpers of the Hub emulator's tests: client settings, a running emulator, raw requests."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import pytest
from huggingface_hub import (
    HfApi,
    constants,
    hf_hub_download,
)

from lightning_bridge.testing import HubEmulator


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


def download(emu, repo_id, filename, cache_dir, **kwargs) -> bytes:
    kwargs.setdefault("token", TOKEN)
    path = hf_hub_download(repo_id, filename, endpoint=emu.endpoint, cache_dir=cache_dir, **kwargs)
    return Path(path).read_bytes()


def safetensors_bytes(tmp_path: Path) -> bytes:
    import numpy as np
    from safetensors.numpy import save_file

    path = tmp_path / "weights.safetensors"
    save_file(
        {"w": np.arange(600, dtype=np.float32).reshape(20, 30), "b": np.ones(7, dtype=np.float16)}, str(path)
    )
    return path.read_bytes()


def raw(emu, method, path, *, body=None, headers=None, token=TOKEN):
    """A plain urllib request; returns (status, headers, body bytes) without raising on HTTP errors."""
    req = urllib.request.Request(emu.endpoint + path, data=body, method=method, headers=dict(headers or {}))
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()
