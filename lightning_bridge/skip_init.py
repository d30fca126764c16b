"""Build Megatron modules without drawing their random weights, but with their layout marked.

A model about to be filled from a checkpoint need not be initialised: on 2 CPU cores drawing
the weights of a Llama-3.2-1B model took 14 of the 16 s of a (profiled) import, the
checkpoint's copy about 1 s. megatron-core's own
switch, ``perform_initialization=False``, is not enough: in megatron-core 0.16 the helpers that
draw a tensor-parallel weight (``_initialize_affine_weight_cpu`` / ``_gpu``) are also the only
place that marks it as tensor-parallel (``tensor_model_parallel``, ``partition_dim``,
``partition_stride``), so without them every weight looks replicated, and at TP > 1 the
gradient norm (and so clipping) counts only TP rank 0's shards (Megatron-Bridge met the same:
NVIDIA-NeMo/Megatron-Bridge#992).

So inside :func:`skip_weight_initialisation` those two helpers mark the weight exactly as they
would and draw nothing; everything else Megatron initialises (zeroed biases, the small MoE
router) is done as usual. The weights' memory is left uninitialised: the caller must overwrite
every parameter. The swap is process-wide while the block runs: build one model at a time.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Iterator

from megatron.core.tensor_parallel import layers

# The modules that call the helpers (by their own imported names).
_CALLERS = ("megatron.core.tensor_parallel.layers", "megatron.core.transformer.moe.experts",
            "megatron.core.extensions.transformer_engine")


def _mark_cpu_weight(weight, output_size, input_size, per_partition_size, partition_dim, init_method,
                     stride=1, return_master_weight=False, *, skip_set_tensor_parallel_attributes=False,
                     **unused):
    """``_initialize_affine_weight_cpu`` without the master weight and its random values."""
    if not skip_set_tensor_parallel_attributes:
        layers.set_tensor_model_parallel_attributes(tensor=weight, is_parallel=True, dim=partition_dim,
                                                    stride=stride)


def _mark_gpu_weight(weight, init_method, partition_dim, stride=1, is_expert=False):
    """``_initialize_affine_weight_gpu`` without the random values."""
    layers.set_tensor_model_parallel_attributes(tensor=weight, is_parallel=True, dim=partition_dim, stride=stride)


_REPLACEMENTS = {"_initialize_affine_weight_cpu": _mark_cpu_weight,
                 "_initialize_affine_weight_gpu": _mark_gpu_weight}


@contextlib.contextmanager
def skip_weight_initialisation() -> Iterator[None]:
    """Megatron modules built inside draw no random weights; their tensor-parallel marks are set."""
    importlib.import_module("megatron.core.transformer.moe.experts")
    modules = [sys.modules[name] for name in _CALLERS if name in sys.modules]
    saved = [(module, name, getattr(module, name)) for module in modules for name in _REPLACEMENTS
             if hasattr(module, name)]
    try:
        for module, name, _ in saved:
            setattr(module, name, _REPLACEMENTS[name])
        yield
    finally:
        for module, name, original in saved:
            setattr(module, name, original)
