"""Tests for lightning_bridge.lora.apply: which layers get adapters, what is frozen, what is refused."""

from __future__ import annotations

import peft
import pytest
import torch
from factories import FAMILIES, make_checkpoint, make_hf_config
from megatron.core import parallel_state as ps

from lightning_bridge import AutoBridge, families
from lightning_bridge.lora import LoraLinear, LoraSettings, adapter_layers
from lightning_bridge.lora.apply import check_targets


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_checkpoint("llama", tmp_path_factory.mktemp("apply") / "llama")


def build(checkpoint):
    bridge = AutoBridge.from_hf_pretrained(checkpoint, torch_dtype=torch.float32)
    return bridge, bridge.to_megatron_model(show_progress=False)


def test_part_of_a_fused_layer_trains_only_those_projections(llama):
    bridge, model = build(llama)
    adapted = bridge.apply_lora(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                       init_lora_weights=False))
    assert adapted == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    trainable = sorted(name for name, param in model[0].named_parameters() if param.requires_grad)
    assert trainable == sorted(f"decoder.layers.{i}.self_attention.linear_qkv.adapters.{p}.{kind}"
                               for i in range(2) for p in ("q_proj", "v_proj") for kind in ("lora_A", "lora_B"))
    (name, layer), *_ = adapter_layers(model)
    assert name == "decoder.layers.0.self_attention.linear_qkv" and isinstance(layer, LoraLinear)
    # k rows of the fused output are the base layer's, bit for bit; q and v rows are changed
    x = torch.randn(5, 2, 64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    out, _ = layer(x)
    base, _ = layer.base_layer(x)
    head_dim, per_group = 16, 2  # 4 heads of 16 in 2 groups: per group [q q k v]
    rows = torch.arange(out.shape[-1]).reshape(2, per_group + 2, head_dim)
    k_rows, q_rows = rows[:, per_group].reshape(-1), rows[:, :per_group].reshape(-1)
    assert torch.equal(out[..., k_rows], base[..., k_rows])
    assert not torch.allclose(out[..., q_rows], base[..., q_rows])
    out.sum().backward()
    assert layer.base_layer.weight.grad is None and not layer.base_layer.weight.requires_grad
    assert all(param.grad is not None for adapter in layer.adapters.values()
               for _, param in adapter.named_adapter_tensors())
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        bridge.apply_lora(model, peft.LoraConfig(target_modules=["k_proj"]))
    ps.destroy_model_parallel()


def test_base_weights_still_export_through_the_wrapper(llama):
    bridge, model = build(llama)
    bridge.apply_lora(model, peft.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    source = bridge.checkpoint_reader()
    exported = dict(bridge.export_hf_weights(model))
    assert sorted(exported) == sorted(source.names())  # no adapter tensor among the weights
    assert all(torch.equal(tensor, source.get(name)) for name, tensor in exported.items())
    assert bridge.load_hf_weights(model)  # and load through it
    ps.destroy_model_parallel()


def targets(family: str, target_modules) -> None:
    config = make_hf_config(family)
    family_bridge = families.family_for(FAMILIES[family][1].__name__)(config)
    settings = LoraSettings.from_lora_config(peft.LoraConfig(target_modules=target_modules))
    check_targets(settings, family_bridge.mapping_registry(), family_bridge.wildcard_ranges())


@pytest.mark.parametrize("family,target_modules,says", [
    ("llama", ["lm_head"], "selects lm_head: LoRA on embeddings and the output layer is not supported yet"),
    ("llama", ["embed_tokens"], "selects model.embed_tokens"),
    ("llama", ["q_proj", "query"], r"'query' matches no linear layer of this model. Its linear modules are "
                                   r"\['down_proj', 'gate_proj', 'k_proj', 'o_proj', 'q_proj', 'up_proj', 'v_proj'\]"),
    ("qwen3-moe", ["q_proj", "gate_proj"], r"\['gate_proj'\] select mixture-of-experts layers, which LoRA does "
                                           "not support yet: attention and dense MLP layers only"),
    ("qwen3-moe", "all-linear", "would adapt its expert layers"),
    ("gpt2", ["q_proj"], r"Its linear modules are \['c_attn', 'c_fc', 'c_proj'\]"),
])
def test_refused_targets_are_named(family, target_modules, says):
    with pytest.raises(ValueError, match=says):
        targets(family, target_modules)


def test_accepted_targets():
    targets("phi3", ["qkv_proj", "gate_up_proj"])
    targets("qwen3-moe", ["q_proj", "k_proj", "v_proj", "o_proj"])
    targets("llama", "all-linear")
    targets("llama", r".*\.1\.self_attn\.(q|v)_proj")


def test_lora_goes_on_before_ddp(llama):
    bridge = AutoBridge.from_hf_pretrained(llama, torch_dtype=torch.float32)
    model = bridge.to_megatron_model(wrap_with_ddp=True, show_progress=False)
    with pytest.raises(ValueError, match=r"before wrapping the model in Megatron's DistributedDataParallel"):
        bridge.apply_lora(model, peft.LoraConfig(target_modules=["q_proj"]))
    ps.destroy_model_parallel()


def test_a_training_step_moves_only_the_adapters(llama):
    """Megatron's DDP and distributed optimizer built after apply_lora hold only adapter parameters;
    one step changes them and leaves every base weight bit for bit."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig

    from lightning_bridge.optim import megatron_optimizer

    bridge = AutoBridge.from_hf_pretrained(llama, torch_dtype=torch.float32)
    model = bridge.to_megatron_model(show_progress=False)
    bridge.apply_lora(model, peft.LoraConfig(r=2, target_modules="all-linear", use_dora=True))
    provider = model[0].config
    ddp = [DistributedDataParallel(config=provider, module=model[0], ddp_config=DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=True))]
    optimizer = megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, use_distributed_optimizer=True,
                                                   bf16=False, params_dtype=torch.float32), ddp)
    before = {name: param.detach().clone() for name, param in model[0].named_parameters()}
    trainable = {name for name, param in model[0].named_parameters() if param.requires_grad}
    assert trainable and all(".adapters." in name for name in trainable)
    buffered = {param for buffer in ddp[0].buffers for param in buffer.params}
    assert buffered == {param for name, param in model[0].named_parameters() if name in trainable}
    ddp[0].zero_grad_buffer()
    optimizer.zero_grad()
    input_ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    logits = ddp[0](input_ids, torch.arange(16).expand(2, 16), None)
    logits.float().pow(2).mean().backward()
    finalize_model_grads(ddp)
    assert optimizer.step()[0]
    after = {name: param.detach() for name, param in model[0].named_parameters()}
    assert all(torch.equal(after[name], before[name]) for name in before if name not in trainable)
    # B starts at zero (so A gets no gradient yet): B and the magnitudes learn
    assert all(not torch.equal(after[name], before[name]) for name in trainable
               if name.endswith(("lora_B", "lora_magnitude_vector")))
    ps.destroy_model_parallel()
