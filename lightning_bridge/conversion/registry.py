"""The lookup table from Megatron parameter names to their :class:`WeightMapping`."""

from __future__ import annotations

import itertools
from collections.abc import Container, Iterable, Sequence

from lightning_bridge.conversion.mappings import WeightMapping

# Transformer Engine fuses the layer norm into the following linear layer; the local spec
# keeps it separate. A mapping written for one name serves the other.
TE_NAME_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}
# A layer wrapped by an adapter (LoRA, :mod:`lightning_bridge.lora`) keeps the original module as
# ``base_layer``; its weights convert as the original's.
WRAPPED_SEGMENT = ".base_layer."


class MappingRegistry:
    """All weight mappings of one model, searchable by Megatron or HF name."""

    def __init__(self, mappings: Iterable[WeightMapping], *, tied: dict[str, str] | None = None):
        self._mappings = list(mappings)
        # Megatron names whose values are another parameter's (tied embeddings).
        self.tied = dict(tied or {})

    def get_all_mappings(self) -> list[WeightMapping]:
        """Every mapping, in the family file's order."""
        return list(self._mappings)

    def megatron_to_hf_lookup(self, megatron_name: str) -> tuple[WeightMapping, tuple[str, ...]] | None:
        """The mapping of a global Megatron parameter name and its wildcard values, or None."""
        name = canonical_megatron_name(megatron_name)
        for mapping in self._mappings:
            wildcards = mapping.match(name)
            if wildcards is not None:
                return mapping, wildcards
        return None

    def hf_to_megatron_lookup(self, hf_name: str) -> tuple[WeightMapping, tuple[str, ...]] | None:
        """The mapping an HF tensor name belongs to and its wildcard values, or None."""
        for mapping in self._mappings:
            wildcards = mapping.match_hf(hf_name)
            if wildcards is not None:
                return mapping, wildcards
        return None

    def tied_stored_in(self, names: Container[str]) -> list[str]:
        """Tied Megatron parameters whose own HF tensors ``names`` holds anyway."""
        stored = []
        for name in self.tied:
            found = self.megatron_to_hf_lookup(name)
            if found and all(hf in names for hf in found[0].hf_names(found[1])):
                stored.append(name)
        return stored

    def expected_hf_names(self, wildcard_ranges: Sequence[int]) -> set[str]:
        """Every HF name the full model has, filling ``*`` n with ``range(wildcard_ranges[n])``."""
        names: set[str] = set()
        for mapping in self._mappings:
            if mapping.megatron in self.tied:
                continue
            count = mapping.megatron.count("*")
            for values in itertools.product(*(range(n) for n in wildcard_ranges[:count])):
                if not mapping.applies_to([str(v) for v in values]):
                    continue
                names.update(mapping.hf_names([str(v) for v in values]))
        return names

    def __repr__(self) -> str:
        return "MappingRegistry(\n" + "\n".join(f"  {m}" for m in self._mappings) + "\n)"


def canonical_megatron_name(name: str) -> str:
    """The local-spec spelling of a Megatron parameter name (TE names are translated, an adapter
    wrapper's ``base_layer`` seen through)."""
    name = name.replace(WRAPPED_SEGMENT, ".")
    for te_suffix, local_suffix in TE_NAME_ALIASES.items():
        if name.endswith(te_suffix):
            return name[: -len(te_suffix)] + local_suffix
    return name
