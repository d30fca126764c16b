"""HF checkpoint -> this rank's Megatron model chunks, tensor by tensor, with no collectives.

Each rank reads only the HF tensors its own parameters need, builds the full Megatron tensor
(fusing q/k/v or gate/up, padding the vocabulary), keeps its tensor-parallel slice and copies it
in. With expert parallelism a rank's parameters name only its own experts (global expert
numbers, see :mod:`~lightning_bridge.conversion.parallel`), so it reads only those. Nothing is
gathered, so loading scales with the number of ranks.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

import torch
from tqdm.auto import tqdm

from lightning_bridge.conversion.context import ConversionContext
from lightning_bridge.conversion.parallel import RankLayout, global_named_parameters
from lightning_bridge.conversion.registry import MappingRegistry

logger = logging.getLogger(__name__)


class TensorSource(Protocol):
    """What loading needs of a checkpoint: names, shapes and lazily read tensors."""

    def names(self) -> list[str]: ...

    def __contains__(self, name: str) -> bool: ...

    def get(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor: ...


def check_checkpoint_names(source: TensorSource, registry: MappingRegistry, expected: set[str],
                           ignored: Sequence[str] = ()) -> None:
    """Fail with the names when the checkpoint lacks tensors the model needs, or holds extra ones."""
    present = set(source.names())
    tied_hf = {
        name
        for megatron in registry.tied
        for mapping in registry.get_all_mappings() if mapping.megatron == megatron
        for name in mapping.hf_patterns
    }
    missing = sorted(expected - present)
    unexpected = sorted(n for n in present - expected if n not in tied_hf and not _ignored(n, ignored))
    problems = []
    if missing:
        problems.append(f"missing tensors {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors {_short(unexpected)}")
    if problems:
        raise ValueError(
            "The checkpoint does not match its config.json: " + "; ".join(problems) + ". "
            "Check that config.json belongs to these weights (same architecture, number of layers, "
            "attention_bias, tie_word_embeddings) and that the download is complete."
        )


def load_hf_weights(
    chunks: Sequence[torch.nn.Module],
    source: TensorSource,
    registry: MappingRegistry,
    ctx: ConversionContext,
    *,
    show_progress: bool = False,
) -> None:
    """Copy this rank's slice of every HF tensor into the parameters of ``chunks``."""
    layout = RankLayout.current()
    params = [(name, param) for chunk in chunks for name, param in global_named_parameters(chunk)]
    stored_tied = registry.tied_stored_in(source)
    for name, param in tqdm(params, desc="Loading HF weights", unit="tensor", disable=not show_progress):
        if name in registry.tied and name not in stored_tied:
            name_in_checkpoint = registry.tied[name]  # tied: the checkpoint has one copy
        else:
            name_in_checkpoint = name
        found = registry.megatron_to_hf_lookup(name_in_checkpoint)
        if found is None:
            raise ValueError(
                f"No weight mapping for Megatron parameter {name!r}: the model family's mapping "
                f"table is incomplete for this configuration. Please report it with your config.json."
            )
        mapping, wildcards = found
        hf_names = mapping.hf_names(wildcards)
        tp_rank, tp_size = layout.tp_for(name)  # experts: the expert tensor-parallel group
        expected_full = mapping.full_shape(param.shape, tp_size)
        expected = [tuple(t.shape) for t in mapping.to_hf(torch.empty(expected_full, device="meta"), ctx)]
        hf_tensors = [source.get(hf_name, device=param.device) for hf_name in hf_names]
        found_shapes = [tuple(t.shape) for t in hf_tensors]
        if found_shapes != expected:
            wrong = [f"{n}: checkpoint {f}, config expects {e}"
                     for n, f, e in zip(hf_names, found_shapes, expected) if f != e]
            raise ValueError(
                f"Shape mismatch for {'; '.join(wrong)}. config.json and the weights disagree: check "
                "hidden_size, num_attention_heads, num_key_value_heads, head_dim, intermediate_size and vocab_size."
            )
        full = mapping.to_megatron(hf_tensors, ctx)
        shard = mapping.shard(full, tp_rank, tp_size)
        with torch.no_grad():
            param.copy_(shard)
        logger.debug("loaded %s <- %s (%s)", name, ", ".join(hf_names), mapping.kind)


def _ignored(name: str, patterns: Sequence[str]) -> bool:
    import fnmatch

    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _short(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}] ({len(names)} in all)"
