"""The parallel mechanics of conversion in one place: names, TP shards, PP/EP ownership.

Megatron numbers the layers of a pipeline stage (or virtual chunk) from 0; a layer's global
number is its ``layer_number - 1``. Every conversion works on global names so that ranks agree on
what a tensor is whatever the layout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The bare GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(module, "module") and isinstance(module.module, torch.nn.Module):
        module = module.module
    return module


def global_named_parameters(chunk: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """(global name, parameter) of a model chunk, layer numbers made global."""
    model = unwrap(chunk)
    layers = model.decoder.layers if getattr(model, "decoder", None) is not None else []
    for name, param in model.named_parameters():
        found = _LAYER.match(name)
        if found:
            global_index = layers[int(found.group(1))].layer_number - 1
            name = f"decoder.layers.{global_index}." + name[found.end():]
        yield name, param


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
        )

    @property
    def coordinates(self) -> tuple[int, int, int]:
        return (self.tp_rank, self.pp_rank, self.dp_rank)


def tp_group() -> dist.ProcessGroup:
    return ps.get_tensor_model_parallel_group()


def pp_group() -> dist.ProcessGroup:
    return ps.get_pipeline_model_parallel_group()


def all_gather_tp(shard: torch.Tensor) -> list[torch.Tensor]:
    """Every tensor-parallel rank's shard, on every rank of the group."""
    group = tp_group()
    shard = shard.contiguous()
    shards = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shards, shard, group=group)
    return shards


def gather_tp_to(shard: torch.Tensor, dst_global: int) -> list[torch.Tensor] | None:
    """Every tensor-parallel rank's shard on ``dst_global`` only (None elsewhere)."""
    group = tp_group()
    shard = shard.contiguous()
    if dist.get_world_size(group) == 1:
        return [shard]
    if dist.get_rank() == dst_global:
        shards = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
        dist.gather(shard, shards, dst=dst_global, group=group)
        return shards
    dist.gather(shard, None, dst=dst_global, group=group)
    return None


def comm_device() -> torch.device:
    """The device collectives use: the current GPU with NCCL, the CPU with gloo."""
    if torch.cuda.is_available() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
