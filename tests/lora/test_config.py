"""Tests for lightning_bridge.lora.config: which LoraConfig settings are taken, which refused and how."""

from __future__ import annotations

import math

import peft
import pytest

from lightning_bridge.lora import LoraSettings


def test_settings_from_lora_config():
    settings = LoraSettings.from_lora_config(peft.LoraConfig(
        r=8, lora_alpha=32, lora_dropout=0.1, target_modules=["q_proj", "v_proj"], use_dora=True,
        init_lora_weights="gaussian", task_type="CAUSAL_LM", base_model_name_or_path="some/model"))
    assert (settings.r, settings.lora_alpha, settings.lora_dropout, settings.use_dora) == (8, 32, 0.1, True)
    assert settings.scaling == 4.0
    rslora = LoraSettings.from_lora_config(peft.LoraConfig(r=16, lora_alpha=8, use_rslora=True,
                                                           target_modules="all-linear"))
    assert rslora.scaling == 8 / math.sqrt(16)


def test_target_matching_is_peft_s():
    names = LoraSettings.from_lora_config(peft.LoraConfig(target_modules=["q_proj", "mlp.c_proj"]))
    assert names.matches("model.layers.3.self_attn.q_proj")
    assert names.matches("transformer.h.0.mlp.c_proj") and not names.matches("transformer.h.0.attn.c_proj")
    assert not names.matches("model.layers.3.self_attn.qq_proj")
    regex = LoraSettings.from_lora_config(peft.LoraConfig(target_modules=r".*\.1\..*(q|v)_proj"))
    assert regex.matches("model.layers.1.self_attn.v_proj") and not regex.matches("model.layers.0.self_attn.v_proj")
    assert LoraSettings.from_lora_config(peft.LoraConfig(target_modules="all-linear")).matches("anything")


@pytest.mark.parametrize("field,value,says", [
    ("modules_to_save", ["lm_head"], "modules_to_save=['lm_head'] (train those modules in full"),
    ("rank_pattern", {"q_proj": 4}, "rank_pattern={'q_proj': 4} (use one r for every target)"),
    ("layers_to_transform", [0], "layers_to_transform=[0] (target every layer"),
    ("lora_bias", True, "lora_bias=True (leave lora_bias=False)"),
    ("bias", "all", "bias='all' (use bias='none'"),
    ("init_lora_weights", "pissa", "init_lora_weights='pissa' (use True, 'gaussian' or False)"),
    ("exclude_modules", ["k_proj"], "exclude_modules="),
])
def test_refused_settings_are_named_with_the_alternative(field, value, says):
    with pytest.raises(ValueError, match="not supported by the Megatron LoRA adapters") as error:
        LoraSettings.from_lora_config(peft.LoraConfig(target_modules=["q_proj"], **{field: value}))
    assert says in str(error.value)


def test_targets_are_required():
    with pytest.raises(ValueError, match="target_modules=None"):
        LoraSettings.from_lora_config(peft.LoraConfig())


def test_only_lora_configs():
    with pytest.raises(TypeError, match="Expected a peft.LoraConfig"):
        LoraSettings.from_lora_config({"r": 8})
