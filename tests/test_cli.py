"""The lightning-bridge command."""

from __future__ import annotations

import csv
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from factories import make_checkpoint
from processes import clean_environment
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BertConfig

from lightning_bridge.builtin import build_tokenizer, tiny_llama
from lightning_bridge.cli import main
from lightning_bridge.dist_checkpoint import is_megatron_checkpoint

FIT_YAML = Path(__file__).resolve().parents[1] / "examples" / "configs" / "fit_tiny_llama.yaml"


def test_inspect_lists_supported_architectures(capsys):
    assert main(["inspect"]) == 0
    assert "LlamaForCausalLM" in capsys.readouterr().out


def test_inspect_shows_a_checkpoints_mapping_table(tmp_path, capsys):
    assert main(["inspect", str(tiny_llama(tmp_path / "tiny"))]) == 0
    out = capsys.readouterr().out
    assert "LlamaBridge" in out
    assert "qkv: decoder.layers.*.self_attention.linear_qkv.weight <- model.layers.*.self_attn.q_proj.weight" in out


def test_roundtrip_reports_bitwise_identity(tmp_path, capsys):
    assert main(["roundtrip", str(tiny_llama(tmp_path / "tiny")), "--output", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "bitwise identical" in out and "(OK)" in out
    BertConfig().save_pretrained(tmp_path / "bert")
    assert main(["roundtrip", str(tmp_path / "bert"), "--output", str(tmp_path / "out2")]) == 1
    assert capsys.readouterr().err.startswith("lightning-bridge roundtrip: error: Model architecture ")


def test_hub_serve_answers_until_stopped(tmp_path):
    import re
    import subprocess
    import sys

    from huggingface_hub import HfApi

    server = subprocess.Popen([sys.executable, "-m", "lightning_bridge.cli", "hub", "serve", "--root", str(tmp_path),
                               "--port", "0", "--token", "secret-token"], stdout=subprocess.PIPE, text=True)
    try:
        endpoint = None
        for line in server.stdout:
            found = re.search(r"http://127\.0\.0\.1:\d+", line)
            if found:
                endpoint = found.group(0)
                break
        assert endpoint is not None
        assert HfApi(endpoint=endpoint, token="secret-token").whoami()["name"]
    finally:
        server.terminate()
        server.wait(timeout=30)


# --- convert ------------------------------------------------------------------------------------
def _torchrun(args: list[str], nproc: int, cwd) -> subprocess.CompletedProcess:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "lightning_bridge.cli", *args]
    env = {**clean_environment(), "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, check=False, capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


@pytest.mark.slow
def test_convert_at_tp2_on_two_ranks_then_back_at_tp1_is_bitwise(tmp_path, capsys):
    """HF -> Megatron at TP=2 under torchrun, Megatron -> HF at TP=1 in one process: the same tensors.

    vocab_size=96 pads to 256 rows at TP=2 but 128 at TP=1: the checkpoint re-pads on load.
    """
    source = make_checkpoint("llama3.2", tmp_path / "hf")  # tied embeddings
    build_tokenizer(96).save_pretrained(source)
    done = _torchrun(["convert", "hf-to-megatron", str(source), "megatron", "--tp", "2", "--no-progress"],
                     nproc=2, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("converted") == 1  # rank 0 reports
    megatron = tmp_path / "megatron"
    metadata = json.loads((megatron / "lightning_bridge.json").read_text())
    assert metadata["written_with"]["tensor_model_parallel_size"] == 2
    assert metadata["written_with"]["world_size"] == 2
    assert sorted(p.name for p in (megatron / "hf_config").iterdir()) == [
        "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left

    assert main(["convert", "megatron-to-hf", str(megatron), str(tmp_path / "back"), "--no-progress"]) == 0
    original, back = _tensors(source), _tensors(tmp_path / "back")
    assert sorted(back) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name
        assert back[name].dtype == tensor.dtype
    assert (tmp_path / "back" / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    ids = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(source)(ids).logits
        actual = AutoModelForCausalLM.from_pretrained(tmp_path / "back")(ids).logits
    assert torch.equal(actual, expected)


@pytest.mark.slow
def test_convert_moe_at_ep2_then_back_at_pp2_is_bitwise(tmp_path):
    """Mixtral written with its experts split over 2 expert-parallel ranks, read back at PP=2."""
    source = make_checkpoint("mixtral", tmp_path / "hf")
    done = _torchrun(["convert", "hf-to-megatron", str(source), "megatron", "--ep", "2", "--no-progress"],
                     nproc=2, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "EP=2" in done.stdout
    written = json.loads((tmp_path / "megatron" / "lightning_bridge.json").read_text())["written_with"]
    assert written["expert_model_parallel_size"] == 2
    done = _torchrun(["convert", "megatron-to-hf", "megatron", "back", "--pp", "2", "--no-progress"],
                     nproc=2, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    original, back = _tensors(source), _tensors(tmp_path / "back")
    assert sorted(back) == sorted(original)
    assert all(torch.equal(back[name], tensor) for name, tensor in original.items())


def test_convert_refuses_bad_inputs_with_clear_errors(tmp_path, capsys):
    source = make_checkpoint("llama", tmp_path / "hf")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    BertConfig().save_pretrained(tmp_path / "bert")
    out = str(tmp_path / "out")  # never created: every case fails before writing
    cases = [
        (["hf-to-megatron", str(tmp_path / "missing"), out], f"The HF checkpoint {tmp_path / 'missing'} does not exist"),
        (["megatron-to-hf", str(tmp_path / "missing"), out], f"The checkpoint {tmp_path / 'missing'} does not exist"),
        (["megatron-to-hf", str(source), out], f"{source} is not a Megatron-Core distributed checkpoint"),
        (["hf-to-megatron", str(tmp_path / "bert"), out], "Model architecture"),
        (["hf-to-megatron", str(source), str(tmp_path / "full")],
         f"The output folder {tmp_path / 'full'} already exists and is not empty. Pass --overwrite"),
        (["hf-to-megatron", str(source), out, "--tp", "2"],
         "The world size 1 is not divisible by tensor_model_parallel_size (2) x pipeline_model_parallel_size (1)"),
    ]
    capsys.readouterr()
    for args, message in cases:
        assert main(["convert", *args, "--no-progress"]) == 1, args
        err = capsys.readouterr().err
        assert err.startswith("lightning-bridge convert: error: ") and message in err, (args, err)
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "out").exists()


def test_convert_overwrite_replaces_the_output_in_one_process(tmp_path, capsys):
    source = make_checkpoint("qwen2", tmp_path / "hf")
    out = tmp_path / "megatron"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert main(["convert", "hf-to-megatron", str(source), str(out), "--overwrite", "--no-progress"]) == 0
    assert not (out / "stale.txt").exists() and is_megatron_checkpoint(out)
    assert capsys.readouterr().out.startswith(f"converted {source} -> {out} (hf-to-megatron, TP=1 PP=1 EP=1) in ")
    assert main(["inspect", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["bridge"] == "Qwen2Bridge" and report["megatron_checkpoint"]["params_dtype"] == "float32"
    assert report["megatron_checkpoint"]["written_with"]["tensor_model_parallel_size"] == 1
    assert main(["inspect", str(out)]) == 0
    assert ("Megatron distributed checkpoint: float32 parameters, written at TP=1 PP=1 EP=1 on 1 process(es)"
            in capsys.readouterr().out)
    assert main(["convert", "hf-to-megatron", str(out), str(tmp_path / "again"), "--no-progress"]) == 1
    assert (f"{out} is a Megatron distributed checkpoint, not an HF one: use `lightning-bridge convert "
            "megatron-to-hf` to convert it.") in capsys.readouterr().err
    back = tmp_path / "back"
    back.mkdir()  # an empty folder is fine without --overwrite
    assert main(["convert", "megatron-to-hf", str(out), str(back), "--dtype", "bfloat16", "--no-progress"]) == 0
    original, converted = _tensors(source), _tensors(back)
    assert sorted(converted) == sorted(original)
    assert all(converted[n].dtype == torch.bfloat16 and torch.equal(converted[n], t.bfloat16())
               for n, t in original.items())


# --- fit ----------------------------------------------------------------------------------------
def test_fit_print_config_shows_the_example_yaml(capsys):
    assert main(["fit", "--config", str(FIT_YAML), "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["strategy"]["tensor_model_parallel_size"] == 2
    assert printed["trainer"]["devices"] == 2
    assert [c["class_path"] for c in printed["trainer"]["callbacks"]] == [
        "lightning_bridge.HFCheckpoint", "lightning.pytorch.callbacks.ModelCheckpoint"]
    assert printed["data"] == {**printed["data"], "class_path": "lightning_bridge.TextDataModule"}
    assert printed["data"]["init_args"]["block_size"] == 64


def test_fit_reads_a_dataset_by_default_with_sft_data_module(tmp_path, capsys):
    """`--data.dataset` needs no class: SFTDataModule is the default; the SFT example YAML packs chats."""
    assert main(["fit", "--data.dataset", "train.jsonl", "--data.packing", "true", "--print_config"]) == 0
    data = yaml.safe_load(capsys.readouterr().out)["data"]
    assert data["class_path"] == "lightning_bridge.SFTDataModule"
    assert data["init_args"]["dataset"] == "train.jsonl" and data["init_args"]["packing"] is True
    assert main(["fit", "--config", str(FIT_YAML.with_name("sft_tiny_llama.yaml")), "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["init_args"]["max_length"] == 128 and printed["trainer"]["max_steps"] == 20


def test_fit_refuses_another_trainer_strategy():
    with pytest.raises(ValueError, match=r"--trainer.strategy='ddp' is not used by `lightning-bridge fit`, which "
                                         r"always trains with MegatronBridgeStrategy: set --strategy.\* flags"):
        main(["fit", "--trainer.strategy", "ddp", "--trainer.devices", "1", "--trainer.logger", "false"])


@pytest.mark.slow
def test_fit_from_the_example_yaml_on_two_processes_then_convert_its_checkpoint(tmp_path):
    """2 CPU processes at TP=2: HF checkpoint and metrics appear; the Lightning checkpoint the strategy
    wrote converts (at TP=1) to the same tensors HFCheckpoint wrote at the same step."""
    config = yaml.safe_load(FIT_YAML.read_text())
    config["trainer"].update(max_steps=4, val_check_interval=2, enable_progress_bar=False,
                             enable_model_summary=False)
    for callback in config["trainer"]["callbacks"]:
        callback["init_args"]["every_n_train_steps"] = 4
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(config))
    env = {**clean_environment(), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "lightning_bridge.cli", "fit", "--config", "fit.yaml"],
                          check=False, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    out = tmp_path / "outputs" / "fit"
    hf_checkpoint = out / "hf-checkpoints" / "step-4"
    AutoModelForCausalLM.from_pretrained(hf_checkpoint)
    with open(out / "lightning_logs" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len([r for r in rows if r["train_loss"]]) == 4 and any(r["val_loss"] for r in rows)

    (lightning_checkpoint,) = (out / "checkpoints").glob("*step=4.ckpt")
    assert main(["convert", "megatron-to-hf", str(lightning_checkpoint), str(tmp_path / "converted"),
                 "--no-progress"]) == 0
    expected, converted = _tensors(hf_checkpoint), _tensors(tmp_path / "converted")
    assert sorted(converted) == sorted(expected)
    assert all(torch.equal(converted[n], t) for n, t in expected.items())
    assert (tmp_path / "converted" / "tokenizer.json").is_file()


# --- inspect ------------------------------------------------------------------------------------
def test_inspect_json_reports_config_shapes_and_parameter_counts(tmp_path, capsys):
    source = make_checkpoint("llama", tmp_path / "hf")
    assert main(["inspect", str(source), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["bridge"] == "LlamaBridge" and report["architectures"] == ["LlamaForCausalLM"]
    config = report["transformer_config"]
    assert (config["num_layers"], config["hidden_size"], config["num_query_groups"], config["ffn_hidden_size"]) == \
        (2, 64, 2, 128)
    assert config["normalization"] == "RMSNorm" and config["gated_linear_unit"] is True
    rows = {row["megatron"]: row for row in report["mappings"]}
    qkv = rows["decoder.layers.*.self_attention.linear_qkv.weight"]
    assert qkv["count"] == 2 and qkv["hf_shapes"] == [[64, 64], [32, 64], [32, 64]]
    assert qkv["megatron_shape"] == [128, 64] and qkv["parameters"] == 2 * 128 * 64
    assert rows["embedding.word_embeddings.weight"]["megatron_shape"] == [128, 64]  # padded vocab
    model = AutoModelForCausalLM.from_pretrained(source)
    assert report["parameters"] == sum(p.numel() for p in model.parameters())
    assert sum(row["parameters"] for row in report["mappings"]) == report["parameters"]

    assert main(["inspect", "--json"]) == 0
    assert "LlamaForCausalLM" in json.loads(capsys.readouterr().out)["supported_architectures"]
    assert main(["inspect", str(source)]) == 0
    out = capsys.readouterr().out
    assert "num_query_groups = 2" in out and "x2  megatron [128, 64]  hf [64, 64], [32, 64], [32, 64]" in out


def _one_line_error(capsys, path: Path, fix: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("lightning-bridge convert: error: Could not ") and str(path) in err and fix in err, err
    return err


def test_convert_onto_a_full_disk_ends_in_one_line(tmp_path, capsys, monkeypatch):
    """Simulated ENOSPC: torch's writer loses the errno ("unexpected pos"), the diagnosis finds it."""
    import errno
    import os

    from megatron.core import dist_checkpointing

    from lightning_bridge.publish import CheckpointIOError

    source = make_checkpoint("llama", tmp_path / "hf")
    meg = tmp_path / "meg"
    assert main(["convert", "hf-to-megatron", str(source), str(meg), "--no-progress"]) == 0
    capsys.readouterr()

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        def torch_write_failure(*args, **kwargs):
            raise RuntimeError("Worker failure: [enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

        patch.setattr(dist_checkpointing, "save", torch_write_failure)
        patch.setattr(os, "fsync", disk_full)  # what the disk says now: full
        assert main(["convert", "hf-to-megatron", str(source), str(tmp_path / "out"), "--no-progress"]) == 1
    _one_line_error(capsys, tmp_path / "out", "no space left on device")
    monkeypatch.setattr("lightning_bridge.safetensors_stream.StreamedSafetensorsFile._write_at", disk_full)
    assert main(["convert", "megatron-to-hf", str(meg), str(tmp_path / "hf-out"), "--no-progress"]) == 1
    _one_line_error(capsys, tmp_path / "hf-out", "free disk space")
    with pytest.raises(CheckpointIOError, match="no space left on device") as raised:
        main(["convert", "megatron-to-hf", str(meg), str(tmp_path / "hf-out"), "--no-progress", "--debug"])
    assert raised.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "meg"]  # nothing half-written


def test_convert_onto_a_real_tiny_full_disk(tmp_path, capsys):
    """A 200 KiB tmpfs as the output disk, when this machine lets us mount one."""
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(small)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        source = make_checkpoint("llama", tmp_path / "hf")
        assert main(["convert", "hf-to-megatron", str(source), str(tmp_path / "meg"), "--no-progress"]) == 0
        capsys.readouterr()
        assert main(["convert", "hf-to-megatron", str(source), str(small / "out"), "--no-progress"]) == 1
        _one_line_error(capsys, small / "out", "free disk space")
        assert main(["convert", "megatron-to-hf", str(tmp_path / "meg"), str(small / "hf"), "--no-progress"]) == 1
        _one_line_error(capsys, small / "hf", "free disk space")
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=False)


def _refused(capsys, *phrases: str) -> str:
    """The CLI's one-line error (no traceback) holding every phrase."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and err.startswith("lightning-bridge convert: error: "), err
    assert all(phrase in err for phrase in phrases), (phrases, err)
    return err


@pytest.mark.parametrize("code,what,fix", [(13, "permission denied", "writable for this user"),
                                           (30, "read-only file system", "writable for this user")],
                         ids=["permission-denied", "read-only"])
def test_convert_onto_a_target_it_cannot_write_ends_in_one_line(tmp_path, capsys, monkeypatch, code, what, fix):
    """EACCES / EROFS from Megatron's writer (hf-to-megatron) and from the safetensors writer (megatron-to-hf),
    and from creating the output folder itself; nothing half-written is left."""
    import errno
    import os

    from megatron.core import dist_checkpointing

    source = make_checkpoint("llama", tmp_path / "hf")
    meg = tmp_path / "meg"
    assert main(["convert", "hf-to-megatron", str(source), str(meg), "--no-progress"]) == 0
    capsys.readouterr()

    def refused(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(tmp_path / "x"))

    with monkeypatch.context() as patch:
        patch.setattr(dist_checkpointing, "save", refused)
        assert main(["convert", "hf-to-megatron", str(source), str(tmp_path / "out"), "--no-progress"]) == 1
    _refused(capsys, f"Could not write the Megatron checkpoint {tmp_path / 'out'}: {what}", fix)
    with monkeypatch.context() as patch:
        patch.setattr("lightning_bridge.safetensors_stream.StreamedSafetensorsFile._write_at", refused)
        assert main(["convert", "megatron-to-hf", str(meg), str(tmp_path / "hf-out"), "--no-progress"]) == 1
    _refused(capsys, str(tmp_path / "hf-out"), what, fix)
    real_mkdir = os.mkdir

    def mkdir_refused(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path / ".")):  # the staging folder beside the output
            raise OSError(code, os.strerror(code), str(path))
        return real_mkdir(path, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(os, "mkdir", mkdir_refused)
        assert main(["convert", "hf-to-megatron", str(source), str(tmp_path / "out"), "--no-progress"]) == 1
        _refused(capsys, str(tmp_path / "out"), what, fix)
        assert main(["convert", "megatron-to-hf", str(meg), str(tmp_path / "hf-out"), "--no-progress"]) == 1
        _refused(capsys, str(tmp_path / "hf-out"), what, fix)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "meg"]  # nothing half-written
    assert errno.errorcode[code] in ("EACCES", "EROFS")


@pytest.mark.parametrize("damage,why", [("truncate_shard", "EOFError"), ("truncate_metadata", "UnpicklingError"),
                                        ("garble_megatron_metadata", "JSONDecodeError"),
                                        ("unreadable", "permission denied")])
def test_converting_a_damaged_or_unreadable_megatron_checkpoint_ends_in_one_line(tmp_path, capsys, monkeypatch,
                                                                              damage, why):
    import shutil

    from megatron.core import dist_checkpointing

    source = make_checkpoint("llama", tmp_path / "hf")
    meg = tmp_path / "meg"
    assert main(["convert", "hf-to-megatron", str(source), str(meg), "--no-progress"]) == 0
    capsys.readouterr()
    if damage == "truncate_shard":
        shard = sorted(meg.glob("*.distcp"))[0]
        shard.write_bytes(shard.read_bytes()[:1000])
    elif damage == "truncate_metadata":
        (meg / ".metadata").write_bytes((meg / ".metadata").read_bytes()[:500])
    elif damage == "garble_megatron_metadata":
        (meg / "metadata.json").write_text("{garbage")
    else:  # root reads any file: the error a non-root user gets, from Megatron's reader
        def unreadable(*args, **kwargs):
            raise PermissionError(13, "Permission denied", str(meg / "__0_0.distcp"))

        monkeypatch.setattr(dist_checkpointing, "load", unreadable)
    assert main(["convert", "megatron-to-hf", str(meg), str(tmp_path / "hf-out"), "--no-progress"]) == 1
    if damage == "unreadable":
        _refused(capsys, f"Could not read the checkpoint {meg}: permission denied", "readable for this user")
    else:
        _refused(capsys, f"The checkpoint {meg} is corrupt or truncated ({why}", "Copy it again")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "meg"]
    shutil.rmtree(meg)


def test_the_command_exits_non_zero_with_one_line_for_a_truncated_checkpoint(tmp_path, capsys):
    """The real entry point, in its own process: exit status 1, one line on stderr, no traceback."""
    source = make_checkpoint("llama", tmp_path / "hf")
    meg = tmp_path / "meg"
    assert main(["convert", "hf-to-megatron", str(source), str(meg), "--no-progress"]) == 0
    shard = sorted(meg.glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])
    done = subprocess.run([sys.executable, "-m", "lightning_bridge.cli", "convert", "megatron-to-hf", str(meg),
                           str(tmp_path / "out"), "--no-progress"], capture_output=True, text=True,
                          env={**clean_environment(), "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines() == [f"lightning-bridge convert: error: The checkpoint {meg} is corrupt or truncated (EOFError). "
                     "Copy it again if it came from elsewhere, or write it again (convert hf-to-megatron, or the "
                     "training run's checkpoint)."], done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()
