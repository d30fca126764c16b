"""Shared pieces of the LoRA tests: PEFT references in the test process, checks inside each rank."""

from __future__ import annotations

from pathlib import Path

import peft
import torch
import transformers
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from lightning_bridge import AutoBridge
from lightning_bridge.lora import adapter_layers, parse_peft_name, peft_name
from lightning_bridge.verify import megatron_logits

# family -> LoraConfig keywords: fused-layer subsets, row-parallel targets, DoRA, rslora, Conv1D
CASES = {
    "llama": dict(target_modules="all-linear"),
    "llama-dora": dict(target_modules=["q_proj", "v_proj", "o_proj", "up_proj"], use_dora=True),
    "qwen3": dict(target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True),
    "gemma2": dict(target_modules=["q_proj", "k_proj", "o_proj", "down_proj"], use_dora=True),
    "phi3": dict(target_modules="all-linear", use_dora=True),
    "gpt2": dict(target_modules=["c_attn", "c_proj", "c_fc"], use_dora=True),
    "qwen3-moe": dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
}


def family_of(case: str) -> str:
    return case.removesuffix("-dora")


def make_peft_adapter(checkpoint: Path, case: str, folder: Path, seed: int = 0) -> peft.PeftModel:
    """A PEFT model on the checkpoint with a random adapter (B and, for DoRA, magnitudes non-trivial),
    saved to ``folder``."""
    torch.manual_seed(seed)
    base = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32,
                                                             attn_implementation="eager")
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **CASES[case])
    model = peft.get_peft_model(base, config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.1 * torch.randn_like(param))
            elif "lora_B" in name:
                param.mul_(0.3)
    model.save_pretrained(folder)
    return model


def peft_reference(model: peft.PeftModel, input_ids: torch.Tensor, loss_weights: torch.Tensor):
    """Logits and adapter gradients (by PEFT tensor name) of ``sum(logits * loss_weights)``."""
    model.zero_grad()
    logits = model(input_ids).logits.float()
    (logits * loss_weights).sum().backward()
    grads = {}
    for name, param in model.named_parameters():
        if param.grad is not None:
            grads[peft_name(*parse_peft_name(name))] = param.grad.clone()
    return logits.detach(), grads


def build(checkpoint: str, tp: int, pp: int, sequence_parallel: bool = False):
    bridge = AutoBridge.from_hf_pretrained(checkpoint, torch_dtype=torch.float32, attn_implementation="eager")
    provider = bridge.to_megatron_provider(show_progress=False)
    provider.tensor_model_parallel_size = tp
    provider.pipeline_model_parallel_size = pp
    provider.sequence_parallel = sequence_parallel
    return bridge, provider(wrap_with_ddp=False)


def megatron_gradients(bridge, model, input_ids: torch.Tensor, loss_weights: torch.Tensor,
                       train: bool = False) -> dict:
    """Full adapter gradients (PEFT names) of ``sum(logits * loss_weights)``, through Megatron's own
    forward-backward schedule (any TP/PP layout), on every rank: each gradient is swapped into its
    parameter and exported like the adapter. ``train=False``: no dropout, as the PEFT reference."""
    chunks = list(model)
    batch, seq = input_ids.shape
    position_ids = torch.arange(seq).expand(batch, seq)
    for chunk in chunks:
        chunk.train(train)
        chunk.zero_grad()

    def loss_func(logits):
        logits = gather_from_tensor_model_parallel_region(logits)[..., : loss_weights.shape[-1]]
        loss = (logits.float() * loss_weights).sum()
        return loss, {"loss": loss.detach()}

    def forward_step(data_iterator, chunk):
        return chunk(next(data_iterator), position_ids, None), loss_func

    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([input_ids]), model=chunks[0] if len(chunks) == 1
        else chunks, num_microbatches=1, seq_length=seq, micro_batch_size=batch, forward_only=False)
    for chunk in chunks:
        for param in chunk.parameters():  # what finalize_model_grads does under sequence parallelism
            if param.grad is not None and getattr(param, "sequence_parallel", False):
                torch.distributed.all_reduce(param.grad, group=ps.get_tensor_model_parallel_group())
    base_grads = [name for chunk in chunks for name, p in chunk.named_parameters()
                  if p.grad is not None and ".adapters." not in name]
    saved = {}
    for _, layer in adapter_layers(model):
        for adapter in layer.adapters.values():
            for kind, param in adapter.named_adapter_tensors():
                saved[id(param)] = param.data
                param.data = param.grad.clone()
    grads = dict(bridge.export_adapter_weights(model, mode="replicate"))
    for _, layer in adapter_layers(model):
        for adapter in layer.adapters.values():
            for kind, param in adapter.named_adapter_tensors():
                param.data = saved[id(param)]
    return {"grads": grads, "base_grads": base_grads}


FRESH = dict(r=4, lora_alpha=16, lora_dropout=0.1, target_modules="all-linear", use_dora=True,
             init_lora_weights=False)


def fresh_adapter(checkpoint: str, tp: int, pp: int) -> dict:
    """A new adapter (``FRESH``, seed 7) exported on rank 0: the same at every layout. A training
    forward-backward (DoRA with dropout) runs first: it changes no parameter."""
    bridge, model = build(checkpoint, tp, pp)
    bridge.apply_lora(model, peft.LoraConfig(**FRESH), seed=7)
    input_ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(3))
    grads = megatron_gradients(bridge, model, input_ids, torch.ones(2, 16, 96), train=True)["grads"]
    assert grads and all(torch.isfinite(grad).all() for grad in grads.values())
    exported = dict(bridge.export_adapter_weights(model))
    ps.destroy_model_parallel()
    return exported


def run_layouts(cases: dict[str, tuple[str, str]], layouts, input_ids, loss_weights, out_dir: str) -> dict:
    """In each rank, for every layout (TP, PP, sequence parallel, cases) and case (checkpoint, PEFT
    adapter folder): logits with the adapter loaded, the adapter exported, the merged weights
    exported, the adapter saved; gradients through the forward-backward schedule."""
    results: dict = {}
    for tp, pp, sp, *only in layouts:
        for case, (checkpoint, adapter) in cases.items():
            if only and case not in only[0]:
                continue
            key = f"{case}-tp{tp}-pp{pp}{'-sp' if sp else ''}"
            bridge, model = build(checkpoint, tp, pp, sp)
            bridge.load_hf_adapter(model, adapter)
            result = {"logits": megatron_logits(model, input_ids)}
            result["exported"] = dict(bridge.export_adapter_weights(model))
            result["merged"] = dict(bridge.export_hf_weights(model, merge_adapters=True))
            saved = Path(out_dir) / key
            bridge.save_hf_adapter(model, saved)
            result["saved"] = str(saved)
            result.update(megatron_gradients(bridge, model, input_ids, loss_weights))
            results[key] = result
            ps.destroy_model_parallel()
    return results
