"""Each example runs in a small setting, as a user runs it (a subprocess; torchrun for the torchrun ones)."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from processes import clean_environment

from lightning_bridge.builtin import tiny_llama

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


def run(script: str, *args: str, cwd: Path, nproc: int = 0, timeout: int = 600) -> str:
    """Run an example (under torchrun with ``nproc`` processes when given); its stdout, checked rc 0."""
    command = [sys.executable]
    if nproc:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        command += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
                    f"--master_port={port}"]
    result = subprocess.run([*command, str(EXAMPLES / script), *args], check=False, capture_output=True,
                            text=True, timeout=timeout, cwd=cwd, env={**clean_environment(), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def test_quickstart_main_job(model, tmp_path):
    """The README's main job: fine-tune at TP=2, checkpoint, publish to the emulator, reload, generate, summarise."""
    out = tmp_path / "out"
    stdout = run("quickstart.py", "--model", str(model), "--max-steps", "4", "--save-every", "2",
                 "--output", str(out), cwd=tmp_path)
    assert "layout       TP=2 PP=1 DP=1 on 2 cpu process(es)" in stdout
    assert re.search(r"training     4 steps, \d+ tokens, fit [\d.]+ s \(with set-up\); train_loss [\d.]+ -> [\d.]+",
                     stdout)
    assert f"checkpoint   {out / 'hf-checkpoints' / 'step-4'}" in stdout
    assert "/demo/tiny-llama-finetuned/commit/" in stdout
    assert "generated    'The red cat lives near" in stdout

    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and [step for step, _ in summary["losses"]] == [1, 2, 3, 4]
    assert summary["layout"] == {"tp": 2, "pp": 1, "dp": 1, "processes": 2, "accelerator": "cpu"}
    assert [c["step"] for c in summary["checkpoints"]] == [2, 4]
    assert set(summary["timings"]) == {"fit_s", "push_s", "reload_and_generate_s"}
    assert summary["published"]["error"] is None
    # the files it wrote: HF checkpoints, the latest pointer, the model card, the emulator's repo
    step4 = out / "hf-checkpoints" / "step-4"
    assert (out / "hf-checkpoints" / "latest").read_text().strip() == "step-4"
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "README.md"):
        assert (step4 / name).is_file(), name
    downloaded = Path(summary["downloaded"])
    assert (downloaded / "model.safetensors").read_bytes() == (step4 / "model.safetensors").read_bytes()
    assert (out / "hub").is_dir()


def test_sft_quickstart_on_the_builtin_chat_set(model, tmp_path):
    """SFT end to end: built-in chats packed, loss on the answers, TP=2, HFCheckpoint, PushToHub, reload, answer."""
    out = tmp_path / "out"
    stdout = run("sft_quickstart.py", "--model", str(model), "--max-steps", "3", "--packing", "--output", str(out),
                 cwd=tmp_path)
    assert re.search(r"data         built-in chat set: \d+ training sequences \(packed\); the first has \d+ tokens, "
                     r"\d+ of them assistant tokens", stdout)
    assert re.search(r"training     3 steps; train_loss [\d.]+ -> [\d.]+", stdout)
    assert "/demo/tiny-llama-sft/commit/" in stdout and "answer       'What is 4 plus 4?' -> " in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert 0 < summary["first_sequence"]["counted"] < summary["first_sequence"]["tokens"] <= 128
    assert (out / "hf-checkpoints" / "step-3" / "model.safetensors").is_file()


def test_sft_quickstart_with_lora_publishes_a_peft_adapter(model, tmp_path):
    """--lora-r: LoRA on every linear layer at TP=2; the published repo is a PEFT adapter that answers."""
    pytest.importorskip("peft")
    out = tmp_path / "out"
    stdout = run("sft_quickstart.py", "--model", str(model), "--max-steps", "3", "--lora-r", "8", "--lr", "1e-2",
                 "--output", str(out), cwd=tmp_path)
    assert re.search(r"training     3 steps; train_loss [\d.]+ -> [\d.]+", stdout)
    assert "answer       'What is 4 plus 4?' -> " in stdout
    step = out / "hf-checkpoints" / "step-3"
    files = {p.name for p in step.iterdir()}  # with the card PushToHub wrote beside what it published
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= files
    assert not any(name.startswith("model") for name in files)
    card = (step / "README.md").read_text()
    assert "library_name: peft" in card and "PeftModel.from_pretrained" in card


def test_finetune_with_lightnings_own_launcher(model, tmp_path):
    """devices=2 in a plain process: Lightning starts the second process itself (TP=2); HFCheckpoint + PushToHub."""
    out = tmp_path / "out"
    stdout = run("finetune.py", "--model", str(model), "--accelerator", "cpu", "--devices", "2", "--tp", "2",
                 "--max-steps", "6", "--save-every", "3", "--output", str(out), cwd=tmp_path)
    assert "fit: 6 steps" in stdout and "'val_loss'" in stdout
    assert f"HF checkpoint: {out / 'hf-checkpoints' / 'step-3'}" in stdout
    assert f"HF checkpoint: {out / 'hf-checkpoints' / 'step-6'}" in stdout
    assert re.search(r"pushed: .*step-6 -> main: http://127\.0\.0\.1:\d+/demo/finetuned/commit/", stdout)
    assert (out / "hf-checkpoints" / "step-6" / "README.md").is_file()  # the model card, as pushed


def test_2_way_hf_binding(model, tmp_path):
    stdout = run("models/2_way_hf_binding.py", "--model", str(model), "--output", str(tmp_path / "out"), cwd=tmp_path)
    assert "bitwise identical" in stdout


def test_load_and_build(model, tmp_path):
    stdout = run("conversion/load_and_build.py", "--model", str(model), cwd=tmp_path)
    assert "LlamaForCausalLM -> LlamaBridge, 4 layers, hidden 128, 4 heads (2 KV groups), vocab 512" in stdout
    assert re.search(r"logits \(2, 16, 512\): .* = \S+ \(OK\)", stdout)


def test_provider_configuration(model, tmp_path):
    stdout = run("conversion/provider_configuration.py", "--model", str(model), cwd=tmp_path)
    assert re.search(r"params_dtype +torch.bfloat16 +\(was torch.float32\)", stdout)
    assert re.search(r"seq_length +128 +\(was 256\)", stdout)
    assert "rank 0 chunk 0: Float16Module, 869504 parameters, ['bfloat16']" in stdout


def test_list_supported_models(model, tmp_path):
    stdout = run("conversion/list_supported_models.py", "--model", str(model), cwd=tmp_path)
    for architecture in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "GPT2LMHeadModel"):
        assert f"  {architecture}\n" in stdout
    assert "LlamaForCausalLM -> LlamaBridge, 9 weight mappings" in stdout
    assert "qkv: decoder.layers.*.self_attention.linear_qkv.weight <- model.layers.*.self_attn.q_proj.weight" in stdout


def test_streaming_export_under_torchrun(model, tmp_path):
    """torchrun, 2 CPU processes, TP=2: what each rank receives in each mode, bitwise equal to the source."""
    stdout = run("conversion/streaming_export.py", "--model", str(model), "--tp", "2", cwd=tmp_path, nproc=2)
    for mode in ("consolidate", "replicate", "distribute"):
        assert f"  {mode}: OK" in stdout
    assert "mode=consolidate\n  rank 0:  39 of 39 tensors" in stdout
    assert "  rank 1:   0 of 39 tensors, 0.00 MiB\n" in stdout
    assert "dtype=torch.bfloat16: every tensor is torch.bfloat16" in stdout


def test_multi_gpu_torchrun_on_cpu(model, tmp_path):
    """The torchrun training example on 2 CPU processes at PP=2."""
    out = tmp_path / "out"
    stdout = run("training/multi_gpu_torchrun.py", "--model", str(model), "--accelerator", "cpu", "--devices", "2",
                 "--pp", "2", "--max-steps", "3", "--output", str(out), cwd=tmp_path, nproc=2)
    assert re.search(r"world 2 = TP 1 x PP 2 x DP 1; 3 steps in [\d.]+ s; train_loss [\d.]+", stdout)
    assert (out / "final" / "config.json").is_file() and (out / "final" / "model.safetensors").is_file()


def test_docs_name_only_files_that_exist():
    """Every examples/ or docs/ path the README and the docs mention exists (docs stay true to the tree)."""
    texts = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for text in texts:
        for path in re.findall(r"(?<![\w/.-])((?:examples|docs|lightning_bridge|benchmarks)/[\w./-]+\.(?:py|md))",
                               text.read_text()):
            assert (ROOT / path).is_file(), f"{text.name} mentions {path}, which does not exist"
