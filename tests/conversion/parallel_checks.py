"""Checks of conversion/parallel.py that run inside every rank of a 2-process gloo launch (see test_parallel.py)."""

from __future__ import annotations

import torch
from megatron.core import parallel_state as ps

from lightning_bridge import AutoBridge
from lightning_bridge.conversion.parallel import (
    RankLayout,
    all_gather_tp,
    gather_tp_to,
    global_named_parameters,
    tp_group_for,
)
from lightning_bridge.distributed import initialize_model_parallel


def names_and_gathers(folder: str) -> dict:
    """At PP=2: each stage's global parameter names; at TP=2: the layout and what the TP gathers return."""
    results: dict = {}
    provider = AutoBridge.from_hf_pretrained(folder).to_megatron_provider(show_progress=False)
    provider.pipeline_model_parallel_size = 2
    chunks = provider(wrap_with_ddp=False)
    results["pp_names"] = sorted(name for name, _ in global_named_parameters(chunks[0]))
    results["pp_layout"] = RankLayout.current()
    ps.destroy_model_parallel()
    initialize_model_parallel(tensor_model_parallel_size=2)
    layout = RankLayout.current()
    shard = torch.full((2,), float(layout.tp_rank))
    results["tp_layout"] = layout
    results["all_gather"] = [t.tolist() for t in all_gather_tp(shard)]
    gathered = gather_tp_to(shard, 1)
    results["gather_to_rank_1"] = None if gathered is None else [t.tolist() for t in gathered]
    results["expert_group_size"] = torch.distributed.get_world_size(tp_group_for("decoder.layers.0.mlp.experts.x"))
    ps.destroy_model_parallel()
    return results
