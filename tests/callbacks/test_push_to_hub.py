"""PushToHub against the local HubEmulator: end to end in a 2-process fit, Hub faults, pushes of every checkpoint.

All Hub traffic goes to a HubEmulator on 127.0.0.1. The two fits (PushToHub exporting the model itself,
and PushToHub publishing what an HFCheckpoint wrote, with a push of every checkpoint) share one
2-process launch (a launch costs ~20 s on 2 cores). The fault tests call ``PushToHub.publish`` (or the
hooks, with a stand-in trainer) in this process.
"""

from __future__ import annotations

import importlib.util
import itertools
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import huggingface_hub.constants
import pytest
import torch
import yaml
from callbacks.push_to_hub_checks import fit_and_push
from factories import make_checkpoint
from huggingface_hub import HfApi, snapshot_download
from processes import launch

from lightning_bridge.builtin import build_tokenizer
from lightning_bridge.callbacks.push_to_hub import PushResult, PushToHub
from lightning_bridge.testing import HubEmulator

TOKEN = "hf_PushToHubTestToken_7f3a9c2e5b"  # distinctive: searched for in every file and log
HAS_HF_CHECKPOINT = importlib.util.find_spec("lightning_bridge.callbacks.hf_checkpoint") is not None
RUNS = {"export": {"repo_id": "me/tiny-export", "hf_checkpoint": False, "every": False, "steps": 4}}
if HAS_HF_CHECKPOINT:
    RUNS["hfc"] = {"repo_id": "me/tiny-hfc", "hf_checkpoint": True, "every": True, "steps": 4}


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and ".cache" not in p.relative_to(folder).parts}


def _token_hits(root: Path) -> list[str]:
    needle = TOKEN.encode()
    return [str(p) for p in root.rglob("*") if p.is_file() and not p.is_symlink() and needle in p.read_bytes()]


def _transport():
    """The HTTP client module huggingface_hub uses: httpx2 (2.x) or httpx (1.x)."""
    try:
        import httpx2

        return httpx2
    except ImportError:
        import httpx

        return httpx


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


# --- end to end: 2-process fits -------------------------------------------------------------------------
def _tiny_checkpoint(folder: Path, max_shard_size: str) -> Path:
    """A tiny sharded llama checkpoint with a tokenizer, as a source or as a checkpoint to publish."""
    build_tokenizer().save_pretrained(make_checkpoint("llama", folder, max_shard_size=max_shard_size))
    return folder


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return _tiny_checkpoint(tmp_path_factory.mktemp("push-src") / "source", "40KB")


@pytest.fixture(scope="module")
def fitted(source, tmp_path_factory):
    base = tmp_path_factory.mktemp("push-e2e")
    out = base / "out"
    out.mkdir()
    with pytest.MonkeyPatch.context() as mp, HubEmulator(root=base / "hub", token=TOKEN) as emu:
        mp.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
        # The ranks inherit this environment: PushToHub(token=None, endpoint=None) reads it.
        mp.setenv("HF_HUB_DISABLE_XET", "1")
        mp.setenv("HF_ENDPOINT", emu.endpoint)
        mp.setenv("HF_TOKEN", TOKEN)
        mp.setenv("HF_HOME", str(base / "hf-home"))
        results = launch(fit_and_push, 2, str(source), str(out), RUNS)
        api = HfApi(endpoint=emu.endpoint, token=TOKEN)
        downloads = {key: Path(snapshot_download(run["repo_id"], endpoint=emu.endpoint, token=TOKEN,
                                                 cache_dir=base / "downloads"))
                     for key, run in RUNS.items()}
        refs = {key: sorted(b.name for b in api.list_repo_refs(run["repo_id"]).branches) for key, run in RUNS.items()}
        branches = {}
        if "hfc" in RUNS:
            for name in refs["hfc"]:
                if name != "main":
                    branches[name] = (
                        Path(snapshot_download("me/tiny-hfc", revision=name, endpoint=emu.endpoint, token=TOKEN,
                                               cache_dir=base / "downloads")),
                        [c.title for c in api.list_repo_commits("me/tiny-hfc", revision=name)])
        private = api.model_info("me/tiny-export").private
    return SimpleNamespace(base=base, out=out, results=results, downloads=downloads, refs=refs,
                           branches=branches, private=private)


def _check_published(fitted, key: str, local: Path) -> str:
    """The repo's main is the local checkpoint, byte for byte, and transformers loads it; returns the card."""
    download = fitted.downloads[key]
    remote = _files(download)
    assert remote.pop(".gitattributes")  # the repo's initial commit
    assert remote == _files(local)
    model = __import__("transformers").AutoModelForCausalLM.from_pretrained(download)
    assert model.config.vocab_size == 96
    __import__("transformers").AutoTokenizer.from_pretrained(download)
    return (download / "README.md").read_text()


def _check_card(card: str, plot_names: set[str]) -> None:
    meta = _front_matter(card)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"lightning-bridge", "megatron-core", "llama"} <= set(meta["tags"])
    assert "base_model" not in meta  # the source is a local folder: named in the body instead
    assert "`source`" in card
    assert "| Training steps | 4 |" in card and "| Tokens seen | 240 |" in card
    assert "| Parallel layout | TP=2, PP=1, DP=1 |" in card
    assert "Final train loss" in card and "Final validation loss" in card and "perplexity" in card
    plots = [name for name in plot_names if name.startswith("training_loss.")]
    assert len(plots) == 1 and f"]({plots[0]})" in card


@pytest.mark.slow
def test_end_to_end_exporting_itself(fitted):
    run = fitted.results[0]["export"]
    assert fitted.results[1]["export"]["results"] == []  # only rank 0 talks to the Hub
    assert run["failure"] is None and [r.ok for r in run["results"]] == [True]
    assert [s for s, _ in run["losses"]] == [1, 2, 3, 4]
    local = Path(run["exported"])
    assert local == fitted.out / "export" / "export" / "step-4"
    card = _check_published(fitted, "export", local)
    _check_card(card, set(_files(local)))
    assert fitted.refs["export"] == ["main"] and fitted.private is True


@pytest.mark.slow
def test_end_to_end_from_hf_checkpoint_with_every_checkpoint(fitted):
    pytest.importorskip("lightning_bridge.callbacks.hf_checkpoint")
    run = fitted.results[0]["hfc"]
    results: list[PushResult] = run["results"]
    assert run["failure"] is None and all(r.ok for r in results)
    final = results[-1]
    assert final.revision == "main" and Path(final.folder).name == "step-4"
    hf_dir = fitted.out / "hfc" / "hf"
    assert (hf_dir / "latest").read_text().strip() == "step-4"
    card = _check_published(fitted, "hfc", hf_dir / "step-4")
    _check_card(card, set(_files(hf_dir / "step-4")))
    # Intermediate checkpoints: each on its own branch step-N, made from main; never two pushes at once.
    pushed = [Path(r.folder).name for r in results[:-1]]
    assert pushed and all(r.revision == Path(r.folder).name for r in results[:-1])
    assert set(pushed).isdisjoint(Path(s).name for s in run["skipped"])
    assert set(pushed) | {Path(s).name for s in run["skipped"]} <= {"step-1", "step-2", "step-3", "step-4"}
    spans = sorted((r.started, r.finished) for r in results)
    assert all(end <= next_start for (_, end), (next_start, _) in itertools.pairwise(spans))
    assert sorted(fitted.branches) == sorted(pushed) and fitted.refs["hfc"] == sorted(["main", *pushed])
    for name, (download, titles) in fitted.branches.items():
        remote = _files(download)
        local = _files(hf_dir / name)
        assert {k: remote[k] for k in local} == local  # the checkpoint as HFCheckpoint wrote it
        assert "README.md" in remote and any(k.startswith("training_loss.") for k in remote)
        assert titles == [f"Upload {name} (lightning-bridge)", "initial commit"]


@pytest.mark.slow
def test_end_to_end_token_is_nowhere(fitted):
    assert _token_hits(fitted.base) == []  # repos, blobs, checkpoints, cards, downloads, rank stdout/stderr
    assert any("PushToHub: pushed" in r for r in fitted.results[0]["log_records"])
    for rank_result in fitted.results:
        assert not [r for r in rank_result["log_records"] if TOKEN in r]
    assert (fitted.out / "rank0.out").exists() and (fitted.out / "rank1.out").exists()


# --- faults: single process, publish() on a local checkpoint --------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return _tiny_checkpoint(tmp_path_factory.mktemp("push-ckpt") / "step-3", "100KB")


@pytest.fixture
def local(checkpoint, tmp_path) -> Path:
    return Path(shutil.copytree(checkpoint, tmp_path / "ckpt" / "step-3"))


@pytest.fixture
def emu(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with HubEmulator(root=tmp_path / "hub", token=TOKEN) as emulator:
        yield emulator


def _push(emu: HubEmulator, **kwargs) -> PushToHub:
    kwargs = {"token": TOKEN, "endpoint": emu.endpoint, "max_retries": 3, "retry_backoff_s": 0.01, **kwargs}
    callback = PushToHub(kwargs.pop("repo_id", "me/tiny"), **kwargs)
    callback.losses = [(step, 4.0 - 0.5 * step) for step in range(1, 4)]
    return callback


def _commits(emu: HubEmulator, repo_id: str = "me/tiny", revision: str = "main") -> list[str]:
    return [c.title for c in HfApi(endpoint=emu.endpoint, token=TOKEN).list_repo_commits(repo_id, revision=revision)]


def _commit_posts(emu: HubEmulator) -> list:
    return [r for r in emu.requests if r.method == "POST" and "/commit/" in r.path]


def test_publish_uploads_shards_one_by_one_in_one_commit(emu, local):
    result = _push(emu).publish(local)
    assert result.ok and result.retries == 0
    assert _commits(emu) == ["Upload step-3 (lightning-bridge)", "initial commit"]
    shards = sorted(p.name for p in local.glob("*.safetensors"))
    assert len(shards) > 1
    preuploads = [r for r in emu.requests if r.method == "POST" and "/preupload/" in r.path]
    assert len(preuploads) >= len(shards)  # one per shard, then the commit's own for the small files
    api = HfApi(endpoint=emu.endpoint, token=TOKEN)
    assert set(api.list_repo_files("me/tiny")) == {".gitattributes", *_files(local)}
    assert "README.md" in _files(local) and [p.name for p in local.glob("training_loss.*")]


def test_failing_commit_is_retried_and_published_once(emu, local):
    emu.inject_fault("status", path_regex=r"/commit/", method="POST", status=500, times=1)
    result = _push(emu).publish(local)
    assert result.ok and result.retries == 1
    assert _commits(emu) == ["Upload step-3 (lightning-bridge)", "initial commit"]
    assert [r.status for r in _commit_posts(emu)] == [500, 200]


def test_rate_limit_is_retried(emu, local):
    emu.inject_fault("status", path_regex=r"/commit/", method="POST", status=429, times=2)
    emu.inject_fault("status", path_regex=r"/api/repos/create", status=429, times=1)
    result = _push(emu).publish(local)
    assert result.ok and result.retries == 3
    assert _commits(emu) == ["Upload step-3 (lightning-bridge)", "initial commit"]


def test_slow_uploads_still_publish(emu, local):
    emu.inject_fault("delay", path_regex=r"^/_lfs/", method="PUT", delay=0.5, times=2)
    emu.inject_fault("delay", path_regex=r"/commit/", method="POST", delay=0.5, times=1)
    result = _push(emu).publish(local)
    assert result.ok and result.retries == 0 and emu.pending_faults == 0
    assert len(_commits(emu)) == 2


def test_dropped_commit_is_retried_without_duplicate(emu, local):
    emu.inject_fault("drop", path_regex=r"/commit/", method="POST", times=1)
    result = _push(emu).publish(local)
    assert result.ok and result.retries == 1
    assert [r.status for r in _commit_posts(emu)] == [None, 200]
    assert _commits(emu) == ["Upload step-3 (lightning-bridge)", "initial commit"]


def test_commit_applied_but_answer_lost_is_not_made_twice(emu, local, monkeypatch):
    """The server applied the commit, then the connection dropped before its answer: no second commit."""
    transport = _transport()
    real = HfApi.create_commit
    calls = []

    def lost_answer(self, *args, **kwargs):
        info = real(self, *args, **kwargs)
        calls.append(info.oid)
        if len(calls) == 1:
            raise transport.RemoteProtocolError("Server disconnected without sending a response.")
        return info

    monkeypatch.setattr(HfApi, "create_commit", lost_answer)
    result = _push(emu).publish(local)
    assert result.ok and result.commit_id == calls[0] and len(calls) == 1
    assert _commits(emu) == ["Upload step-3 (lightning-bridge)", "initial commit"]
    assert len(_commit_posts(emu)) == 1


def test_client_errors_are_not_retried(emu, local):
    emu.inject_fault("status", path_regex=r"/commit/", method="POST", status=403, times=1)
    result = _push(emu).publish(local)
    assert not result.ok and result.retries == 0 and "403" in result.error
    assert len(_commit_posts(emu)) == 1 and _commits(emu) == ["initial commit"]
    bad = _push(emu, token="hf_wrong_token_0123456789", repo_id="me/other").publish(local)
    assert not bad.ok and "401" in bad.error and len(_commit_posts(emu)) == 1
    assert [r.status for r in emu.requests if "/repos/create" in r.path][-1] == 401


def test_stale_weight_files_are_removed(emu, local, tmp_path):
    assert _push(emu).publish(local).ok
    single = make_checkpoint("llama", tmp_path / "single" / "step-5", seed=1)
    assert _push(emu).publish(single).ok
    files = set(HfApi(endpoint=emu.endpoint, token=TOKEN).list_repo_files("me/tiny"))
    assert {"model.safetensors", "tokenizer.json"} <= files  # tokenizer files are left alone
    assert not [f for f in files if f.startswith("model-0")] and "model.safetensors.index.json" not in files


def _trainer(callbacks: list, step: int = 3) -> SimpleNamespace:
    """The parts of a Trainer that PushToHub's hooks use, for one process."""
    strategy = SimpleNamespace(broadcast=lambda obj, src=0: obj, model_source="org/base-model",
                               parallel_sizes={"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 1})
    return SimpleNamespace(callbacks=callbacks, is_global_zero=True, global_step=step, world_size=4,
                           strategy=strategy, callback_metrics={"train_loss": torch.tensor(2.5)})


def _hf_checkpoint(dirpath: Path, *names: str) -> SimpleNamespace:
    """An HFCheckpoint stand-in: a dirpath with ``latest`` naming the newest folder."""
    dirpath.mkdir(parents=True, exist_ok=True)
    for name in names:
        (dirpath / "latest").write_text(name + "\n")
    return SimpleNamespace(dirpath=dirpath, save_now=lambda trainer: None)


def test_persistent_failure_is_reported_with_retry_command(emu, local, caplog):
    emu.inject_fault("status", path_regex=r"/commit/", method="POST", status=503, times=None)
    callback = _push(emu, max_retries=2)
    trainer = _trainer([_hf_checkpoint(local.parent, local.name), callback])
    before = _files(local)
    with caplog.at_level(logging.INFO), pytest.warns(UserWarning, match="could not publish"):
        callback.on_fit_end(trainer, SimpleNamespace(tokens_seen=1234))  # returns: training is not killed
    assert len(_commit_posts(emu)) == 3 and _commits(emu) == ["initial commit"]
    failure = callback.failure
    assert failure and "503" in failure and str(local) in failure
    assert f"hf upload me/tiny {local} . --revision main --private" in failure and "upload_folder" in failure
    assert any(r.levelno == logging.ERROR and "hf upload" in r.getMessage() for r in caplog.records)
    assert _files(local).keys() >= before.keys()  # the checkpoint stays (plus its card)
    # The command it gives does publish the folder.
    emu.clear_faults()
    command = failure.split("run:\n  ", 1)[1].splitlines()[0]
    env = {**os.environ, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    subprocess.run(["bash", "-c", command], check=True, env=env, capture_output=True, timeout=120)
    remote = set(HfApi(endpoint=emu.endpoint, token=TOKEN).list_repo_files("me/tiny"))
    assert remote == {".gitattributes", *_files(local)}


def test_raise_on_failure_fails_fit(emu, local):
    emu.inject_fault("status", path_regex=r"/commit/", method="POST", status=500, times=None)
    callback = _push(emu, max_retries=1, raise_on_failure=True)
    trainer = _trainer([_hf_checkpoint(local.parent, local.name), callback])
    with pytest.raises(RuntimeError, match=r"hf upload me/tiny"), pytest.warns(UserWarning):
        callback.on_fit_end(trainer, SimpleNamespace(tokens_seen=1234))


def test_token_is_redacted_everywhere(emu, local, tmp_path, caplog, monkeypatch):
    def leaky(self, *args, **kwargs):
        raise OSError(f"connection reset while sending Authorization: Bearer {TOKEN} (token={TOKEN})")

    monkeypatch.setattr(HfApi, "create_commit", leaky)
    callback = _push(emu, max_retries=1, raise_on_failure=True)
    trainer = _trainer([_hf_checkpoint(local.parent, local.name), callback])
    with caplog.at_level(logging.DEBUG), pytest.raises(RuntimeError) as raised, pytest.warns(UserWarning):
        callback.on_fit_end(trainer, SimpleNamespace(tokens_seen=1234))
    assert TOKEN not in str(raised.value) and "Bearer ***" in str(raised.value)
    assert TOKEN not in callback.failure and TOKEN not in repr(callback)
    assert not [r for r in caplog.records if TOKEN in r.getMessage()]
    assert _token_hits(tmp_path) == []


def test_card_summary_from_the_trainer(emu, local):
    callback = _push(emu)
    trainer = _trainer([_hf_checkpoint(local.parent, local.name), callback], step=3)
    callback.on_fit_end(trainer, SimpleNamespace(tokens_seen=1234))
    assert callback.failure is None and callback.results[-1].ok
    card = (local / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["base_model"] == "org/base-model"
    assert "| Tokens seen | 1,234 |" in card and "| Parallel layout | TP=2, PP=1, DP=2 |" in card
    assert "2.5000 (perplexity 12.18)" in card


def test_push_every_checkpoint_to_branches_without_overlap(emu, local, tmp_path):
    """A checkpoint that appears while a push runs is skipped; the final push waits, then goes to main."""
    dirpath = local.parent
    hfc = _hf_checkpoint(dirpath)
    callback = _push(emu, push_every_checkpoint=True)
    trainer = _trainer([hfc, callback], step=1)
    module = SimpleNamespace(tokens_seen=0)
    callback.setup(trainer, module, "fit")
    emu.inject_fault("delay", path_regex=r"^/_lfs/", method="PUT", delay=1.0, times=1)  # step-3's push is slow
    (dirpath / "latest").write_text("step-3\n")
    callback.on_train_batch_end(trainer, module, None, None, 0)
    assert callback._background.running  # training goes on meanwhile
    shutil.copytree(local, dirpath / "step-4")
    (dirpath / "latest").write_text("step-4\n")
    trainer.global_step = 2
    callback.on_train_batch_end(trainer, module, None, None, 1)  # step-3 still pushing: skip step-4
    assert callback.skipped == [str(dirpath / "step-4")]
    shutil.copytree(local, dirpath / "step-5")
    (dirpath / "latest").write_text("step-5\n")
    trainer.global_step = 3
    callback.on_fit_end(trainer, module)  # waits for step-3's push, then step-5 to main
    assert callback.failure is None
    assert [(Path(r.folder).name, r.revision, r.ok) for r in callback.results] == [
        ("step-3", "step-3", True), ("step-5", "main", True)]
    first, final = callback.results
    assert first.finished <= final.started
    refs = HfApi(endpoint=emu.endpoint, token=TOKEN).list_repo_refs("me/tiny")
    assert sorted(b.name for b in refs.branches) == ["main", "step-3"]
    assert _commits(emu, revision="step-3") == ["Upload step-3 (lightning-bridge)", "initial commit"]
    assert not (dirpath / "step-3" / "README.md").exists()  # intermediate checkpoints are left untouched


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="namespace/name"):
        PushToHub("no-namespace")
    with pytest.raises(ValueError):
        PushToHub("me/x", max_retries=-1)
