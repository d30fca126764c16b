"""Mixtral: Mistral's attention with a sparse mixture-of-experts MLP in every layer.

The router (``block_sparse_moe.gate``) takes a softmax over all experts, keeps the top k and
renormalises them to sum to one: Megatron's top-k router with the softmax taken *after* the
top-k (``moe_router_pre_softmax=False``), which is the same function. Each expert is a gated
SiLU MLP, ``w1``/``w3``/``w2`` <-> ``linear_fc1`` = [gate; up] and ``linear_fc2``.

Not supported, refused by name: ``router_jitter_noise > 0`` (HF scales the whole MLP input,
Megatron's jitter only the router's), and top-1 routing (renormalising one weight gives 1.0;
Megatron's softmax-after-top-k needs k > 1).

Precision: in bf16 Megatron rounds the routing weights to bf16 where HF Mixtral keeps them in
float32, so bf16 logits agree to bf16 precision; in float32 they agree to 1e-5 (tested).
"""

from __future__ import annotations

from typing import Any, ClassVar

from lightning_bridge.conversion.mappings import GatedMLP, Replicated, RowParallel, WeightMapping
from lightning_bridge.families.mistral import MistralBridge
from lightning_bridge.families.registry import register

# Megatron settings every MoE family shares: local-spec SequentialMLP experts, the allgather token
# dispatcher (it runs with gloo on CPU and NCCL on GPU; megatron-core's alltoall dispatcher creates
# a CUDA stream when built, so it cannot run on the CPU runtime), a softmax top-k router with no
# capacity limit (no token is dropped, as in HF).
MOE_CONFIG: dict[str, Any] = {
    "moe_router_score_function": "softmax",
    "moe_router_topk_scaling_factor": None,
    "moe_router_load_balancing_type": "aux_loss",  # a training loss only: forward outputs are unchanged
    "moe_token_dispatcher_type": "allgather",
    "moe_grouped_gemm": False,
    "moe_expert_capacity_factor": None,
    "moe_shared_expert_intermediate_size": None,
    "moe_layer_freq": 1,
}


def moe_mappings(block: str, gate: str, up: str, down: str) -> list[WeightMapping]:
    """The router and per-expert tables of an HF sparse MLP ``model.layers.*.<block>``."""
    experts = f"model.layers.*.{block}.experts.*"
    return [
        Replicated("decoder.layers.*.mlp.router.weight", f"model.layers.*.{block}.gate.weight"),
        GatedMLP("decoder.layers.*.mlp.experts.local_experts.*.linear_fc1.weight",
                 (f"{experts}.{gate}.weight", f"{experts}.{up}.weight")),
        RowParallel("decoder.layers.*.mlp.experts.local_experts.*.linear_fc2.weight",
                    f"{experts}.{down}.weight"),
    ]


def refuse_top1_renormalised(hf_config: Any, renormalise: bool) -> None:
    """Refuse top-1 routing with renormalised weights: Megatron's router cannot reproduce it."""
    if renormalise and hf_config.num_experts_per_tok == 1:
        raise ValueError(
            f"{type(hf_config).__name__} with num_experts_per_tok=1 and renormalised routing weights is not "
            "supported: Megatron's router cannot renormalise a single expert's weight to 1. "
            "Use num_experts_per_tok >= 2."
        )


@register
class MixtralBridge(MistralBridge):
    architectures = ("MixtralForCausalLM",)
    config_fields: ClassVar[dict[str, str]] = {
        **MistralBridge.config_fields,
        "num_moe_experts": "num_local_experts",
        "moe_router_topk": "num_experts_per_tok",
        "moe_ffn_hidden_size": "intermediate_size",
        "moe_aux_loss_coeff": "router_aux_loss_coef",
    }
    fixed_config: ClassVar[dict[str, Any]] = {**MistralBridge.fixed_config, **MOE_CONFIG,
                                              "moe_router_pre_softmax": False}

    def check_supported(self) -> None:
        super().check_supported()
        jitter = getattr(self.hf_config, "router_jitter_noise", 0.0) or 0.0
        if jitter > 0:
            raise ValueError(
                f"MixtralConfig with router_jitter_noise={jitter} is not supported: HF scales the whole MLP "
                "input by the noise while training, Megatron only the router's input. Load it with "
                "router_jitter_noise=0.0 (AutoBridge.from_hf_pretrained(path, router_jitter_noise=0.0))."
            )
        refuse_top1_renormalised(self.hf_config, renormalise=True)

    def mappings(self) -> list[WeightMapping]:
        dense = [m for m in super().mappings() if ".mlp." not in m.megatron]
        return dense + moe_mappings("block_sparse_moe", "w1", "w3", "w2")
