"""Global names, rank layouts and the tensor-parallel gathers: one process, then one 2-process gloo launch."""

from __future__ import annotations

import pytest
import torch
from conversion.parallel_checks import names_and_gathers
from factories import make_checkpoint, make_hf_config
from megatron.core import parallel_state as ps
from processes import launch

from lightning_bridge import AutoBridge
from lightning_bridge.conversion.parallel import (
    RankLayout,
    all_gather_tp,
    comm_device,
    gather_tp_to,
    global_name,
    global_named_parameters,
    global_named_weights,
    is_expert_parameter,
    unwrap,
)


class Layer(torch.nn.Module):
    def __init__(self, layer_number: int, experts: list[int] | None = None):
        super().__init__()
        self.layer_number = layer_number
        self.mlp = torch.nn.Module()
        self.mlp.local_expert_indices = experts or []


def stage(*layers: Layer) -> torch.nn.Module:
    """A stand-in pipeline stage: ``decoder.layers`` numbered as Megatron numbers a later stage's."""
    model = torch.nn.Module()
    model.decoder = torch.nn.Module()
    model.decoder.layers = torch.nn.ModuleList(layers)
    return model


def test_global_name_makes_layer_and_expert_numbers_global():
    model = stage(Layer(3), Layer(4, experts=[6, 7]))  # the second stage of a 4-layer model at PP=2
    assert global_name(model, "decoder.layers.0.self_attention.linear_qkv.weight") == \
        "decoder.layers.2.self_attention.linear_qkv.weight"
    assert global_name(model, "decoder.layers.1.mlp.experts.local_experts.1.linear_fc1.weight") == \
        "decoder.layers.3.mlp.experts.local_experts.7.linear_fc1.weight"
    assert global_name(model, "output_layer.weight") == "output_layer.weight"
    assert is_expert_parameter("decoder.layers.3.mlp.experts.local_experts.7.linear_fc1.weight")
    assert not is_expert_parameter("decoder.layers.3.mlp.linear_fc1.weight")


def test_one_process_names_layout_and_gathers(tmp_path):
    bridge = AutoBridge.from_hf_pretrained(make_checkpoint("llama", tmp_path / "llama"), torch_dtype=torch.bfloat16)
    try:
        (chunk,) = bridge.to_megatron_model(show_progress=False)  # bf16: inside Megatron's Float16Module
        bare = unwrap(chunk)
        assert bare is not chunk and unwrap(bare) is bare and type(bare).__name__ == "GPTModel"
        assert [name for name, _ in global_named_parameters(chunk)] == [name for name, _ in bare.named_parameters()]
        assert dict(global_named_weights(chunk)).keys() >= dict(global_named_parameters(chunk)).keys()
        layout = RankLayout.current()
        assert layout == RankLayout(rank=0, world_size=1, tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, dp_rank=0,
                                    dp_size=1)
        assert layout.coordinates == (0, 0, 0) and layout.expert_coordinates == (0, 0, 0, 0)
        shard = torch.arange(3.0)
        (gathered,) = all_gather_tp(shard)
        assert torch.equal(gathered, shard) and torch.equal(gather_tp_to(shard, 0)[0], shard)
        assert comm_device() == torch.device("cpu")
    finally:
        ps.destroy_model_parallel()


def test_expert_parameters_use_the_expert_tensor_parallel_group():
    layout = RankLayout(rank=5, world_size=8, tp_rank=1, tp_size=2, pp_rank=0, pp_size=1, dp_rank=2, dp_size=4,
                        ep_rank=1, ep_size=2, etp_rank=0, etp_size=1, edp_rank=3)
    assert layout.tp_for("decoder.layers.0.mlp.experts.local_experts.0.linear_fc1.weight") == (0, 1)
    assert layout.tp_for("decoder.layers.0.mlp.linear_fc1.weight") == (1, 2)
    assert layout.expert_coordinates == (0, 0, 1, 3) and layout.coordinates == (1, 0, 2)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    folder = make_checkpoint("llama", tmp_path_factory.mktemp("parallel") / "llama")
    return launch(names_and_gathers, 2, str(folder))


def test_pipeline_stages_name_their_layers_globally(two_ranks):
    layers = make_hf_config("llama").num_hidden_layers
    first, second = (set(r["pp_names"]) for r in two_ranks)
    numbers = [{int(n.split(".")[2]) for n in names if n.startswith("decoder.layers.")} for names in (first, second)]
    assert numbers == [set(range(layers // 2)), set(range(layers // 2, layers))]
    assert "embedding.word_embeddings.weight" in first and "output_layer.weight" in second
    assert [r["pp_layout"].pp_rank for r in two_ranks] == [0, 1]


def test_tensor_parallel_layout_and_gathers(two_ranks):
    assert [r["tp_layout"].tp_rank for r in two_ranks] == [0, 1]
    assert all(r["tp_layout"].tp_size == 2 and r["tp_layout"].dp_size == 1 for r in two_ranks)
    assert [r["all_gather"] for r in two_ranks] == [[[0.0, 0.0], [1.0, 1.0]]] * 2
    assert [r["gather_to_rank_1"] for r in two_ranks] == [None, [[0.0, 0.0], [1.0, 1.0]]]
    assert [r["expert_group_size"] for r in two_ranks] == [2, 2]  # expert TP defaults to the TP size
