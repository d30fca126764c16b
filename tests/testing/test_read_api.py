"""The emulator's read endpoints: downloads byte for byte, snapshots, ranges, repo types."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

from huggingface_hub import snapshot_download
from testing.hub_fixtures import TOKEN, api, download, emu, hf_client_env, raw, safetensors_bytes  # noqa: F401 - fixtures


def test_upload_folder_then_snapshot_download_is_byte_identical(emu, api, tmp_path):
    folder = tmp_path / "ckpt"
    (folder / "nested").mkdir(parents=True)
    files = {
        "model.safetensors": safetensors_bytes(tmp_path),
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
    assert download(emu, "alice/ckpt", "model.safetensors", tmp_path / "c2") == files["model.safetensors"]


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
    assert download(emu, "alice/data", "data/train.txt", tmp_path / "c", repo_type="dataset") == big_text
    assert download(emu, "alice/data", "blob.dat", tmp_path / "c", repo_type="dataset") == b"\x00\x01binary"
    assert any(r.path == "/datasets/alice/data.git/info/lfs/objects/batch" for r in emu.requests)

    status, headers, body = raw(
        emu, "GET", "/datasets/alice/data/resolve/main/data/train.txt", headers={"Range": "bytes=5-11"}
    )
    assert status == 206 and body == big_text[5:12]
    assert headers["Content-Range"] == f"bytes 5-11/{len(big_text)}"
    assert len(headers["X-Repo-Commit"]) == 40

    status, headers, _ = raw(emu, "HEAD", "/datasets/alice/data/resolve/main/blob.dat")
    assert status == 200 and headers["X-Linked-Size"] == "8"
    blob_sha = hashlib.sha256(b"\x00\x01binary").hexdigest()
    assert headers["X-Linked-Etag"] == f'"{blob_sha}"'
    assert not any(k.lower().startswith("x-xet") for k in headers)  # Xet never advertised
