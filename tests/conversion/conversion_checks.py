"""Checks that run inside every rank of a multi-process launch (see test_exporting.py)."""

from __future__ import annotations

from pathlib import Path

import torch
from megatron.core import parallel_state as ps

from lightning_bridge import AutoBridge
from lightning_bridge.hf_io import HFCheckpointReader
from lightning_bridge.verify import megatron_logits

LAYOUTS = [(2, 1), (1, 2), (2, 2)]  # (TP, PP) on 4 ranks: DP 2, 2, 1


def round_trip_all_layouts(checkpoints: dict[str, str], input_ids: torch.Tensor, out_dir: str) -> dict:
    """For every layout and checkpoint: logits, and every export mode and order, vs the source."""
    results: dict = {}
    for tp, pp in LAYOUTS:
        for family, folder in checkpoints.items():
            key = f"{family}-tp{tp}-pp{pp}"
            bridge = AutoBridge.from_hf_pretrained(folder)
            provider = bridge.to_megatron_provider()
            provider.tensor_model_parallel_size = tp
            provider.pipeline_model_parallel_size = pp
            model = provider(wrap_with_ddp=False)
            results[key] = {"logits": megatron_logits(model, input_ids)}
            source = HFCheckpointReader(folder)
            for mode in ("consolidate", "replicate", "distribute"):
                for order in ("safetensors", None):
                    received = dict(bridge.export_hf_weights(model, order=order, mode=mode))
                    results[key][(mode, order)] = {
                        "names": list(received),
                        "bitwise": all(torch.equal(t, source.get(n)) for n, t in received.items()),
                        "dtypes_equal": all(t.dtype == source.dtype(n) for n, t in received.items()),
                    }
            target = Path(out_dir) / key
            bridge.save_hf_pretrained(model, target, show_progress=False)
            results[key]["saved"] = str(target)
            ps.destroy_model_parallel()
    return results
