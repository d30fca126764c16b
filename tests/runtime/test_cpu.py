"""Tests for lightning_bridge.runtime.cpu: Megatron-Core's CUDA calls redirected to the CPU."""

from __future__ import annotations

import threading

import pytest
import torch
from torch.overrides import _get_current_function_mode_stack

from lightning_bridge.runtime import cpu

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU runtime only acts without CUDA")


@pytest.fixture(scope="module", autouse=True)
def active():
    assert cpu.activate() is True
    return True


def cpu_modes() -> list:
    return [m for m in _get_current_function_mode_stack() if isinstance(m, cpu.CudaToCpuMode)]


def test_activate_is_idempotent():
    assert cpu.is_cpu_runtime() and cpu.is_active()
    assert cpu.activate() is True and cpu.activate() is True
    assert len(cpu_modes()) == 1  # entered once, however often activate() is called


@pytest.mark.parametrize("device", ["cuda", "cuda:1", torch.device("cuda"), 0])
def test_factories_with_a_cuda_device_land_on_cpu(device):
    assert torch.empty(2, device=device).device == torch.device("cpu")
    assert torch.zeros(2, 3, device=device).device == torch.device("cpu")
    assert torch.arange(4, device=device).tolist() == [0, 1, 2, 3]


def test_current_device_works_as_a_device_argument():
    assert torch.ones(2, device=torch.cuda.current_device()).device.type == "cpu"
    with torch.device(torch.cuda.current_device()):  # megatron-core's YaRN rotary embedding
        assert torch.ones(2).device.type == "cpu"


def test_a_named_cuda_device_keeps_its_meaning():
    """Only Megatron's integer device is redirected: code that asks what ``torch.device("cuda")`` is
    (the pinned-read path of HFCheckpointReader) still sees CUDA."""
    assert torch.device("cuda").type == "cuda" and torch.device("cuda", 0).type == "cuda"


class _AllocatesInBackward(torch.autograd.Function):
    """Like Megatron's all-gather backwards: allocates on ``torch.cuda.current_device()``."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return torch.full(grad.shape, 2.0, device=torch.cuda.current_device()) * grad


@pytest.mark.parametrize("run", [
    lambda loss, x: loss.backward(),
    lambda loss, x: torch.autograd.backward(loss),
    lambda loss, x: x.grad.add_(torch.autograd.grad(loss, x)[0]) if x.grad is not None else None,
], ids=["Tensor.backward", "autograd.backward", "autograd.grad"])
def test_backward_functions_are_redirected_too(run):
    """A mode is off while its own handler runs; the backward pass must still be redirected."""
    x = torch.ones(3, requires_grad=True)
    x.grad = torch.zeros(3)
    run(_AllocatesInBackward.apply(x).sum(), x)
    assert x.grad.tolist() == [2.0, 2.0, 2.0]


def test_tensor_cuda_is_a_no_op():
    tensor = torch.ones(3)
    assert tensor.cuda() is tensor
    assert tensor.cuda(0) is tensor


@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda")])
def test_tensor_to_cuda_stays_on_cpu(device):
    tensor = torch.ones(3)
    assert tensor.to(device).device.type == "cpu"
    assert tensor.to(device=device).device.type == "cpu"
    moved = tensor.to(device, torch.float16)
    assert moved.device.type == "cpu" and moved.dtype == torch.float16


def test_tensor_to_current_device_stays_on_cpu():
    assert torch.ones(3).to(torch.cuda.current_device()).device.type == "cpu"


@pytest.mark.parametrize("dtype,answer", [
    (torch.float32, "torch.cuda.FloatTensor"),
    (torch.float16, "torch.cuda.HalfTensor"),
    (torch.bfloat16, "torch.cuda.BFloat16Tensor"),
    (torch.float64, "torch.DoubleTensor"),  # types Megatron never checks keep their CPU name
])
def test_param_type_answers_megatrons_cuda_check(dtype, answer):
    param = torch.nn.Parameter(torch.ones(2, dtype=dtype))
    assert param.type() == answer


def test_type_with_an_argument_still_converts():
    converted = torch.ones(2).type(torch.float64)
    assert converted.dtype == torch.float64


def test_cuda_helpers_are_harmless():
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    state = torch.cuda.get_rng_state()
    torch.cuda.set_rng_state(state)
    assert torch.equal(torch.get_rng_state(), state)


def test_megatron_uses_the_cpu_rng_tracker():
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import random as mcore_random

    assert isinstance(mcore_random.get_cuda_rng_tracker(), cpu.CpuRNGStatesTracker)
    assert tensor_parallel.get_cuda_rng_tracker() is mcore_random.get_cuda_rng_tracker()


def test_rng_fork_is_reproducible_and_restores_the_default_generator():
    first, second = cpu.CpuRNGStatesTracker(), cpu.CpuRNGStatesTracker()
    first.add("model-parallel-rng", 42)
    second.add("model-parallel-rng", 42)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with first.fork():
        a = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)
    with second.fork("model-parallel-rng"):
        b = torch.rand(4)
    assert torch.equal(a, b)  # same seed, same numbers
    assert torch.equal(torch.get_rng_state(), before)
    with first.fork():
        c = torch.rand(4)
    assert not torch.equal(a, c)  # the forked stream advanced
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    with first.fork():
        torch.rand(100)
    assert torch.equal(torch.rand(4), expected)  # the default stream is untouched by the fork


def test_rng_fork_restores_the_default_generator_after_an_error():
    tracker = cpu.CpuRNGStatesTracker()
    tracker.add("x", 7)
    before = torch.get_rng_state()
    with pytest.raises(KeyError), tracker.fork("x"):
        torch.rand(3)
        raise KeyError("inside")
    assert torch.equal(torch.get_rng_state(), before)


def test_rng_tracker_states_round_trip():
    tracker = cpu.CpuRNGStatesTracker()
    assert not tracker.is_initialized()
    tracker.add("x", 3)
    saved = tracker.get_states()
    with tracker.fork("x"):
        a = torch.rand(3)
    tracker.set_states(saved)
    with tracker.fork("x"):
        assert torch.equal(torch.rand(3), a)


@pytest.mark.parametrize("call,message", [
    (lambda t: t.add("other", 1), "seed 1 already exists"),
    (lambda t: t.add("x", 2), "rng state x already exists"),
    (lambda t: t.fork("missing").__enter__(), "rng state missing is not added"),
])
def test_rng_tracker_errors_name_the_problem(call, message):
    tracker = cpu.CpuRNGStatesTracker()
    tracker.add("x", 1)
    with pytest.raises(RuntimeError, match=message):
        call(tracker)


def test_activate_in_another_thread_redirects_there_too():
    result = {}

    def worker():
        try:
            result["active"] = cpu.activate()
            result["device"] = torch.empty(1, device="cuda").device.type
        except BaseException as exc:  # noqa: BLE001  (reported below)
            result["error"] = repr(exc)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert result == {"active": True, "device": "cpu"}
