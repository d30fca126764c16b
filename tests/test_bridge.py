"""Tests for lightning_bridge.bridge: the public AutoBridge API on real tiny checkpoints.

Every bad input must fail with an error that names the problem and says what to do.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
import transformers
from factories import FAMILIES, make_checkpoint, make_hf_config
from safetensors.torch import load_file, save_file

from lightning_bridge import AutoBridge, CausalLMBridge
from lightning_bridge.builtin import build_tokenizer
from lightning_bridge.conversion.parallel import global_named_parameters
from lightning_bridge.hf_io import HFCheckpointReader

SUPPORTED = ["GPT2LMHeadModel", "GemmaForCausalLM", "LlamaForCausalLM", "MistralForCausalLM", "Olmo2ForCausalLM",
             "Phi3ForCausalLM", "PhiForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"]
SUPPORTED = sorted([*SUPPORTED, "MixtralForCausalLM", "Qwen3MoeForCausalLM"])  # the MoE families
SUPPORTED = sorted([*SUPPORTED, "Gemma2ForCausalLM", "Gemma3ForCausalLM"])
SUPPORTED = sorted([*SUPPORTED, "Glm4MoeForCausalLM"])
SUPPORTED = sorted([*SUPPORTED, "DeepseekV3ForCausalLM"])  # multi-latent attention


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Never contact the Hugging Face Hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A tiny Llama checkpoint; tests that change files work on a copy (see ``copy_of``)."""
    return make_checkpoint("llama", tmp_path_factory.mktemp("bridge") / "llama")


def copy_of(folder: Path, tmp_path: Path, name: str = "copy") -> Path:
    return Path(shutil.copytree(folder, tmp_path / name))


def hf_config(family: str, **overrides) -> transformers.PretrainedConfig:
    """The family's config as a checkpoint's config.json has it (with ``architectures``)."""
    return make_hf_config(family, architectures=[FAMILIES[family][1].__name__], **overrides)


def rewrite_weights(folder: Path, change) -> Path:
    """Rewrite model.safetensors after ``change(tensors)`` edits the name -> tensor dict in place."""
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def gpt_neox_folder(tmp_path: Path) -> Path:
    """A GPT-NeoX config.json (an architecture the bridge does not support yet)."""
    config = transformers.GPTNeoXConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2,
                                        intermediate_size=32, architectures=["GPTNeoXForCausalLM"])
    config.save_pretrained(tmp_path / "gpt_neox")
    return tmp_path / "gpt_neox"


def dot_entries(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# --- construction: config now, weights later --------------------------------------------------------------
def test_from_hf_pretrained_reads_only_the_config(source, tmp_path):
    folder = copy_of(source, tmp_path)
    bridge = AutoBridge.from_hf_pretrained(folder)
    (folder / "model.safetensors").unlink()
    assert bridge.transformer_config.num_layers == 2  # still fine: weights are not read yet
    with pytest.raises(ValueError, match=r"No weights in .*copy: expected model\.safetensors or "
                                         r"model\.safetensors\.index\.json .*Download the weight files"):
        bridge.to_megatron_model()


def test_weights_corrupted_after_the_bridge_is_made_fail_at_build_naming_the_file(source, tmp_path):
    folder = copy_of(source, tmp_path)
    bridge = AutoBridge.from_hf_pretrained(folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert bridge.transformer_config.hidden_size == 64
    file = re.escape(str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=rf"{file} is corrupt or truncated.*Re-download"):
        bridge.to_megatron_model()


def test_from_hf_config():
    config = hf_config("llama")
    bridge = AutoBridge.from_hf_config(config)
    assert bridge.hf_config is config
    assert bridge.transformer_config.num_layers == 2
    with pytest.raises(ValueError, match="made from a config alone: it has no HF weights"):
        bridge.checkpoint_reader()


def test_from_hf_config_torch_dtype():
    provider = AutoBridge.from_hf_config(hf_config("llama"), torch_dtype="bfloat16").to_megatron_provider()
    assert provider.params_dtype == torch.bfloat16 and provider.bf16 and not provider.fp16


@pytest.mark.parametrize("kwargs", [dict(torch_dtype=torch.bfloat16), dict(torch_dtype="bfloat16"),
                                    dict(dtype=torch.bfloat16)], ids=["torch_dtype", "str", "dtype"])
def test_from_hf_pretrained_dtype(source, kwargs):
    config = AutoBridge.from_hf_pretrained(source, **kwargs).transformer_config
    assert config.params_dtype == torch.bfloat16 and config.bf16


def test_from_hf_config_of_a_config_made_in_code():
    config = make_hf_config("llama")
    assert config.architectures is None
    assert AutoBridge.can_handle(config)
    assert AutoBridge.from_hf_config(config).transformer_config.num_layers == 2


def test_causal_lm_bridge_has_the_same_api(source):
    bridge = CausalLMBridge.from_hf_pretrained(source)
    assert isinstance(bridge, CausalLMBridge) and isinstance(bridge, AutoBridge)
    assert isinstance(CausalLMBridge.from_hf_config(hf_config("qwen2")), CausalLMBridge)
    assert CausalLMBridge.can_handle(source)
    assert CausalLMBridge.list_supported_models() == AutoBridge.list_supported_models()
    fields = ("num_layers", "hidden_size", "num_query_groups", "kv_channels", "ffn_hidden_size",
              "normalization")
    ours, reference = bridge.transformer_config, AutoBridge.from_hf_pretrained(source).transformer_config
    assert [getattr(ours, f) for f in fields] == [getattr(reference, f) for f in fields]
    assert len(bridge.to_megatron_model()) == 1


def test_can_handle(source, tmp_path):
    assert AutoBridge.can_handle(source) and AutoBridge.can_handle(str(source))
    assert AutoBridge.can_handle(hf_config("qwen3"))
    assert not AutoBridge.can_handle(transformers.GPTNeoXConfig(architectures=["GPTNeoXForCausalLM"]))
    assert not AutoBridge.can_handle(transformers.GPTNeoXConfig())
    assert not AutoBridge.can_handle(gpt_neox_folder(tmp_path))
    (tmp_path / "no-config").mkdir()
    assert not AutoBridge.can_handle(tmp_path / "no-config")
    assert not AutoBridge.can_handle(tmp_path / "does-not-exist")


def test_supported_models_and_bridges():
    assert AutoBridge.list_supported_models() == SUPPORTED
    assert AutoBridge.get_supported_bridges() == sorted([
        "GPT2Bridge", "GemmaBridge", "LlamaBridge", "MistralBridge", "Olmo2Bridge", "Phi2Bridge", "Phi3Bridge",
        "Qwen2Bridge", "Qwen3Bridge", "MixtralBridge", "Qwen3MoeBridge", "Gemma2Bridge", "Gemma3Bridge",
        "Glm4MoeBridge", "DeepseekV3Bridge"])


# --- the Megatron side --------------------------------------------------------------------------------------
def test_transformer_config_fields_of_llama():
    config = AutoBridge.from_hf_config(hf_config("llama")).transformer_config
    assert (config.num_layers, config.hidden_size, config.num_attention_heads) == (2, 64, 4)
    assert (config.num_query_groups, config.kv_channels, config.ffn_hidden_size) == (2, 16, 128)
    assert config.normalization == "RMSNorm" and config.gated_linear_unit
    assert config.layernorm_epsilon == 1e-6 and config.vocab_size == 96 and config.seq_length == 128
    assert not config.add_qkv_bias and not config.add_bias_linear and not config.qk_layernorm
    assert not config.share_embeddings_and_output_weights and config.window_size is None
    assert config.activation_func is torch.nn.functional.silu


@pytest.mark.parametrize("family,field,value", [
    ("qwen2", "add_qkv_bias", True),
    ("qwen3", "qk_layernorm", True),
    ("qwen3", "kv_channels", 24),  # head_dim differs from hidden / heads
    ("llama3.2", "share_embeddings_and_output_weights", True),
    ("mistral", "window_size", (4, 0)),  # sliding_window=5: token i sees i-4..i
    ("llama-mqa", "num_query_groups", 1),
    ("llama-mha", "num_query_groups", 4),
])
def test_transformer_config_family_fields(family, field, value):
    assert getattr(AutoBridge.from_hf_config(hf_config(family)).transformer_config, field) == value


def test_mapping_registry_is_readable(source):
    bridge = AutoBridge.from_hf_pretrained(source)
    mappings = bridge.model_bridge.mapping_registry().get_all_mappings()
    lines = [str(m) for m in mappings]
    assert "vocab: embedding.word_embeddings.weight <- model.embed_tokens.weight" in lines[0]
    assert any(line.strip() == "gated-mlp: decoder.layers.*.mlp.linear_fc1.weight <- "
               "model.layers.*.mlp.gate_proj.weight, model.layers.*.mlp.up_proj.weight" for line in lines)
    assert {m.kind for m in mappings} == {"vocab", "replicated", "qkv", "row", "gated-mlp"}
    assert bridge._model_bridge is bridge.model_bridge  # the name Megatron Bridge's users know
    assert [str(m) for m in bridge._model_bridge.mapping_registry().get_all_mappings()] == lines


def test_provider_fields_can_be_changed_before_building(source):
    bridge = AutoBridge.from_hf_pretrained(source)
    provider = bridge.to_megatron_provider()
    provider.params_dtype = torch.bfloat16
    provider.bf16 = True
    chunks = provider()
    assert type(chunks[0]).__name__ == "Float16Module"
    params = dict(global_named_parameters(chunks[0]))
    assert {p.dtype for p in params.values()} == {torch.bfloat16}
    down = HFCheckpointReader(source).get("model.layers.1.mlp.down_proj.weight")
    assert torch.equal(params["decoder.layers.1.mlp.linear_fc2.weight"], down.to(torch.bfloat16))


def test_provider_tp_needs_that_many_processes(source):
    provider = AutoBridge.from_hf_pretrained(source).to_megatron_provider()
    provider.tensor_model_parallel_size = 2
    with pytest.raises(ValueError, match=r"world size 1 is not divisible by tensor_model_parallel_size "
                                         r"\(2\).*Launch a multiple of 2 processes"):
        provider()


def test_to_megatron_model_overrides(source):
    chunks = AutoBridge.from_hf_pretrained(source).to_megatron_model(params_dtype=torch.bfloat16, bf16=True)
    assert {p.dtype for p in chunks[0].parameters()} == {torch.bfloat16}


def test_to_megatron_model_rejects_an_unknown_field(source):
    with pytest.raises(TypeError, match="'num_layerz' is not a TransformerConfig or provider field"):
        AutoBridge.from_hf_pretrained(source).to_megatron_model(num_layerz=1)


def test_to_megatron_model_rejects_a_method_name(source):
    with pytest.raises(TypeError, match="'finalize' is not a TransformerConfig or provider field"):
        AutoBridge.from_hf_pretrained(source).to_megatron_model(finalize=False)


# --- exporting and saving ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def built(source):
    bridge = AutoBridge.from_hf_pretrained(source)
    return bridge, bridge.to_megatron_model()


@pytest.mark.parametrize("mode", ["consolidate", "replicate", "distribute"])
@pytest.mark.parametrize("order", ["safetensors", None])
def test_export_yields_every_tensor_once_bitwise(source, built, mode, order):
    bridge, model = built
    original = HFCheckpointReader(source)
    names = []
    for name, tensor in bridge.export_hf_weights(model, order=order, mode=mode):
        names.append(name)
        assert tensor.dtype == original.dtype(name) and tensor.device.type == "cpu"
        assert torch.equal(tensor, original.get(name)), name
    assert sorted(names) == sorted(original.names()) and len(names) == len(set(names))
    if order is None:  # Megatron's model order
        assert names[0] == "model.embed_tokens.weight"
        assert names[-2:] == ["model.norm.weight", "lm_head.weight"]


def test_export_order_follows_the_source_shards(tmp_path):
    folder = make_checkpoint("llama", tmp_path / "sharded", max_shard_size="40KB")
    original = HFCheckpointReader(folder)
    files = sorted(set(original.weight_map.values()))
    assert len(files) > 2
    bridge = AutoBridge.from_hf_pretrained(folder)
    names = [name for name, _ in bridge.export_hf_weights(bridge.to_megatron_model(), order="safetensors")]
    shard_sequence = [files.index(original.weight_map[n]) for n in names]
    assert shard_sequence == sorted(shard_sequence)


def test_export_of_tied_embeddings_yields_no_lm_head(tmp_path):
    folder = make_checkpoint("llama3.2", tmp_path / "tied")
    bridge = AutoBridge.from_hf_pretrained(folder)
    exported = dict(bridge.export_hf_weights(bridge.to_megatron_model()))
    assert "lm_head.weight" not in exported and sorted(exported) == sorted(HFCheckpointReader(folder).names())


def test_export_keeps_an_lm_head_the_tied_source_stores(tmp_path):
    folder = make_checkpoint("llama3.2", tmp_path / "tied")
    rewrite_weights(folder, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    bridge = AutoBridge.from_hf_pretrained(folder)
    exported = dict(bridge.export_hf_weights(bridge.to_megatron_model()))
    assert sorted(exported) == sorted(HFCheckpointReader(folder).names())


def test_export_rejects_an_unknown_mode(built):
    bridge, model = built
    with pytest.raises(ValueError, match=r"mode='gather' is not one of "
                                         r"\('consolidate', 'replicate', 'distribute'\)"):
        list(bridge.export_hf_weights(model, mode="gather"))


def test_save_hf_pretrained_writes_a_complete_checkpoint(source, tmp_path):
    folder = copy_of(source, tmp_path, "with-tokenizer")
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(folder)
    bridge = AutoBridge.from_hf_pretrained(folder)
    out = bridge.save_hf_pretrained(bridge.to_megatron_model(), tmp_path / "out", show_progress=False)

    assert out == tmp_path / "out"
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors"} <= files
    assert {p.name for p in folder.iterdir() if p.name.startswith("tokenizer")} <= files
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert (out / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
    reloaded = transformers.AutoTokenizer.from_pretrained(out)
    assert reloaded("hello world")["input_ids"] == tokenizer("hello world")["input_ids"]
    saved, original = HFCheckpointReader(out), HFCheckpointReader(folder)
    assert saved.names() == original.names()
    assert all(torch.equal(saved.get(n), original.get(n)) for n in original.names())
    assert transformers.AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 2
    assert dot_entries(tmp_path) == []


def test_random_model_from_a_config_can_be_saved_and_loaded(tmp_path):
    bridge = AutoBridge.from_hf_config(hf_config("llama"))
    model = bridge.to_megatron_model()
    out = bridge.save_hf_pretrained(model, tmp_path / "random", show_progress=False)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors"]
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out)
    params = dict(global_named_parameters(model[0]))
    assert torch.equal(hf_model.model.layers[1].mlp.down_proj.weight,
                       params["decoder.layers.1.mlp.linear_fc2.weight"])
    assert torch.equal(hf_model.model.embed_tokens.weight, params["embedding.word_embeddings.weight"][:96])


def test_saving_over_an_existing_folder_replaces_it_atomically(built, tmp_path):
    bridge, model = built
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("from an older save")
    bridge.save_hf_pretrained(model, out, show_progress=False)
    assert not (out / "stale.txt").exists()
    assert {"config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    assert dot_entries(tmp_path) == []  # no temporary or old folders left behind


# --- bad input: the model ---------------------------------------------------------------------------
def test_unsupported_architecture_names_it_and_lists_the_supported_ones(tmp_path):
    message = rf"GPTNeoXForCausalLM is not supported\. Supported architectures: {', '.join(SUPPORTED)}\."
    with pytest.raises(ValueError, match=message):
        AutoBridge.from_hf_pretrained(gpt_neox_folder(tmp_path))
    with pytest.raises(ValueError, match=message):
        AutoBridge.from_hf_config(transformers.GPTNeoXConfig(architectures=["GPTNeoXForCausalLM"]))


def test_folder_without_config_json(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"has no config\.json.*Point to the folder that holds config\.json"):
        AutoBridge.from_hf_pretrained(tmp_path)


def test_missing_local_folder_says_it_does_not_exist(tmp_path):
    missing = re.escape(str(tmp_path / "nowhere"))
    with pytest.raises((ValueError, OSError), match=rf"{missing}.* does not exist"):
        AutoBridge.from_hf_pretrained(tmp_path / "nowhere")


def test_custom_code_needs_trust_remote_code(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "my-new-model", "architectures": ["MyNewModelForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_mine.MyConfig"},
    }))
    (tmp_path / "configuration_mine.py").write_text(
        "from transformers import PretrainedConfig\n\nclass MyConfig(PretrainedConfig):\n"
        "    model_type = 'my-new-model'\n")
    with pytest.raises(ValueError, match=r"needs custom code from its repository\. Read that code, then pass "
                                         r"trust_remote_code=True if you trust it"):
        AutoBridge.from_hf_pretrained(tmp_path)
    assert not AutoBridge.can_handle(tmp_path)


@pytest.mark.parametrize("overrides,message", [
    (dict(rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0,
                           "original_max_position_embeddings": 64}), r"rope_type='yarn' is not supported"),
    (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}),
     r"rope_type='dynamic' is not supported"),
], ids=["yarn", "dynamic"])
def test_unsupported_rope_scaling(overrides, message):
    supported = r"Supported rope types: \['default', 'linear', 'llama3'\]\."
    with pytest.raises(ValueError, match=f"{message}.*{supported}"):  # refused before any work
        AutoBridge.from_hf_config(hf_config("llama", **overrides))


def test_unsupported_rope_scaling_in_a_checkpoint(tmp_path):
    folder = make_checkpoint("llama", tmp_path / "yarn", rope_parameters={
        "rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0, "original_max_position_embeddings": 64})
    with pytest.raises(ValueError, match="rope_type='yarn' is not supported"):
        AutoBridge.from_hf_pretrained(folder).to_megatron_model()


@pytest.mark.parametrize("family,overrides,message", [
    ("llama", dict(attention_bias=True),
     r"LlamaConfig with attention_bias=True is not supported.*Use a checkpoint with attention_bias=False"),
    ("llama", dict(mlp_bias=True), r"LlamaConfig with mlp_bias=True is not supported"),
    ("qwen2", dict(use_sliding_window=True),
     r"Qwen2Config with use_sliding_window=True is not supported.*set use_sliding_window=False"),
    ("qwen3", dict(use_sliding_window=True), r"Qwen3Config with use_sliding_window=True is not supported"),
])
def test_unsupported_family_features(family, overrides, message):
    with pytest.raises(ValueError, match=message):
        AutoBridge.from_hf_config(hf_config(family, **overrides)).to_megatron_provider()


@pytest.mark.parametrize("family,overrides,tp,message", [
    ("llama", {}, 3, r"tensor_model_parallel_size=3 does not divide num_attention_heads=4\. "
                     r"Choose a tensor_model_parallel_size that divides it \(for example 2\)"),
    ("llama-mqa", {}, 2, r"tensor_model_parallel_size=2 does not divide num_key_value_heads "
                         r"\(num_query_groups\)=1\. .*\(for example 1\)"),
    ("llama", dict(num_attention_heads=8, num_key_value_heads=4, intermediate_size=130), 4,
     r"tensor_model_parallel_size=4 does not divide intermediate_size \(ffn_hidden_size\)=130\. "
     r".*\(for example 2\)"),
], ids=["heads", "mqa-kv-groups", "ffn"])
def test_tp_that_does_not_divide_names_the_field_and_suggests_a_size(family, overrides, tp, message):
    provider = AutoBridge.from_hf_config(hf_config(family, **overrides)).to_megatron_provider()
    provider.tensor_model_parallel_size = tp
    with pytest.raises(ValueError, match=message):
        provider.finalize()


def test_tp_that_divides_passes_finalize():
    provider = AutoBridge.from_hf_config(hf_config("llama")).to_megatron_provider()
    provider.tensor_model_parallel_size = 2
    provider.finalize()
    assert provider.padded_vocab_size == 256


# --- bad input: from_pretrained arguments -----------------------------------------------------------------
@pytest.mark.parametrize("kwargs,message", [
    (dict(device_map="auto"), r"device_map='auto' is not supported by the bridge: .*set "
                              r"tensor_model_parallel_size / pipeline_model_parallel_size"),
    (dict(attn_implementation="flash_attention_1"),
     r"attn_implementation='flash_attention_1' is not supported.*set attention_backend"),
    (dict(load_in_8bit=True), r"load_in_8bit=True is not supported.*load in bf16/fp16 with torch_dtype="),
    (dict(load_in_4bit=True), r"load_in_4bit=True is not supported"),
    (dict(max_memory={0: "1GB"}), r"max_memory=.* is not supported.*use more ranks"),
])
def test_refused_from_pretrained_kwargs_say_what_to_use(source, kwargs, message):
    with pytest.raises(ValueError, match=message):
        AutoBridge.from_hf_pretrained(source, **kwargs)


@pytest.mark.parametrize("kwargs", [dict(low_cpu_mem_usage=True), dict(use_safetensors=True),
                                    dict(device_map=None), dict(load_in_8bit=False),
                                    dict(local_files_only=True)])
def test_harmless_from_pretrained_kwargs_are_accepted(source, kwargs):
    assert AutoBridge.from_hf_pretrained(source, **kwargs).transformer_config.num_layers == 2


def test_unknown_from_pretrained_kwarg_is_a_type_error(source):
    with pytest.raises(TypeError, match=r"Unknown arguments to from_hf_pretrained: \['not_an_option'\]"):
        AutoBridge.from_hf_pretrained(source, not_an_option=1)


# --- bad input: the weights -------------------------------------------------------------------------------
def test_missing_tensor_is_named(source, tmp_path):
    folder = rewrite_weights(copy_of(source, tmp_path), lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensors \[model\.layers\.1\.mlp\.up_proj\.weight\] "
                                         r"\(1 in all\).*download is complete"):
        AutoBridge.from_hf_pretrained(folder).to_megatron_model()


def test_unexpected_tensor_is_named(source, tmp_path):
    folder = rewrite_weights(copy_of(source, tmp_path),
                             lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(3)}))
    with pytest.raises(ValueError, match=r"unexpected tensors \[model\.layers\.0\.mlp\.extra\.weight\].*"
                                         r"Check that config\.json belongs to these weights"):
        AutoBridge.from_hf_pretrained(folder).to_megatron_model()


def test_config_with_fewer_layers_than_the_weights(source, tmp_path):
    with pytest.raises(ValueError, match=r"unexpected tensors \[model\.layers\.1\..*number of layers"):
        AutoBridge.from_hf_pretrained(source, num_hidden_layers=1).to_megatron_model()


SHAPE_BUGS = "loading.py load_hf_weights checks only the fused Megatron shape, after mapping.to_megatron: "


@pytest.mark.parametrize("name,bad_shape,good_shape", [
    ("model.layers.0.mlp.down_proj.weight", (64, 120), (64, 128)),
    ("model.norm.weight", (32,), (64,)),
    ("lm_head.weight", (200, 64), (96, 64)),
    pytest.param("model.layers.0.self_attn.q_proj.weight", (60, 64), (64, 64)),
    pytest.param("model.layers.0.mlp.up_proj.weight", (128, 60), (128, 64)),
    pytest.param("model.layers.0.self_attn.k_proj.weight", (64, 32), (32, 64)),
    pytest.param("model.embed_tokens.weight", (90, 64), (96, 64)),
], ids=["row", "norm", "vocab-long", "qkv-rows", "gated-cols", "qkv-transposed", "vocab-short"])
def test_wrong_shape_names_the_tensor_and_both_shapes(source, tmp_path, name, bad_shape, good_shape):
    def change(tensors):
        tensors[name] = torch.zeros(bad_shape)

    folder = rewrite_weights(copy_of(source, tmp_path), change)
    with pytest.raises(ValueError, match=re.escape(name)) as info:
        AutoBridge.from_hf_pretrained(folder).to_megatron_model()
    message = str(info.value).replace(" ", "")
    assert str(bad_shape).replace(" ", "") in message or f"has{bad_shape[0]}rows" in message
    assert str(good_shape).replace(" ", "") in message or f"vocab_size={good_shape[0]}" in message


def test_truncated_safetensors_names_the_file(source, tmp_path):
    folder = copy_of(source, tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:-100])
    file = re.escape(str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=rf"Safetensors file {file} is corrupt or truncated"):
        AutoBridge.from_hf_pretrained(folder).to_megatron_model()


def test_index_pointing_outside_the_folder(source, tmp_path):
    folder = copy_of(source, tmp_path)
    names = HFCheckpointReader(folder).names()
    shutil.move(folder / "model.safetensors", tmp_path / "elsewhere.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": dict.fromkeys(names, "../elsewhere.safetensors")}))
    with pytest.raises(ValueError, match=r"points outside the checkpoint folder: "
                                         r"'\.\./elsewhere\.safetensors'"):
        AutoBridge.from_hf_pretrained(folder).to_megatron_model()


def test_pickled_weights_need_allow_pickle(source, tmp_path):
    folder = copy_of(source, tmp_path)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"only has pickled PyTorch weights \(pytorch_model\.bin\).*"
                                         r"pass allow_pickle=True.*convert the checkpoint to safetensors"):
        AutoBridge.from_hf_pretrained(folder).to_megatron_model()

    bridge = AutoBridge.from_hf_pretrained(folder, allow_pickle=True)
    exported = dict(bridge.export_hf_weights(bridge.to_megatron_model()))
    original = HFCheckpointReader(source)
    assert sorted(exported) == sorted(original.names())
    assert all(torch.equal(t, original.get(n)) for n, t in exported.items())


def test_subfolder_reads_config_and_weights_from_it(tmp_path):
    folder = make_checkpoint("llama", tmp_path / "repo" / "model")
    bridge = AutoBridge.from_hf_pretrained(tmp_path / "repo", subfolder="model")
    assert bridge.checkpoint_reader().folder == folder
    assert "model.embed_tokens.weight" in bridge.checkpoint_reader().names()


def test_proxies_is_refused_with_the_fix(source):
    with pytest.raises(ValueError, match="HTTPS_PROXY"):
        AutoBridge.from_hf_pretrained(source, proxies={"https": "http://proxy:3128"})


# --- the export plan ------------------------------------------------------------------------------
def test_the_export_plan_is_computed_once_per_model(source, tmp_path, monkeypatch):
    from lightning_bridge.conversion import exporting

    bridge = AutoBridge.from_hf_pretrained(source)
    model = bridge.to_megatron_model(show_progress=False)
    gathers = []
    all_gather_object = exporting.dist.all_gather_object

    def counted(*args, **kwargs):
        gathers.append(1)
        return all_gather_object(*args, **kwargs)

    monkeypatch.setattr(exporting.dist, "all_gather_object", counted)
    plan = bridge.export_plan(model)
    assert len(gathers) == 1 and bridge.export_plan(model) is plan
    specs = bridge.hf_tensor_specs(model)
    assert bridge.export_destinations(model) == plan.destinations() == dict.fromkeys([s.name for s in specs], 0)
    exported = dict(bridge.export_hf_weights(model))
    bridge.save_hf_pretrained(model, tmp_path / "out", show_progress=False)
    assert len(gathers) == 1  # nothing planned again, behind the caller's back
    assert {s.name: (s.shape, s.dtype) for s in specs} == {n: (tuple(t.shape), t.dtype) for n, t in exported.items()}
    other = bridge.to_megatron_model(show_progress=False)
    assert bridge.export_plan(other) is not plan and len(gathers) == 2  # another model: its own plan
