"""Put LoRA adapters on this rank's Megatron model chunks and freeze everything else.

The targets are found from the model's own layers: every ``ColumnParallelLinear`` /
``RowParallelLinear`` whose weight has a mapping in the family's table is a candidate, known by
its HF projections (the mapping's HF tensors ``<module>.weight``). Each pipeline stage wraps only
its own layers, so adapters live on the stage that owns the layer.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from lightning_bridge.conversion.context import ConversionContext
from lightning_bridge.conversion.mappings import WeightMapping
from lightning_bridge.conversion.parallel import (
    RankLayout,
    global_name,
    is_adapter_parameter,
    is_expert_parameter,
    unwrap,
)
from lightning_bridge.conversion.registry import MappingRegistry
from lightning_bridge.lora.config import ALL_LINEAR, LoraSettings
from lightning_bridge.lora.layers import PARALLEL_LINEAR, LoraLinear, projection_layouts

# Megatron modules LoRA does not adapt yet: the embedding and the output layer.
NOT_ADAPTED = ("embedding.", "output_layer")
LINEAR_WEIGHTS = ("linear_qkv.weight", "linear_proj.weight", "linear_fc1.weight", "linear_fc2.weight")


@dataclass(frozen=True)
class Candidate:
    """A Megatron linear layer that LoRA can adapt, with its HF projection names."""

    parent: torch.nn.Module
    attribute: str
    module: torch.nn.Module
    megatron_name: str  # global, without ".weight"
    mapping: WeightMapping
    hf_modules: tuple[str, ...]


def apply_lora(chunks: Sequence[torch.nn.Module], settings: LoraSettings, registry: MappingRegistry,
               ctx: ConversionContext, wildcard_ranges: Sequence[int], *, seed: int = 0) -> list[str]:
    """Wrap the targeted layers of ``chunks`` in :class:`LoraLinear`, freeze every other parameter.

    Returns the HF module names adapted on this rank. Raises ValueError for targets it refuses (see
    :mod:`lightning_bridge.lora.config`) or that match nothing on the model; the check uses the
    whole model's names (from the mapping table and ``wildcard_ranges``, the family's counts of
    layers and experts), so every pipeline stage agrees.
    """
    if any(hasattr(chunk, "ddp_config") for chunk in chunks):
        raise ValueError("Apply LoRA before wrapping the model in Megatron's DistributedDataParallel "
                         "(build it with provider(wrap_with_ddp=False)): DDP sizes its gradient buffers for the "
                         "parameters that require grad when it is built.")
    if any(isinstance(module, LoraLinear) for chunk in chunks for module in unwrap(chunk).modules()):
        raise ValueError("This model already has LoRA adapters; build a fresh model to apply another config.")
    check_targets(settings, registry, wildcard_ranges)
    layout = RankLayout.current()
    adapted = []
    for candidate in list(_candidates(chunks, registry)):
        hf_modules = [m for m in candidate.hf_modules if settings.matches(m)]
        if not hf_modules:
            continue
        if is_expert_parameter(candidate.megatron_name + ".weight"):
            raise ValueError(_expert_message(hf_modules))
        weight = candidate.module.weight
        tp_rank, tp_size = layout.tp_for(candidate.megatron_name)
        full_shape = candidate.mapping.full_shape(weight.shape, tp_size)
        layouts = [found for found in projection_layouts(candidate.mapping, candidate.hf_modules, ctx, full_shape,
                                                         tp_rank, tp_size) if found.hf_module in hf_modules]
        wrapped = LoraLinear(candidate.module, layouts, settings)
        setattr(candidate.parent, candidate.attribute, wrapped)
        wrapped.reset_adapter_parameters(settings, seed)
        adapted.extend(hf_modules)
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            param.requires_grad_(is_adapter_parameter(name))
    return adapted


def adapter_layers(chunks: Sequence[torch.nn.Module]) -> Iterator[tuple[str, LoraLinear]]:
    """(global Megatron module name, layer) of every :class:`LoraLinear` in ``chunks``."""
    for chunk in chunks:
        model = unwrap(chunk)
        for name, module in model.named_modules():
            if isinstance(module, LoraLinear):
                yield global_name(model, name + ".weight").removesuffix(".weight"), module


def check_targets(settings: LoraSettings, registry: MappingRegistry, wildcard_ranges: Sequence[int]) -> None:
    """Refuse targets LoRA cannot adapt, and entries matching no module, naming them."""
    linear, experts, other = _hf_modules_by_kind(registry, wildcard_ranges)
    if settings.target_modules == ALL_LINEAR:
        if experts:
            raise ValueError("target_modules='all-linear' on a mixture-of-experts model would adapt its expert "
                             "layers, which LoRA does not support yet (attention and dense layers only). "
                             "List the attention modules instead, e.g. ['q_proj', 'k_proj', 'v_proj', 'o_proj'].")
        return
    for entry in settings.entries():
        if any(entry in settings.matching_entries(name) for name in experts):
            raise ValueError(_expert_message([entry]))
        hits = [name for name in linear if entry in settings.matching_entries(name)]
        refused = [name for name in other if entry in settings.matching_entries(name)]
        if refused:
            raise ValueError(f"target_modules entry {entry!r} selects {refused[0]}: LoRA on embeddings and the "
                             "output layer is not supported yet. Target the linear layers of the transformer "
                             "blocks only.")
        if not hits:
            names = sorted({name.rsplit(".", 1)[-1] for name in linear})
            raise ValueError(f"target_modules entry {entry!r} matches no linear layer of this model. Its linear "
                             f"modules are {names} (or 'all-linear').")


def targeted_hf_modules(settings: LoraSettings, registry: MappingRegistry,
                        wildcard_ranges: Sequence[int]) -> set[str]:
    """The HF modules of the whole model that ``settings`` adapt (no model needed, no collective)."""
    linear, _, _ = _hf_modules_by_kind(registry, wildcard_ranges)
    return {name for name in linear if settings.matches(name)}


def _hf_modules_by_kind(registry: MappingRegistry,
                        wildcard_ranges: Sequence[int]) -> tuple[set[str], set[str], set[str]]:
    """Every HF module of the model with a weight: adaptable linear layers, expert layers (and
    routers), the rest (embeddings, output layer, norms)."""
    linear, experts, other = set(), set(), set()
    for name in registry.expected_hf_names(wildcard_ranges):
        found = registry.hf_to_megatron_lookup(name)
        if found is None or not name.endswith(".weight"):
            continue
        module, megatron = name.removesuffix(".weight"), found[0].megatron
        if any(part in megatron for part in (".mlp.experts.", ".mlp.shared_experts.", ".mlp.router.")):
            experts.add(module)
        elif megatron.endswith(LINEAR_WEIGHTS) and not megatron.startswith(NOT_ADAPTED):
            linear.add(module)
        else:
            other.add(module)
    return linear, experts, other


def _expert_message(entries) -> str:
    return (f"target_modules {list(entries)} select mixture-of-experts layers, which LoRA does not support yet: "
            "attention and dense MLP layers only. Target the attention modules (q_proj, k_proj, v_proj, "
            "o_proj) instead.")


def _candidates(chunks: Sequence[torch.nn.Module], registry: MappingRegistry) -> Iterator[Candidate]:
    for chunk in chunks:
        model = unwrap(chunk)
        for parent_name, parent in list(model.named_modules()):
            for attribute, module in list(parent.named_children()):
                if not isinstance(module, PARALLEL_LINEAR):
                    continue
                local = f"{parent_name}.{attribute}" if parent_name else attribute
                name = global_name(model, local + ".weight").removesuffix(".weight")
                if name.startswith(NOT_ADAPTED):
                    continue
                found = registry.megatron_to_hf_lookup(name + ".weight")
                if found is None:
                    continue
                mapping, wildcards = found
                hf_names = mapping.hf_names(wildcards)
                if not all(n.endswith(".weight") for n in hf_names):
                    continue
                yield Candidate(parent, attribute, module, name, mapping,
                                tuple(n.removesuffix(".weight") for n in hf_names))
