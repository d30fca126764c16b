"""Training is correct at every layout: one step's gradient equals transformers' in one process.

Each layout runs one optimizer step that moves each weight by lr x gradient and nothing else on the same global batch of four
sequences whose counted tokens differ (15, 11, 7 and 4), one sequence per microbatch, so
microbatches and data-parallel ranks weigh unequally. The weight change, exported to HF names,
is compared tensor by tensor with the gradient transformers computes for the token-weighted mean
loss of the whole batch (:mod:`strategies.gradient_checks`).

Tolerances, per tensor:
- float32: ``max|ours - reference| / max|reference|`` at most ``FP32_TOL`` = 1e-3 (measured
  2026-12-04: 2e-6 to 2.9e-4, the same at every layout of a model, so the difference is Megatron's
  kernels against transformers', not the parallelism; a wrong gradient shows as 0.1 to 1);
- bf16 / fp16 mixed precision (Megatron's Float16Module, fp32 main weights, lr 1e4 so that the
  step dwarfs the rounding of the weights): the relative norm error ``|ours - reference| /
  |reference|`` at most ``HALF_TOL`` (measured: 1.5e-2 for bf16, 1.9e-3 for fp16; transformers
  itself in bf16 / fp16 is 1.7e-2 / 1.8e-3 from its float32 gradient).

All cases share one 4-rank launch.
"""

from __future__ import annotations

import pytest
import torch
from factories import make_checkpoint
from processes import launch
from megatron.core.distributed import DistributedDataParallelConfig
from safetensors.torch import load_file
from strategies.gradient_checks import gradient_batch, packed_batch, reference_gradients, step_gradients

WORLD = 4
FP32_TOL = 1e-3
HALF_TOL = {torch.bfloat16: 5e-2, torch.float16: 1e-2}

TP2, PP2 = {"tensor_model_parallel_size": 2}, {"pipeline_model_parallel_size": 2}
SP = {**TP2, "sequence_parallel": True}
PLAIN_OPTIMIZER = {"module": {"use_distributed_optimizer": False}}  # Megatron's optimizer, not distributed
ALL_REDUCE_DDP = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=False)
DENSE_LAYOUTS = {
    "dp4": {},
    "tp2-dp2": TP2,
    "pp2-dp2": PP2,
    "tp2-pp2": {**TP2, **PP2},
    "pp2-vpp2-dp2": {**PP2, "virtual_pipeline_model_parallel_size": 2},
    "tp2-sp-dp2": SP,
    "tp2-pp2-sp": {**SP, **PP2},
    "tp2-pp2-left-padding": {**TP2, **PP2, "padding": "left"},
    "pp2-dp2-right-padding": {**PP2, "padding": "right"},
    "tp2-pp2-packed": {**TP2, **PP2, "padding": "packed"},
    "tp2-sp-dp2-packed": {**SP, "padding": "packed"},
    "tp2-pp2-unfused-attention": {**TP2, **PP2, "provider_overrides": {"attention_backend": "local"}},
    "pp2-dp2-micro-batch-2": {**PP2, "micro_batch_size": 2},
    "tp2-dp2-recompute": {**TP2, "recompute": "full"},
    "tp2-dp2-selective-recompute": {**TP2, "recompute": "selective"},
    "dp4-no-overlap": {"overlap_grad_reduce": False},  # the default overlaps the reduction with backward
    "dp2-tp2-all-reduce-ddp": {**TP2, "ddp_config": ALL_REDUCE_DDP, **PLAIN_OPTIMIZER},
    "dp4-mismatched-optimizer": PLAIN_OPTIMIZER,  # under the default DDP: must be refused
    "tp2-dp2-bf16": {**TP2, "precision": "bf16-mixed", "lr": 1e4},
    # Lightning turns precision="16-mixed" into bf16 on a CPU: fp16 is chosen with torch_dtype
    "pp2-dp2-fp16": {**PP2, "torch_dtype": torch.float16, "lr": 1e4, "loss_scale": 1024.0},
}
TIED_LAYOUTS = {name: DENSE_LAYOUTS[name] for name in ("dp4", "tp2-pp2", "pp2-vpp2-dp2", "tp2-pp2-sp")}
NO_AUX_LOSS = {"provider_overrides": {"moe_aux_loss_coeff": 0.0}}  # transformers' loss has no aux term
EP2 = {"expert_model_parallel_size": 2, **NO_AUX_LOSS}
MOE_LAYOUTS = {
    "ep2-dp4": EP2,
    "ep4-dp4": {**EP2, "expert_model_parallel_size": 4},
    "tp2-ep2-sp": {**EP2, **SP},
    "tp2-sp-etp1-ep2": {**EP2, **SP, "expert_tensor_parallel_size": 1},
    "pp2-ep2": {**EP2, **PP2},
}
# model: (factories family, layouts); each other family checks TP with sequence parallelism.
MODELS = {
    "llama": ("llama", DENSE_LAYOUTS),
    "llama-tied": ("llama3.2", TIED_LAYOUTS),
    "mixtral": ("mixtral", MOE_LAYOUTS),
    "qwen3-moe": ("qwen3-moe", {"tp2-ep2-sp": MOE_LAYOUTS["tp2-ep2-sp"]}),
    # shared expert, grouped sigmoid routing; Megatron's own update of the correction bias held still
    "glm4-moe": ("glm4-moe", {"tp2-ep2-sp": {**MOE_LAYOUTS["tp2-ep2-sp"], "provider_overrides": {
        "moe_aux_loss_coeff": 0.0, "moe_router_bias_update_rate": 0.0}}}),
    # multi-latent attention (compressed q and kv, YaRN) with GLM-4.5's MoE; packed rows restart the rope
    "deepseek-v3": ("deepseek-v3", {
        "tp2-ep2-sp": {**MOE_LAYOUTS["tp2-ep2-sp"], "provider_overrides": {
            "moe_aux_loss_coeff": 0.0, "moe_router_bias_update_rate": 0.0}},
        "tp2-sp-ep2-packed": {**MOE_LAYOUTS["tp2-ep2-sp"], "padding": "packed", "provider_overrides": {
            "moe_aux_loss_coeff": 0.0, "moe_router_bias_update_rate": 0.0}}}),
    "deepseek-v3-q": ("deepseek-v3-q", {"tp2-ep2-sp": {**MOE_LAYOUTS["tp2-ep2-sp"], "provider_overrides": {
        "moe_aux_loss_coeff": 0.0, "moe_router_bias_update_rate": 0.0}}}),  # one q projection, plain rope
    "qwen3": ("qwen3", {"tp2-sp-dp2": SP}),
    "olmo2": ("olmo2", {"tp2-dp2": TP2, "tp2-pp2-sp": DENSE_LAYOUTS["tp2-pp2-sp"]}),
    "gemma2": ("gemma2", {"tp2-sp-dp2": SP, "pp2-vpp2-dp2": DENSE_LAYOUTS["pp2-vpp2-dp2"],
                          "tp2-dp2-packed": {**TP2, "padding": "packed"}}),
    # sliding windows with padding and packing (fused attention, the default)
    "mistral": ("mistral", {"tp2-pp2-left-padding": DENSE_LAYOUTS["tp2-pp2-left-padding"],
                            "tp2-sp-dp2-packed": DENSE_LAYOUTS["tp2-sp-dp2-packed"]}),
    "gpt2": ("gpt2", {"tp2-sp-dp2": SP}),  # built without dropout (see checkpoints)
    "phi2": ("phi2", {"tp2-sp-dp2": SP}),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("gradients")
    no_dropout = {"gpt2": dict(attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)}  # GPT-2's default is 0.1
    return {model: str(make_checkpoint(family, root / model, num_hidden_layers=4, **no_dropout.get(family, {})))
            for model, (family, _) in MODELS.items()}


@pytest.fixture(scope="module")
def stepped(checkpoints):
    """Rank 0's result of every (model, layout), all in one launch."""
    cases = [(model, layout) for model, (_, layouts) in MODELS.items() for layout in layouts]
    results = launch(step_gradients, WORLD, [(checkpoints[m], MODELS[m][1][layout]) for m, layout in cases])[0]
    return dict(zip(cases, results))


def _case(checkpoints, stepped, model: str, layout: str):
    result = stepped[(model, layout)]
    assert "error" not in result, result.get("error")
    samples = result["samples"]
    reference = reference_gradients(checkpoints[model], samples)
    before = load_file(f"{checkpoints[model]}/model.safetensors")
    return result, reference, before


def _gradients(result, before, dtype=torch.float32):
    return {name: (before[name].to(dtype).float() - after.float()) / result["lr"]
            for name, after in result["after"].items()}


def _half(spec: dict) -> torch.dtype | None:
    return {"bf16-mixed": torch.bfloat16}.get(spec.get("precision"), spec.get("torch_dtype"))


CASES = [(model, layout) for model, (_, layouts) in MODELS.items() for layout, spec in layouts.items()
         if _half(spec) is None and "mismatched" not in layout]


@pytest.mark.slow
@pytest.mark.parametrize("model,layout", CASES)
def test_float32_step_is_the_reference_gradient(checkpoints, stepped, model, layout):
    result, reference, before = _case(checkpoints, stepped, model, layout)
    gradients = _gradients(result, before)
    assert gradients.keys() == reference.keys()
    # gradients far below the model's largest (a key bias, which softmax ignores) are measured
    # against a floor: their relative error is float32 noise
    floor = 1e-3 * max(float(g.abs().max()) for g in reference.values())
    worst = {}
    for name, gradient in gradients.items():
        scale = max(float(reference[name].abs().max()), floor)
        worst[name] = float((gradient - reference[name]).abs().max()) / scale
    assert max(worst.values()) <= FP32_TOL, sorted(worst.items(), key=lambda kv: -kv[1])[:5]


@pytest.mark.slow
@pytest.mark.parametrize("layout", [name for name, spec in DENSE_LAYOUTS.items() if _half(spec)])
def test_mixed_precision_step_is_close_to_the_reference_gradient(checkpoints, stepped, layout):
    result, reference, before = _case(checkpoints, stepped, "llama", layout)
    dtype = _half(DENSE_LAYOUTS[layout])
    gradients = _gradients(result, before, dtype)
    errors = {name: float((g - reference[name]).norm() / reference[name].norm()) for name, g in gradients.items()}
    assert max(errors.values()) <= HALF_TOL[dtype], sorted(errors.items(), key=lambda kv: -kv[1])[:5]


def test_packed_rows_hold_the_unpacked_examples():
    packed, unpacked = packed_batch()
    assert sum(int(row["loss_mask"].sum()) for row in packed) == sum(int(u["loss_mask"][1:].sum()) for u in unpacked)
    first = packed[0]
    assert first["position_ids"][:9].tolist() == list(range(9)) and first["position_ids"][9:16].tolist() == list(range(7))
    assert first["input_ids"][9:16].tolist() == unpacked[1]["input_ids"][:7].tolist()


def test_the_batch_weighs_microbatches_unequally():
    counted = [int(s["loss_mask"][1:].sum()) for s in gradient_batch()]
    assert counted == [15, 11, 7, 4]
    left = gradient_batch(padding="left")
    assert all(int(s["attention_mask"][:-c - 1].sum()) == 0 for s, c in zip(left, counted))


@pytest.mark.slow
def test_an_optimizer_that_does_not_match_ddp_is_refused(stepped):
    """A plain optimizer under the default (distributed-optimizer) DDP would train on wrong gradients."""
    error = stepped[("llama", "dp4-mismatched-optimizer")]["error"]
    assert "OptimizerConfig(use_distributed_optimizer=False)" in error
    assert "DistributedDataParallelConfig(use_distributed_optimizer=True)" in error
