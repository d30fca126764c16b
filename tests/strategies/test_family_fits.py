"""Every architecture in ``factories.FAMILIES`` trains with MegatronBridgeStrategy at TP=2.

One 2-rank gloo launch fits each family for a few steps (TP=1, DP=2 where the KV heads cannot be
split, e.g. MQA; expert parallelism for MoE families, see :func:`parallel_settings`): the loss is
finite and falls, every parameter shard changed, padded vocabulary rows (embedding, output
layer and its bias) stayed zero, and a Lightning (Megatron distributed) checkpoint restores the result.
Families are read from FAMILIES when the tests run, so a newly added family is covered at once.
"""

from __future__ import annotations

import pytest
from factories import FAMILIES, make_checkpoint
from processes import launch
from strategies.family_fit_checks import STEPS, fit_every_family

from lightning_bridge import AutoBridge

WORLD = 2


def parallel_settings(folder: str) -> dict:
    """TP=2, unless the family's KV heads (query groups) cannot be split over two ranks (TP=1, DP=2).

    MoE families use expert parallelism (EP=2, DP=2) instead; MoE at TP x EP (which needs sequence
    parallelism) is trained against transformers' gradients in ``test_gradients.py``.
    """
    provider = AutoBridge.from_hf_pretrained(folder).to_megatron_provider(load_weights=False)
    if provider.num_moe_experts:
        return {"tensor_model_parallel_size": 1, "expert_model_parallel_size": WORLD}
    groups = provider.num_query_groups or provider.num_attention_heads
    return {"tensor_model_parallel_size": WORLD if groups % WORLD == 0 else 1}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("family-fits")
    checkpoints = {family: str(make_checkpoint(family, root / family)) for family in sorted(FAMILIES)}
    settings = {family: parallel_settings(folder) for family, folder in checkpoints.items()}
    return launch(fit_every_family, WORLD, checkpoints, settings, str(root / "lightning-checkpoints"))


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_fits(fitted, family):
    per_rank = [results[family] for results in fitted]
    losses = per_rank[0]["losses"]
    assert len(losses) == STEPS and per_rank[0]["finite"], losses
    assert losses[-1] < losses[0], losses
    for rank, result in enumerate(per_rank):
        assert not result["unchanged"], (rank, result["unchanged"])  # every parameter trained ...
        assert not result["padding_nonzero"], (rank, result["padding_nonzero"])  # ... but vocab padding
        assert result["restored"], rank  # a Lightning checkpoint of the result restores it exactly
