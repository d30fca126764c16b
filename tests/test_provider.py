"""Tests for lightning_bridge.provider: settable fields, validation at finalize(), building and loading."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from factories import make_checkpoint, make_hf_config
from megatron.core.transformer import TransformerConfig

from lightning_bridge import AutoBridge, GPTModelProvider
from lightning_bridge.conversion.parallel import global_named_parameters
from lightning_bridge.distributed import initialize_model_parallel
from lightning_bridge.hf_io import HFCheckpointReader


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint("qwen2", tmp_path_factory.mktemp("provider") / "qwen2")


def small(**fields) -> GPTModelProvider:
    defaults = dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=96)
    return GPTModelProvider(**{**defaults, **fields})


# --- vocabulary padding -------------------------------------------------------------------------------
@pytest.mark.parametrize("vocab,divisible_by,tp,padded", [
    (96, 128, 1, 128),
    (96, 128, 2, 256),
    (128, 128, 1, 128),
    (300, 128, 1, 384),
    (300, 128, 2, 512),
    (257, 64, 1, 320),
    (100, 1, 4, 100),
    (101, 1, 4, 104),
])
def test_padded_vocab_size_is_a_multiple_of_divisible_by_times_tp(vocab, divisible_by, tp, padded):
    provider = small(vocab_size=vocab, make_vocab_size_divisible_by=divisible_by,
                     tensor_model_parallel_size=tp)
    assert provider.padded_vocab_size == padded
    assert padded % (divisible_by * tp) == 0 and padded >= vocab


def test_padded_vocab_size_follows_later_changes():
    provider = small()
    assert provider.padded_vocab_size == 128
    provider.tensor_model_parallel_size = 4
    assert provider.padded_vocab_size == 512
    provider.make_vocab_size_divisible_by = 8
    assert provider.padded_vocab_size == 96  # 96 is already a multiple of 8 x 4


# --- finalize ---------------------------------------------------------------------------------------
def test_fields_are_settable_until_finalize():
    provider = small(num_attention_heads=3, tensor_model_parallel_size=2)  # invalid, but not checked yet
    provider.num_attention_heads = 4
    provider.finalize()
    assert provider.kv_channels == 16


def test_finalize_fills_megatrons_defaults():
    provider = small()
    assert (provider.kv_channels, provider.num_query_groups, provider.ffn_hidden_size) == (None, None, None)
    provider.finalize()
    assert provider.kv_channels == 16  # hidden / heads
    assert provider.num_query_groups == 4  # MHA
    assert provider.ffn_hidden_size == 256  # 4 x hidden
    assert provider.pipeline_dtype is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU runtime defaults")
def test_finalize_on_cpu_uses_cpu_initialisation():
    provider = small(gradient_accumulation_fusion=True)
    provider.finalize()
    assert provider.use_cpu_initialization is True
    assert provider.gradient_accumulation_fusion is False


def test_finalize_sets_pipeline_dtype_for_pipeline_parallelism():
    provider = small(pipeline_model_parallel_size=2, params_dtype=torch.bfloat16, bf16=True)
    provider.finalize()
    assert provider.pipeline_dtype == torch.bfloat16


def test_finalize_refuses_more_stages_than_layers():
    provider = small(pipeline_model_parallel_size=3)
    with pytest.raises(ValueError, match=r"pipeline_model_parallel_size=3 is larger than the number of "
                                         r"layers \(2\); use at most 2 stages"):
        provider.finalize()


@pytest.mark.parametrize("heads,tp,example", [(6, 4, 3), (12, 8, 6), (5, 2, 1)])
def test_finalize_suggests_the_largest_tp_that_divides(heads, tp, example):
    provider = small(hidden_size=heads * 8, num_attention_heads=heads, ffn_hidden_size=24 * heads,
                     tensor_model_parallel_size=tp)
    with pytest.raises(ValueError, match=rf"tensor_model_parallel_size={tp} does not divide "
                                         rf"num_attention_heads={heads}\. .*for example {example}\)"):
        provider.finalize()


def test_finalize_runs_megatrons_own_validation():
    provider = small(fp16=True, bf16=True)
    with pytest.raises(ValueError, match="Only one of .*fp16.* and .*bf16.* should be True"):
        provider.finalize()


def test_transformer_config_fields():
    provider = small()
    values = provider.transformer_config_fields()
    assert set(values) == {f.name for f in dataclasses.fields(TransformerConfig)}
    assert values["num_layers"] == 2 and values["hidden_size"] == 64
    assert "vocab_size" not in values  # a model-level setting, not a TransformerConfig field


# --- building --------------------------------------------------------------------------------------
def expected_megatron_tensors(bridge: AutoBridge, folder: Path,
                              provider: GPTModelProvider) -> dict[str, torch.Tensor]:
    """Every Megatron parameter computed straight from the HF tensors, through the mapping table."""
    from lightning_bridge.conversion.context import ConversionContext

    reader = HFCheckpointReader(folder)
    registry = bridge.mapping_registry()
    ctx = ConversionContext.from_config(provider, provider.vocab_size, provider.padded_vocab_size)
    expected = {}
    for mapping in registry.get_all_mappings():
        for layer in range(provider.num_layers) if "*" in mapping.megatron else [None]:
            wildcards = [str(layer)] if layer is not None else []
            tensors = [reader.get(n) for n in mapping.hf_names(wildcards)]
            expected[mapping.megatron_name(wildcards)] = mapping.to_megatron(tensors, ctx)
    return expected


def test_call_builds_chunks_with_the_checkpoint_loaded(checkpoint):
    bridge = AutoBridge.from_hf_pretrained(checkpoint)
    provider = bridge.to_megatron_provider()
    chunks = provider(wrap_with_ddp=False)
    assert isinstance(chunks, list) and len(chunks) == 1
    params = dict(global_named_parameters(chunks[0]))
    expected = expected_megatron_tensors(bridge, checkpoint, provider)
    assert set(params) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(params[name].detach(), tensor), name
    embedding = params["embedding.word_embeddings.weight"]
    assert embedding.shape[0] == provider.padded_vocab_size == 128
    assert not embedding[provider.vocab_size:].any()  # padding rows are zero


def test_load_weights_false_leaves_the_model_random(checkpoint):
    bridge = AutoBridge.from_hf_pretrained(checkpoint)
    provider = bridge.to_megatron_provider()
    params = dict(global_named_parameters(provider(load_weights=False)[0]))
    reader = HFCheckpointReader(checkpoint)
    # Megatron's initial values, not the file's
    assert torch.equal(params["decoder.final_layernorm.weight"], torch.ones(64))
    assert not torch.equal(params["decoder.final_layernorm.weight"], reader.get("model.norm.weight"))
    assert not torch.equal(params["decoder.layers.0.mlp.linear_fc2.weight"],
                           reader.get("model.layers.0.mlp.down_proj.weight"))


def test_provider_without_weight_loader_builds_a_random_model():
    calls = []
    provider = small()
    assert provider.weight_loader is None
    first = dict(global_named_parameters(provider()[0]))
    provider.weight_loader = lambda chunks, p: calls.append((len(chunks), p))
    provider()
    # the loader gets this rank's chunks and the provider itself
    assert len(calls) == 1 and calls[0][0] == 1 and calls[0][1] is provider
    assert first["embedding.word_embeddings.weight"].shape == (128, 64)


# --- random initialisation: skipped when a checkpoint overwrites every parameter -----------------------
class CountingInit:
    """An init method (Megatron calls it for every weight it draws) that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.nn.init.normal_(tensor, std=0.02)


def count_initialisations(provider: GPTModelProvider) -> CountingInit:
    counting = CountingInit()
    provider.init_method = provider.output_layer_init_method = provider.embedding_init_method = counting
    return counting


@pytest.mark.parametrize("wrap_with_ddp", [False, True], ids=["plain", "ddp-as-the-strategy-builds"])
def test_loading_a_checkpoint_skips_random_initialisation_and_loads_every_parameter(checkpoint,
                                                                                   wrap_with_ddp):
    bridge = AutoBridge.from_hf_pretrained(checkpoint)
    provider = bridge.to_megatron_provider()
    assert provider.loader_fills_every_parameter() and not provider.loader_fills_every_parameter(False)
    counting = count_initialisations(provider)
    chunks = provider(wrap_with_ddp=wrap_with_ddp)
    assert counting.calls == 0
    assert provider.perform_initialization is True  # only the build skipped it
    params = dict(global_named_parameters(chunks[0]))
    expected = expected_megatron_tensors(bridge, checkpoint, provider)
    assert set(params) == set(expected)  # every parameter comes from the checkpoint ...
    for name, tensor in expected.items():  # ... and holds exactly its values, padding rows zero
        assert torch.equal(params[name].detach(), tensor), name


def test_a_build_without_initialisation_keeps_megatrons_tensor_parallel_marks(checkpoint):
    """megatron-core 0.16 marks a weight tensor-parallel only while drawing it; without the marks
    the gradient norm at TP > 1 would count TP rank 0's shards only."""
    bridge = AutoBridge.from_hf_pretrained(checkpoint)
    marks = ("tensor_model_parallel", "partition_dim", "partition_stride")
    builds = [dict(global_named_parameters(bridge.to_megatron_provider()(load_weights=load)[0]))
              for load in (True, False)]
    loaded, initialised = ({name: tuple(getattr(p, mark, None) for mark in marks) for name, p in build.items()}
                           for build in builds)
    assert loaded == initialised
    assert loaded["decoder.layers.0.mlp.linear_fc1.weight"] == (True, 0, 2)  # gate/up: stride 2
    assert loaded["decoder.layers.0.self_attention.linear_proj.weight"] == (True, 1, 1)


def test_models_without_checkpoint_weights_are_initialised_as_megatron_does(checkpoint):
    from_checkpoint = AutoBridge.from_hf_pretrained(checkpoint)
    from_config = AutoBridge.from_hf_config(from_checkpoint.hf_config)
    builds = []
    for provider, load_weights in [(from_config.to_megatron_provider(), True),
                                   (from_checkpoint.to_megatron_provider(load_weights=False), True),
                                   (from_checkpoint.to_megatron_provider(), False)]:
        assert not provider.loader_fills_every_parameter(load_weights)
        counting = count_initialisations(provider)
        builds.append(dict(global_named_parameters(provider(load_weights=load_weights)[0])))
        assert counting.calls == sum(p.dim() == 2 for p in builds[-1].values())  # every weight matrix drawn
    first = builds[0]
    for other in builds[1:]:  # same seed, same values: nothing of the checkpoint in them
        assert all(torch.equal(first[name], other[name]) for name in first)
    reader = HFCheckpointReader(checkpoint)
    assert not torch.equal(first["decoder.layers.0.mlp.linear_fc2.weight"],
                           reader.get("model.layers.0.mlp.down_proj.weight"))


def test_a_loader_that_does_not_say_it_fills_everything_gets_an_initialised_model():
    provider = small()
    counting = count_initialisations(provider)
    provider.weight_loader = lambda chunks, p: ["decoder.final_layernorm.weight"]
    provider()
    assert counting.calls > 0


def test_a_loader_that_promised_every_parameter_but_missed_some_is_refused():
    class PartialLoader:
        fills_every_parameter = True

        def __call__(self, chunks, provider):
            params = dict(global_named_parameters(chunks[0]))
            params["decoder.final_layernorm.weight"].data.fill_(1.0)
            return ["decoder.final_layernorm.weight"]

    provider = small()
    provider.weight_loader = PartialLoader()
    counting = count_initialisations(provider)
    with pytest.raises(RuntimeError, match=r"did not write the parameters decoder\.final_layernorm\.bias, "
                                           r"decoder\.layers\.0\.[\w., ]+\.\.\. \(\d+ in all\).*"
                                           r"uninitialised memory.*fills_every_parameter") as raised:
        provider()
    assert "decoder.final_layernorm.weight" not in str(raised.value)
    assert counting.calls == 0 and provider.perform_initialization is True


def test_the_seed_makes_random_models_reproducible():
    initialize_model_parallel()  # as after any earlier model in this process
    a = dict(global_named_parameters(small(seed=5)()[0]))
    b = dict(global_named_parameters(small(seed=5)()[0]))
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_virtual_pipeline_without_pipeline_parallelism_is_refused(checkpoint):
    initialize_model_parallel()  # as after any earlier model in this process
    provider = AutoBridge.from_hf_pretrained(checkpoint).to_megatron_provider()
    provider.virtual_pipeline_model_parallel_size = 2
    with pytest.raises(ValueError, match=r"virtual_pipeline_model_parallel_size=2.*"
                                         r"pipeline_model_parallel_size"):
        provider()  # today: two chunks, each a whole model with every layer, embedding and output layer


# --- expert parallelism -------------------------------------------------------------------------------
@pytest.mark.parametrize("fields,message", [
    ({"num_moe_experts": 4, "expert_model_parallel_size": 3},
     r"expert_model_parallel_size=3 does not divide the number of experts \(num_moe_experts=4\): .* \(for example 2\)"),
    ({"num_moe_experts": 4, "moe_ffn_hidden_size": 30, "expert_tensor_parallel_size": 4},
     r"expert_tensor_parallel_size=4 does not divide the experts' FFN size \(moe_ffn_hidden_size=30\)\. .*"),
    ({"num_moe_experts": 4, "moe_ffn_hidden_size": 30, "tensor_model_parallel_size": 4},  # expert TP = TP
     r"expert_tensor_parallel_size=4 does not divide the experts' FFN size"),
    ({"expert_model_parallel_size": 2},
     r"expert_model_parallel_size=2 needs a mixture-of-experts model, but this model has no experts"),
], ids=["ep-vs-experts", "etp-vs-ffn", "etp-defaults-to-tp", "ep-without-experts"])
def test_bad_expert_parallel_sizes_are_refused_before_any_work(fields, message):
    with pytest.raises(ValueError, match=message):
        small(ffn_hidden_size=128, **fields)()


def test_expert_ffn_need_not_divide_by_tp_when_expert_tp_is_1():
    small(num_moe_experts=4, ffn_hidden_size=30, moe_ffn_hidden_size=30, tensor_model_parallel_size=2,
          expert_tensor_parallel_size=1)._check_parallel_sizes()


def test_dense_layers_of_a_moe_pattern_get_the_dense_mlp():
    """moe_layer_freq as a pattern: 0 layers are megatron-core's dense MLP, 1 layers MoE."""
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from lightning_bridge.provider import moe_layer_pattern

    provider = small(num_layers=3, ffn_hidden_size=128, num_moe_experts=4, moe_ffn_hidden_size=32,
                     moe_router_topk=2, moe_layer_freq=[0, 1, 1], moe_token_dispatcher_type="allgather")
    assert moe_layer_pattern(provider) == [0, 1, 1]
    (chunk,) = provider(load_weights=False)
    assert [type(layer.mlp) for layer in chunk.decoder.layers] == [MLP, MoELayer, MoELayer]
    assert chunk.decoder.layers[0].mlp.linear_fc1.weight.shape == (128, 64)
    assert moe_layer_pattern(small(num_layers=4, num_moe_experts=4, moe_layer_freq=2)) == [1, 0, 1, 0]
    assert moe_layer_pattern(small(num_layers=2)) == [1, 1]  # dense model: its layer spec decides


def test_a_deep_copy_shares_the_weight_loader(checkpoint):
    """megatron-core deep-copies the config (experts of another FFN size): the loader is shared."""
    import copy

    provider = AutoBridge.from_hf_pretrained(checkpoint).to_megatron_provider()
    provider()  # the loader has read the checkpoint (its files are open)
    copied = copy.deepcopy(provider)
    assert copied.weight_loader is provider.weight_loader and copied.hidden_size == provider.hidden_size
    assert copied.rotary_inv_freq is None or copied.rotary_inv_freq is not provider.rotary_inv_freq


def test_precision_fields_is_the_one_precision_rule():
    from lightning_bridge.provider import precision_fields

    assert precision_fields(torch.bfloat16) == {"params_dtype": torch.bfloat16, "bf16": True, "fp16": False}
    assert precision_fields(torch.float16) == {"params_dtype": torch.float16, "bf16": False, "fp16": True}
    assert precision_fields(torch.float32) == {"params_dtype": torch.float32, "bf16": False, "fp16": False}
    bridge = AutoBridge.from_hf_config(make_hf_config("llama"), torch_dtype="float16")
    assert bridge.to_megatron_provider().precision() == precision_fields(torch.float16)
