"""LoRA and DoRA under MegatronBridgeStrategy(peft=LoraConfig(...)): a fit trains only the adapters,
HFCheckpoint writes PEFT adapter folders that PeftModel loads, and a resumed fit is exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from factories import make_checkpoint
from processes import launch
from safetensors.torch import load_file

from lightning_bridge import MegatronBridgeStrategy
from lightning_bridge.hf_io import HFCheckpointReader

peft = pytest.importorskip("peft")

# (TP, PP, DoRA) on 2 gloo ranks
RUNS = [(2, 1, False), (1, 2, True)]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return str(make_checkpoint("llama", tmp_path_factory.mktemp("lora") / "llama"))


@pytest.fixture(scope="module")
def fits(source, tmp_path_factory):
    from strategies.lora_fit_checks import lora_fit_and_resume

    work = tmp_path_factory.mktemp("lora-fits")
    return {run: launch(lora_fit_and_resume, 2, source, str(work), *run)[0] for run in RUNS}


@pytest.mark.parametrize("run", RUNS)
def test_only_adapters_train_and_the_loss_falls(fits, source, run):
    result = fits[run]
    assert result["trainable"] and all(".adapters." in name for name in result["trainable"])
    first, second = result["full"][:8], result["full"][8:]  # the same 8 batches, epoch after epoch
    drop = sum(first) / 8 - sum(second) / 8
    assert drop > 0.03, result["full"]  # the mean over the same batches; measured 0.08 for LoRA at TP=1
    original = HFCheckpointReader(source)
    assert sorted(result["base"]) == sorted(original.names())
    for name, tensor in result["base"].items():  # the base weights come out bitwise as they went in
        assert torch.equal(tensor, original.get(name)), name


@pytest.mark.parametrize("run", RUNS)
def test_resume_reproduces_the_uninterrupted_run(fits, run):
    full, again = fits[run]["full"], fits[run]["resumed"]
    assert again == full[len(full) // 2:]


@pytest.mark.parametrize("run", RUNS)
def test_hf_checkpoints_are_peft_adapter_folders(fits, source, run):
    result = fits[run]
    hf_dir = Path(result["hf_dir"])
    assert sorted(p.name for p in hf_dir.iterdir()) == ["latest", "step-12", "step-16"]  # keep_last_k=2
    final = hf_dir / "step-16"
    assert sorted(p.name for p in final.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == source and config["use_dora"] == run[2]
    assert sorted(config["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    saved = load_file(final / "adapter_model.safetensors")
    assert saved.keys() == result["adapters"].keys()
    assert all(torch.equal(saved[n], t) for n, t in result["adapters"].items())
    base = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, str(final)).eval()
    with torch.no_grad():
        expected = model(torch.tensor([[5, 17, 3, 44, 90, 12, 7, 61]])).logits
    torch.testing.assert_close(result["logits"], expected, rtol=1e-4, atol=1e-4)


def test_an_unsupported_lora_field_is_refused_at_construction(source):
    with pytest.raises(ValueError, match="modules_to_save"):
        MegatronBridgeStrategy(source, peft=peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                              modules_to_save=["lm_head"]))


def test_a_peft_adapter_folder_starts_the_model(source, tmp_path):
    """peft_adapter=: an adapter saved by PEFT itself is loaded exactly (same logits as PeftModel)."""
    import lightning.pytorch as pl

    from lightning_bridge.verify import megatron_logits

    base = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "o_proj", "up_proj"],
                             init_lora_weights="gaussian")
    reference = peft.get_peft_model(base, config).eval()
    for name, param in reference.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)  # B != 0: the adapter moves the logits
    reference.save_pretrained(tmp_path / "adapter")
    strategy = MegatronBridgeStrategy(source, peft_adapter=str(tmp_path / "adapter"))
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=strategy, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    data = torch.utils.data.DataLoader([{"input_ids": torch.arange(8)}] * 2, batch_size=2)
    from lightning_bridge import CausalLMModule

    trainer.validate(CausalLMModule(), data)
    probe = torch.tensor([[5, 17, 3, 44, 90, 12, 7, 61]])
    with torch.no_grad():
        expected = reference(probe).logits
    torch.testing.assert_close(megatron_logits(strategy.model_chunks, probe).float(), expected, rtol=1e-4, atol=1e-4)
    assert all(".adapters." in n for c in strategy.model_chunks for n, p in c.named_parameters() if p.requires_grad)
