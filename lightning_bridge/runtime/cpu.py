"""Megatron-Core on a CPU: the few redirections that let it build, run and train without CUDA.

Megatron-Core assumes CUDA in a handful of places: ``torch.cuda.current_device()`` as a
device (also made into a ``torch.device``), tensors created with ``device="cuda"``, ``Tensor.cuda()``, ``torch.cuda.synchronize()``,
the CUDA RNG tracker, and the optimizers' ``param.type() == "torch.cuda.FloatTensor"`` checks.
:func:`activate` redirects each of them to the CPU, once per process, and only when CUDA is
absent. It is what lets TP and PP run (and be tested) with gloo on a laptop.

Nothing here changes behaviour on a machine with CUDA: :func:`activate` returns at once there.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

_ACTIVE = False
_LOCK = threading.Lock()
_THREAD = threading.local()  # the redirection mode is per thread in torch
_CUDA_TENSOR_TYPES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
}
_DEVICE_FACTORIES_KWARG = "device"


def is_cpu_runtime() -> bool:
    """True when Megatron-Core runs on the CPU in this process (CUDA absent)."""
    return not torch.cuda.is_available()


def is_active() -> bool:
    """True once :func:`activate` has redirected Megatron-Core's CUDA calls in this process."""
    return _ACTIVE


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, int):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to the CPU and answers Megatron's CUDA type checks."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get(_DEVICE_FACTORIES_KWARG)
        if device is not None and _is_cuda_device(device):
            kwargs = dict(kwargs, device="cpu")
        if func is torch.device and len(args) == 1 and isinstance(args[0], int):
            # ``with torch.device(torch.cuda.current_device()):`` (megatron-core's YaRN rotary embedding);
            # only the integer form: ``torch.device("cuda")`` keeps its meaning for the rest of the process
            return torch.device("cpu")
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # Megatron's optimizers check ``param.type() == 'torch.cuda.FloatTensor'``.
            with torch._C.DisableTorchFunction():
                cpu_name = args[0].type()
            return _CUDA_TENSOR_TYPES.get(args[0].dtype, cpu_name)
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class CpuRNGStatesTracker:
    """Megatron's RNG tracker (named, forkable generator states) on the CPU generator."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.reset()

    def reset(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._is_initialized = False

    def is_initialized(self) -> bool:
        return self._is_initialized

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = states

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise RuntimeError(f"seed {seed} already exists")
        if name in self.states_:
            raise RuntimeError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise RuntimeError(f"rng state {name} is not added")
        original = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(original)


def _install_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    mcore_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)

    original_seed = mcore_random.model_parallel_cuda_manual_seed

    def model_parallel_cpu_manual_seed(seed: int, *args: Any, **kwargs: Any) -> None:
        torch.manual_seed(seed)
        mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
        original_seed(seed, *args, **{**kwargs, "force_reset_rng": False})

    mcore_random.model_parallel_cuda_manual_seed = model_parallel_cpu_manual_seed
    import megatron.core.tensor_parallel as tp

    tp.model_parallel_cuda_manual_seed = model_parallel_cpu_manual_seed


def _patch_torch_cuda() -> None:
    torch.cuda.current_device = lambda: 0  # used only as a device argument, rewritten to cpu
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.empty_cache = lambda: None
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    torch.cuda.manual_seed = lambda seed: None
    torch.cuda.nvtx.range_push = lambda *a, **k: None
    torch.cuda.nvtx.range_pop = lambda *a, **k: None


def _patch_autograd_engine() -> None:
    """Run backward passes with the redirection on.

    ``Tensor.backward`` goes through the mode's handler, and a mode is off while its own handler
    runs, so the autograd engine would run every backward function unredirected (Megatron's
    all-gathers in MoE and sequence-parallel backwards allocate on ``torch.cuda.current_device()``).
    The engine entry point is not a torch function, so the mode can be pushed around it.
    """
    from torch import autograd
    from torch.autograd import graph

    original = graph._engine_run_backward

    def engine_run_backward(*args: Any, **kwargs: Any) -> Any:
        with CudaToCpuMode():
            return original(*args, **kwargs)

    graph._engine_run_backward = autograd._engine_run_backward = engine_run_backward


# Warnings Megatron-Core's own calls raise on the CPU runtime: CUDA tuning advice, torch's renames of
# collectives megatron-core 0.16 still uses, and ``.grad`` reads that the function mode reports as
# its own. None is about the user's code or actionable on a CPU.
_CUDA_ONLY_WARNINGS = (
    r"When using async grad allreduce it is recommended to set the environment variable CUDA_DEVICE_MAX",
    r"`torch.distributed.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",
    r"The .grad attribute of a Tensor that is not a leaf Tensor is being accessed",
)


def _silence_cuda_only_warnings() -> None:
    for message in _CUDA_ONLY_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


def activate() -> bool:
    """Redirect Megatron-Core's CUDA calls to the CPU in this process; a no-op with CUDA.

    Returns True when the CPU runtime is (now) active. Safe to call many times.
    """
    global _ACTIVE
    if not is_cpu_runtime():
        return False
    with _LOCK:
        if not _ACTIVE:
            _patch_torch_cuda()
            _patch_autograd_engine()
            _install_rng_tracker()
            _silence_cuda_only_warnings()
            _ACTIVE = True
            logger.debug("lightning_bridge CPU runtime active: Megatron-Core CUDA calls run on the CPU")
    if not getattr(_THREAD, "mode", None):
        _THREAD.mode = CudaToCpuMode()
        _THREAD.mode.__enter__()  # stays on for the life of this thread
    return True
