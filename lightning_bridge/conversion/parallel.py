"""The parallel mechanics of conversion in one place: names, TP shards, PP/EP ownership.

Megatron numbers the layers of a pipeline stage (or virtual chunk) from 0; a layer's global
number is its ``layer_number - 1``. Likewise each expert-parallel rank numbers its MoE experts
from 0 (``mlp.experts.local_experts.i``): local expert i on EP rank r is global expert
``r * num_local_experts + i``. Every conversion works on global names so that ranks agree on what
a tensor is whatever the layout.

Expert weights are split by the *expert* tensor-parallel group (``expert_tensor_parallel_size``,
Megatron's default: the tensor-parallel size) and replicated over the expert data-parallel group;
every other weight by the tensor-parallel group and the data-parallel group.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
# Trainable adapters (LoRA, :mod:`lightning_bridge.lora`) live under this name segment; they are no
# part of the HF checkpoint, so conversion leaves them out.
ADAPTER_SEGMENT = ".adapters."
_LOCAL_EXPERT = re.compile(r"\.mlp\.experts\.local_experts\.(\d+)\.")


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The bare GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(module, "module") and isinstance(module.module, torch.nn.Module):
        module = module.module
    return module


def global_named_parameters(chunk: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """(global name, parameter) of a model chunk, layer numbers made global."""
    model = unwrap(chunk)
    for name, param in model.named_parameters():
        yield global_name(model, name), param


def global_named_weights(chunk: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(global name, tensor) of every weight a checkpoint holds: the parameters, then the persistent
    buffers (a router's expert bias, which HF stores as ``e_score_correction_bias``). What
    conversion loads and exports; adapter parameters (:func:`is_adapter_parameter`) are left out."""
    model = unwrap(chunk)
    for name, param in global_named_parameters(model):
        if not is_adapter_parameter(name):
            yield name, param
    state = model.state_dict(keep_vars=True)
    for name, buffer in model.named_buffers():
        if name in state:  # persistent: part of the model's state
            yield global_name(model, name), buffer


def global_name(model: torch.nn.Module, name: str) -> str:
    """The global name of ``model``'s local parameter or buffer ``name``: layer (and expert) numbers
    made global."""
    found = _LAYER.match(name)
    if not found:
        return name
    layer = model.decoder.layers[int(found.group(1))]
    name = f"decoder.layers.{layer.layer_number - 1}." + name[found.end():]
    expert = _LOCAL_EXPERT.search(name)
    if expert:  # the MoE layer knows which global experts it holds
        global_expert = layer.mlp.local_expert_indices[int(expert.group(1))]
        name = f"{name[:expert.start()]}.mlp.experts.local_experts.{global_expert}.{name[expert.end():]}"
    return name


def is_adapter_parameter(name: str) -> bool:
    """Whether a Megatron parameter belongs to a trainable adapter (not to the HF checkpoint)."""
    return ADAPTER_SEGMENT in name


def is_expert_parameter(name: str) -> bool:
    """Whether a (global) Megatron parameter belongs to a MoE expert, sharded by the expert groups."""
    return ".mlp.experts." in name


@dataclass(frozen=True)
class RankLayout:
    """Where this process sits in the parallel grid."""

    rank: int
    world_size: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int
    ep_rank: int = 0
    ep_size: int = 1
    etp_rank: int = 0  # expert tensor-parallel
    etp_size: int = 1
    edp_rank: int = 0  # expert data-parallel

    @classmethod
    def current(cls) -> RankLayout:
        return cls(
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            tp_rank=ps.get_tensor_model_parallel_rank(),
            tp_size=ps.get_tensor_model_parallel_world_size(),
            pp_rank=ps.get_pipeline_model_parallel_rank(),
            pp_size=ps.get_pipeline_model_parallel_world_size(),
            dp_rank=ps.get_data_parallel_rank(),
            dp_size=ps.get_data_parallel_world_size(),
            ep_rank=ps.get_expert_model_parallel_rank(),
            ep_size=ps.get_expert_model_parallel_world_size(),
            etp_rank=ps.get_expert_tensor_parallel_rank(),
            etp_size=ps.get_expert_tensor_parallel_world_size(),
            edp_rank=ps.get_expert_data_parallel_rank(),
        )

    @property
    def coordinates(self) -> tuple[int, int, int]:
        return (self.tp_rank, self.pp_rank, self.dp_rank)

    @property
    def expert_coordinates(self) -> tuple[int, int, int, int]:
        """(expert TP rank, PP rank, EP rank, expert DP rank): where this rank sits for expert weights."""
        return (self.etp_rank, self.pp_rank, self.ep_rank, self.edp_rank)

    def tp_for(self, name: str) -> tuple[int, int]:
        """(rank, size) of the tensor-parallel group that splits parameter ``name``."""
        if is_expert_parameter(name):
            return self.etp_rank, self.etp_size
        return self.tp_rank, self.tp_size


def tp_group() -> dist.ProcessGroup:
    return ps.get_tensor_model_parallel_group()


def tp_group_for(name: str) -> dist.ProcessGroup:
    """The group that splits parameter ``name``: expert tensor-parallel for experts, else tensor-parallel."""
    return ps.get_expert_tensor_parallel_group() if is_expert_parameter(name) else tp_group()


def pp_group() -> dist.ProcessGroup:
    return ps.get_pipeline_model_parallel_group()


def all_gather_tp(shard: torch.Tensor, group: dist.ProcessGroup | None = None) -> list[torch.Tensor]:
    """Every tensor-parallel rank's shard, on every rank of the group."""
    group = group or tp_group()
    shard = shard.contiguous()
    shards = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shards, shard, group=group)
    return shards


def gather_tp_to(shard: torch.Tensor, dst_global: int,
                 group: dist.ProcessGroup | None = None) -> list[torch.Tensor] | None:
    """Every tensor-parallel rank's shard on ``dst_global`` only (None elsewhere)."""
    group = group or tp_group()
    shard = shard.contiguous()
    if dist.get_world_size(group) == 1:
        return [shard]
    if dist.get_rank() == dst_global:
        shards = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
        dist.gather(shard, shards, dst=dst_global, group=group)
        return shards
    dist.gather(shard, None, dst=dst_global, group=group)
    return None


def send_to_rank_zero(full: torch.Tensor | None, src: int, shape: Sequence[int], dtype: torch.dtype,
                      device: torch.device) -> torch.Tensor | None:
    """``full``, assembled on global rank ``src``, on global rank 0 only (sent there when ``src`` is
    another rank); None on every other rank."""
    rank = dist.get_rank()
    if rank == src:
        if src == 0:
            return full
        dist.send(full.contiguous(), dst=0)
        return None
    if rank == 0:
        received = torch.empty(tuple(shape), dtype=dtype, device=device)
        dist.recv(received, src=src)
        return received
    return None


def comm_device() -> torch.device:
    """The device collectives use: the current GPU with NCCL, the CPU with gloo."""
    if torch.cuda.is_available() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
