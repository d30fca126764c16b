"""LoRA / DoRA on Megatron's tensor-parallel linear layers, one adapter per HF projection.

:class:`LoraLinear` wraps a ``ColumnParallelLinear`` or ``RowParallelLinear`` (kept as
``base_layer``, frozen) and returns ``(output + delta, bias)`` in Megatron's convention. It holds
one :class:`ProjectionAdapter` per targeted HF module (``adapters.<name>``): a fused Megatron layer
such as ``linear_qkv`` carries separate ``q_proj``/``k_proj``/``v_proj`` adapters, each writing its
output rows only, so targeting q and v leaves k's rows untouched.

Where a projection's rows sit in the layer's local output is not written per family: it is found
by pushing row numbers (float64) through the same weight mapping and tensor-parallel split the
base weight uses (:func:`projection_layouts`). The mappings are pure re-arrangements, so this
covers grouped q/k/v, [gate; up], HF-fused tensors and GPT-2's transposed ``Conv1D`` alike.

Tensor parallelism, with ``y = base(x) + scaling * B A dropout(x)``:

- column-parallel target (output rows split): ``A`` [r, in] replicated, ``B`` [rows held, r]
  split like the base weight's rows. ``A x`` passes Megatron's ``copy_to_tensor_model_parallel_region``
  (``gather_from_sequence_parallel_region`` under sequence parallelism) before ``B``, so the
  backward sums the partial gradients of ``A x`` over the group: ``A``'s gradient is whole on every
  rank and the input's gradient is right;
- row-parallel target (input split): ``A`` [r, in held] split like the base weight's columns,
  ``A x`` summed over the group with ``reduce_from_tensor_model_parallel_region``
  (``reduce_scatter_to_sequence_parallel_region`` under sequence parallelism, as the base output
  is), ``B`` [out, r] replicated.

Parameters whose gradient covers only this rank's part of the sequence under sequence parallelism
(column ``A``; row ``B`` and magnitude) are marked ``sequence_parallel`` so Megatron's
``finalize_model_grads`` sums them over the tensor-parallel group; split parameters carry
Megatron's tensor-parallel attributes (the gradient norm counts them once).

DoRA follows PEFT's ``DoraLinearLayer``: ``m / ||W + scaling B A||`` per output row, the norm
detached, ``(m/n - 1) * base_result + (m/n) * scaling * B A dropout(x)`` where ``base_result`` is
the layer's output without bias, recomputed on the dropped-out input while training with dropout.
The norm of a row-parallel weight is summed over the group.

Dropout on an input that differs across tensor-parallel ranks (row-parallel, or sequence
parallel) draws from Megatron's tensor-parallel RNG; on a replicated input, from the default one
(the same mask on every rank of the group, which the gradients above need).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear, \
    set_tensor_model_parallel_attributes
from megatron.core.transformer.module import MegatronModule

from lightning_bridge.conversion.context import ConversionContext
from lightning_bridge.conversion.mappings import WeightMapping
from lightning_bridge.lora.config import LoraSettings

PARALLEL_LINEAR = (ColumnParallelLinear, RowParallelLinear)


@dataclass(frozen=True)
class ProjectionLayout:
    """Where one HF projection's weight rows and columns sit in a tensor-parallel rank's layer.

    ``rows[i]`` is the HF output row written at ``positions[i]`` of the local output; ``columns``
    are the HF input columns of the local input, in local order (None: the whole input).
    ``fan_in_fan_out``: the HF weight is stored [in, out] (``Conv1D``).
    """

    hf_module: str
    out_features: int
    in_features: int
    rows: torch.Tensor
    positions: torch.Tensor
    columns: torch.Tensor | None
    fan_in_fan_out: bool


def projection_layouts(mapping: WeightMapping, hf_modules: Sequence[str], ctx: ConversionContext,
                       full_shape: Sequence[int], tp_rank: int, tp_size: int) -> list[ProjectionLayout]:
    """Every HF projection of a Megatron weight [out, in], located on ``tp_rank`` by pushing row (and
    column) numbers through ``mapping`` exactly as the base weight is converted and split."""
    out_full, in_full = full_shape
    out_ids = torch.arange(out_full, dtype=torch.float64).reshape(out_full, 1)
    hf_out = mapping.to_hf(out_ids, ctx)
    local_out = mapping.shard(out_ids, tp_rank, tp_size) if mapping.tp_dim == 0 else out_ids
    position_of = _inverse(local_out.reshape(-1), out_full)

    columns = None
    in_features = in_full
    if mapping.tp_dim == 1:  # the input is split: find this rank's HF columns, in local order
        in_ids = torch.arange(in_full, dtype=torch.float64).reshape(1, in_full)
        (hf_in,) = mapping.to_hf(in_ids, ctx)
        megatron_of_hf = hf_in.reshape(-1).long()
        local_in = mapping.shard(in_ids, tp_rank, tp_size).reshape(-1).long()
        hf_of_megatron = torch.empty_like(megatron_of_hf)
        hf_of_megatron[megatron_of_hf] = torch.arange(len(megatron_of_hf))
        columns = hf_of_megatron[local_in]
    layouts = []
    for hf_module, ids in zip(hf_modules, hf_out):
        fan_in_fan_out = ids.dim() == 2 and ids.shape[0] == 1 and ids.shape[1] > 1
        megatron_rows = ids.reshape(-1).long()
        positions = position_of[megatron_rows]
        held = positions >= 0
        layouts.append(ProjectionLayout(hf_module, len(megatron_rows), in_features,
                                        rows=torch.arange(len(megatron_rows))[held],
                                        positions=positions[held], columns=columns,
                                        fan_in_fan_out=fan_in_fan_out))
    return layouts


def _inverse(local_ids: torch.Tensor, size: int) -> torch.Tensor:
    """Global index -> local position (-1 where not held)."""
    position = torch.full((size,), -1, dtype=torch.long)
    position[local_ids.long()] = torch.arange(len(local_ids))
    return position


class ProjectionAdapter(torch.nn.Module):
    """One HF projection's LoRA factors (and DoRA magnitude), this rank's part of them.

    ``lora_A`` [r, in held], ``lora_B`` [rows held, r], ``lora_magnitude_vector`` [rows held]
    (DoRA); ``rows``/``positions``/``columns`` (non-persistent buffers) place them.
    """

    def __init__(self, layout: ProjectionLayout, settings: LoraSettings, *, column_parallel: bool,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.hf_module = layout.hf_module
        self.out_features, self.in_features = layout.out_features, layout.in_features
        self.fan_in_fan_out = layout.fan_in_fan_out
        self.column_parallel = column_parallel
        self.scaling = settings.scaling
        self.use_dora = settings.use_dora
        in_held = self.in_features if layout.columns is None else len(layout.columns)
        self.register_buffer("rows", layout.rows.to(device), persistent=False)
        self.register_buffer("positions", layout.positions.to(device), persistent=False)
        self.register_buffer("columns", None if layout.columns is None else layout.columns.to(device),
                             persistent=False)
        self.lora_A = torch.nn.Parameter(torch.zeros(settings.r, in_held, dtype=dtype, device=device))
        self.lora_B = torch.nn.Parameter(torch.zeros(len(layout.rows), settings.r, dtype=dtype, device=device))
        self.lora_magnitude_vector = (torch.nn.Parameter(torch.ones(len(layout.rows), dtype=dtype, device=device))
                                      if settings.use_dora else None)
        self.dropout = torch.nn.Dropout(settings.lora_dropout) if settings.lora_dropout > 0 else torch.nn.Identity()

    # --- this rank's part of the full HF tensors ---------------------------------------------
    def local_part(self, kind: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of the full HF ``lora_A`` / ``lora_B`` / ``lora_magnitude_vector``."""
        if kind == "lora_A":
            return full if self.columns is None else full[:, self.columns.to(full.device)]
        return full[self.rows.to(full.device)]

    @property
    def split_kinds(self) -> tuple[str, ...]:
        """The tensors split over the tensor-parallel group (the others are replicated)."""
        return ("lora_B", "lora_magnitude_vector") if self.column_parallel else ("lora_A",)

    def named_adapter_tensors(self) -> list[tuple[str, torch.nn.Parameter]]:
        tensors = [("lora_A", self.lora_A), ("lora_B", self.lora_B)]
        if self.lora_magnitude_vector is not None:
            tensors.append(("lora_magnitude_vector", self.lora_magnitude_vector))
        return tensors

    @torch.no_grad()
    def load_full(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy this rank's part of full HF tensors (``lora_A``, ``lora_B``, ``lora_magnitude_vector``)."""
        for kind, param in self.named_adapter_tensors():
            part = self.local_part(kind, tensors[kind])
            if tuple(part.shape) != tuple(param.shape):
                raise ValueError(f"{self.hf_module}.{kind}: the adapter tensor gives shape {tuple(part.shape)} "
                                 f"here, the model expects {tuple(param.shape)}: check r and the base model.")
            param.copy_(part)


class LoraLinear(MegatronModule):
    """A frozen Megatron parallel linear layer (``base_layer``) plus LoRA/DoRA adapters.

    ``forward(x) -> (output, bias)`` as the base layer. A base layer with ``linear_forward`` and
    ``finish_output`` (a post-norm) gets the adapters' output added between the two.

    ``state_dict()`` and ``sharded_state_dict()`` name the base layer's tensors as the un-adapted
    model does (``linear_qkv.weight``, not ``linear_qkv.base_layer.weight``) and the adapters'
    ``linear_qkv.adapters.<projection>.lora_A`` (``lora_B``, ``lora_magnitude_vector``);
    ``load_state_dict`` takes either spelling of the base keys.
    """

    def __init__(self, base_layer: torch.nn.Module, layouts: Sequence[ProjectionLayout], settings: LoraSettings):
        super().__init__(config=base_layer.config)
        if not isinstance(base_layer, PARALLEL_LINEAR):
            raise TypeError("LoRA wraps ColumnParallelLinear or RowParallelLinear, not "
                            f"{type(base_layer).__name__}.")
        if getattr(base_layer, "gather_output", False) or not getattr(base_layer, "input_is_parallel", True):
            raise ValueError("LoRA adapts parallel linear layers whose output (column-parallel) or input "
                             "(row-parallel) stays split over tensor parallelism, as in Megatron's GPT layers; "
                             "this one gathers its output or scatters its input.")
        self.base_layer = base_layer
        self.column_parallel = isinstance(base_layer, ColumnParallelLinear)
        self.sequence_parallel = bool(getattr(base_layer, "sequence_parallel", False))
        weight = base_layer.weight
        self.adapters = torch.nn.ModuleDict()
        for layout in layouts:
            self.adapters[layout.hf_module.rsplit(".", 1)[-1]] = ProjectionAdapter(
                layout, settings, column_parallel=self.column_parallel, dtype=weight.dtype, device=weight.device)
        for adapter in self.adapters.values():
            self._mark(adapter)
        positions = torch.cat([adapter.positions for adapter in self.adapters.values()])
        self.register_buffer("positions", positions, persistent=False)
        self._register_state_dict_hook(_base_keys_unwrapped)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Accept the base layer's keys as the un-adapted model names them (``<prefix>weight``)."""
        for key in list(state_dict):
            rest = key[len(prefix):]
            if key.startswith(prefix) and not rest.startswith(("base_layer.", "adapters.")):
                state_dict[f"{prefix}base_layer.{rest}"] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def _mark(self, adapter: ProjectionAdapter) -> None:
        """Megatron's tensor-parallel and sequence-parallel marks on the adapter's parameters."""
        tp_size = ps.get_tensor_model_parallel_world_size()
        for kind, param in adapter.named_adapter_tensors():
            split = kind in adapter.split_kinds and tp_size > 1
            set_tensor_model_parallel_attributes(param, is_parallel=split,
                                                 dim=1 if kind == "lora_A" else 0, stride=1)
            seq_partial = (kind == "lora_A") if self.column_parallel else (kind != "lora_A")
            if self.sequence_parallel and seq_partial:
                param.sequence_parallel = True

    # --- distributed checkpoints -------------------------------------------------------------
    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """The base layer's sharded tensors under its own keys (as without adapters, so a checkpoint of
        the base model loads into the wrapped one's base), plus ``adapters.<projection>.<kind>``.

        Adapter tensors are stored in HF order (layout independent) when this rank holds one block of
        rows (columns) per rank, as for separate q/k/v or gate/up projections; an HF-fused
        projection (``qkv_proj``, ``c_attn``, ``gate_up_proj``) split over TP holds several blocks,
        and is stored per tensor-parallel size (its key ends in ``.tp<N>``), so it resumes at the same
        TP size and a checkpoint of another TP size fails to load rather than load wrong.
        """
        from megatron.core.utils import (
            make_sharded_tensor_for_checkpoint,
            make_tp_sharded_tensor_for_checkpoint,
        )

        sharded = self.base_layer.sharded_state_dict(prefix=prefix, sharded_offsets=sharded_offsets,
                                                     metadata=metadata)
        tp_rank, tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
        for name, adapter in self.adapters.items():
            for kind, param in adapter.named_adapter_tensors():
                key = f"{prefix}adapters.{name}.{kind}"
                if kind not in adapter.split_kinds or tp_size == 1:
                    sharded[key] = make_sharded_tensor_for_checkpoint(param, key, prepend_offsets=sharded_offsets)
                    continue
                axis = 1 if kind == "lora_A" else 0
                index = adapter.columns if kind == "lora_A" else adapter.rows
                held = param.shape[axis]
                one_block = torch.equal(index.cpu(), torch.arange(tp_rank * held, (tp_rank + 1) * held))
                checkpoint_key = key if one_block else f"{key}.tp{tp_size}"
                sharded[key] = make_tp_sharded_tensor_for_checkpoint(param, checkpoint_key, tp_axis=axis,
                                                                     prepend_offsets=sharded_offsets)
        return sharded

    # --- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs):
        base = self.base_layer
        finish = getattr(base, "finish_output", None)
        linear = base.linear_forward if finish is not None and hasattr(base, "linear_forward") else base
        output, bias = linear(x, *args, **kwargs)
        if not self.adapters:
            return finish(output, bias) if finish is not None else (output, bias)
        pure = output
        if base.bias is not None and not base.skip_bias_add:
            pure = output - base.bias  # PEFT's base_result - bias
        deltas = [self._delta(adapter, x, pure) for adapter in self.adapters.values()]
        delta = output.new_zeros(output.shape).index_copy(-1, self.positions, torch.cat(deltas, dim=-1))
        output = output + delta
        return finish(output, bias) if finish is not None else (output, bias)

    def _delta(self, adapter: ProjectionAdapter, x: torch.Tensor, pure: torch.Tensor) -> torch.Tensor:
        """One projection's addition to its output rows."""
        dropping = self.training and not isinstance(adapter.dropout, torch.nn.Identity)
        with self._dropout_rng():
            dropped = adapter.dropout(x)
        lora_result = F.linear(self._sum_over_group(F.linear(dropped, adapter.lora_A)), adapter.lora_B)
        if not adapter.use_dora:
            return lora_result * adapter.scaling
        weight = self.base_layer.weight.index_select(0, adapter.positions)
        if dropping:  # PEFT recomputes the base result on the dropped-out input
            base_result = self._base_linear(dropped, weight)
        else:
            base_result = pure.index_select(-1, adapter.positions)
        weight_norm = self.weight_norm(adapter, weight).detach()
        mag_norm_scale = (adapter.lora_magnitude_vector / weight_norm).view(1, -1)
        return (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * adapter.scaling

    def _sum_over_group(self, a: torch.Tensor) -> torch.Tensor:
        """``A x`` [.., r] made whole: see the module docstring."""
        if self.column_parallel:
            if self.sequence_parallel:
                return tensor_parallel.gather_from_sequence_parallel_region(a)
            return tensor_parallel.copy_to_tensor_model_parallel_region(a)
        if self.sequence_parallel:
            return tensor_parallel.reduce_scatter_to_sequence_parallel_region(a)
        return tensor_parallel.reduce_from_tensor_model_parallel_region(a)

    def _base_linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``x W^T`` for some rows of the base weight, with the base layer's communication."""
        weight = weight.detach()
        if self.column_parallel:
            if self.sequence_parallel:
                x = tensor_parallel.gather_from_sequence_parallel_region(x)
            else:
                x = tensor_parallel.copy_to_tensor_model_parallel_region(x)
            return F.linear(x, weight)
        return self._sum_over_group(F.linear(x, weight))

    def _dropout_rng(self):
        split_input = (not self.column_parallel and ps.get_tensor_model_parallel_world_size() > 1) \
            or self.sequence_parallel
        return tensor_parallel.get_cuda_rng_tracker().fork() if split_input and self.training \
            else contextlib.nullcontext()

    @torch.no_grad()
    def weight_norm(self, adapter: ProjectionAdapter, weight: torch.Tensor | None = None) -> torch.Tensor:
        """PEFT's ``||W + scaling B A||`` per output row, for the rows this rank holds."""
        if weight is None:
            weight = self.base_layer.weight.index_select(0, adapter.positions)
        lora_weight = adapter.lora_B @ adapter.lora_A
        combined = weight + adapter.scaling * lora_weight
        if self.column_parallel or ps.get_tensor_model_parallel_world_size() == 1:
            return torch.linalg.norm(combined, dim=1).to(combined.dtype)
        squares = combined.pow(2).sum(dim=1)
        dist.all_reduce(squares, group=ps.get_tensor_model_parallel_group())
        return squares.sqrt().to(combined.dtype)

    # --- initialisation ----------------------------------------------------------------------
    @torch.no_grad()
    def reset_adapter_parameters(self, settings: LoraSettings, seed: int) -> None:
        """PEFT's initialisation, drawn for the full HF tensors from ``seed`` and the module name, so
        every layout gets the same adapter; then DoRA magnitudes from the weights."""
        for adapter in self.adapters.values():
            generator = torch.Generator().manual_seed(_stable_seed(seed, adapter.hf_module))
            full_a = torch.empty(settings.r, adapter.in_features)
            full_b = torch.zeros(adapter.out_features, settings.r)
            if settings.init_lora_weights == "gaussian":
                torch.nn.init.normal_(full_a, std=1 / settings.r, generator=generator)
            else:
                torch.nn.init.kaiming_uniform_(full_a, a=math.sqrt(5), generator=generator)
            if settings.init_lora_weights is False:  # nn.Linear's default: B non-zero
                torch.nn.init.kaiming_uniform_(full_b, a=math.sqrt(5), generator=generator)
            adapter.lora_A.copy_(adapter.local_part("lora_A", full_a))
            adapter.lora_B.copy_(adapter.local_part("lora_B", full_b))
            if adapter.lora_magnitude_vector is not None:
                adapter.lora_magnitude_vector.copy_(self.weight_norm(adapter))


def _base_keys_unwrapped(module, state_dict, prefix, local_metadata):
    """``state_dict()`` names the base layer's tensors as the un-adapted model does."""
    for key in [k for k in state_dict if k.startswith(f"{prefix}base_layer.")]:
        state_dict[prefix + key[len(f"{prefix}base_layer."):]] = state_dict.pop(key)
    return state_dict


def _stable_seed(seed: int, name: str) -> int:
    import zlib

    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)
