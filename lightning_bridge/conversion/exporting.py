"""This rank's Megatron model chunks -> full HF tensors, streamed one at a time.

Every rank walks the same globally sorted list of parameters, so collectives are issued in the
same order everywhere (no hangs). For each parameter the pipeline stage that owns it gathers
the tensor-parallel shards, converts to HF names and delivers the result by mode:

- ``consolidate``: to global rank 0; other ranks drain the generator and get nothing;
- ``replicate``: to every rank;
- ``distribute``: to exactly one rank holding the parameter (its pipeline stage, and for a MoE
  expert its expert-parallel rank), round-robin, so ranks share the work.

MoE experts are held by one expert-parallel rank each (see
:mod:`~lightning_bridge.conversion.parallel`); their shards are gathered over the expert
tensor-parallel group and sent on from there.

Only a few tensors exist at a time, whatever the model size.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from lightning_bridge.conversion import parallel
from lightning_bridge.conversion.context import ConversionContext
from lightning_bridge.conversion.mappings import WeightMapping
from lightning_bridge.conversion.parallel import RankLayout, global_named_weights, is_expert_parameter
from lightning_bridge.conversion.registry import MappingRegistry

logger = logging.getLogger(__name__)

ExportMode = Literal["consolidate", "replicate", "distribute"]
EXPORT_MODES = ("consolidate", "replicate", "distribute")


@dataclass(frozen=True)
class ExportTask:
    """One Megatron parameter to export: who owns it, and what HF tensors it becomes."""

    megatron_name: str
    mapping: WeightMapping
    hf_names: tuple[str, ...]
    full_shape: tuple[int, ...]
    dtype: torch.dtype
    owner_pp_rank: int
    destination: int  # global rank receiving it in "distribute" mode (else unused)
    owner_ep_rank: int | None = None  # the expert-parallel rank holding it; None: not an expert

    @property
    def is_expert(self) -> bool:
        return self.owner_ep_rank is not None

    def held_by(self, layout: RankLayout) -> bool:
        """Whether a rank holds (a tensor-parallel shard of) this parameter."""
        same_expert_rank = not self.is_expert or layout.ep_rank == self.owner_ep_rank
        return layout.pp_rank == self.owner_pp_rank and same_expert_rank

    def replica(self, layout: RankLayout) -> int:
        """Which copy of the parameter a holder has: its (expert) data-parallel rank."""
        return layout.edp_rank if self.is_expert else layout.dp_rank

    def tp_rank(self, layout: RankLayout) -> int:
        return layout.etp_rank if self.is_expert else layout.tp_rank


@dataclass(frozen=True)
class ExportPlan:
    """What every rank exports, in which order, and to whom, for one model layout.

    Computed once per model (:meth:`compute`: the one ``all_gather_object`` of :func:`plan_export`)
    and then only read: the HF shapes, the destinations and every export of the same chunks need
    no collective of their own.
    """

    tasks: tuple[ExportTask, ...]
    layouts: tuple[RankLayout, ...]

    @classmethod
    def compute(cls, chunks: Sequence[torch.nn.Module], registry: MappingRegistry, *,
                hf_order: Sequence[str] | None = None, keep_tied: Sequence[str] = ()) -> ExportPlan:
        """The plan of this rank's ``chunks`` (collective: every rank calls it)."""
        tasks, layouts = plan_export(chunks, registry, hf_order=hf_order, keep_tied=keep_tied)
        return cls(tuple(tasks), tuple(layouts))

    def destinations(self) -> dict[str, int]:
        """HF tensor name -> the global rank that receives it in ``mode="distribute"``."""
        return {name: task.destination for task in self.tasks for name in task.hf_names}

    def hf_tensors(self, ctx: ConversionContext) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """Name, shape and Megatron dtype of every HF tensor an export yields, in export order
        (shapes from the mappings applied to meta tensors: no data, no collective)."""
        tensors = []
        for task in self.tasks:
            meta = torch.empty(task.full_shape, dtype=task.dtype, device="meta")
            for name, tensor in zip(task.hf_names, task.mapping.to_hf(meta, ctx)):
                tensors.append((name, tuple(tensor.shape), task.dtype))
        return tensors


def plan_export(
    chunks: Sequence[torch.nn.Module],
    registry: MappingRegistry,
    *,
    hf_order: Sequence[str] | None = None,
    keep_tied: Sequence[str] = (),
) -> tuple[list[ExportTask], list[RankLayout]]:
    """The global, identically ordered export plan, and every rank's :class:`RankLayout`.

    One ``all_gather_object`` of parameter names and shapes: cheap, and it makes every rank see
    the whole model whatever the pipeline and expert layout.
    """
    layout = RankLayout.current()
    local = []
    for chunk in chunks:
        for name, param in global_named_weights(chunk):
            expert = is_expert_parameter(name)
            first_copy = (layout.edp_rank, layout.etp_rank) if expert else (layout.dp_rank, layout.tp_rank)
            if first_copy == (0, 0):
                local.append((name, tuple(param.shape), str(param.dtype).removeprefix("torch.")))
    gathered: list = [None] * layout.world_size
    dist.all_gather_object(gathered, (layout, local))
    layouts = [entry[0] for entry in gathered]

    owners: dict[str, tuple[int, int | None, tuple[int, ...], str]] = {}
    for owner, entries in gathered:
        for name, shape, dtype in entries:
            ep_rank = owner.ep_rank if is_expert_parameter(name) else None
            owners.setdefault(name, (owner.pp_rank, ep_rank, shape, dtype))

    for name in keep_tied:  # tied and not a parameter of its own (PP=1): export from its twin
        if name not in owners and registry.tied.get(name) in owners:
            owners[name] = owners[registry.tied[name]]
    tasks = []
    for name, (pp_rank, ep_rank, shard_shape, dtype) in owners.items():
        if name in registry.tied and name not in keep_tied:
            continue  # exported once, through the parameter it is tied to
        found = registry.megatron_to_hf_lookup(name)
        if found is None:
            raise ValueError(f"No weight mapping for Megatron parameter {name!r}; cannot export it.")
        mapping, wildcards = found
        full_shape = mapping.full_shape(shard_shape, layout.tp_for(name)[1])
        tasks.append((name, mapping, tuple(mapping.hf_names(wildcards)), full_shape,
                      getattr(torch, dtype), pp_rank, ep_rank))

    tasks.sort(key=_order_key(hf_order))
    plan = []
    per_stage_count: dict[int, int] = {}
    for name, mapping, hf_names, full_shape, dtype, pp_rank, ep_rank in tasks:
        task = ExportTask(name, mapping, hf_names, full_shape, dtype, pp_rank, -1, ep_rank)
        holders = [rank for rank, where in enumerate(layouts) if task.held_by(where)]
        k = per_stage_count.get(pp_rank, 0)
        per_stage_count[pp_rank] = k + 1
        plan.append(dataclasses.replace(task, destination=holders[k % len(holders)]))
    return plan, layouts


def export_hf_weights(
    chunks: Sequence[torch.nn.Module],
    registry: MappingRegistry,
    ctx: ConversionContext,
    *,
    mode: ExportMode = "consolidate",
    hf_order: Sequence[str] | None = None,
    keep_tied: Sequence[str] = (),
    dtypes: dict[str, torch.dtype] | None = None,
    cpu: bool = True,
    show_progress: bool = False,
    plan: ExportPlan | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, tensor)`` pairs that this rank receives under ``mode``.

    Every rank must drain the generator: it contains collectives. ``plan`` is the chunks'
    :class:`ExportPlan` when the caller has it (else it is computed here).
    """
    if mode not in EXPORT_MODES:
        raise ValueError(f"mode={mode!r} is not one of {EXPORT_MODES}")
    layout = RankLayout.current()
    if plan is None:
        plan = ExportPlan.compute(chunks, registry, hf_order=hf_order, keep_tied=keep_tied)
    plan, layouts = plan.tasks, plan.layouts
    local = {name: param for chunk in chunks for name, param in global_named_weights(chunk)}
    device = parallel.comm_device()
    dtypes = {} if dtypes is None else dtypes
    position = {name: i for i, name in enumerate(hf_order or ())}
    for task in tqdm(plan, desc="Exporting HF weights", unit="tensor",
                     disable=not show_progress or layout.rank != 0):
        full = _deliver(task, local, layout, layouts, mode, device, registry.tied)
        if full is None:
            continue
        converted = zip(task.hf_names, task.mapping.to_hf(full, ctx))
        for hf_name, tensor in sorted(converted, key=lambda item: position.get(item[0], 0)):
            tensor = tensor.to(dtypes.get(hf_name, tensor.dtype)).contiguous()
            if cpu:
                tensor = to_host(tensor)
            logger.debug("exported %s -> %s (%s)", task.megatron_name, hf_name, task.mapping.kind)
            yield hf_name, tensor


def _deliver(task: ExportTask, local: dict[str, torch.Tensor], layout: RankLayout,
             layouts: Sequence[RankLayout], mode: ExportMode,
             device: torch.device, tied: dict[str, str]) -> torch.Tensor | None:
    """The full Megatron tensor of ``task`` on the ranks that receive it under ``mode``.

    The holders of a parameter are the ranks of its pipeline stage (and, for an expert, of its
    expert-parallel rank); each replica of it is split over a tensor-parallel group (the expert
    tensor-parallel group for experts), which is gathered first.
    """
    holder = task.held_by(layout)
    group = parallel.tp_group_for(task.megatron_name)
    if mode == "distribute":
        if not holder or task.replica(layout) != task.replica(layouts[task.destination]):
            return None
        shards = parallel.gather_tp_to(_shard(local, task, device, tied), task.destination, group)
        return task.mapping.gather(shards) if shards is not None else None

    # the first replica's tensor-parallel rank 0 assembles the full tensor
    root = next(rank for rank, where in enumerate(layouts)
                if task.held_by(where) and task.replica(where) == 0 and task.tp_rank(where) == 0)
    if mode == "consolidate":
        full = None
        if holder and task.replica(layout) == 0:
            shards = parallel.gather_tp_to(_shard(local, task, device, tied), root, group)
            full = task.mapping.gather(shards) if shards is not None else None
        return parallel.send_to_rank_zero(full, root, task.full_shape, task.dtype, device)

    # replicate: every holder gathers its tensor-parallel group, then the rest receive a copy.
    if holder:
        shards = parallel.all_gather_tp(_shard(local, task, device, tied), group)
        full = task.mapping.gather(shards).contiguous()
    else:
        full = torch.empty(task.full_shape, dtype=task.dtype, device=device)
    if task.is_expert:
        if layout.ep_size > 1 or layout.pp_size > 1:  # experts live on a subset of ranks
            dist.broadcast(full, src=root)
    elif layout.pp_size > 1:  # along each pipeline group, from the owning stage
        src = next(rank for rank, where in enumerate(layouts) if where.pp_rank == task.owner_pp_rank
                   and where.tp_rank == layout.tp_rank and where.dp_rank == layout.dp_rank)
        dist.broadcast(full, src=src, group=parallel.pp_group())
    return full


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A host copy. From a GPU it lands in pinned memory: torch's caching host allocator reuses
    the blocks of tensors the consumer has dropped, so steady-state copies run at DMA speed."""
    if not tensor.is_cuda:
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor)
    return host


def _shard(local: dict[str, torch.Tensor], task: ExportTask, device: torch.device,
           tied: dict[str, str]) -> torch.Tensor:
    name = task.megatron_name if task.megatron_name in local else tied[task.megatron_name]
    return local[name].detach().to(device)


def _order_key(hf_order: Sequence[str] | None):
    """Sort by position in the HF checkpoint when given, else by Megatron model order."""
    position = {name: i for i, name in enumerate(hf_order or ())}

    def key(task):
        name, _, hf_names = task[0], task[1], task[2]
        if position:
            return (min(position.get(n, len(position)) for n in hf_names), name)
        return (_model_order(name), name)

    return key


def _model_order(name: str) -> tuple:
    parts = name.split(".")
    if parts[0] == "embedding":
        return (0, 0)
    if parts[0] == "decoder" and parts[1] == "layers":
        return (1, int(parts[2]))
    if parts[0] == "decoder":
        return (2, 0)
    return (3, 0)
