"""Megatron layers built without drawing their weights keep the tensor-parallel marks of an
initialised build, and the swap of Megatron's helpers ends with the block."""

from __future__ import annotations

import pytest
import torch
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel import layers
from megatron.core.transformer import TransformerConfig

from lightning_bridge.distributed import initialize_model_parallel
from lightning_bridge.skip_init import skip_weight_initialisation

MARKS = ("tensor_model_parallel", "partition_dim", "partition_stride")


class CountingInit:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.nn.init.normal_(tensor)


def build_layers(init: CountingInit) -> dict[str, torch.nn.Module]:
    initialize_model_parallel()
    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, use_cpu_initialization=True)
    return {
        "column": tensor_parallel.ColumnParallelLinear(8, 16, config=config, init_method=init, bias=True,
                                                       stride=2),
        "row": tensor_parallel.RowParallelLinear(16, 8, config=config, init_method=init, bias=True,
                                                 input_is_parallel=True, skip_bias_add=False),
        "embedding": tensor_parallel.VocabParallelEmbedding(32, 8, init_method=init, config=config),
    }


def marks(modules: dict[str, torch.nn.Module]) -> dict[str, tuple]:
    return {f"{key}.{name}": tuple(getattr(param, mark, None) for mark in MARKS)
            for key, module in modules.items() for name, param in module.named_parameters()}


def test_weights_are_not_drawn_but_marked_as_an_initialised_build_marks_them():
    drawn, skipped = CountingInit(), CountingInit()
    initialised = build_layers(drawn)
    with skip_weight_initialisation():
        uninitialised = build_layers(skipped)
    assert drawn.calls == 3 and skipped.calls == 0
    assert marks(uninitialised) == marks(initialised)
    assert marks(initialised)["column.weight"] == (True, 0, 2)  # the stride the layer was built with
    assert marks(initialised)["row.weight"] == (True, 1, 1)
    assert not uninitialised["column"].bias.any()  # biases are still zeroed as Megatron does


def test_the_gpu_helper_marks_the_weight_too():
    weight, init = torch.empty(4, 4), CountingInit()
    with skip_weight_initialisation():
        layers._initialize_affine_weight_gpu(weight, init, partition_dim=1, stride=2)
    assert init.calls == 0 and tuple(getattr(weight, mark) for mark in MARKS) == (True, 1, 2)


def test_megatrons_helpers_are_restored_after_the_block_even_on_error():
    from megatron.core.transformer.moe import experts

    originals = (layers._initialize_affine_weight_cpu, layers._initialize_affine_weight_gpu,
                 experts._initialize_affine_weight_cpu, experts._initialize_affine_weight_gpu)
    with pytest.raises(RuntimeError, match="boom"), skip_weight_initialisation():
        assert layers._initialize_affine_weight_cpu is not originals[0]
        assert experts._initialize_affine_weight_gpu is not originals[3]
        raise RuntimeError("boom")
    assert (layers._initialize_affine_weight_cpu, layers._initialize_affine_weight_gpu,
            experts._initialize_affine_weight_cpu, experts._initialize_affine_weight_gpu) == originals
