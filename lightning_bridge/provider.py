"""A lazily built Megatron GPT model: every ``TransformerConfig`` field can be set before building.

``GPTModelProvider`` *is* a ``TransformerConfig`` (so its fields are Megatron's own names) plus
the model-level settings ``GPTModel`` takes. Megatron's validation runs when the model is built,
not when the provider is made, so parallel sizes, precision, recompute or MoE settings can be
changed freely in between::

    provider = bridge.to_megatron_provider()
    provider.tensor_model_parallel_size = 2
    provider.sequence_parallel = True
    chunks = provider(wrap_with_ddp=False)

When the provider's ``weight_loader`` overwrites every parameter (the bridge's loader from an HF
checkpoint does), the chunks are built without drawing Megatron's random weights (see
:mod:`~lightning_bridge.skip_init`): drawing every weight only to overwrite it was 90% of a CPU
import. Without a loader, or with ``load_weights=False``, the model is initialised exactly as
Megatron does.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
from collections.abc import Callable, Collection
from dataclasses import dataclass, fields
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.transformer_config import MLATransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
    get_transformer_layer_offset,
)

from lightning_bridge.attention import core_attention_spec, resolve_backend
from lightning_bridge.conversion.parallel import global_named_weights
from lightning_bridge.experts import GroupedExperts, check_expert_backend
from lightning_bridge.distributed import initialize_model_parallel
from lightning_bridge.norms import TorchNorm
from lightning_bridge.rotary import use_position_ids
from lightning_bridge.runtime import cpu as cpu_runtime
from lightning_bridge.skip_init import skip_weight_initialisation

logger = logging.getLogger(__name__)

LayerSpecFn = Callable[["GPTModelProvider"], ModuleSpec]



def precision_fields(dtype: torch.dtype) -> dict[str, Any]:
    """The one precision rule: ``params_dtype`` and Megatron's mixed-precision flags for a parameter dtype
    (bf16 / fp16 parameters train with Megatron's ``Float16Module`` and fp32 main weights; others in full)."""
    return {"params_dtype": dtype, "bf16": dtype == torch.bfloat16, "fp16": dtype == torch.float16}


class WeightLoader(Protocol):
    """Fills freshly built model chunks with weights: ``loader(chunks, provider)``.

    Any callable will do; the model is then randomly initialised before it runs. A loader that
    overwrites *every* parameter may say so with a true ``fills_every_parameter`` attribute: the
    provider then builds the chunks without drawing their random weights (that memory is
    uninitialised until loaded), and the loader must return the global names of the parameters it
    wrote, which the provider checks are all of them.
    """

    def __call__(self, chunks: list[torch.nn.Module],
                 provider: GPTModelProvider) -> Collection[str] | None: ...


# Changes a freshly built chunk where a family differs from GPTModel outside the layer spec
# (an output-layer bias, soft-capped final logits); runs before weights load.
ModelHook = Callable[[GPTModel, "GPTModelProvider"], None]


def local_layer_spec(provider: GPTModelProvider) -> ModuleSpec:
    """megatron-core's local (no Transformer Engine) GPT layer for this provider's settings: norms that
    allow sequence parallelism (:class:`~lightning_bridge.norms.TorchNorm`), and the core attention
    chosen by ``provider.attention_backend`` (:mod:`lightning_bridge.attention`)."""
    latent = provider.multi_latent_attention
    spec = get_gpt_layer_local_spec(
        num_experts=provider.num_moe_experts,
        qk_layernorm=provider.qk_layernorm,
        normalization=provider.normalization,
        multi_latent_attention=latent,
    )
    layer, attention = spec.submodules, spec.submodules.self_attention
    parts = {"core_attention": core_attention_spec(provider)}
    if provider.qk_layernorm:  # multi-latent attention: the norms of the compressed q and kv
        parts.update(q_layernorm=TorchNorm, **{"kv_layernorm" if latent else "k_layernorm": TorchNorm})
    if latent:
        parts["linear_kv_down_proj"] = _latent_kv_down_projection()
    attention = dataclasses.replace(attention, submodules=dataclasses.replace(attention.submodules, **parts))
    mlp = layer.mlp
    if provider.num_moe_experts:  # same parameters as SequentialMLP; grouped GEMMs on CUDA
        experts = dataclasses.replace(mlp.submodules.experts, module=GroupedExperts)
        mlp = dataclasses.replace(mlp, submodules=dataclasses.replace(mlp.submodules, experts=experts))
    return dataclasses.replace(spec, submodules=dataclasses.replace(
        layer, input_layernorm=TorchNorm, pre_mlp_layernorm=TorchNorm, self_attention=attention, mlp=mlp))


def _latent_kv_down_projection() -> type:
    """MLA's kv down projection, whole on every tensor-parallel rank (megatron-core's plain ``Linear``).

    The local spec's column-parallel one splits [kv latent | shared rotary key] over TP ranks and
    gathers it; each rank then uses the rotary key for its own heads only, and the gather's backward
    keeps only this rank's part of the key's gradient: under TP the gradient of the key's rows and of
    the layer input is wrong (forward is right). Whole on every rank, the key is gathered over the
    sequence-parallel ranks, whose backward sums every rank's heads; the weight's gradient is summed
    over TP like a norm's (``sequence_parallel``). So MLA trains exactly at TP > 1 with
    ``sequence_parallel=True`` (which Megatron's MoE layers require anyway)."""
    from megatron.core.post_training.modelopt.layers import Linear

    return Linear


def block_spec(spec: ModuleSpec, provider: GPTModelProvider, vp_stage: int | None) -> ModuleSpec:
    """A whole-block spec: ``spec`` itself if it is one, else its layers under a TorchNorm final norm.

    A MoE model whose ``moe_layer_freq`` makes some layers dense (0 in the pattern; DeepSeek's first
    dense layers) gets, in those layers, ``spec`` with megatron-core's dense local MLP (of
    ``ffn_hidden_size``) in place of the MoE layer."""
    if spec.module is TransformerBlock:
        return spec
    layers = get_num_layers_to_build(provider, vp_stage=vp_stage)
    pattern = moe_layer_pattern(provider)
    if all(pattern):
        layer_specs = [spec] * layers
    else:
        dense = dataclasses.replace(spec, submodules=dataclasses.replace(
            spec.submodules, mlp=get_gpt_layer_local_spec().submodules.mlp))
        offset = get_transformer_layer_offset(provider, vp_stage=vp_stage)
        layer_specs = [spec if pattern[offset + i] else dense for i in range(layers)]
    return ModuleSpec(module=TransformerBlock,
                      submodules=TransformerBlockSubmodules(layer_specs=layer_specs, layer_norm=TorchNorm))


def moe_layer_pattern(provider: GPTModelProvider) -> list[int]:
    """Per global layer, 1 for a MoE layer and 0 for a dense one (Megatron's reading of
    ``moe_layer_freq``: an int N makes every N-th layer MoE, a list gives the pattern); all 1 for a
    dense model, whose layer spec says what every layer is."""
    freq = provider.moe_layer_freq
    if not provider.num_moe_experts:
        return [1] * provider.num_layers
    if isinstance(freq, int):
        return [int(i % freq == 0) for i in range(provider.num_layers)]
    return [int(bool(moe)) for moe in freq]


@dataclass
class GPTModelProvider(TransformerConfig):
    """Builds this rank's GPT model chunks from its settings, then loads weights into them."""

    vocab_size: int = 0
    seq_length: int = 2048
    make_vocab_size_divisible_by: int = 128
    position_embedding_type: str = "rope"
    rotary_base: float = 10000.0
    rotary_percent: float = 1.0
    rotary_inv_freq: torch.Tensor | None = None  # rope frequencies when scaling is not Megatron's
    share_embeddings_and_output_weights: bool = False
    qk_layernorm: bool = False
    parallel_output: bool = True
    layer_spec: LayerSpecFn = local_layer_spec
    weight_loader: WeightLoader | None = None
    model_hook: ModelHook | None = None
    seed: int = 1234
    # On CUDA, fuse SwiGLU (gated SiLU MLPs) and bias-dropout-add with megatron-core's own TorchScript
    # kernels; the CPU keeps the unfused ops, which compute exactly what transformers does.
    cuda_fusions: bool = True
    # Megatron's own field, here choosing the local spec's core attention: "auto" (default: torch's
    # fused kernels), "sdpa", "flex" or "local" (megatron-core's unfused DotProductAttention); Megatron's
    # AttnBackend members are accepted (local/unfused -> "local", flash/fused -> "sdpa").
    attention_backend: Any = "auto"
    # MoE experts: "auto" (all local experts as grouped GEMMs where torch._grouped_mm runs, one after
    # another elsewhere), "grouped" or "sequential" (:mod:`lightning_bridge.experts`).
    expert_backend: str = "auto"

    def __post_init__(self) -> None:
        # Megatron's validation waits for finalize(), so fields stay settable until the build.
        pass

    def __deepcopy__(self, memo: dict) -> GPTModelProvider:
        """A copy sharing the weight loader and model hook: megatron-core deep-copies its config (MoE
        experts of another FFN size than the dense layers), and a loader may hold open files."""
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        for name, value in self.__dict__.items():
            shared = name in ("weight_loader", "model_hook")
            copied.__dict__[name] = value if shared else copy.deepcopy(value, memo)
        return copied

    # ---------------------------------------------------------------------------------------
    @property
    def padded_vocab_size(self) -> int:
        """The vocabulary rounded up so it splits evenly (and efficiently) over TP ranks."""
        multiple = self.make_vocab_size_divisible_by * self.tensor_model_parallel_size
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    def precision(self) -> dict[str, Any]:
        """``params_dtype``, ``bf16`` and ``fp16`` as set: what Megatron's ``OptimizerConfig`` must match."""
        return {"params_dtype": self.params_dtype, "bf16": self.bf16, "fp16": self.fp16}

    def finalize(self) -> None:
        """Check the settings and run Megatron's own ``TransformerConfig`` validation."""
        self._check_parallel_sizes()
        resolve_backend(self)  # an unknown attention_backend is named before anything is built
        check_expert_backend(self.expert_backend)
        if self.pipeline_model_parallel_size > 1 and self.pipeline_dtype is None:
            self.pipeline_dtype = self.params_dtype
        if cpu_runtime.is_cpu_runtime():
            self.use_cpu_initialization = True
            self.gradient_accumulation_fusion = False
        elif self.cuda_fusions:
            self.bias_activation_fusion = bool(self.gated_linear_unit and self.activation_func is F.silu)
            self.bias_dropout_fusion = True
        if self.virtual_pipeline_model_parallel_size:
            # The batched exchange sends a stage's activations and gradients to the same neighbour
            # in one batch; at PP=2 the previous and next stage are the same rank, and the receiver
            # matches them in the other order (gradients silently swapped with activations).
            # Megatron-LM runs interleaved pipelines unbatched too.
            self.batch_p2p_comm = False
        if self.num_moe_experts:
            _define_missing_te_gemm()
        if self.multi_latent_attention:
            _mla_without_missing_te()
        super(GPTModelProvider, self).__post_init__()  # the config class's own: TransformerConfig's, or MLA's

    def provide(self, vp_stage: int | None = None) -> GPTModel:
        """One model chunk (a pipeline stage, or a virtual stage of it) for this rank."""
        first = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        last = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        model = GPTModel(
            config=self,
            transformer_layer_spec=block_spec(self.layer_spec(self), self, vp_stage),
            vocab_size=self.padded_vocab_size,
            max_sequence_length=self.seq_length,
            pre_process=first,
            post_process=last,
            parallel_output=self.parallel_output,
            share_embeddings_and_output_weights=self.share_embeddings_and_output_weights,
            position_embedding_type=self.position_embedding_type,
            rotary_percent=self.rotary_percent,
            rotary_base=int(self.rotary_base) if float(self.rotary_base).is_integer() else self.rotary_base,
            vp_stage=vp_stage,
        )
        if self.rotary_inv_freq is not None and getattr(model, "rotary_pos_emb", None) is not None:
            model.rotary_pos_emb.inv_freq = self.rotary_inv_freq.to(model.rotary_pos_emb.inv_freq.device)
        use_position_ids(model)  # packed examples restart their rotary positions
        if self.model_hook is not None:
            self.model_hook(model, self)
        return model

    def __call__(self, wrap_with_ddp: bool = False, ddp_config: Any = None,
                 load_weights: bool = True) -> list[torch.nn.Module]:
        """Build (and load) this rank's model chunks: one per virtual pipeline stage."""
        self._check_parallel_sizes()
        initialize_model_parallel(
            tensor_model_parallel_size=self.tensor_model_parallel_size,
            pipeline_model_parallel_size=self.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=self.virtual_pipeline_model_parallel_size,
            context_parallel_size=self.context_parallel_size,
            expert_model_parallel_size=self.expert_model_parallel_size,
            expert_tensor_parallel_size=self.expert_tensor_parallel_size,
            seed=self.seed,
        )
        self.finalize()
        from megatron.core.tensor_parallel import random as mcore_random

        mcore_random.model_parallel_cuda_manual_seed(self.seed)  # same seed, same random init
        vp_size = self.virtual_pipeline_model_parallel_size
        stages = range(vp_size) if vp_size else [None]
        skip_initialization = self.loader_fills_every_parameter(load_weights)
        with skip_weight_initialisation() if skip_initialization else contextlib.nullcontext():
            chunks: list[torch.nn.Module] = [self.provide(vp_stage=stage) for stage in stages]
        if torch.cuda.is_available():
            chunks = [chunk.cuda(torch.cuda.current_device()) for chunk in chunks]
        if load_weights and self.weight_loader is not None:
            loaded = self.weight_loader(chunks, self)
            if skip_initialization:
                _check_every_parameter_loaded(chunks, loaded)
        if self.fp16 or self.bf16:
            from megatron.core.transformer.module import Float16Module

            chunks = [Float16Module(self, chunk) for chunk in chunks]
        if wrap_with_ddp:
            chunks = self.wrap_with_ddp(chunks, ddp_config)
        return chunks

    def loader_fills_every_parameter(self, load_weights: bool = True) -> bool:
        """Whether a build with ``load_weights`` overwrites every parameter from a checkpoint, so
        Megatron's random weights are not drawn (see :class:`WeightLoader`)."""
        return load_weights and bool(getattr(self.weight_loader, "fills_every_parameter", False))

    # ---------------------------------------------------------------------------------------
    def _check_parallel_sizes(self) -> None:
        tp = self.tensor_model_parallel_size
        groups = self.num_query_groups or self.num_attention_heads
        checks = [
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads (num_query_groups)", groups),
        ]
        # MoE layers split experts by the expert TP size instead; dense layers (all, or some) by TP
        if not self.num_moe_experts or not all(moe_layer_pattern(self)):
            ffn = self.ffn_hidden_size or 4 * self.hidden_size
            checks.append(("intermediate_size (ffn_hidden_size)", ffn))
        for label, value in checks:
            if value % tp:
                raise ValueError(
                    f"tensor_model_parallel_size={tp} does not divide {label}={value}. "
                    f"Choose a tensor_model_parallel_size that divides it "
                    f"(for example {_largest_divisor(value, tp)})."
                )
        self._check_expert_sizes()
        if self.context_parallel_size > 1:
            raise ValueError(
                f"context_parallel_size={self.context_parallel_size} is not supported: megatron-core's local "
                "attention (no Transformer Engine) cannot split the sequence. Use context_parallel_size=1, "
                "and sequence_parallel=True with tensor parallelism to split activations."
            )
        vp, pp = self.virtual_pipeline_model_parallel_size, self.pipeline_model_parallel_size
        if vp is not None and (pp == 1 or self.num_layers % (pp * vp)):
            raise ValueError(
                f"virtual_pipeline_model_parallel_size={vp} needs pipeline_model_parallel_size > 1 and "
                f"num_layers ({self.num_layers}) divisible by pipeline x virtual stages ({pp} x {vp}). "
                "Set virtual_pipeline_model_parallel_size=None or choose sizes that divide the layers."
            )
        if self.pipeline_model_parallel_size > self.num_layers:
            raise ValueError(
                f"pipeline_model_parallel_size={self.pipeline_model_parallel_size} is larger than "
                f"the number of layers ({self.num_layers}); use at most {self.num_layers} stages."
            )

    def _check_expert_sizes(self) -> None:
        ep, experts = self.expert_model_parallel_size, self.num_moe_experts
        if not experts:
            if ep > 1:
                raise ValueError(
                    f"expert_model_parallel_size={ep} needs a mixture-of-experts model, but this model has "
                    "no experts (num_moe_experts is not set). Use expert_model_parallel_size=1."
                )
            return
        if experts % ep:
            raise ValueError(
                f"expert_model_parallel_size={ep} does not divide the number of experts "
                f"(num_moe_experts={experts}): each expert-parallel rank must hold the same number of "
                f"experts. Choose an expert_model_parallel_size that divides it "
                f"(for example {_largest_divisor(experts, ep)})."
            )
        etp = self.expert_tensor_parallel_size or self.tensor_model_parallel_size
        expert_ffn = self.moe_ffn_hidden_size or self.ffn_hidden_size
        if expert_ffn % etp:
            raise ValueError(
                f"expert_tensor_parallel_size={etp} does not divide the experts' FFN size "
                f"(moe_ffn_hidden_size={expert_ffn}). Set expert_tensor_parallel_size to a divisor of it "
                f"(for example {_largest_divisor(expert_ffn, etp)}); it defaults to "
                "tensor_model_parallel_size."
            )

    def wrap_with_ddp(self, chunks: list[torch.nn.Module], ddp_config: Any) -> list[torch.nn.Module]:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        ddp_config = ddp_config or DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=True
        )
        return [
            DistributedDataParallel(config=self, ddp_config=ddp_config, module=chunk,
                                    disable_bucketing=(i > 0))
            for i, chunk in enumerate(chunks)
        ]

    def transformer_config_fields(self) -> dict[str, Any]:
        """The ``TransformerConfig`` fields (``MLATransformerConfig``'s for MLA) and their current values."""
        config_class = MLATransformerConfig if isinstance(self, MLATransformerConfig) else TransformerConfig
        return {f.name: getattr(self, f.name) for f in fields(config_class)}


@dataclass
class MLAModelProvider(GPTModelProvider, MLATransformerConfig):
    """A :class:`GPTModelProvider` with multi-latent attention (DeepSeek-V2/V3): an ``MLATransformerConfig``.

    Its extra fields are megatron-core's own (``q_lora_rank`` (None: one q projection),
    ``kv_lora_rank``, ``qk_head_dim``, ``qk_pos_emb_head_dim``, ``v_head_dim``, ``rope_type`` "rope" or
    "yarn" with ``rotary_scaling_factor``, ``mscale``, ``mscale_all_dim``, ...). The layers use
    megatron-core's local MLA spec, but with the kv down projection whole on every TP rank (see
    :func:`_latent_kv_down_projection`: training at TP > 1 needs ``sequence_parallel=True``);
    ``qk_layernorm`` puts the RMSNorms on the compressed q and kv. Each layer's attention has its own
    rotary embedding (of ``qk_pos_emb_head_dim``).
    """

    multi_latent_attention: bool = True
    rope_type: str = "rope"

    def _check_parallel_sizes(self) -> None:
        super()._check_parallel_sizes()
        tp = self.tensor_model_parallel_size
        # the q down projection is column-parallel: its output splits over TP (kv's is whole on each rank)
        if self.q_lora_rank is not None and self.q_lora_rank % tp:
            raise ValueError(
                f"tensor_model_parallel_size={tp} does not divide q_lora_rank={self.q_lora_rank} "
                f"(multi-latent attention splits its q down projection over TP). Choose one that divides it "
                f"(for example {_largest_divisor(self.q_lora_rank, tp)}).")


def _check_every_parameter_loaded(chunks: list[torch.nn.Module], loaded: Collection[str] | None) -> None:
    """Refuse chunks built without initialisation that the loader did not fill completely."""
    written = set(loaded or ())
    names = [name for chunk in chunks for name, _ in global_named_weights(chunk)]
    missing = sorted(name for name in names if name not in written)
    if missing:
        shown = ", ".join(missing[:8]) + (f", ... ({len(missing)} in all)" if len(missing) > 8 else "")
        raise RuntimeError(
            f"The weight loader did not write the parameters {shown}. The model was built without random "
            "initialisation because the loader declared fills_every_parameter, so they hold uninitialised "
            "memory. Make the loader write every parameter and return their names, or drop its "
            "fills_every_parameter attribute so the model is initialised first."
        )


def _define_missing_te_gemm() -> None:
    """Let megatron-core's MoE router run without Transformer Engine (CPU and GPU alike).

    megatron-core 0.16's ``moe_utils`` imports ``te_general_gemm`` only when Transformer Engine is
    installed, yet its router tests ``te_general_gemm is not None``: without TE that is a
    NameError. Defining it as None selects the router's plain ``torch.mm`` path.
    """
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _mla_without_missing_te() -> None:
    """Let megatron-core's multi-latent attention build without Transformer Engine.

    megatron-core 0.16's ``multi_latent_attention`` sets ``HAVE_TE`` when
    ``megatron.core.extensions.transformer_engine`` imports, which it does without TE too (its classes
    are then mocks), and later calls ``isinstance(self.linear_proj, TELinear)`` with a mock: a
    TypeError. Without TE, it is told so.
    """
    from megatron.core.extensions import transformer_engine
    from megatron.core.transformer import multi_latent_attention

    if not getattr(transformer_engine, "HAVE_TE", False):
        multi_latent_attention.HAVE_TE = False


def _largest_divisor(value: int, limit: int) -> int:
    return max(d for d in range(1, limit + 1) if value % d == 0)
