"""MegatronBridgeStrategy: train a Hugging Face model with Megatron-Core parallelism from Lightning.

    trainer = Trainer(devices=2, max_steps=1000,
                      strategy=MegatronBridgeStrategy("meta-llama/Llama-3.2-1B", tensor_model_parallel_size=2))
    trainer.fit(CausalLMModule(learning_rate=2e-5), train_dataloader, val_dataloader)

The strategy sets up torch.distributed and Megatron's parallel groups, builds this rank's model
chunks from the HF checkpoint through the bridge, wraps them in Megatron's DDP with the
distributed optimizer, and runs every step through Megatron's forward-backward schedule (the
pipeline schedule when PP > 1; microbatches are the gradient accumulation). Lightning checkpoints
are sharded Megatron distributed checkpoints.

With ``peft=LoraConfig(...)`` (or ``peft_adapter=``) only LoRA/DoRA adapters train on the frozen
model (:mod:`lightning_bridge.lora`); ``recompute`` selects activation recomputation.

After ``fit``, ``strategy.model_chunks`` is the trained model and ``strategy.bridge`` converts it
back: ``strategy.bridge.save_hf_pretrained(strategy.model_chunks, "out")``.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.plugins import ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.distributed import _init_dist_connection
from lightning.fabric.utilities.distributed import group as _group
from lightning.pytorch.core.optimizer import LightningOptimizer, _configure_schedulers_manual_opt
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import ParallelStrategy, StrategyRegistry
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only
from megatron.core import parallel_state as ps
from typing_extensions import override

from lightning_bridge.bridge import AutoBridge
from lightning_bridge.dist_checkpoint import restore_model_chunks, sharded_model_state_dict, write_hf_metadata
from lightning_bridge.attention import resolve_backend
from lightning_bridge.lora import LoraSettings
from lightning_bridge.masks import attention_mask_for
from lightning_bridge.optim import step_tensor
from lightning_bridge.provider import GPTModelProvider, precision_fields
from lightning_bridge.publish import make_staging_folder, publish_folder, run_on_rank_zero
from lightning_bridge.runtime import cpu as cpu_runtime

logger = logging.getLogger(__name__)

LossFunction = Callable[[dict[str, torch.Tensor], torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
_COMMON_STATE_FILE = "lightning_state.pt"
# Each rank saves and loads its own optimizer buffers, in parallel (Megatron-LM's default).
_OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable", "chained_optim_avoid_prefix": True}
# recompute= -> the provider's TransformerConfig activation-recomputation fields
RECOMPUTE: dict[str | None, dict[str, Any]] = {
    None: {},
    "selective": dict(recompute_granularity="selective", recompute_modules=["core_attn"]),
    "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
}
_PRECISIONS = {"32-true": None, "32": None, "bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16,
               "bf16": torch.bfloat16, "16-mixed": torch.float16, "16-true": torch.float16}


class MegatronBridgeStrategy(ParallelStrategy):
    """Lightning strategy: an HF checkpoint trained with Megatron-Core TP, PP, DP (and EP)."""

    strategy_name = "megatron_bridge"

    def __init__(
        self,
        model: str | os.PathLike | AutoBridge | None = None,
        *,
        tensor_model_parallel_size: int = 1,
        pipeline_model_parallel_size: int = 1,
        virtual_pipeline_model_parallel_size: int | None = None,
        expert_model_parallel_size: int = 1,
        expert_tensor_parallel_size: int | None = None,
        context_parallel_size: int = 1,
        sequence_parallel: bool = False,
        micro_batch_size: int | None = None,
        recompute: str | None = None,
        overlap_grad_reduce: bool | None = None,
        peft: Any = None,
        peft_adapter: str | os.PathLike | None = None,
        torch_dtype: torch.dtype | str | None = None,
        load_weights: bool = True,
        seed: int = 1234,
        ddp_config: Any = None,
        provider_overrides: Mapping[str, Any] | None = None,
        accelerator: pl.accelerators.Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(accelerator=accelerator, parallel_devices=parallel_devices,
                         cluster_environment=cluster_environment)
        if context_parallel_size != 1:
            raise ValueError(
                f"context_parallel_size={context_parallel_size} is not supported: megatron-core's local "
                "attention (no Transformer Engine) cannot split the sequence. Use context_parallel_size=1, "
                "and sequence_parallel=True with tensor_model_parallel_size > 1 to split activations."
            )
        self.model_source = model
        self.parallel_sizes = dict(
            tensor_model_parallel_size=tensor_model_parallel_size,
            pipeline_model_parallel_size=pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
            expert_model_parallel_size=expert_model_parallel_size,
            expert_tensor_parallel_size=expert_tensor_parallel_size,  # None: the TP size
            context_parallel_size=context_parallel_size,
        )
        self.sequence_parallel = sequence_parallel
        self.micro_batch_size = micro_batch_size
        if recompute not in RECOMPUTE:
            raise ValueError(
                f"recompute={recompute!r} is not one of {sorted(RECOMPUTE, key=str)}: None keeps every activation, "
                "'selective' recomputes the core attention, 'full' recomputes each transformer layer in the "
                "backward pass (least memory, about a third more compute)."
            )
        self.recompute = recompute
        if peft is not None:
            LoraSettings.from_lora_config(peft)  # an unsupported LoraConfig field is named before launch
        self.peft = peft
        self.peft_adapter = peft_adapter
        self.overlap_grad_reduce = overlap_grad_reduce
        self.torch_dtype = torch_dtype
        self.load_weights = load_weights
        self.seed = seed
        self.ddp_config = ddp_config
        self.provider_overrides = dict(provider_overrides or {})
        self._process_group_backend = process_group_backend
        self._timeout = timeout
        self.num_nodes = 1
        self.bridge: AutoBridge | None = None
        self.provider: GPTModelProvider | None = None
        self.model_chunks: list[torch.nn.Module] = []
        self.megatron_optimizer: Any = None

    # --- properties ----------------------------------------------------------------------------
    @property
    @override
    def root_device(self) -> torch.device:
        assert self.parallel_devices is not None
        return self.parallel_devices[self.local_rank]

    @property
    def num_processes(self) -> int:
        return len(self.parallel_devices) if self.parallel_devices is not None else 0

    @property
    @override
    def is_distributed(self) -> bool:
        return True

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        """Samplers split data over data-parallel replicas only: TP/PP ranks share a batch."""
        return {"num_replicas": ps.get_data_parallel_world_size(), "rank": ps.get_data_parallel_rank()}

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        return True

    @property
    @override
    def lightning_restore_optimizer(self) -> bool:
        return False

    @property
    def tensor_model_parallel_size(self) -> int:
        return self.parallel_sizes["tensor_model_parallel_size"]

    @property
    def pipeline_model_parallel_size(self) -> int:
        return self.parallel_sizes["pipeline_model_parallel_size"]

    # --- lifecycle, in the order Lightning calls it --------------------------------------------
    @override
    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        if not self.cluster_environment.creates_processes_externally:
            self._launcher = _SubprocessScriptLauncher(self.cluster_environment, self.num_processes, self.num_nodes)

    @override
    def connect(self, model: pl.LightningModule) -> None:
        super().connect(model)
        if model._trainer is not None:
            self._check_trainer(model.trainer)  # before Lightning's own checks, which name no fix

    @override
    def setup_environment(self) -> None:
        self._check_world_size()
        super().setup_environment()
        self._setup_distributed()

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        assert self.accelerator is not None
        self.accelerator.setup(trainer)
        fitting = trainer.state.fn == TrainerFn.FITTING
        if not self.model_chunks:
            self.model_chunks = self._build_model(wrap_with_ddp=True)
        module = self.lightning_module
        if hasattr(module, "configure_megatron_model"):
            module.configure_megatron_model(self.model_chunks, self)
        else:
            module.megatron_model = torch.nn.ModuleList(self.model_chunks)
        self.model = module
        if fitting:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        self.barrier()

    @override
    def setup_optimizers(self, trainer: pl.Trainer) -> None:
        """Read ``configure_optimizers`` in any of Lightning's documented forms; it must hold exactly one
        Megatron optimizer (schedulers, e.g. Megatron's ``OptimizerParamScheduler``, are the module's to step)."""
        optimizers, schedulers = parse_optimizers(self.lightning_module.configure_optimizers())
        if len(optimizers) != 1:
            raise ValueError(
                f"MegatronBridgeStrategy trains with exactly one Megatron optimizer, but configure_optimizers "
                f"returned {len(optimizers)} ({', '.join(type(o).__name__ for o in optimizers) or 'none'}). Return "
                '{"optimizer": megatron_optimizer(config, list(self.megatron_model)), "lr_scheduler": scheduler} '
                "(a tuple (optimizer, scheduler) is two optimizers to Lightning)."
            )
        optimizer = optimizers[0]
        self._check_optimizer_matches_ddp(optimizer)
        self.megatron_optimizer = optimizer
        self.optimizers = [optimizer]
        self.lr_scheduler_configs = _configure_schedulers_manual_opt(schedulers)
        self._connect_optimizer(optimizer)

    @override
    def setup_precision_plugin(self) -> None:
        """Use Lightning's plain precision plugin: Megatron's ``Float16Module`` does mixed precision itself.

        The Trainer's precision became the parameter dtype when the model was built; its own plugin
        (autocast, a grad scaler) would wrap Megatron's steps a second time.
        """
        self.precision_plugin = Precision()

    @override
    def model_to_device(self) -> None:
        pass  # the provider builds the chunks on the right device

    @override
    def optimizer_step(self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        """Megatron's optimizer step (grad clipping and the distributed param gather included)."""
        closure()
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        success, grad_norm, _ = optimizer.step()
        self.last_grad_norm = grad_norm
        return success

    @override
    def backward(self, closure_loss: torch.Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError(
            "MegatronBridgeStrategy runs backward inside Megatron's schedule: call "
            "self.trainer.strategy.forward_backward(batch, loss_fn) in training_step instead of "
            "manual_backward (CausalLMModule does this for you)."
        )

    # --- the step ------------------------------------------------------------------------------
    def forward_backward(self, batch: dict[str, torch.Tensor], loss_fn: LossFunction,
                         forward_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """One step of Megatron's schedule over the microbatches of ``batch``.

        ``loss_fn(microbatch, logits)`` returns ``(loss_sum, num_tokens)``; this returns the
        token-weighted mean loss over the whole global batch and its token count, on every rank.
        """
        from megatron.core.pipeline_parallel import get_forward_backward_func

        batch = {k: v.to(self.root_device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        input_ids = batch["input_ids"]
        batch_size, seq_length = input_ids.shape
        micro = self._micro_batch_size(batch_size)
        microbatches = [
            {k: v[i:i + micro] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            for i in range(0, batch_size, micro)
        ]
        if not forward_only:
            for chunk in self.model_chunks:
                chunk.zero_grad_buffer()
            self.megatron_optimizer.zero_grad()
        self._check_sequence_length(seq_length)
        positions = torch.arange(seq_length, device=input_ids.device).expand(micro, seq_length)

        def forward_step(data_iterator: Iterator, model: torch.nn.Module):
            microbatch = next(data_iterator)
            logits = model(microbatch["input_ids"], microbatch.get("position_ids", positions),
                           self._attention_mask(microbatch))
            return logits, partial(_reduce_for_megatron, loss_fn, microbatch)

        chunks = self.model_chunks
        for chunk in chunks:
            chunk.train(not forward_only)
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=[iter(microbatches) for _ in chunks] if len(chunks) > 1 else iter(microbatches),
            model=chunks if len(chunks) > 1 else chunks[0],
            num_microbatches=len(microbatches),
            seq_length=seq_length,
            micro_batch_size=micro,
            forward_only=forward_only,
        )
        return self._global_mean_loss(outputs)

    # --- collectives ---------------------------------------------------------------------------
    @override
    def barrier(self, name: str | None = None) -> None:
        if dist.is_initialized():
            dist.barrier()

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not dist.is_initialized():
            return obj
        objects = [obj]
        dist.broadcast_object_list(objects, src, group=_group.WORLD)
        return objects[0]

    @override
    def reduce(self, tensor: Any, group: Any = None, reduce_op: Any = "mean") -> Any:
        """Values logged by CausalLMModule are already global; other tensors are averaged over DP."""
        if not isinstance(tensor, torch.Tensor) or not dist.is_initialized():
            return tensor
        tensor = tensor.clone()
        op = str(reduce_op).lower()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=ps.get_data_parallel_group())
        if op in ("mean", "avg", "reduceop.avg"):
            tensor /= ps.get_data_parallel_world_size()
        return tensor

    # --- state and checkpoints -----------------------------------------------------------------
    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """This rank's model shards as Megatron ``ShardedTensor``s (saved by dist_checkpointing)."""
        return sharded_model_state_dict(self.model_chunks)

    @override
    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        return optimizer.sharded_state_dict(self.lightning_module_state_dict(), metadata=_OPTIMIZER_METADATA)

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: str | os.PathLike,
                        storage_options: Any = None) -> None:
        """A folder: Megatron's sharded checkpoint of model + optimizer, plus Lightning's own state."""
        from megatron.core import dist_checkpointing

        path = Path(self.broadcast(str(filepath)))
        sharded = {"state_dict": checkpoint.pop("state_dict")}
        for index, state in enumerate(checkpoint.pop("optimizer_states", [])):
            sharded[f"optimizer_{index}"] = state
        staging = make_staging_folder(path)  # rank 0 creates it; its error is raised on every rank

        def finish() -> None:  # rank 0, once every rank wrote its shards
            checkpoint["adam_step"] = _adam_step(self.megatron_optimizer) if self.megatron_optimizer else None
            torch.save(checkpoint, staging / _COMMON_STATE_FILE)
            self._write_hf_metadata(staging)
            publish_folder(staging, path)  # `path` is always the old or the new checkpoint

        try:
            dist_checkpointing.save(sharded, str(staging))
            run_on_rank_zero(finish)  # no rank waits for one that failed
        except BaseException:
            if self.global_rank == 0:
                shutil.rmtree(staging, ignore_errors=True)
            raise

    @override
    def load_checkpoint(self, checkpoint_path: str | os.PathLike, weights_only: bool | None = None) -> dict[str, Any]:
        """Restore model and optimizer shards in place; return Lightning's state for the loops."""
        from megatron.core import dist_checkpointing

        path = Path(self.broadcast(str(checkpoint_path)))
        if not (path / _COMMON_STATE_FILE).is_file():
            raise FileNotFoundError(
                f"{path} is not a MegatronBridgeStrategy checkpoint (no {_COMMON_STATE_FILE}). "
                "Pass a folder written by this strategy's ModelCheckpoint / trainer.save_checkpoint."
            )
        template = {"state_dict": self.lightning_module_state_dict()}
        if self.megatron_optimizer is not None and self.lightning_module.trainer.state.fn == TrainerFn.FITTING:
            model_state = self.lightning_module_state_dict()
            _materialize_optimizer_state(self.megatron_optimizer)
            template["optimizer_0"] = self.megatron_optimizer.sharded_state_dict(
                model_state, is_loading=True, metadata=_OPTIMIZER_METADATA
            )
        loaded = dist_checkpointing.load(template, str(path))
        restore_model_chunks(self.model_chunks, loaded["state_dict"])
        if "optimizer_0" in loaded:
            with torch.no_grad():
                self.megatron_optimizer.load_state_dict(loaded["optimizer_0"])
        checkpoint = torch.load(path / _COMMON_STATE_FILE, map_location="cpu", weights_only=False)
        if "optimizer_0" in loaded and checkpoint.get("adam_step") is not None:
            _set_adam_step(self.megatron_optimizer, checkpoint["adam_step"])
        checkpoint["state_dict"] = {}
        return checkpoint

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        pass  # load_checkpoint already restored the shards in place

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        pass  # load_checkpoint already restored the shards in place

    @override
    def remove_checkpoint(self, filepath: str | os.PathLike) -> None:
        if self.global_rank == 0:
            shutil.rmtree(filepath, ignore_errors=True)

    @override
    def teardown(self) -> None:
        """Release Lightning's plugins but keep the trained chunks on their device for export.

        Lightning's default moves the module to the CPU here; ``strategy.model_chunks`` stay put.
        """
        if self.cluster_environment is not None:
            self.cluster_environment.teardown()
        self.precision_plugin.teardown()
        if self.accelerator is not None:
            self.accelerator.teardown()
        self.checkpoint_io.teardown()

    # --- private helpers -----------------------------------------------------------------------
    def _setup_distributed(self) -> None:
        self.set_world_ranks()
        backend = self._process_group_backend or ("nccl" if self.root_device.type == "cuda" else "gloo")
        cpu_runtime.activate()
        if self.root_device.type == "cuda":
            torch.cuda.set_device(self.root_device)
        if not dist.is_initialized():
            _init_dist_connection(self.cluster_environment, backend, timeout=self._timeout)
        # Megatron's parallel groups are made by the provider when it builds the model (once per build).

    def set_world_ranks(self) -> None:
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
            self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        rank_zero_only.rank = utils_rank_zero_only.rank = self.global_rank

    def _check_world_size(self) -> None:
        world = self.num_nodes * self.num_processes
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        cp = self.parallel_sizes["context_parallel_size"]
        if world % (tp * pp * cp):
            raise ValueError(
                f"devices x num_nodes = {world} is not divisible by tensor_model_parallel_size ({tp}) x "
                f"pipeline_model_parallel_size ({pp}) x context_parallel_size ({cp}). Use a multiple of "
                f"{tp * pp * cp} devices, or smaller parallel sizes."
            )

    def _check_trainer(self, trainer: pl.Trainer) -> None:
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                "Trainer(accumulate_grad_batches=...) does not apply with MegatronBridgeStrategy: "
                "Megatron accumulates over microbatches. Use a larger batch and "
                "MegatronBridgeStrategy(micro_batch_size=...) instead."
            )
        if trainer.gradient_clip_val:
            raise ValueError(
                "Trainer(gradient_clip_val=...) does not apply with MegatronBridgeStrategy: the Megatron "
                "optimizer clips gradients. Use CausalLMModule(gradient_clip_val=...) instead."
            )

    def _resolve_dtype(self) -> torch.dtype:
        precision = getattr(self.precision_plugin, "precision", "32-true")
        if self.torch_dtype is not None:
            return self.torch_dtype if isinstance(self.torch_dtype, torch.dtype) else getattr(torch, self.torch_dtype)
        if precision not in _PRECISIONS:
            raise ValueError(
                f"Trainer(precision={precision!r}) cannot be honoured by Megatron. Use '32-true', "
                "'bf16-mixed' or '16-mixed' (Megatron's own mixed precision with fp32 main weights)."
            )
        chosen = _PRECISIONS[precision]
        if chosen is None:  # the default: bf16 with fp32 main weights on GPU, fp32 on CPU
            return torch.bfloat16 if self.root_device.type == "cuda" else torch.float32
        return chosen

    def _build_model(self, wrap_with_ddp: bool) -> list[torch.nn.Module]:
        self.bridge = self._resolve_bridge()
        dtype = self._resolve_dtype()
        provider = self.bridge.to_megatron_provider(load_weights=self.load_weights)
        fields = {**self.parallel_sizes, "sequence_parallel": self.sequence_parallel, **precision_fields(dtype)}
        for key, value in fields.items():
            setattr(provider, key, value)
        provider.seed = self.seed
        provider.calculate_per_token_loss = True
        for key, value in {**RECOMPUTE[self.recompute], **self.provider_overrides}.items():
            if not hasattr(provider, key):
                raise TypeError(f"provider_overrides: {key!r} is not a TransformerConfig or provider field")
            setattr(provider, key, value)
        self.provider = provider
        from megatron.core.distributed import DistributedDataParallelConfig

        overlap = self.overlap_grad_reduce
        if overlap is None:  # by default, reduce gradient buckets during the backward pass when there are replicas
            sizes = self.parallel_sizes
            model_parallel = (sizes["tensor_model_parallel_size"] * sizes["pipeline_model_parallel_size"]
                              * sizes["context_parallel_size"])
            overlap = self.world_size // model_parallel > 1
        self.ddp_config = self.ddp_config or DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=overlap, use_distributed_optimizer=True,
            check_for_nan_in_grad=False,
        )
        if self.peft is None and self.peft_adapter is None:
            return provider(wrap_with_ddp=wrap_with_ddp, ddp_config=self.ddp_config)
        chunks = provider(wrap_with_ddp=False)
        self._add_adapters(chunks)  # before DDP: its buffers and the optimizer see only the adapters
        return provider.wrap_with_ddp(chunks, self.ddp_config) if wrap_with_ddp else chunks

    def _add_adapters(self, chunks: list[torch.nn.Module]) -> None:
        """LoRA/DoRA adapters from ``peft`` (a ``peft.LoraConfig``) and/or an existing ``peft_adapter``."""
        if self.peft is not None:
            self.bridge.apply_lora(chunks, self.peft)
        if self.peft_adapter is not None:
            self.bridge.load_hf_adapter(chunks, adapter_folder(self.peft_adapter))
        trainable = sum(p.numel() for chunk in chunks for p in chunk.parameters() if p.requires_grad)
        total = sum(p.numel() for chunk in chunks for p in chunk.parameters())
        logger.info("LoRA: %s of this rank's %s parameters train (%.2f%%); the base weights are frozen.",
                    f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1))

    def _resolve_bridge(self) -> AutoBridge:
        source = self.model_source
        if source is None:
            source = getattr(self.lightning_module, "hf_model", None)
        if source is None:
            raise ValueError(
                "MegatronBridgeStrategy needs a model: MegatronBridgeStrategy('meta-llama/Llama-3.2-1B') "
                "(an HF id, a local checkpoint folder or an AutoBridge)."
            )
        if isinstance(source, AutoBridge):
            return source
        return AutoBridge.from_hf_pretrained(source)

    def _write_hf_metadata(self, folder: Path) -> None:
        """The HF config and tokenizer beside the shards, so `lightning-bridge convert` needs no flags."""
        try:
            write_hf_metadata(self.bridge, folder, self.provider)
        except (OSError, ValueError, TypeError) as exc:  # the checkpoint still resumes training
            logger.warning("Could not write the HF config files into %s (%s); converting this checkpoint "
                           "to HF will need --hf-config.", folder, exc)

    def _connect_optimizer(self, optimizer: Any) -> None:
        """Hand Megatron's schedule the hooks of its DDP and optimizer (as Megatron-LM does)."""
        from megatron.core.distributed import finalize_model_grads

        config = self.provider
        config.grad_scale_func = optimizer.scale_loss
        config.finalize_model_grads_func = finalize_model_grads
        no_sync = [chunk.no_sync for chunk in self.model_chunks]
        config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        if self.ddp_config.overlap_grad_reduce:
            # each chunk starts reducing its gradients when its last microbatch's backward ends
            grad_sync = [chunk.start_grad_sync for chunk in self.model_chunks]
            config.grad_sync_func = grad_sync[0] if len(grad_sync) == 1 else grad_sync

    def _check_optimizer_matches_ddp(self, optimizer: Any) -> None:
        """Megatron's DDP reduces gradients for one kind of optimizer: refuse the other kind.

        With the distributed optimizer DDP reduce-scatters the gradients (each replica keeps its
        shard); a plain optimizer needs them all-reduced. A mismatch trains on wrong gradients.
        """
        for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
            config = getattr(inner, "config", None)
            if config is None or not hasattr(config, "use_distributed_optimizer"):
                raise TypeError(
                    f"configure_optimizers returned {type(inner).__name__}, not a Megatron optimizer. Build it "
                    "with lightning_bridge.optim.megatron_optimizer(config, list(self.megatron_model)) "
                    "(see CausalLMModule.configure_optimizers)."
                )
            if config.use_distributed_optimizer != self.ddp_config.use_distributed_optimizer:
                raise ValueError(
                    f"The optimizer from configure_optimizers has OptimizerConfig(use_distributed_optimizer="
                    f"{config.use_distributed_optimizer}) but the model's DDP was built with "
                    f"DistributedDataParallelConfig(use_distributed_optimizer="
                    f"{self.ddp_config.use_distributed_optimizer}): gradients would be reduced for the other "
                    "kind of optimizer and training would be wrong. Build the optimizer with "
                    "use_distributed_optimizer=self.trainer.strategy.ddp_config.use_distributed_optimizer, or "
                    "pass MegatronBridgeStrategy(ddp_config=DistributedDataParallelConfig("
                    f"use_distributed_optimizer={config.use_distributed_optimizer}, ...))."
                )

    def _micro_batch_size(self, batch_size: int) -> int:
        micro = self.micro_batch_size or (1 if self.pipeline_model_parallel_size > 1 else batch_size)
        if batch_size % micro:
            raise ValueError(
                f"The batch size {batch_size} is not divisible by micro_batch_size={micro}. Make the "
                "DataLoader's batch_size a multiple of it (use drop_last=True for a ragged last batch)."
            )
        return micro

    def _check_sequence_length(self, seq_length: int) -> None:
        tp = self.tensor_model_parallel_size
        if self.sequence_parallel and seq_length % tp:
            raise ValueError(
                f"sequence_parallel=True splits each sequence over the {tp} tensor-parallel ranks, but the "
                f"batch's sequence length {seq_length} is not divisible by {tp}. Pad or pack sequences to a "
                f"multiple of {tp}."
            )

    def _attention_mask(self, microbatch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Megatron's attention mask for a padded or packed microbatch (:mod:`lightning_bridge.masks`)."""
        mask = attention_mask_for(microbatch.get("attention_mask"), microbatch.get("position_ids"))
        if mask is not None and self.provider.window_size is not None and resolve_backend(self.provider) == "local":
            raise ValueError(
                "This batch has padding before real tokens (left padding) or packed examples, which "
                "megatron-core's unfused sliding-window attention (attention_backend='local') cannot "
                "combine with its window. Use the fused attention (attention_backend='auto', the default), "
                "or pad on the right (tokenizer.padding_side = 'right') and do not pack."
            )
        return mask

    def _global_mean_loss(self, outputs: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token-weighted mean loss over microbatches and data-parallel replicas, on every rank."""
        totals = torch.zeros(2, dtype=torch.float64, device=self.root_device)
        if ps.is_pipeline_last_stage(ignore_virtual=True):
            for reduced in outputs:
                totals += reduced["loss"].to(totals)
            dist.all_reduce(totals, group=ps.get_data_parallel_group())
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(totals, src=ps.get_pipeline_model_parallel_last_rank(),
                           group=ps.get_pipeline_model_parallel_group())
        return (totals[0] / totals[1].clamp_min(1)).float(), totals[1].float()


def adapter_folder(path_or_id: str | os.PathLike) -> Path:
    """A PEFT adapter's local folder: the path itself, or the Hub repo's adapter files downloaded."""
    path = Path(path_or_id)
    if path.is_dir():
        return path
    if path.exists() or str(path_or_id).startswith((".", "/", "~")):
        raise FileNotFoundError(f"peft_adapter={str(path_or_id)!r} is not a folder. Pass the folder that holds "
                                "adapter_config.json and adapter_model.safetensors, or a Hub repo id.")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(path_or_id), allow_patterns=["adapter_config.json", "*.safetensors"]))


def parse_optimizers(conf: Any) -> tuple[list[Any], list[Any]]:
    """``(optimizers, schedulers)`` from a ``configure_optimizers`` result in Lightning's documented forms.

    The forms are Lightning's (``lightning.pytorch.core.optimizer``): one optimizer; a list or tuple
    of optimizers; ``([optimizers], [schedulers])``; ``{"optimizer": ..., "lr_scheduler": ...}``; a
    list of such dicts. Lightning's own parser recognises an optimizer by torch's attributes, which a
    Megatron optimizer lacks (it has no ``defaults``), so anything that is not a dict, list or tuple
    is taken as one optimizer here.
    """
    if conf is None:
        return [], []
    if isinstance(conf, dict):
        conf = [conf]
    if isinstance(conf, (list, tuple)) and conf and all(isinstance(item, dict) for item in conf):
        for item in conf:
            if "optimizer" not in item:
                raise ValueError(f'configure_optimizers returned a dict without "optimizer": keys {sorted(item)}.')
        return ([item["optimizer"] for item in conf],
                [item["lr_scheduler"] for item in conf if item.get("lr_scheduler") is not None])
    if isinstance(conf, (list, tuple)) and len(conf) == 2 and isinstance(conf[0], list):
        schedulers = conf[1] if isinstance(conf[1], (list, tuple)) else [conf[1]]
        return list(conf[0]), list(schedulers)
    if isinstance(conf, (list, tuple)):
        return list(conf), []
    return [conf], []


def _materialize_optimizer_state(optimizer: Any) -> None:
    """Give a fresh Megatron optimizer its (zero) state, so a checkpoint can be loaded into it."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_optimizer = inner.optimizer
        if inner.init_state_fn is not None:
            inner.init_state_fn(torch_optimizer, inner.config)
        for group in torch_optimizer.param_groups:
            for param in group["params"]:
                torch_optimizer.state[param].setdefault("step", step_tensor(0.0, torch_optimizer, param))


def _adam_step(optimizer: Any) -> float | None:
    """The optimizer's step count (the same for every parameter), if it has taken a step."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in inner.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                return float(state["step"])
    return None


def _set_adam_step(optimizer: Any, step: float) -> None:
    """Give every parameter its own step counter, set to ``step``.

    Without Apex or Transformer Engine, megatron-core 0.16 neither saves the step of its torch
    Adam in the distributed checkpoint nor restores one counter per parameter, so the strategy
    keeps the step in its own state and puts it back here.
    """
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        for param, state in inner.optimizer.state.items():
            state["step"] = step_tensor(step, inner.optimizer, param)


def _reduce_for_megatron(loss_fn: LossFunction, microbatch: dict[str, torch.Tensor], logits: torch.Tensor):
    """Megatron's loss-function contract: (loss sum, token count, values to report)."""
    loss_sum, num_tokens = loss_fn(microbatch, logits)
    num_tokens = num_tokens.to(torch.int)
    report = torch.stack([loss_sum.detach().double(), num_tokens.double()])
    return loss_sum, num_tokens, {"loss": report}


StrategyRegistry.register(
    MegatronBridgeStrategy.strategy_name, MegatronBridgeStrategy,
    description="Megatron-Core TP/PP/DP training of a Hugging Face model through lightning-bridge",
)
