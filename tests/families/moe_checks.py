"""Checks that run inside every rank of a multi-process MoE launch (see test_moe_parallel.py)."""

from __future__ import annotations

import torch
from megatron.core import parallel_state as ps

from lightning_bridge import AutoBridge
from lightning_bridge.conversion.parallel import RankLayout, global_named_parameters
from lightning_bridge.hf_io import HFCheckpointReader
from lightning_bridge.verify import megatron_logits

MODES = ("consolidate", "replicate", "distribute")


def round_trip_expert_layouts(cases: list[tuple[str, int, int, int, int | None]], checkpoints: dict[str, str],
                              input_ids: torch.Tensor) -> dict:
    """For each (family, TP, PP, EP, expert TP): experts held, logits, every export mode and order."""
    results: dict = {}
    for family, tp, pp, ep, etp in cases:
        bridge = AutoBridge.from_hf_pretrained(checkpoints[family])
        provider = bridge.to_megatron_provider(show_progress=False)
        provider.tensor_model_parallel_size, provider.pipeline_model_parallel_size = tp, pp
        provider.expert_model_parallel_size, provider.expert_tensor_parallel_size = ep, etp
        model = provider(wrap_with_ddp=False)
        layout = RankLayout.current()
        experts = sorted({int(name.split(".")[6]) for chunk in model
                          for name, _ in global_named_parameters(chunk) if ".local_experts." in name})
        result = {"logits": megatron_logits(model, input_ids), "experts": experts,
                  "ep_rank": layout.ep_rank, "etp_size": layout.etp_size}
        source = HFCheckpointReader(checkpoints[family])
        for mode in MODES:
            for order in ("safetensors", None):
                received = dict(bridge.export_hf_weights(model, order=order, mode=mode))
                result[(mode, order)] = {
                    "names": list(received),
                    "bitwise": all(torch.equal(t, source.get(n)) for n, t in received.items()),
                }
        results[(family, tp, pp, ep, etp)] = result
        ps.destroy_model_parallel()
    return results
