"""How one Megatron parameter relates to one or more Hugging Face tensors.

A family file lists :class:`WeightMapping` objects: a Megatron name pattern, the HF name
pattern(s) it is made of, and its kind. ``*`` in a pattern stands for a layer (or expert)
number. Each kind knows four things, and nothing about any model family:

- ``to_megatron``: the HF tensors -> the full (unsharded) Megatron tensor;
- ``to_hf``: the full Megatron tensor -> the HF tensors, the exact inverse;
- ``shard`` / ``gather``: the full Megatron tensor <-> this tensor-parallel rank's slice.

Every conversion is a pure re-arrangement of values (concatenation, slicing, padding), so a
round trip is bitwise exact.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from lightning_bridge.conversion.context import ConversionContext


@dataclass(frozen=True)
class WeightMapping:
    """A Megatron parameter pattern and the HF tensor pattern(s) it converts from and to."""

    megatron: str
    hf: str | tuple[str, ...]
    kind: ClassVar[str] = "direct"
    tp_dim: ClassVar[int | None] = None

    @property
    def hf_patterns(self) -> tuple[str, ...]:
        return (self.hf,) if isinstance(self.hf, str) else tuple(self.hf)

    # --- names -------------------------------------------------------------------------------
    def match(self, megatron_name: str) -> tuple[str, ...] | None:
        """The wildcard values if ``megatron_name`` fits this mapping's pattern, else None."""
        found = _compile(self.megatron).fullmatch(megatron_name)
        return found.groups() if found else None

    def match_hf(self, hf_name: str) -> tuple[str, ...] | None:
        for pattern in self.hf_patterns:
            found = _compile(pattern).fullmatch(hf_name)
            if found:
                return found.groups()
        return None

    def hf_names(self, wildcards: Sequence[str]) -> list[str]:
        return [_fill(pattern, wildcards) for pattern in self.hf_patterns]

    def megatron_name(self, wildcards: Sequence[str]) -> str:
        return _fill(self.megatron, wildcards)

    # --- values ------------------------------------------------------------------------------
    def to_megatron(self, hf_tensors: Sequence[torch.Tensor], ctx: ConversionContext) -> torch.Tensor:
        (tensor,) = hf_tensors
        return tensor

    def to_hf(self, megatron_tensor: torch.Tensor, ctx: ConversionContext) -> list[torch.Tensor]:
        return [megatron_tensor]

    def full_shape(self, shard_shape: Sequence[int], tp_size: int) -> tuple[int, ...]:
        """The unsharded Megatron shape of a tensor-parallel rank's ``shard_shape``."""
        shape = list(shard_shape)
        if self.tp_dim is not None:
            shape[self.tp_dim] *= tp_size
        return tuple(shape)

    def shard(self, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
        if self.tp_dim is None or tp_size == 1:
            return full
        return full.chunk(tp_size, dim=self.tp_dim)[tp_rank]

    def gather(self, shards: Sequence[torch.Tensor]) -> torch.Tensor:
        if self.tp_dim is None or len(shards) == 1:
            return shards[0]
        return torch.cat(list(shards), dim=self.tp_dim)

    def __str__(self) -> str:
        return f"{self.kind:>10}: {self.megatron} <- {', '.join(self.hf_patterns)}"


class Replicated(WeightMapping):
    """The same tensor on every tensor-parallel rank (norms, biases of row-parallel layers)."""

    kind = "replicated"


class ColumnParallel(WeightMapping):
    """Split along the output dimension (rows of the weight) across tensor-parallel ranks."""

    kind = "column"
    tp_dim = 0


class RowParallel(WeightMapping):
    """Split along the input dimension (columns of the weight) across tensor-parallel ranks."""

    kind = "row"
    tp_dim = 1


class VocabParallel(WeightMapping):
    """An embedding or output layer: vocabulary rows padded for Megatron, split across ranks."""

    kind = "vocab"
    tp_dim = 0

    def to_megatron(self, hf_tensors, ctx):
        (tensor,) = hf_tensors
        padding = ctx.padded_vocab_size - tensor.shape[0]
        if padding < 0:
            raise ValueError(
                f"{self.hf_patterns[0]} has {tensor.shape[0]} rows but the config says "
                f"vocab_size={ctx.vocab_size}; fix config.json or the checkpoint"
            )
        if padding == 0:
            return tensor
        return torch.cat([tensor, tensor.new_zeros((padding, *tensor.shape[1:]))])

    def to_hf(self, megatron_tensor, ctx):
        return [megatron_tensor[: ctx.vocab_size]]


class QKV(WeightMapping):
    """Separate q, k, v projections <-> Megatron's fused ``linear_qkv``, grouped per KV head.

    Megatron lays the fused rows out per query group g: [q rows of the heads in g; k rows of g;
    v rows of g]. Tensor parallelism splits whole groups, so a plain row split is right.
    Works for weights [rows, hidden] and biases [rows].
    """

    kind = "qkv"
    tp_dim = 0

    def to_megatron(self, hf_tensors, ctx):
        q, k, v = hf_tensors
        groups, per_group = ctx.num_query_groups, ctx.num_attention_heads // ctx.num_query_groups
        head_dim = ctx.kv_channels
        rest = q.shape[1:]
        q = q.reshape(groups, per_group * head_dim, *rest)
        k = k.reshape(groups, head_dim, *rest)
        v = v.reshape(groups, head_dim, *rest)
        return torch.cat([q, k, v], dim=1).reshape(-1, *rest)

    def to_hf(self, megatron_tensor, ctx):
        groups, per_group = ctx.num_query_groups, ctx.num_attention_heads // ctx.num_query_groups
        head_dim = ctx.kv_channels
        rest = megatron_tensor.shape[1:]
        grouped = megatron_tensor.reshape(groups, (per_group + 2) * head_dim, *rest)
        q, k, v = grouped.split([per_group * head_dim, head_dim, head_dim], dim=1)
        return [t.reshape(-1, *rest) for t in (q, k, v)]


class GatedMLP(WeightMapping):
    """Separate gate and up projections <-> Megatron's ``linear_fc1`` = [gate; up].

    Under tensor parallelism each rank holds [gate_i; up_i], so sharding splits gate and up
    separately.
    """

    kind = "gated-mlp"
    tp_dim = 0

    def to_megatron(self, hf_tensors, ctx):
        gate, up = hf_tensors
        return torch.cat([gate, up], dim=0)

    def to_hf(self, megatron_tensor, ctx):
        return list(megatron_tensor.chunk(2, dim=0))

    def shard(self, full, tp_rank, tp_size):
        if tp_size == 1:
            return full
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size)[tp_rank], up.chunk(tp_size)[tp_rank]])

    def gather(self, shards):
        if len(shards) == 1:
            return shards[0]
        gates, ups = zip(*(shard.chunk(2, dim=0) for shard in shards))
        return torch.cat([*gates, *ups])


_PATTERN_CACHE: dict[str, re.Pattern[str]] = {}


def _compile(pattern: str) -> re.Pattern[str]:
    compiled = _PATTERN_CACHE.get(pattern)
    if compiled is None:
        compiled = re.compile(re.escape(pattern).replace(r"\*", r"(\d+)"))
        _PATTERN_CACHE[pattern] = compiled
    return compiled


def _fill(pattern: str, wildcards: Sequence[str]) -> str:
    parts = pattern.split("*")
    if len(parts) - 1 != len(wildcards):
        raise ValueError(f"pattern {pattern!r} needs {len(parts) - 1} values, got {list(wildcards)}")
    out = [parts[0]]
    for value, part in zip(wildcards, parts[1:]):
        out += [str(value), part]
    return "".join(out)


class FusedQKV(QKV):
    """One HF tensor [q; k; v] (Phi-3's ``qkv_proj``, GPT-2's ``c_attn``) <-> ``linear_qkv``.

    The HF rows are all query heads, then all key heads, then all value heads; Megatron groups
    them per query group (see :class:`QKV`). Works for weights and biases.
    """

    kind = "fused-qkv"

    def to_megatron(self, hf_tensors, ctx):
        (fused,) = hf_tensors
        return super().to_megatron(fused.split(_qkv_sizes(ctx)), ctx)

    def to_hf(self, megatron_tensor, ctx):
        return [torch.cat(super().to_hf(megatron_tensor, ctx))]


class FusedGatedMLP(GatedMLP):
    """One HF tensor [gate; up] (Phi-3's ``gate_up_proj``) <-> ``linear_fc1``: the same layout.

    Only the tensor-parallel split differs from a plain row split: each rank holds [gate_i; up_i].
    """

    kind = "fused-gated-mlp"

    def to_megatron(self, hf_tensors, ctx):
        (fused,) = hf_tensors
        return fused

    def to_hf(self, megatron_tensor, ctx):
        return [megatron_tensor]


class _TransposedHF:
    """HF stores the weight as [in, out] (GPT-2's ``Conv1D``), the transpose of ``nn.Linear``."""

    def to_megatron(self, hf_tensors, ctx):
        return super().to_megatron([tensor.t() for tensor in hf_tensors], ctx)

    def to_hf(self, megatron_tensor, ctx):
        return [tensor.t() for tensor in super().to_hf(megatron_tensor, ctx)]


class TransposedColumnParallel(_TransposedHF, ColumnParallel):
    """:class:`ColumnParallel` for an HF ``Conv1D`` weight [in, out]."""

    kind = "column-T"


class TransposedRowParallel(_TransposedHF, RowParallel):
    """:class:`RowParallel` for an HF ``Conv1D`` weight [in, out]."""

    kind = "row-T"


class TransposedFusedQKV(_TransposedHF, FusedQKV):
    """:class:`FusedQKV` for an HF ``Conv1D`` weight [in, q + k + v] (GPT-2's ``c_attn``)."""

    kind = "fused-qkv-T"


def _qkv_sizes(ctx: ConversionContext) -> list[int]:
    """Rows of q, k and v in an HF fused [q; k; v] tensor."""
    kv_rows = ctx.num_query_groups * ctx.kv_channels
    return [ctx.num_attention_heads * ctx.kv_channels, kv_rows, kv_rows]
