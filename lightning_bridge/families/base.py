"""What a model family declares, and the shared machinery that turns it into a provider.

A family file subclasses :class:`ModelBridge` and fills in tables:

- ``architectures``: the HF ``architectures`` names it handles;
- ``config_fields``: ``TransformerConfig`` / provider field <- HF config attribute;
- ``fixed_config``: provider fields that are constant for the family;
- ``mappings(hf_config)``: the weight table (:mod:`lightning_bridge.conversion.mappings`);
- ``check_supported(hf_config)``: refuse, by name, HF features it cannot reproduce exactly;
- ``provider_class``: the provider (a ``TransformerConfig``) it fills, ``MLAModelProvider`` for
  multi-latent attention.

Nothing in the engine knows a family by name.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig

from lightning_bridge.conversion.mappings import WeightMapping
from lightning_bridge.conversion.registry import MappingRegistry
from lightning_bridge.provider import GPTModelProvider, precision_fields

logger = logging.getLogger(__name__)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation: HF's ``gelu_new`` and ``gelu_pytorch_tanh``.

    Not Megatron's ``openai_gelu``: megatron-core compiles that with ``torch.compile``.
    """
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu, "relu": F.relu,
               "gelu_new": gelu_tanh, "gelu_pytorch_tanh": gelu_tanh}
# rope types whose whole effect is a different set of frequencies (no attention scaling).
FREQUENCY_ONLY_ROPE = ("default", "linear", "llama3")
TIED_OUTPUT = {"output_layer.weight": "embedding.word_embeddings.weight"}
# megatron-core's local spec runs without Transformer Engine or Apex: its fused kernels are off for
# every family (they need those libraries, and the unfused paths compute exactly what HF does).
UNFUSED_KERNELS = {"bias_activation_fusion": False, "bias_dropout_fusion": False, "masked_softmax_fusion": False,
                   "persist_layer_norm": False, "apply_rope_fusion": False}


class ModelBridge:
    """One model family: its HF architectures, config translation and weight mappings."""

    architectures: ClassVar[tuple[str, ...]] = ()
    provider_class: ClassVar[type[GPTModelProvider]] = GPTModelProvider
    config_fields: ClassVar[dict[str, str]] = {}
    fixed_config: ClassVar[dict[str, Any]] = {}
    # HF tensors that carry no weights of their own (old rotary caches and the like).
    ignored_hf_patterns: ClassVar[tuple[str, ...]] = ("*.rotary_emb.inv_freq",)

    def __init__(self, hf_config: PretrainedConfig):
        self.hf_config = hf_config

    # --- what a family declares --------------------------------------------------------------
    def mappings(self) -> list[WeightMapping]:
        raise NotImplementedError

    def check_supported(self) -> None:
        """Raise ValueError naming any HF feature this family cannot reproduce exactly."""

    def computed_config(self) -> dict[str, Any]:
        """Provider fields that need a little arithmetic on the HF config."""
        cfg = self.hf_config
        return {
            "activation_func": hf_activation(cfg),
            "rotary_base": rope_parameters(cfg).get("rope_theta", 10000.0),
            "rotary_inv_freq": _rotary_inv_freq(cfg),
            "params_dtype": hf_dtype(cfg),
            "share_embeddings_and_output_weights": bool(getattr(cfg, "tie_word_embeddings", False)),
        }

    # --- shared machinery --------------------------------------------------------------------
    def mapping_registry(self) -> MappingRegistry:
        """The family's weight table as a searchable registry."""
        tied = TIED_OUTPUT if getattr(self.hf_config, "tie_word_embeddings", False) else {}
        return MappingRegistry(self.mappings(), tied=tied)

    def provider(self, **overrides: Any) -> GPTModelProvider:
        """A provider whose fields come from the HF config, then from ``overrides``."""
        self.check_supported()
        kwargs: dict[str, Any] = dict(UNFUSED_KERNELS)
        for field, attribute in self.config_fields.items():
            value = getattr(self.hf_config, attribute, None)
            if value is not None:
                kwargs[field] = value
        kwargs.update(self.fixed_config)
        kwargs.update(self.computed_config())
        kwargs.update(overrides)
        if kwargs.get("params_dtype") in (torch.bfloat16, torch.float16) and "bf16" not in overrides:
            kwargs = {**precision_fields(kwargs["params_dtype"]), **kwargs}
        return self.provider_class(**kwargs)

    def wildcard_ranges(self) -> Sequence[int]:
        """How many values each ``*`` of a mapping pattern takes: layers, then experts."""
        return (self.hf_config.num_hidden_layers, getattr(self.hf_config, "num_local_experts", 0)
                or getattr(self.hf_config, "num_experts", 0) or 0)


def hf_activation(cfg: PretrainedConfig, attribute: str = "hidden_act"):
    """The activation function the HF config names in ``attribute`` (families name it differently)."""
    name = getattr(cfg, attribute, "silu")
    if name not in ACTIVATIONS:
        raise ValueError(f"{attribute}={name!r} is not supported; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def hf_dtype(cfg: PretrainedConfig) -> torch.dtype:
    """The HF config's dtype (float32 when it names none)."""
    dtype = getattr(cfg, "dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def rope_parameters(cfg: PretrainedConfig) -> dict[str, Any]:
    """The config's rope parameters, from ``rope_parameters`` or the older ``rope_theta`` + ``rope_scaling``."""
    params = getattr(cfg, "rope_parameters", None) or {}
    if not params and getattr(cfg, "rope_theta", None) is not None:
        params = {"rope_theta": cfg.rope_theta, **(getattr(cfg, "rope_scaling", None) or {})}
    return dict(params)


def _rotary_inv_freq(cfg: PretrainedConfig) -> torch.Tensor | None:
    """HF's own rope frequencies when scaling changes them; None for plain rope (Megatron's own)."""
    params = rope_parameters(cfg)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type not in FREQUENCY_ONLY_ROPE:
        raise ValueError(
            f"rope_type={rope_type!r} is not supported: Megatron's rotary embedding cannot "
            f"reproduce it exactly. Supported rope types: {list(FREQUENCY_ONLY_ROPE)}."
        )
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[rope_type](cfg, torch.device("cpu"))
    if attention_factor != 1.0:
        raise ValueError(f"rope_type={rope_type!r} with attention scaling {attention_factor} is not supported.")
    return inv_freq.float()
