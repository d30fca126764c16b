"""Mixtral, Qwen3-MoE, GLM-4.5 MoE and DeepSeek-V3 with
expert parallelism on 4 gloo ranks: each rank loads its own experts,
logits equal transformers', and every export mode and order is bitwise equal to the source.

One launch runs every layout: EP=2 (expert data-parallel 2), TP=2 x EP=2 with expert TP 1 and
with expert TP 2 (Megatron's default, the TP size), EP=2 x PP=2, and EP=4 (one expert per rank).
"""

from __future__ import annotations

import pytest
import torch
import transformers
from factories import make_checkpoint
from families.moe_checks import round_trip_expert_layouts
from processes import launch

from lightning_bridge.hf_io import HFCheckpointReader
from lightning_bridge.verify import relative_difference, transformers_logits

WORLD = 4
CASES = [  # (family, TP, PP, EP, expert TP); None: Megatron's default expert TP, the TP size
    ("mixtral", 1, 1, 2, None),
    ("mixtral", 2, 1, 2, 1),
    ("mixtral", 1, 1, 4, None),
    ("qwen3-moe", 2, 1, 2, None),
    ("qwen3-moe", 1, 2, 2, None),
    ("glm4-moe", 2, 1, 2, None),  # dense first layer, shared expert, grouped sigmoid routing
    ("glm4-moe", 1, 2, 2, None),
    ("deepseek-v3", 2, 1, 2, None),  # multi-latent attention: compressed q and kv split over TP
    ("deepseek-v3", 1, 2, 2, None),
    ("deepseek-v3", 2, 2, 1, None),
    ("deepseek-v3-q", 2, 1, 1, None),  # one q projection, TP=2 x DP=2
]
MOE_FAMILIES = sorted({case[0] for case in CASES})


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    checkpoints = {family: str(make_checkpoint(family, root / family)) for family in MOE_FAMILIES}
    input_ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    return checkpoints, input_ids, launch(round_trip_expert_layouts, WORLD, CASES, checkpoints, input_ids)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=lambda c: "{}-tp{}-pp{}-ep{}-etp{}".format(*c))
def test_expert_layout(launched, case):
    checkpoints, input_ids, results = launched
    family, tp, _, ep, etp = case
    per_rank = [results[rank][case] for rank in range(WORLD)]

    # local expert i on EP rank r is global expert r * (4 / EP) + i
    per_ep = 4 // ep
    for result in per_rank:
        assert result["experts"] == list(range(result["ep_rank"] * per_ep, (result["ep_rank"] + 1) * per_ep))
        assert result["etp_size"] == (etp or tp)

    reference = transformers_logits(transformers.AutoModelForCausalLM.from_pretrained(checkpoints[family]).eval(),
                                    input_ids)
    for rank, result in enumerate(per_rank):
        assert relative_difference(result["logits"], reference) <= 1e-5, (case, rank)

    all_names = sorted(HFCheckpointReader(checkpoints[family]).names())
    for mode in ("consolidate", "replicate", "distribute"):
        for order in ("safetensors", None):
            received = [result[(mode, order)] for result in per_rank]
            assert all(r["bitwise"] for r in received), (case, mode, order)
            if mode == "consolidate":
                assert sorted(received[0]["names"]) == all_names
                assert not any(r["names"] for r in received[1:])
            elif mode == "replicate":
                assert all(sorted(r["names"]) == all_names for r in received)
            else:  # each tensor on exactly one rank, and the work shared
                assert sorted(n for r in received for n in r["names"]) == all_names
                assert sum(bool(r["names"]) for r in received) > 1
