"""HF checkpoint -> this rank's Megatron model chunks, tensor by tensor, with no collectives.

Each rank reads only the HF tensors its own parameters need, builds the full Megatron tensor
(fusing q/k/v or gate/up, padding the vocabulary), keeps its tensor-parallel slice and copies it
in. With expert parallelism a rank's parameters name only its own experts (global expert
numbers, see :mod:`~lightning_bridge.conversion.parallel`), so it reads only those. Nothing is
gathered, so loading scales with the number of ranks.

Shapes are checked against the checkpoint's header before any data is read. Reading is
pipelined: worker threads read the next tensors onto the parameters' device (onto a GPU through
pinned buffers, see :mod:`~lightning_bridge.pinned_read`) while the main thread fuses, slices and
copies the current one, with at most ``READ_AHEAD_BYTES`` in flight.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import torch
from tqdm.auto import tqdm

from lightning_bridge.conversion.context import ConversionContext
from lightning_bridge.conversion.parallel import RankLayout, global_named_weights
from lightning_bridge.conversion.registry import MappingRegistry

logger = logging.getLogger(__name__)

READ_AHEAD_BYTES = 2 * 2**30  # tensors read ahead of the one being converted
READ_THREADS = 4


class TensorSource(Protocol):
    """What loading needs of a checkpoint: names, shapes and lazily read tensors.

    A source may also have ``release(name)``, called once a tensor has been copied into the model,
    to free what reading it holds (:class:`~lightning_bridge.hf_io.HFCheckpointReader` drops its
    memory-mapped pages, so a CPU load peaks near the model's size, not twice it).
    """

    def names(self) -> list[str]: ...

    def __contains__(self, name: str) -> bool: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

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


@dataclass
class _Load:
    """One parameter to fill: where its HF tensors are and how they convert."""

    name: str
    param: torch.Tensor
    mapping: object
    hf_names: list[str]
    tp_rank: int
    tp_size: int
    nbytes: int


def load_hf_weights(
    chunks: Sequence[torch.nn.Module],
    source: TensorSource,
    registry: MappingRegistry,
    ctx: ConversionContext,
    *,
    show_progress: bool = False,
) -> list[str]:
    """Copy this rank's slice of every HF tensor into the parameters of ``chunks``.

    Every parameter is overwritten whole (a parameter without a mapping, or a converted tensor of
    another shape, is an error), so the chunks may be built without random initialisation. The
    mappings write fused tensors (q/k/v, gate/up) straight into the parameter, without a full copy.
    Returns the global names of the parameters written: all of them.
    """
    loads = plan_loads(chunks, source, registry, ctx)
    release = getattr(source, "release", lambda name: None)
    progress = tqdm(total=len(loads), desc="Loading HF weights", unit="tensor", disable=not show_progress)
    with progress, torch.no_grad():
        for load, hf_tensors in _read_ahead(source, loads):
            try:
                load.mapping.load_shard(load.param, hf_tensors, ctx, load.tp_rank, load.tp_size)
            except ValueError as exc:
                raise ValueError(f"Loading Megatron parameter {load.name!r} from {', '.join(load.hf_names)}: "
                                 f"{exc}") from None
            del hf_tensors
            for hf_name in load.hf_names:
                release(hf_name)
            logger.debug("loaded %s <- %s (%s)", load.name, ", ".join(load.hf_names), load.mapping.kind)
            progress.update()
    return [load.name for load in loads]


def plan_loads(chunks: Sequence[torch.nn.Module], source: TensorSource, registry: MappingRegistry,
                ctx: ConversionContext) -> list[_Load]:
    """Every parameter's HF tensors, with their shapes checked against the checkpoint's header."""
    layout = RankLayout.current()
    stored_tied = registry.tied_stored_in(source)
    loads = []
    for chunk in chunks:
        for name, param in global_named_weights(chunk):
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
            found_shapes = [tuple(source.shape(hf_name)) for hf_name in hf_names]
            if found_shapes != expected:
                wrong = [f"{n}: checkpoint {f}, config expects {e}"
                         for n, f, e in zip(hf_names, found_shapes, expected) if f != e]
                raise ValueError(
                    f"Shape mismatch for {'; '.join(wrong)}. config.json and the weights disagree: check "
                    "hidden_size, num_attention_heads, num_key_value_heads, head_dim, intermediate_size and "
                    "vocab_size."
                )
            nbytes = sum(math.prod(shape) for shape in found_shapes) * param.element_size()
            loads.append(_Load(name, param, mapping, hf_names, tp_rank, tp_size, nbytes))
    return loads


def _read_ahead(source: TensorSource, loads: Iterable[_Load]) -> Iterator[tuple[_Load, list[torch.Tensor]]]:
    """Each load with its HF tensors on the parameter's device, in order, read on worker threads.

    File reads and device copies release the GIL, so several reads and the main thread's work
    overlap.
    """
    def read(load: _Load) -> list[torch.Tensor]:
        return [source.get(hf_name, device=load.param.device) for hf_name in load.hf_names]

    pending: deque[tuple[_Load, Future]] = deque()
    in_flight = 0
    upcoming = iter(loads)
    with ThreadPoolExecutor(READ_THREADS, thread_name_prefix="lightning-bridge-read") as pool:
        try:
            while True:
                while not pending or in_flight < READ_AHEAD_BYTES:
                    load = next(upcoming, None)
                    if load is None:
                        break
                    pending.append((load, pool.submit(read, load)))
                    in_flight += load.nbytes
                if not pending:
                    return
                load, future = pending.popleft()
                in_flight -= load.nbytes
                yield load, future.result()
        finally:
            for _, future in pending:
                future.cancel()


def _ignored(name: str, patterns: Sequence[str]) -> bool:
    import fnmatch

    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _short(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}] ({len(names)} in all)"
