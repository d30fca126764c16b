"""Adapter tensors in PEFT's names, out of and into this rank's Megatron chunks; merged weights.

PEFT names a LoRA adapter's tensors ``base_model.model.<HF module>.lora_A.weight`` [r, in],
``...lora_B.weight`` [out, r] and, for DoRA, ``...lora_magnitude_vector`` [out]. Each adapter here
is one HF module's, so export only gathers tensor-parallel parts (rows of ``B`` and the magnitude
of a column-parallel layer, columns of ``A`` of a row-parallel one, placed by the layer's
``rows``/``columns``) and import only slices: both bitwise exact, whatever the layout.

Like the weight export (:mod:`lightning_bridge.conversion.exporting`), every rank walks one
globally sorted list (one ``all_gather_object`` of names and shapes), so collectives come in the
same order everywhere: every rank must drain :func:`export_adapter_weights`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lightning_bridge.conversion import parallel
from lightning_bridge.conversion.exporting import to_host
from lightning_bridge.conversion.parallel import RankLayout
from lightning_bridge.lora.apply import adapter_layers
from lightning_bridge.lora.layers import ProjectionAdapter

PEFT_PREFIX = "base_model.model."
KINDS = ("lora_A", "lora_B", "lora_magnitude_vector")


def peft_name(hf_module: str, kind: str) -> str:
    """PEFT's name of an adapter tensor: ``lora_A``/``lora_B`` end in ``.weight``, the magnitude not."""
    suffix = "" if kind == "lora_magnitude_vector" else ".weight"
    return f"{PEFT_PREFIX}{hf_module}.{kind}{suffix}"


def parse_peft_name(name: str) -> tuple[str, str] | None:
    """``(HF module, kind)`` of a PEFT adapter tensor name (``.default`` adapter names accepted)."""
    found = re.fullmatch(rf"{re.escape(PEFT_PREFIX)}(.+)\.(lora_A|lora_B|lora_magnitude_vector)"
                         r"(?:\.default)?(?:\.weight)?", name)
    return (found.group(1), found.group(2)) if found else None


@dataclass(frozen=True)
class AdapterTensor:
    """One adapter tensor of the whole model: its PEFT name, owner stage and full shape."""

    name: str
    hf_module: str
    kind: str
    owner_pp_rank: int
    full_shape: tuple[int, ...]
    dtype: torch.dtype
    split: bool  # split over the tensor-parallel group (else replicated)
    fan_in_fan_out: bool


def local_adapters(chunks: Sequence[torch.nn.Module]) -> dict[str, ProjectionAdapter]:
    """HF module name -> this rank's :class:`ProjectionAdapter`."""
    return {adapter.hf_module: adapter
            for _, layer in adapter_layers(chunks) for adapter in layer.adapters.values()}


@dataclass(frozen=True)
class AdapterPlan:
    """Every adapter tensor of the whole model in one order, and every rank's layout."""

    tensors: tuple[AdapterTensor, ...]
    layouts: tuple[RankLayout, ...]

    @classmethod
    def compute(cls, chunks: Sequence[torch.nn.Module]) -> AdapterPlan:
        """The plan of this rank's ``chunks`` (collective: every rank calls it)."""
        layout = RankLayout.current()
        local = []
        if (layout.dp_rank, layout.tp_rank) == (0, 0):
            for hf_module, adapter in local_adapters(chunks).items():
                for kind, param in adapter.named_adapter_tensors():
                    r = adapter.lora_A.shape[0]
                    full = {"lora_A": (r, adapter.in_features), "lora_B": (adapter.out_features, r),
                            "lora_magnitude_vector": (adapter.out_features,)}[kind]
                    split = kind in adapter.split_kinds and layout.tp_size > 1
                    local.append(AdapterTensor(peft_name(hf_module, kind), hf_module, kind, layout.pp_rank, full,
                                               param.dtype, split, adapter.fan_in_fan_out))
        gathered: list = [None] * layout.world_size
        dist.all_gather_object(gathered, (layout, local))
        tensors = {t.name: t for _, entries in gathered for t in entries}
        ordered = sorted(tensors.values(), key=lambda t: (_natural(t.hf_module), KINDS.index(t.kind)))
        return cls(tuple(ordered), tuple(where for where, _ in gathered))

    def root(self, task: AdapterTensor) -> int:
        """The global rank assembling ``task``: its stage's first data- and tensor-parallel rank."""
        return next(rank for rank, where in enumerate(self.layouts)
                    if where.pp_rank == task.owner_pp_rank and where.tp_rank == 0 and where.dp_rank == 0)


def export_adapter_weights(chunks: Sequence[torch.nn.Module], *, mode: str = "consolidate", cpu: bool = True,
                           dtype: torch.dtype | None = None,
                           plan: AdapterPlan | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(PEFT name, full tensor)`` on global rank 0 (``mode="consolidate"``) or on every rank
    (``"replicate"``). Every rank must drain it."""
    if mode not in ("consolidate", "replicate"):
        raise ValueError(f"mode={mode!r}: adapters export with 'consolidate' or 'replicate'.")
    layout = RankLayout.current()
    plan = AdapterPlan.compute(chunks) if plan is None else plan
    adapters = local_adapters(chunks)
    device = parallel.comm_device()
    for task in plan.tensors:
        root = plan.root(task)
        full = None
        if layout.pp_rank == task.owner_pp_rank and layout.dp_rank == 0:
            adapter = adapters[task.hf_module]
            param = dict(adapter.named_adapter_tensors())[task.kind].detach().to(device)
            if task.split:  # gather the parts over the tensor-parallel group, put them at their rows/columns
                index = adapter.columns if task.kind == "lora_A" else adapter.rows
                shards = parallel.gather_tp_to(param, root)
                indices = parallel.gather_tp_to(index.to(device), root)
                if shards is not None:
                    full = torch.empty(task.full_shape, dtype=param.dtype, device=device)
                    for shard, where in zip(shards, indices):
                        if task.kind == "lora_A":
                            full[:, where] = shard
                        else:
                            full[where] = shard
            elif layout.rank == root:
                full = param.clone()
        full = _deliver(full, task, root, layout, mode, device)
        if full is None:
            continue
        if dtype is not None:
            full = full.to(dtype)
        yield task.name, to_host(full.contiguous()) if cpu else full


def _deliver(full, task, root, layout, mode, device):
    if mode == "consolidate":
        return parallel.send_to_rank_zero(full, root, task.full_shape, task.dtype, device)
    if layout.world_size > 1:
        if full is None:
            full = torch.empty(task.full_shape, dtype=task.dtype, device=device)
        dist.broadcast(full, src=root)
    return full


def load_adapter_weights(chunks: Sequence[torch.nn.Module], tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Copy this rank's part of PEFT-named adapter tensors into the adapters of ``chunks`` (no
    collectives). Every local adapter tensor must be present; returns the HF modules loaded."""
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        parsed = parse_peft_name(name)
        if parsed is None:
            raise ValueError(f"{name!r} is not a PEFT LoRA tensor name (base_model.model.<module>.lora_A.weight, "
                             "lora_B.weight or lora_magnitude_vector).")
        by_module.setdefault(parsed[0], {})[parsed[1]] = tensor
    loaded = []
    for hf_module, adapter in local_adapters(chunks).items():
        found = by_module.get(hf_module, {})
        missing = [peft_name(hf_module, kind) for kind, _ in adapter.named_adapter_tensors() if kind not in found]
        if missing:
            raise ValueError(f"The adapter lacks {missing}: it was not trained with this LoraConfig's "
                             "target_modules / use_dora.")
        adapter.load_full(found)
        loaded.append(hf_module)
    return loaded


def merge_adapter(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, *,
                  fan_in_fan_out: bool, magnitude: torch.Tensor | None = None) -> torch.Tensor:
    """An HF weight with its adapter merged, as PEFT's ``merge_and_unload`` computes it (LoRA:
    ``W + scaling B A``; DoRA: ``m / ||W + scaling B A|| * (W + scaling B A)`` per output row)."""
    delta = _transpose(lora_B @ lora_A, fan_in_fan_out) * scaling
    if magnitude is None:
        return weight + delta
    oriented = _transpose(weight, fan_in_fan_out) + _transpose(delta, fan_in_fan_out)
    weight_norm = torch.linalg.norm(oriented, dim=1).to(oriented.dtype)
    dora_factor = _transpose((magnitude / weight_norm).view(-1, 1), fan_in_fan_out)
    return (dora_factor * (weight + delta)).to(weight.dtype)


def split_fused_adapter(lora_A: torch.Tensor, lora_B: torch.Tensor, sizes: Sequence[int],
                        magnitude: torch.Tensor | None = None) -> list[dict[str, torch.Tensor]]:
    """An adapter of an HF-fused module (``qkv_proj`` [q; k; v], ``gate_up_proj``) as one adapter per
    part, exactly: ``A`` repeated, ``B`` (and the DoRA magnitude) split by rows ``sizes``. Each part
    computes the same rows as the fused adapter, with the same ``r`` and scaling."""
    parts = []
    magnitudes = magnitude.split(list(sizes)) if magnitude is not None else [None] * len(sizes)
    for rows, part_magnitude in zip(lora_B.split(list(sizes)), magnitudes):
        part = {"lora_A": lora_A.clone(), "lora_B": rows.clone()}
        if part_magnitude is not None:
            part["lora_magnitude_vector"] = part_magnitude.clone()
        parts.append(part)
    return parts


def fuse_adapters(parts: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Adapters of separate modules (q, k, v) as one adapter of their fused module, exactly: the ``A``
    matrices stacked along the rank, ``B`` block-diagonal, magnitudes concatenated. Its rank is the
    sum of the parts'; give it the parts' scaling (``lora_alpha = scaling * rank``, or
    ``scaling * sqrt(rank)`` with ``use_rslora``)."""
    lora_A = torch.cat([part["lora_A"] for part in parts])
    lora_B = torch.block_diag(*[part["lora_B"] for part in parts])
    fused = {"lora_A": lora_A, "lora_B": lora_B}
    if all("lora_magnitude_vector" in part for part in parts):
        fused["lora_magnitude_vector"] = torch.cat([part["lora_magnitude_vector"] for part in parts])
    return fused


def _transpose(tensor: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    return tensor.T if fan_in_fan_out else tensor


def _natural(name: str) -> tuple:
    return tuple(int(part) if part.isdigit() else part for part in name.split("."))


def merged_hf_weights(weights: Iterator[tuple[str, torch.Tensor]], adapters: Mapping[str, torch.Tensor],
                      plan: AdapterPlan, scaling: float) -> Iterator[tuple[str, torch.Tensor]]:
    """``weights`` (an HF weight stream) with every adapted ``<module>.weight`` merged with its adapter
    (``adapters``: the full PEFT-named tensors, on the ranks that receive weights)."""
    fan_in_fan_out = {task.hf_module: task.fan_in_fan_out for task in plan.tensors}
    for name, tensor in weights:
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module in fan_in_fan_out:
            lora_A = adapters[peft_name(module, "lora_A")].to(tensor.device, tensor.dtype)
            lora_B = adapters[peft_name(module, "lora_B")].to(tensor.device, tensor.dtype)
            magnitude = adapters.get(peft_name(module, "lora_magnitude_vector"))
            if magnitude is not None:
                magnitude = magnitude.to(tensor.device, tensor.dtype)
            tensor = merge_adapter(tensor, lora_A, lora_B, scaling, fan_in_fan_out=fan_in_fan_out[module],
                                   magnitude=magnitude)
        yield name, tensor


ADAPTER_CONFIG_NAME = "adapter_config.json"  # PEFT's adapter config file


def adapter_config_json(config: Any) -> str:
    """The text of ``adapter_config.json`` for ``config`` (a ``peft.LoraConfig``), exactly as
    ``LoraConfig.save_pretrained`` writes it (PEFT's own writer, through a temporary folder)."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        config.save_pretrained(folder)
        return (Path(folder) / ADAPTER_CONFIG_NAME).read_text(encoding="utf-8")
