"""Tests for lightning_bridge.distributed: the one-rank default group and Megatron's parallel state."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from processes import launch

from lightning_bridge.distributed import initialize_distributed, initialize_model_parallel


@pytest.fixture
def plain_process(monkeypatch):
    """No launcher variables: what a plain ``python script.py`` sees."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


def test_plain_process_gets_a_one_rank_gloo_group(plain_process):
    initialize_distributed()
    assert dist.is_initialized()
    assert (dist.get_rank(), dist.get_world_size()) == (0, 1)
    assert dist.get_backend() == ("nccl" if torch.cuda.is_available() else "gloo")
    initialize_distributed()  # a second call keeps the same group
    assert dist.get_world_size() == 1


def test_model_parallel_state_for_one_rank(plain_process):
    initialize_model_parallel()
    assert ps.model_parallel_is_initialized()
    assert ps.get_tensor_model_parallel_world_size() == 1
    assert ps.get_pipeline_model_parallel_world_size() == 1
    assert ps.get_data_parallel_world_size() == 1
    initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)  # same: fine


@pytest.mark.parametrize("sizes,product", [
    (dict(tensor_model_parallel_size=2), 2),
    (dict(pipeline_model_parallel_size=3), 3),
    (dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2), 4),
    (dict(context_parallel_size=2), 2),
])
def test_world_size_not_divisible_names_the_sizes(plain_process, sizes, product):
    tp = sizes.get("tensor_model_parallel_size", 1)
    pp = sizes.get("pipeline_model_parallel_size", 1)
    cp = sizes.get("context_parallel_size", 1)
    message = (rf"world size 1 is not divisible by tensor_model_parallel_size \({tp}\) x "
               rf"pipeline_model_parallel_size \({pp}\) x context_parallel_size \({cp}\) = {product}\. "
               rf"Launch a multiple of {product} processes, or change the sizes")
    with pytest.raises(ValueError, match=message):
        initialize_model_parallel(**sizes)


def test_expert_grid_must_divide_the_world(plain_process):
    with pytest.raises(ValueError, match=r"The world size 1 is not divisible by expert_tensor_parallel_size \(1\) x "
                                         r"expert_model_parallel_size \(2\) x pipeline_model_parallel_size \(1\) = 2\. "
                                         r"Launch a multiple of 2 processes"):
        initialize_model_parallel(expert_model_parallel_size=2)


# --- two ranks ---------------------------------------------------------------------------------------
def reinitialise_on_each_rank() -> dict:
    """Runs in every rank: initialise a layout, then ask for another one."""
    result = {}
    initialize_model_parallel(tensor_model_parallel_size=2)
    result["world"] = dist.get_world_size()
    result["tp"] = ps.get_tensor_model_parallel_world_size()
    try:
        initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=2)
    except ValueError as exc:
        result["different_sizes"] = str(exc)
    initialize_model_parallel(tensor_model_parallel_size=2)  # the same sizes again: accepted
    ps.destroy_model_parallel()

    initialize_model_parallel()  # TP = PP = CP = 1, DP = 2
    try:
        initialize_model_parallel(context_parallel_size=2)
    except ValueError as exc:
        result["different_cp"] = str(exc)
    ps.destroy_model_parallel()

    initialize_model_parallel(pipeline_model_parallel_size=2)
    result["after_destroy"] = (ps.get_tensor_model_parallel_world_size(),
                               ps.get_pipeline_model_parallel_world_size())
    try:
        initialize_model_parallel(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)
    except ValueError as exc:
        result["different_vp"] = str(exc)
    ps.destroy_model_parallel()
    return result


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return launch(reinitialise_on_each_rank, 2)


@pytest.mark.slow
def test_reinitialising_with_different_sizes_is_refused_clearly(two_ranks):
    for result in two_ranks:
        assert result["world"] == 2 and result["tp"] == 2
        message = result["different_sizes"]
        assert "already initialised with TP x PP = (2, 1)" in message
        assert "asks for (1, 2)" in message
        assert "destroy_model_parallel() first, or use the same sizes" in message
        assert result["after_destroy"] == (1, 2)  # after destroy_model_parallel() a new layout is fine


@pytest.mark.slow
def test_reinitialising_with_different_cp_or_vp_is_refused(two_ranks):
    for result in two_ranks:
        assert "context_parallel" in result.get("different_cp", "")  # asked CP=2, state has CP=1
        assert "virtual_pipeline" in result.get("different_vp", "")  # asked VP=2, state has none
