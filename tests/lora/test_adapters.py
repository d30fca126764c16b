"""Tests for lightning_bridge.lora.adapters (and the bridge's adapter methods): PEFT adapters in and
out of Megatron models, bitwise; logits and gradients against PEFT; merged weights against
``merge_and_unload()``; at TP=1 in this process and at TP=2 (with and without sequence
parallelism), PP=2 and TP2 x PP2 on 4 gloo ranks (one launch, a few minutes on 2 cores)."""

from __future__ import annotations

import peft
import pytest
import torch
import transformers
from factories import make_checkpoint
from lora.lora_checks import CASES, FRESH, family_of, fresh_adapter, make_peft_adapter, peft_reference, run_layouts
from processes import launch
from safetensors.torch import load_file

from lightning_bridge.lora import fuse_adapters, merge_adapter, parse_peft_name, peft_name, split_fused_adapter
from lightning_bridge.verify import relative_difference

WORLD = 4
LAYOUTS = [(2, 1, False), (2, 1, True, ("llama", "gemma2", "gpt2", "phi3")), (1, 2, False), (2, 2, False)]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Per case: checkpoint, PEFT adapter folder, PEFT logits and gradients, merged weights."""
    root = tmp_path_factory.mktemp("lora")
    input_ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    loss_weights = torch.randn(2, 16, 96, generator=torch.Generator().manual_seed(1))
    cases = {}
    for case in CASES:
        checkpoint = make_checkpoint(family_of(case), root / case)
        model = make_peft_adapter(checkpoint, case, root / f"{case}-adapter")
        logits, grads = peft_reference(model, input_ids, loss_weights)
        merged = model.merge_and_unload().state_dict()
        cases[case] = dict(checkpoint=str(checkpoint), adapter=str(root / f"{case}-adapter"), logits=logits,
                           grads=grads, merged=merged)
    return root, input_ids, loss_weights, cases


@pytest.fixture(scope="module")
def single(references):
    root, input_ids, loss_weights, cases = references
    folders = {case: (ref["checkpoint"], ref["adapter"]) for case, ref in cases.items()}
    results = run_layouts(folders, [(1, 1, False)], input_ids, loss_weights, str(root / "tp1"))
    results["fresh"] = fresh_adapter(cases["llama"]["checkpoint"], 1, 1)
    return results


@pytest.fixture(scope="module")
def launched(references):
    root, input_ids, loss_weights, cases = references
    folders = {case: (ref["checkpoint"], ref["adapter"]) for case, ref in cases.items()}
    return launch(_in_rank, WORLD, folders, LAYOUTS, input_ids, loss_weights, str(root / "launched"))


def _in_rank(folders, layouts, input_ids, loss_weights, out_dir):
    results = run_layouts(folders, layouts, input_ids, loss_weights, out_dir)
    results["fresh"] = fresh_adapter(folders["llama"][0], 2, 2)
    return results


def check(result: dict, reference: dict, input_ids: torch.Tensor, *, receives: bool = True) -> None:
    """Logits, gradients, bitwise export, merged weights, and the saved folder in PEFT."""
    assert relative_difference(result["logits"], reference["logits"]) <= 1e-5
    if "grads" in result:
        assert set(result["grads"]) == set(reference["grads"])
        for name, grad in reference["grads"].items():
            assert relative_difference(result["grads"][name], grad) <= 1e-4, name
        assert result["base_grads"] == []  # frozen: no gradient reaches a base weight
    if not receives:
        assert result["exported"] == {} and result["merged"] == {}
        return
    source = load_file(f"{reference['adapter']}/adapter_model.safetensors")
    assert sorted(result["exported"]) == sorted(source)
    assert all(torch.equal(result["exported"][name], tensor) for name, tensor in source.items())
    # transformers may hold MoE experts fused where the checkpoint has them per expert: compare the
    # names both have, which include every adapted weight
    merged = {name: t for name, t in result["merged"].items() if name in reference["merged"]}
    adapted = {parse_peft_name(name)[0] + ".weight" for name in source}
    assert adapted <= set(merged)
    assert all(torch.equal(tensor, reference["merged"][name]) for name, tensor in merged.items())
    base = transformers.AutoModelForCausalLM.from_pretrained(reference["checkpoint"], attn_implementation="eager")
    again = peft.PeftModel.from_pretrained(base, result["saved"]).eval()
    with torch.no_grad():
        assert relative_difference(again(input_ids).logits, reference["logits"]) <= 1e-6


@pytest.mark.parametrize("case", list(CASES))
def test_tp1_matches_peft(single, references, case):
    _, input_ids, _, cases = references
    check(single[f"{case}-tp1-pp1"], cases[case], input_ids)


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"tp{l[0]}-pp{l[1]}{'-sp' if l[2] else ''}")
def test_layouts_match_peft(launched, references, layout):
    _, input_ids, _, cases = references
    tp, pp, sp, *only = layout
    for case in (only[0] if only else CASES):
        key = f"{case}-tp{tp}-pp{pp}{'-sp' if sp else ''}"
        for rank in range(WORLD):
            check(launched[rank][key], cases[case], input_ids, receives=rank == 0)


@pytest.mark.slow
def test_fresh_adapter_is_the_same_at_every_layout(single, launched):
    ours, theirs = single["fresh"], launched[0]["fresh"]
    assert sorted(ours) == sorted(theirs) and ours
    for name, tensor in ours.items():
        if name.endswith("lora_magnitude_vector"):  # a norm summed over the TP group: rounding may differ
            torch.testing.assert_close(theirs[name], tensor, rtol=1e-6, atol=0)
        else:
            assert torch.equal(theirs[name], tensor), name
    assert all(not launched[rank]["fresh"] for rank in range(1, WORLD))


def test_fresh_dora_magnitude_is_the_weight_norm(single, references):
    """DoRA starts at m = ||W + scaling B A|| per output row, as PEFT's does."""
    _, _, _, cases = references
    weights = load_file(f"{cases['llama']['checkpoint']}/model.safetensors")
    fresh = single["fresh"]
    scaling = FRESH["lora_alpha"] / FRESH["r"]
    for module in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"):
        a, b = fresh[peft_name(module, "lora_A")], fresh[peft_name(module, "lora_B")]
        expected = torch.linalg.norm(weights[f"{module}.weight"] + scaling * (b @ a), dim=1)
        torch.testing.assert_close(fresh[peft_name(module, "lora_magnitude_vector")], expected)
        assert b.abs().sum() > 0  # init_lora_weights=False: B is not zero


def test_peft_names():
    assert peft_name("model.layers.0.self_attn.q_proj", "lora_A") == \
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert peft_name("transformer.h.1.attn.c_attn", "lora_magnitude_vector") == \
        "base_model.model.transformer.h.1.attn.c_attn.lora_magnitude_vector"
    assert parse_peft_name("base_model.model.model.layers.0.mlp.up_proj.lora_B.default.weight") == \
        ("model.layers.0.mlp.up_proj", "lora_B")
    assert parse_peft_name("model.layers.0.mlp.up_proj.weight") is None


def test_merge_adapter_conv1d_layout():
    """A Conv1D weight [in, out] merges with the transposed delta."""
    generator = torch.Generator().manual_seed(0)
    weight, a, b = (torch.randn(shape, generator=generator) for shape in ((4, 6), (2, 6), (4, 2)))
    merged = merge_adapter(weight.T.contiguous(), a, b, 0.5, fan_in_fan_out=True)
    assert torch.equal(merged.T, merge_adapter(weight, a, b, 0.5, fan_in_fan_out=False))


def test_fused_adapters_split_and_fuse_exactly():
    """A fused [q; k; v] adapter is per-projection adapters (A repeated, B split); separate ones are
    a fused adapter of the summed rank (A stacked, B block-diagonal): the same rows either way."""
    generator = torch.Generator().manual_seed(0)
    a, b, m = torch.randn(4, 8, generator=generator), torch.randn(12, 4, generator=generator), torch.rand(12)
    parts = split_fused_adapter(a, b, [6, 3, 3], magnitude=m)
    assert all(torch.equal(part["lora_A"], a) for part in parts)
    assert torch.equal(torch.cat([part["lora_B"] for part in parts]), b)
    assert torch.equal(torch.cat([part["lora_magnitude_vector"] for part in parts]), m)
    fused = fuse_adapters(parts)
    assert fused["lora_A"].shape == (12, 8) and fused["lora_B"].shape == (12, 12)
    assert torch.equal(fused["lora_magnitude_vector"], m)
    torch.testing.assert_close(fused["lora_B"] @ fused["lora_A"], b @ a)
    assert torch.equal(fused["lora_B"][6:9, 4:8], parts[1]["lora_B"]) and not fused["lora_B"][6:9, :4].any()


def test_an_adapter_must_fit_the_model_s_adapters(references):
    from lightning_bridge import AutoBridge
    from megatron.core import parallel_state as ps

    _, _, _, cases = references
    bridge = AutoBridge.from_hf_pretrained(cases["llama"]["checkpoint"], torch_dtype=torch.float32)
    model = bridge.to_megatron_model(show_progress=False)
    bridge.apply_lora(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match="has modules .* this model does not adapt"):
        bridge.load_hf_adapter(model, cases["llama"]["adapter"])  # all-linear
    with pytest.raises(ValueError, match="use_dora: model False, adapter True"):
        bridge.load_hf_adapter(model, cases["llama-dora"]["adapter"])
    ps.destroy_model_parallel()


def test_bf16_model_trains_and_saves_bf16_adapters(references, tmp_path):
    from lightning_bridge import AutoBridge
    from megatron.core import parallel_state as ps

    _, input_ids, _, cases = references
    bridge = AutoBridge.from_hf_pretrained(cases["phi3"]["checkpoint"], torch_dtype=torch.bfloat16)
    model = bridge.to_megatron_model(show_progress=False)
    bridge.load_hf_adapter(model, cases["phi3"]["adapter"])
    (chunk,) = model
    logits = chunk(input_ids, torch.arange(16).expand(2, 16), None)
    logits.float().sum().backward()
    trainable = [p for p in chunk.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.bfloat16 and p.grad is not None for p in trainable)
    bridge.save_hf_adapter(model, tmp_path / "bf16")
    saved = load_file(tmp_path / "bf16" / "adapter_model.safetensors")
    source = load_file(f"{cases['phi3']['adapter']}/adapter_model.safetensors")
    assert sorted(saved) == sorted(source)
    assert all(t.dtype == torch.bfloat16 and torch.equal(t, source[n].to(torch.bfloat16)) for n, t in saved.items())
    ps.destroy_model_parallel()
