"""TP, PP and TP x PP on 4 gloo ranks: logits, every export mode and order, saved checkpoints.

One launch runs every layout and family (a launch costs ~15 s of start-up on 2 cores).
"""

from __future__ import annotations

import pytest
import torch
import transformers
from conversion.conversion_checks import LAYOUTS, round_trip_all_layouts
from factories import make_checkpoint
from processes import launch

from lightning_bridge.hf_io import HFCheckpointReader
from lightning_bridge.verify import relative_difference, transformers_logits

FAMILIES = ["llama", "llama3.2", "llama-mha", "mistral", "qwen2", "qwen3"]
WORLD = 4


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    checkpoints = {f: str(make_checkpoint(f, root / f, max_shard_size="40KB" if f == "llama" else None))
                   for f in FAMILIES}
    input_ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    results = launch(round_trip_all_layouts, WORLD, checkpoints, input_ids, str(root / "saved"))
    return checkpoints, input_ids, results


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_layout(launched, family, tp, pp):
    checkpoints, input_ids, results = launched
    key = f"{family}-tp{tp}-pp{pp}"
    source = HFCheckpointReader(checkpoints[family])
    all_names = source.names()
    reference = transformers_logits(transformers.AutoModelForCausalLM.from_pretrained(checkpoints[family]).eval(),
                                    input_ids)
    for rank in range(WORLD):
        assert relative_difference(results[rank][key]["logits"], reference) <= 1e-5, (key, rank)

    for (mode, order), _ in ((k, v) for k, v in results[0][key].items() if isinstance(k, tuple)):
        per_rank = [results[r][key][(mode, order)] for r in range(WORLD)]
        assert all(r["bitwise"] and r["dtypes_equal"] for r in per_rank), (key, mode, order)
        if mode == "consolidate":
            assert sorted(per_rank[0]["names"]) == sorted(all_names)
            assert all(not r["names"] for r in per_rank[1:])
        elif mode == "replicate":
            assert all(sorted(r["names"]) == sorted(all_names) for r in per_rank)
        else:
            received = [n for r in per_rank for n in r["names"]]
            assert sorted(received) == sorted(all_names)  # each tensor on exactly one rank
            assert sum(bool(r["names"]) for r in per_rank) > 1  # and the work is shared
        if order == "safetensors" and mode != "distribute":
            # shard by shard, so a writer can close each shard as soon as it is complete
            files = sorted(set(source.weight_map.values()))
            shard_sequence = [files.index(source.weight_map[n]) for n in per_rank[0]["names"]]
            assert shard_sequence == sorted(shard_sequence), key

    saved = HFCheckpointReader(results[0][key]["saved"])
    assert saved.weight_map == source.weight_map
    assert all(torch.equal(saved.get(n), source.get(n)) for n in all_names)
    transformers.AutoModelForCausalLM.from_pretrained(results[0][key]["saved"])
