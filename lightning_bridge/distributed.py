"""Start torch.distributed and Megatron's parallel state when the caller has not.

A plain ``python script.py`` gets a one-rank group; under ``torchrun`` (or any launcher that sets
``RANK``/``WORLD_SIZE``/``MASTER_ADDR``) the environment's world. gloo on CPU, NCCL on GPU.
"""

from __future__ import annotations

import logging
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from lightning_bridge.runtime import cpu as cpu_runtime

logger = logging.getLogger(__name__)


def initialize_distributed(timeout_minutes: int = 30) -> None:
    """Initialise the default process group from the environment (or as one rank) if needed."""
    cpu_runtime.activate()
    if dist.is_initialized():
        return
    use_cuda = torch.cuda.is_available()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        init_method = "env://"
    else:
        rank, world_size = 0, 1
        init_method = f"tcp://127.0.0.1:{_free_port()}"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
    dist.init_process_group(
        backend="nccl" if use_cuda else "gloo",
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=timedelta(minutes=timeout_minutes),
    )
    logger.debug("initialised torch.distributed: rank %d of %d", rank, world_size)


def initialize_model_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: int | None = None,
    context_parallel_size: int = 1,
    expert_model_parallel_size: int = 1,
    expert_tensor_parallel_size: int | None = None,
    seed: int = 1234,
) -> None:
    """Initialise Megatron's parallel groups for this layout, or check they match it."""
    initialize_distributed()
    world_size = dist.get_world_size()
    model_parallel = tensor_model_parallel_size * pipeline_model_parallel_size * context_parallel_size
    if world_size % model_parallel:
        raise ValueError(
            f"The world size {world_size} is not divisible by tensor_model_parallel_size "
            f"({tensor_model_parallel_size}) x pipeline_model_parallel_size "
            f"({pipeline_model_parallel_size}) x context_parallel_size ({context_parallel_size}) "
            f"= {model_parallel}. Launch a multiple of {model_parallel} processes, or change the sizes."
        )
    data_parallel = world_size // model_parallel
    # MoE experts have their own grid: expert TP x EP x PP x expert DP = the world.
    expert_tp = expert_tensor_parallel_size or tensor_model_parallel_size
    expert_grid = expert_tp * expert_model_parallel_size * pipeline_model_parallel_size
    if world_size % expert_grid:
        raise ValueError(
            f"The world size {world_size} is not divisible by expert_tensor_parallel_size ({expert_tp}) x "
            f"expert_model_parallel_size ({expert_model_parallel_size}) x pipeline_model_parallel_size "
            f"({pipeline_model_parallel_size}) = {expert_grid}. Launch a multiple of {expert_grid} "
            "processes, or choose a smaller expert_model_parallel_size."
        )
    if ps.model_parallel_is_initialized():
        current = {
            "tensor_model_parallel_size": ps.get_tensor_model_parallel_world_size(),
            "pipeline_model_parallel_size": ps.get_pipeline_model_parallel_world_size(),
            "virtual_pipeline_model_parallel_size": ps.get_virtual_pipeline_model_parallel_world_size(),
            "context_parallel_size": ps.get_context_parallel_world_size(),
            "expert_model_parallel_size": ps.get_expert_model_parallel_world_size(),
            "expert_tensor_parallel_size": ps.get_expert_tensor_parallel_world_size(),
        }
        wanted = dict(zip(current, (tensor_model_parallel_size, pipeline_model_parallel_size,
                                    virtual_pipeline_model_parallel_size, context_parallel_size,
                                    expert_model_parallel_size, expert_tp)))
        different = [f"{k}={wanted[k]} (initialised: {current[k]})" for k in current if current[k] != wanted[k]]
        if different:
            raise ValueError(
                "Megatron's parallel state is already initialised with TP x PP = "
                f"({current['tensor_model_parallel_size']}, {current['pipeline_model_parallel_size']}), but this "
                f"model asks for ({tensor_model_parallel_size}, {pipeline_model_parallel_size}): "
                f"{', '.join(different)}. Call megatron.core.parallel_state.destroy_model_parallel() first, "
                "or use the same sizes."
            )
        return
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        context_parallel_size=context_parallel_size,
        expert_model_parallel_size=expert_model_parallel_size,
        expert_tensor_parallel_size=expert_tensor_parallel_size,
    )
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random.model_parallel_cuda_manual_seed(seed)
    logger.debug(
        "initialised Megatron parallel state: TP=%d PP=%d DP=%d EP=%d ETP=%d",
        tensor_model_parallel_size, pipeline_model_parallel_size, data_parallel,
        expert_model_parallel_size, expert_tp,
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
