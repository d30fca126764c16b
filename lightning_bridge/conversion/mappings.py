"""How one Megatron parameter relates to one or more Hugging Face tensors.

A family file lists :class:`WeightMapping` objects: a Megatron name pattern, the HF name
pattern(s) it is made of, and its kind. ``*`` in a pattern stands for a layer (or expert)
number. Each kind knows four things, and nothing about any model family:

- ``to_megatron``: the HF tensors -> the full (unsharded) Megatron tensor;
- ``to_hf``: the full Megatron tensor -> the HF tensors, the exact inverse;
- ``shard`` / ``gather``: the full Megatron tensor <-> this tensor-parallel rank's slice.

Loading uses ``load_shard``, by definition ``shard(to_megatron(...))`` copied into the parameter;
the fusing kinds write their parts straight into the parameter instead, so no full tensor is
built (on a CPU that temporary cost as much as the copy itself).

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
    # The layers (the first ``*``) the mapping applies to; None: every layer. A model whose layers
    # differ (dense MLPs in the first layers of a MoE model) restricts the mappings of each kind.
    layers: frozenset[int] | None = None
    kind: ClassVar[str] = "direct"
    tp_dim: ClassVar[int | None] = None

    @property
    def hf_patterns(self) -> tuple[str, ...]:
        return (self.hf,) if isinstance(self.hf, str) else tuple(self.hf)

    # --- names -------------------------------------------------------------------------------
    def match(self, megatron_name: str) -> tuple[str, ...] | None:
        """The wildcard values if ``megatron_name`` fits this mapping's pattern, else None."""
        found = _compile(self.megatron).fullmatch(megatron_name)
        return found.groups() if found and self.applies_to(found.groups()) else None

    def match_hf(self, hf_name: str) -> tuple[str, ...] | None:
        for pattern in self.hf_patterns:
            found = _compile(pattern).fullmatch(hf_name)
            if found and self.applies_to(found.groups()):
                return found.groups()
        return None

    def applies_to(self, wildcards: Sequence[str]) -> bool:
        """Whether the mapping covers the layer of these wildcard values (see ``layers``)."""
        return self.layers is None or not wildcards or int(wildcards[0]) in self.layers

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

    def load_shard(self, param: torch.Tensor, hf_tensors: Sequence[torch.Tensor], ctx: ConversionContext,
                   tp_rank: int, tp_size: int) -> None:
        """Overwrite ``param`` with ``shard(to_megatron(hf_tensors), tp_rank, tp_size)``, all of it."""
        _copy_whole(param, self.shard(self.to_megatron(hf_tensors, ctx), tp_rank, tp_size))

    def _parts(self, hf_tensors: Sequence[torch.Tensor], ctx: ConversionContext) -> list[torch.Tensor]:
        """The HF tensors as the parts a fusing kind writes in place (q, k, v; gate, up): split
        when HF fuses them, transposed when HF stores ``Conv1D`` weights."""
        return list(hf_tensors)

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

    def load_shard(self, param, hf_tensors, ctx, tp_rank, tp_size):
        (tensor,) = hf_tensors
        if tensor.shape[0] > ctx.padded_vocab_size or ctx.padded_vocab_size % tp_size:
            super().load_shard(param, hf_tensors, ctx, tp_rank, tp_size)  # its error, or its uneven split
            return
        rows = ctx.padded_vocab_size // tp_size
        first = tp_rank * rows
        real = max(0, min(tensor.shape[0] - first, rows))  # rows of this shard that are not padding
        _check_shape(param, (rows, *tensor.shape[1:]))
        _copy_whole(param[:real], tensor[first:first + real])
        param[real:].zero_()


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

    def load_shard(self, param, hf_tensors, ctx, tp_rank, tp_size):
        groups, per_group = ctx.num_query_groups, ctx.num_attention_heads // ctx.num_query_groups
        if groups % tp_size or not param.is_contiguous():
            super().load_shard(param, hf_tensors, ctx, tp_rank, tp_size)
            return
        q, k, v = self._parts(hf_tensors, ctx)
        head_dim, rest = ctx.kv_channels, q.shape[1:]
        local = groups // tp_size  # tensor parallelism splits whole query groups
        mine = slice(tp_rank * local, (tp_rank + 1) * local)
        _check_shape(param, (local * (per_group + 2) * head_dim, *rest))
        q_rows, k_rows, v_rows = param.view(local, (per_group + 2) * head_dim, *rest).split(
            [per_group * head_dim, head_dim, head_dim], dim=1)
        _copy_whole(q_rows, q.reshape(groups, per_group * head_dim, *rest)[mine])
        _copy_whole(k_rows, k.reshape(groups, head_dim, *rest)[mine])
        _copy_whole(v_rows, v.reshape(groups, head_dim, *rest)[mine])


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

    def load_shard(self, param, hf_tensors, ctx, tp_rank, tp_size):
        gate, up = self._parts(hf_tensors, ctx)
        if gate.shape[0] % tp_size or gate.shape != up.shape:
            super().load_shard(param, hf_tensors, ctx, tp_rank, tp_size)
            return
        rows = gate.shape[0] // tp_size
        _check_shape(param, (2 * rows, *gate.shape[1:]))
        mine = slice(tp_rank * rows, (tp_rank + 1) * rows)
        _copy_whole(param[:rows], gate[mine])
        _copy_whole(param[rows:], up[mine])


_PATTERN_CACHE: dict[str, re.Pattern[str]] = {}


def _compile(pattern: str) -> re.Pattern[str]:
    compiled = _PATTERN_CACHE.get(pattern)
    if compiled is None:
        compiled = re.compile(re.escape(pattern).replace(r"\*", r"(\d+)"))
        _PATTERN_CACHE[pattern] = compiled
    return compiled


def _check_shape(param: torch.Tensor, shape: Sequence[int]) -> None:
    if tuple(param.shape) != tuple(shape):
        raise ValueError(
            f"the converted tensor has shape {tuple(shape)} but the Megatron parameter has "
            f"{tuple(param.shape)}: the family's mapping table is wrong for this configuration. "
            "Please report it with your config.json."
        )


def _copy_whole(param: torch.Tensor, tensor: torch.Tensor) -> None:
    """``param.copy_(tensor)`` that refuses to broadcast: every element of ``param`` is written."""
    _check_shape(param, tensor.shape)
    param.copy_(tensor)


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

    def _parts(self, hf_tensors, ctx):
        (fused,) = hf_tensors
        return list(fused.split(_qkv_sizes(ctx)))


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

    def _parts(self, hf_tensors, ctx):
        (fused,) = hf_tensors
        return list(fused.chunk(2, dim=0))


class _TransposedHF:
    """HF stores the weight as [in, out] (GPT-2's ``Conv1D``), the transpose of ``nn.Linear``."""

    def to_megatron(self, hf_tensors, ctx):
        return super().to_megatron([tensor.t() for tensor in hf_tensors], ctx)

    def to_hf(self, megatron_tensor, ctx):
        return [tensor.t() for tensor in super().to_hf(megatron_tensor, ctx)]

    def _parts(self, hf_tensors, ctx):
        return super()._parts([tensor.t() for tensor in hf_tensors], ctx)


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
