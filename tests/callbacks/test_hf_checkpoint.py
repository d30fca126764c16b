"""HFCheckpoint: HF checkpoints while training, at TP=2, PP=2 (distribute) and DP=2; kills; errors.

The three fits run in one 2-process launch (a launch costs ~15 s of start-up on 2 cores).
"""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from callbacks.hf_checkpoint_checks import fit_runs
from factories import make_checkpoint
from processes import launch
from safetensors.torch import load_file

from lightning_bridge.builtin import build_tokenizer
from lightning_bridge.callbacks import HFCheckpoint
from lightning_bridge.hf_io import HFCheckpointReader, is_complete_checkpoint
from lightning_bridge.verify import relative_difference, transformers_logits

# max_steps, every_n_train_steps, keep_last_k as steps, every, keep
FIELDS = ("tp", "pp", "mode", "steps", "every", "keep", "max_shard_size")
RUNS = {key: dict(zip(FIELDS, run)) for key, run in {
    "tp2": (2, 1, "consolidate", 5, 2, 2, 5 * 2**30),
    "pp2": (1, 2, "distribute", 4, 2, 2, 60_000),
    "dp2": (1, 1, "distribute", 3, 2, 1, 5 * 2**30),
}.items()}
EXPECTED = {  # saved steps (save_last never repeats a step), folders left by keep_last_k
    "tp2": ([2, 4, 5], ["latest", "step-4", "step-5"]),
    "pp2": ([2, 4], ["latest", "step-2", "step-4"]),
    "dp2": ([2, 3], ["latest", "step-3"]),
}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    folder = make_checkpoint("llama", tmp_path_factory.mktemp("hfc") / "source", max_shard_size="40KB")
    build_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def fitted(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("hfc-out")
    input_ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    return out, input_ids, launch(fit_runs, 2, str(source), str(out), input_ids, RUNS)


@pytest.mark.slow
@pytest.mark.parametrize("key", sorted(RUNS))
def test_saves_during_fit(fitted, source, key):
    out, input_ids, results = fitted
    steps, listing = EXPECTED[key]
    for rank, result in enumerate(results):
        assert result[key]["global_step"] == RUNS[key]["steps"]
        assert [s["step"] for s in result[key]["stats"]] == steps, rank  # same decisions on every rank
        assert not result[key]["writing"], rank  # every write finished before fit returned
        assert all(s["bytes"] > 0 and s["total_s"] >= 0 and s["blocked_s"] >= 0 for s in result[key]["stats"])
    mine = results[0][key]
    assert mine["listing"] == listing  # keep_last_k honoured; no temporary folder left
    assert mine["latest"] == f"step-{steps[-1]}"
    assert mine["saved_names"] == mine["reference_names"] == sorted(HFCheckpointReader(source).names())
    assert mine["bitwise"]  # the last checkpoint is exactly the weights at the end of fit

    folder = out / key / mine["latest"]
    assert is_complete_checkpoint(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert relative_difference(mine["logits"], transformers_logits(model, input_ids)) <= 1e-5
    assert transformers.AutoTokenizer.from_pretrained(folder).vocab_size == 512
    assert json.loads((folder / "config.json").read_text())["num_hidden_layers"] == 2
    assert (folder / "generation_config.json").is_file()
    files = mine["shard_files"]
    if RUNS[key]["mode"] == "consolidate":  # the source's shard layout is kept
        assert files == sorted(set(HFCheckpointReader(source).weight_map.values()))
    if key == "pp2":  # several ranks wrote several shards each, under one index
        assert len(files) >= 4 and not any(p.name.startswith("part-") for p in folder.iterdir())
    for old in (out / key).glob("step-*"):
        assert is_complete_checkpoint(old)


@pytest.mark.slow
def test_one_rank_failing_fails_the_save_on_every_rank(fitted):
    _, _, results = fitted
    errors = [result["rank_failure"]["error"] for result in results]
    assert errors[0] and errors[0] == errors[1]  # the same error, raised at the same point, no hang
    assert "rank 1" in errors[0] and "no space left on device" in errors[0] and "step-2" in errors[0]
    assert results[0]["rank_failure"]["listing"] == ["latest", "step-1"]  # no partial step-2, no temporaries
    assert results[0]["rank_failure"]["latest"] == "step-1"


@pytest.mark.slow
def test_kill_while_saving_leaves_only_complete_checkpoints(source, tmp_path):
    dirpath = tmp_path / "ckpt"
    script = Path(__file__).with_name("hf_checkpoint_checks.py")
    done = subprocess.run([sys.executable, str(script), "kill-loop", str(source), str(dirpath), "6", "1"],
                          check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("killed after") == 6
    steps = sorted(dirpath.glob("step-*"))
    assert steps, "no checkpoint was completed before the kills"
    for folder in steps:  # whatever the kill interrupted, a final name holds a complete checkpoint
        _assert_loads(folder, source)
    HFCheckpoint(dirpath).prepare()  # the next run's setup removes what the kills left
    left = sorted(p.name for p in dirpath.iterdir())
    assert all(not name.startswith(".") for name in left), left
    latest = (dirpath / "latest").read_text().strip()
    _assert_loads(dirpath / latest, source)


def _assert_loads(folder: Path, source: Path) -> None:
    assert is_complete_checkpoint(folder), folder
    reader = HFCheckpointReader(folder)
    assert sorted(reader.names()) == sorted(HFCheckpointReader(source).names())
    for file in set(reader.weight_map.values()):
        load_file(folder / file)
    assert json.loads((folder / "config.json").read_text())["model_type"] == "llama"


# --- in this process, one rank ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model(source):
    from lightning_bridge import AutoBridge

    bridge = AutoBridge.from_hf_pretrained(source)
    return bridge, bridge.to_megatron_model()


def test_saved_weights_are_those_of_the_step_even_if_training_goes_on(model, source, tmp_path):
    bridge, chunks = model
    callback = HFCheckpoint(tmp_path / "ckpt", staging_budget_bytes=1, max_shard_size=30_000, keep_last_k=1)
    params = [p for chunk in chunks for p in chunk.parameters()]
    kept = [p.detach().clone() for p in params]
    assert callback.save(bridge, chunks, 7)
    with torch.no_grad():  # the optimizer changes the weights while the files are written
        for param in params:
            param.add_(1.0)
    try:
        assert not callback.save(bridge, chunks, 7)  # a step is never saved twice
        stats = callback.wait()
    finally:
        with torch.no_grad():
            for param, value in zip(params, kept):
                param.copy_(value)
    assert stats["step"] == 7 and not stats["staged_all"]  # a 1-byte budget streams, shard by shard
    saved, original = HFCheckpointReader(tmp_path / "ckpt" / "step-7"), HFCheckpointReader(source)
    assert all(torch.equal(saved.get(n), original.get(n)) for n in original.names())
    assert len(set(saved.weight_map.values())) > 1


def test_dtype_is_honoured(model, source, tmp_path):
    bridge, chunks = model
    callback = HFCheckpoint(tmp_path / "ckpt", dtype=torch.bfloat16, mode="distribute")
    callback.save(bridge, chunks, 1)
    stats = callback.wait()
    folder, original = tmp_path / "ckpt" / "step-1", HFCheckpointReader(source)
    saved = HFCheckpointReader(folder)
    assert all(torch.equal(saved.get(n), original.get(n).to(torch.bfloat16)) for n in original.names())
    assert stats["bytes"] == sum(original.get(n).numel() * 2 for n in original.names())
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    assert transformers.AutoModelForCausalLM.from_pretrained(folder).dtype == torch.bfloat16


def test_foreign_dirpath_and_missing_strategy_are_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "step-3").mkdir()
    with pytest.raises(ValueError, match=r"not HFCheckpoint checkpoints: notes\.txt.*new or empty folder"):
        HFCheckpoint(tmp_path).prepare()
    assert (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="is not a folder"):
        HFCheckpoint(tmp_path / "notes.txt").prepare()
    trainer = SimpleNamespace(strategy=SimpleNamespace())
    with pytest.raises(TypeError, match="needs MegatronBridgeStrategy"):
        HFCheckpoint(tmp_path / "new").setup(trainer, None, "fit")
    stale = tmp_path / "fresh" / ".step-5.tmp-999999999-abcd1234"
    stale.mkdir(parents=True)
    HFCheckpoint(tmp_path / "fresh").prepare()
    assert not stale.exists()


@pytest.mark.parametrize("code, reason", [(errno.ENOSPC, "no space left on device"),
                                          (errno.EACCES, "permission denied")])
def test_disk_errors_are_clear_and_keep_earlier_checkpoints(model, source, tmp_path, monkeypatch, code,
                                                            reason):
    bridge, chunks = model
    dirpath = tmp_path / "ckpt"
    callback = HFCheckpoint(dirpath, max_shard_size=60_000, keep_last_k=1)
    callback.save(bridge, chunks, 1)
    callback.wait()

    def fail(*args, **kwargs):
        raise OSError(code, "simulated")

    monkeypatch.setattr("lightning_bridge.safetensors_stream.StreamedSafetensorsFile._write_at", fail)
    callback.save(bridge, chunks, 2)
    with pytest.raises(RuntimeError) as raised:
        callback.wait()
    message = str(raised.value)
    assert str(dirpath / "step-2") in message and reason in message and "intact" in message
    assert sorted(p.name for p in dirpath.iterdir()) == ["latest", "step-1"]  # nothing partial left
    assert (dirpath / "latest").read_text().strip() == "step-1"
    _assert_loads(dirpath / "step-1", source)
