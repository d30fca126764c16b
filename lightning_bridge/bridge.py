"""The public bridge: Hugging Face Transformers <-> Megatron-Core, configs and weights.

    bridge = AutoBridge.from_hf_pretrained("meta-llama/Llama-3.2-1B")
    provider = bridge.to_megatron_provider()          # settable TransformerConfig fields
    provider.tensor_model_parallel_size = 2
    model = provider(wrap_with_ddp=False)              # this rank's chunks, HF weights loaded
    bridge.save_hf_pretrained(model, "./out")          # back to a transformers checkpoint

The bridge reads only config.json up front; weights are read lazily, tensor by tensor, when a
model is built. ``bridge.source`` (``lightning_bridge.sources``) is where the HF model comes from.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.distributed as dist
from transformers import AutoConfig, PretrainedConfig

from lightning_bridge import families, lora
from lightning_bridge.conversion.context import ConversionContext
from lightning_bridge.conversion.exporting import ExportMode, ExportPlan, export_hf_weights
from lightning_bridge.conversion.parallel import RankLayout, unwrap
from lightning_bridge.conversion.loading import check_checkpoint_names, load_hf_weights
from lightning_bridge.families.base import ModelBridge
from lightning_bridge.hf_io import HFCheckpointReader, ShardedSafetensorsWriter, TensorSpec, plan_shards
from lightning_bridge.publish import raise_on_every_rank
from lightning_bridge.provider import GPTModelProvider, precision_fields
from lightning_bridge.sources import TOKENIZER_FILES as TOKENIZER_FILES  # still importable from here
from lightning_bridge.sources import ConfigOnlySource, HFCheckpointSource, HFSource

logger = logging.getLogger(__name__)

# from_pretrained kwargs that have no meaning for a Megatron model, and what to do instead.
REFUSED_KWARGS = {
    "device_map": "Megatron places weights by its parallel layout: set tensor_model_parallel_size / "
                  "pipeline_model_parallel_size on bridge.to_megatron_provider() instead.",
    "load_in_8bit": "quantized loading is not supported; load in bf16/fp16 with torch_dtype=.",
    "load_in_4bit": "quantized loading is not supported; load in bf16/fp16 with torch_dtype=.",
    "quantization_config": "quantized checkpoints are not supported; use an unquantized checkpoint.",
    "max_memory": "Megatron places weights by its parallel layout; use more ranks instead.",
    "offload_folder": "offloading is not supported; use more ranks instead.",
    "proxies": "huggingface_hub takes no proxies argument; set the HTTPS_PROXY environment variable instead.",
}
# from_pretrained kwargs passed on to the Hub download / config loading.
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "subfolder")
ACCEPTED_NOOP_KWARGS = ("low_cpu_mem_usage", "use_safetensors")
# transformers' attn_implementation -> the provider's attention_backend (lightning_bridge.attention)
ATTN_IMPLEMENTATIONS = {"eager": "local", "sdpa": "sdpa", "flex_attention": "flex",
                        "flash_attention_2": "auto", "flash_attention_3": "auto"}


class AutoBridge:
    """Two-way conversion between an HF causal LM and Megatron-Core, for any supported family."""

    def __init__(self, hf_config: PretrainedConfig, *, source: HFSource | str | os.PathLike | None = None,
                 torch_dtype: torch.dtype | str | None = None, revision: str | None = None,
                 allow_pickle: bool = False, hub_kwargs: dict[str, Any] | None = None,
                 attention_backend: str | None = None):
        self.hf_config = hf_config
        self.model_bridge: ModelBridge = self._family(hf_config)(hf_config)
        self.model_bridge.check_supported()  # refuse what cannot be reproduced, before any work
        self.model_bridge.computed_config()
        if source is None:
            source = ConfigOnlySource()
        elif not isinstance(source, HFSource):
            source = HFCheckpointSource(source, revision=revision, allow_pickle=allow_pickle, hub_kwargs=hub_kwargs)
        self.source: HFSource = source  # where the HF model comes from (lightning_bridge.sources)
        self._plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # first chunk -> (key, plan)
        self.torch_dtype = _as_dtype(torch_dtype)
        self.attention_backend = attention_backend  # None: the provider's default ("auto")

    # --- construction ------------------------------------------------------------------------
    @property
    def _model_bridge(self) -> ModelBridge:
        """The family's bridge under the name Megatron Bridge's users know: ``bridge._model_bridge``
        (``bridge._model_bridge.mapping_registry().get_all_mappings()``); the same as ``model_bridge``."""
        return self.model_bridge

    @classmethod
    def from_hf_pretrained(cls, path_or_id: str | os.PathLike, torch_dtype: torch.dtype | str | None = None,
                           trust_remote_code: bool = False, revision: str | None = None,
                           allow_pickle: bool = False, **kwargs: Any) -> AutoBridge:
        """A bridge for a local HF checkpoint folder or a Hub id (config read now, weights later).

        ``attn_implementation`` picks the models' core attention (the provider's
        ``attention_backend``): "eager" -> "local" (megatron-core's unfused attention), "sdpa" ->
        "sdpa", "flex_attention" -> "flex", "flash_attention_2" / "flash_attention_3" -> "auto"
        (torch's fused kernels: flash / cuDNN through SDPA).
        """
        attention_backend = _attention_backend(kwargs.pop("attn_implementation", None))
        for key, why in REFUSED_KWARGS.items():
            if kwargs.get(key) not in (None, False):
                raise ValueError(f"{key}={kwargs[key]!r} is not supported by the bridge: {why}")
        hub_kwargs = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
        for key in (*REFUSED_KWARGS, *ACCEPTED_NOOP_KWARGS):
            kwargs.pop(key, None)
        config = _load_config(path_or_id, trust_remote_code, revision, hub_kwargs, kwargs)
        return cls(config, source=path_or_id, torch_dtype=torch_dtype, revision=revision,
                   allow_pickle=allow_pickle, hub_kwargs=hub_kwargs, attention_backend=attention_backend)

    @classmethod
    def from_hf_config(cls, config: PretrainedConfig, torch_dtype: torch.dtype | str | None = None) -> AutoBridge:
        """A bridge from a config alone: models it builds are randomly initialised."""
        return cls(config, torch_dtype=torch_dtype)

    @classmethod
    def can_handle(cls, path_or_config: str | os.PathLike | PretrainedConfig, trust_remote_code: bool = False) -> bool:
        """Whether a supported family handles this config (or checkpoint's config)."""
        config = path_or_config
        try:
            if not isinstance(config, PretrainedConfig):
                config = AutoConfig.from_pretrained(str(config), trust_remote_code=trust_remote_code)
            cls(config)
        except (OSError, ValueError):
            return False
        return True

    @classmethod
    def list_supported_models(cls) -> list[str]:
        """The HF architecture names this bridge converts."""
        return families.supported_architectures()

    @classmethod
    def get_supported_bridges(cls) -> list[str]:
        """The model family bridges, by class name."""
        return sorted({families.family_for(a).__name__ for a in families.supported_architectures()})

    # --- Megatron side ----------------------------------------------------------------------
    @property
    def transformer_config(self) -> GPTModelProvider:
        """The Megatron ``TransformerConfig`` this model converts to (validated, TP=PP=1)."""
        provider = self.to_megatron_provider(load_weights=False)
        provider.finalize()
        return provider

    def to_megatron_provider(self, load_weights: bool = True, show_progress: bool = True) -> GPTModelProvider:
        """A provider: set its fields, then call it to build this rank's model chunks.

        ``show_progress`` shows a progress bar on global rank 0 while the weights load.
        """
        overrides: dict[str, Any] = {}
        if self.torch_dtype is not None:
            overrides.update(precision_fields(self.torch_dtype))
        if self.attention_backend is not None:
            overrides["attention_backend"] = self.attention_backend
        provider = self.model_bridge.provider(**overrides)
        if load_weights and self.source.has_weights:
            provider.weight_loader = _HFWeightLoader(self, show_progress)
        return provider

    def to_megatron_model(self, wrap_with_ddp: bool = False, show_progress: bool = True,
                          **overrides: Any) -> list[torch.nn.Module]:
        """Build this rank's Megatron model chunks with the HF weights loaded."""
        provider = self.to_megatron_provider(load_weights=True, show_progress=show_progress)
        known = {field.name for field in dataclasses.fields(provider)}
        for key, value in overrides.items():
            if key not in known:
                raise TypeError(f"{key!r} is not a TransformerConfig or provider field")
            setattr(provider, key, value)
        return provider(wrap_with_ddp=wrap_with_ddp)

    def load_hf_weights(self, model: Sequence[torch.nn.Module] | torch.nn.Module,
                        provider: GPTModelProvider | None = None, show_progress: bool = False) -> list[str]:
        """Copy the HF checkpoint's weights into already built Megatron chunks (this rank's slice).

        Every parameter is overwritten; returns their global names."""
        chunks = _as_chunks(model)
        provider = provider or _provider_of(chunks)
        reader = self.checkpoint_reader()
        registry = self.mapping_registry()
        expected = registry.expected_hf_names(self.model_bridge.wildcard_ranges())
        check_checkpoint_names(reader, registry, expected, self.model_bridge.ignored_hf_patterns)
        show_progress = show_progress and dist.get_rank() == 0
        return load_hf_weights(chunks, reader, registry, self._context(provider), show_progress=show_progress)

    # --- HF side ----------------------------------------------------------------------------
    def export_hf_weights(self, model: Sequence[torch.nn.Module] | torch.nn.Module,
                          order: Literal["safetensors"] | None = "safetensors", cpu: bool = True,
                          mode: ExportMode = "consolidate", show_progress: bool = False,
                          dtype: torch.dtype | None = None,
                          merge_adapters: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(hf_name, tensor)``, a few tensors at a time. Every rank must drain it.

        ``merge_adapters=True``: the weights of LoRA-adapted layers come with their adapters merged,
        as PEFT's ``merge_and_unload()`` computes them (see :meth:`apply_lora`)."""
        chunks = _as_chunks(model)
        hf_order = self.source.tensor_order() if order == "safetensors" else None
        weights = export_hf_weights(
            chunks, self.mapping_registry(), self._context(_provider_of(chunks)), mode=mode,
            hf_order=hf_order, keep_tied=self._kept_tied(), dtypes=self._export_dtypes(chunks, dtype), cpu=cpu,
            show_progress=show_progress, plan=self.export_plan(chunks) if order == "safetensors" else None,
        )
        if not merge_adapters:
            return weights
        return self._merged(chunks, weights, cpu)

    def _merged(self, chunks: list[torch.nn.Module], weights: Iterator[tuple[str, torch.Tensor]],
                cpu: bool) -> Iterator[tuple[str, torch.Tensor]]:
        config = lora.lora_config_of(chunks)
        if config is None:
            raise ValueError("merge_adapters=True, but this model has no LoRA adapters (bridge.apply_lora).")
        plan = lora.AdapterPlan.compute(chunks)
        adapters = dict(lora.export_adapter_weights(chunks, mode="replicate", cpu=cpu, plan=plan))
        scaling = lora.LoraSettings.from_lora_config(config).scaling
        yield from lora.merged_hf_weights(weights, adapters, plan, scaling)

    # --- LoRA / DoRA --------------------------------------------------------------------------
    def apply_lora(self, model: Sequence[torch.nn.Module] | torch.nn.Module, lora_config: Any,
                   seed: int | None = None) -> list[str]:
        """Add LoRA/DoRA adapters from a ``peft.LoraConfig`` to this rank's chunks; freeze the rest.

        ``target_modules`` names HF modules (``q_proj``, ``c_attn``, ``qkv_proj``, ``"all-linear"``);
        a fused Megatron layer gets one adapter per targeted HF projection. Call it after the base
        weights are loaded (DoRA's magnitudes start from them) and before wrapping in Megatron's DDP
        (``provider(wrap_with_ddp=False)``), so DDP and the optimizer see only adapter parameters.
        The initial adapter is the same at every layout (drawn from ``seed``, default the provider's
        ``seed``). Returns the HF modules adapted on this rank. See ``docs/lora.md``.
        """
        chunks = _as_chunks(model)
        provider = _provider_of(chunks)
        settings = lora.LoraSettings.from_lora_config(lora_config)
        adapted = lora.apply_lora(chunks, settings, self.mapping_registry(), self._context(provider),
                                  self.model_bridge.wildcard_ranges(), seed=provider.seed if seed is None else seed)
        for chunk in chunks:
            unwrap(chunk).lora_config = copy.deepcopy(lora_config)
        return adapted

    def export_adapter_weights(self, model: Sequence[torch.nn.Module] | torch.nn.Module, cpu: bool = True,
                               mode: Literal["consolidate", "replicate"] = "consolidate",
                               dtype: torch.dtype | None = None,
                               plan: lora.AdapterPlan | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield the adapters' ``(PEFT name, full tensor)`` (``base_model.model.<module>.lora_A.weight``,
        ``...lora_B.weight``, DoRA's ``...lora_magnitude_vector``) on global rank 0, or on every rank
        with ``mode="replicate"``. Every rank must drain it. ``plan``: an ``AdapterPlan`` already
        computed for this model (else computed here, a collective)."""
        return lora.export_adapter_weights(_as_chunks(model), mode=mode, cpu=cpu, dtype=dtype, plan=plan)

    def adapter_config(self, model: Sequence[torch.nn.Module] | torch.nn.Module,
                       plan: lora.AdapterPlan | None = None) -> Any:
        """The ``peft.LoraConfig`` to save beside the adapters: the one applied, with
        ``base_model_name_or_path`` (the bridge's source) and ``fan_in_fan_out`` (True when the adapted
        HF weights are stored [in, out], GPT-2's ``Conv1D``). Collective unless ``plan`` is given."""
        chunks = _as_chunks(model)
        config = lora.lora_config_of(chunks)
        if config is None:
            raise ValueError("This model has no LoRA adapters: call bridge.apply_lora(model, lora_config) first.")
        plan = lora.AdapterPlan.compute(chunks) if plan is None else plan
        config = copy.deepcopy(config)
        config.base_model_name_or_path = self.source.name
        config.fan_in_fan_out = any(task.fan_in_fan_out for task in plan.tensors)
        return config

    def save_hf_adapter(self, model: Sequence[torch.nn.Module] | torch.nn.Module, path: str | os.PathLike,
                        overwrite: bool = True, dtype: torch.dtype | None = None) -> Path:
        """Write a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) that
        ``PeftModel.from_pretrained(base, path)`` loads; atomically, from global rank 0. Collective."""
        from safetensors.torch import save_file

        from lightning_bridge.publish import make_staging_folder, publish_folder, run_on_rank_zero

        chunks = _as_chunks(model)
        plan = lora.AdapterPlan.compute(chunks)  # the one collective of the planning
        config = self.adapter_config(chunks, plan)
        tensors = dict(self.export_adapter_weights(chunks, mode="consolidate", dtype=dtype, plan=plan))
        path = Path(path)

        def check() -> None:
            if path.exists() and not overwrite:
                raise FileExistsError(f"{path} exists; pass overwrite=True to replace it, or choose another folder.")

        staging = make_staging_folder(path, check, what=f"Saving the LoRA adapter to {path}")

        def write() -> None:
            save_file(tensors, str(staging / "adapter_model.safetensors"), metadata={"format": "pt"})
            config.save_pretrained(str(staging))
            publish_folder(staging, path, overwrite=overwrite)

        run_on_rank_zero(write, f"Saving the LoRA adapter to {path}", target=path)
        return path

    def load_hf_adapter(self, model: Sequence[torch.nn.Module] | torch.nn.Module, path: str | os.PathLike,
                        seed: int | None = None) -> list[str]:
        """Load a PEFT adapter folder into the chunks, bitwise, each rank its own part (no collectives
        beyond :meth:`apply_lora`'s none). A model without adapters gets them from the folder's
        ``adapter_config.json`` first; one with adapters must have the same targets. Returns the HF
        modules loaded on this rank."""
        from safetensors.torch import load_file

        peft = lora.require_peft()
        chunks = _as_chunks(model)
        folder = Path(path)
        config = peft.LoraConfig.from_pretrained(str(folder))
        settings = lora.LoraSettings.from_lora_config(config)
        applied = lora.lora_config_of(chunks)
        if applied is None:
            self.apply_lora(chunks, config, seed=seed)
        else:
            ours = lora.LoraSettings.from_lora_config(applied)
            differ = [f"{field}: model {getattr(ours, field)!r}, adapter {getattr(settings, field)!r}"
                      for field in ("r", "scaling", "use_dora") if getattr(ours, field) != getattr(settings, field)]
            if differ:
                raise ValueError(f"The adapter in {folder} does not fit this model's LoRA adapters "
                                 f"({'; '.join(differ)}). Load it into a model without adapters (they are added "
                                 "from its adapter_config.json).")
            settings = ours
        tensors = load_file(str(folder / "adapter_model.safetensors"))
        expected = lora.targeted_hf_modules(settings, self.mapping_registry(),
                                            self.model_bridge.wildcard_ranges())
        found = {parsed[0] for parsed in map(lora.parse_peft_name, tensors) if parsed is not None}
        if found != expected:
            raise ValueError(f"The adapter in {folder} has modules {sorted(found - expected)[:4]} this model does not "
                             f"adapt and lacks {sorted(expected - found)[:4]} it does: its target_modules differ from "
                             "the model's LoRA config.")
        return lora.load_adapter_weights(chunks, tensors)

    def save_hf_weights(self, model: Sequence[torch.nn.Module] | torch.nn.Module, path: str | os.PathLike,
                        show_progress: bool = True, max_shard_size: int = 5 * 2**30,
                        dtype: torch.dtype | None = None, overwrite: bool = True,
                        extra_files: dict[str, str | bytes] | None = None,
                        copy_files: Sequence[Path] = (), merge_adapters: bool = False) -> Path:
        """Write sharded safetensors + index, shard by shard, atomically (global rank 0 writes).

        ``merge_adapters=True`` writes the LoRA adapters merged into the weights."""
        chunks = _as_chunks(model)
        specs = self.hf_tensor_specs(chunks, dtype=dtype)
        shard_plan = plan_shards(specs, max_shard_size=max_shard_size, source_weight_map=self.source_weight_map())
        writer = None
        error: Exception | None = None
        if dist.get_rank() == 0:
            try:
                writer = ShardedSafetensorsWriter(path, shard_plan, show_progress=show_progress,
                                                  overwrite=overwrite, specs=specs)
            except Exception as exc:
                if dist.get_world_size() == 1:
                    raise
                error = exc  # raised below on every rank, after the export's collectives
        try:
            for name, tensor in self.export_hf_weights(chunks, dtype=dtype, mode="consolidate",
                                                       merge_adapters=merge_adapters):
                if writer is not None and error is None:
                    try:
                        writer.add(name, tensor)
                    except Exception as exc:  # keep draining: other ranks are in collectives
                        error, writer = exc, writer.abort()
            if writer is not None and error is None:
                for relative, data in (extra_files or {}).items():
                    writer.add_file(relative, data)
                for file in copy_files:
                    writer.copy_file(file)
                writer.finalize()
        except Exception as exc:
            if writer is not None:
                writer.abort()
            error = error or exc
        raise_on_every_rank(error, what=f"Saving HF weights to {path}")  # a disk fault stays a CheckpointIOError
        return Path(path)

    def save_hf_pretrained(self, model: Sequence[torch.nn.Module] | torch.nn.Module, path: str | os.PathLike,
                           show_progress: bool = True, **kwargs: Any) -> Path:
        """A complete HF checkpoint: weights, config.json, generation_config.json, tokenizer files."""
        extra, copy_files = self.hf_metadata_files(kwargs.get("dtype"))
        return self.save_hf_weights(model, path, show_progress=show_progress, extra_files=extra,
                                    copy_files=copy_files, **kwargs)

    def hf_metadata_files(self, dtype: torch.dtype | None = None) -> tuple[dict[str, str], list[Path]]:
        """What an HF checkpoint holds besides weights: ``config.json`` and ``generation_config.json``
        (as text, ``dtype`` recorded when given) and the source's tokenizer files (paths to copy)."""
        config = self.hf_config
        if dtype is not None:
            config = copy.deepcopy(config)
            config.dtype = dtype
        extra = {"config.json": config.to_json_string(use_diff=False)}
        generation = self.source.generation_config(self.hf_config)
        if generation is not None:
            extra["generation_config.json"] = generation.to_json_string()
        return extra, self.source.metadata_files()

    def source_weight_map(self) -> dict[str, str] | None:
        """The source checkpoint's tensor -> file map (saves mirror its sharding); None without weights."""
        return self.source.weight_map()

    def export_plan(self, model: Sequence[torch.nn.Module] | torch.nn.Module) -> ExportPlan:
        """What every rank exports, in which order (the source checkpoint's), and to whom.

        Collective the first time for these chunks (one ``all_gather_object`` of parameter names and
        shapes), then kept on the bridge for them: ``hf_tensor_specs``, ``export_destinations``,
        ``export_hf_weights``, ``save_hf_weights`` and ``HFCheckpoint`` read it without planning again.
        """
        chunks = _as_chunks(model)
        key = (tuple(id(chunk) for chunk in chunks), RankLayout.current())
        cached = self._plans.get(chunks[0])
        if cached is not None and cached[0] == key:
            return cached[1]
        plan = ExportPlan.compute(chunks, self.mapping_registry(), hf_order=self.source.tensor_order(),
                                  keep_tied=self._kept_tied())
        self._plans[chunks[0]] = (key, plan)  # dropped with the model
        return plan

    def export_destinations(self, model: Sequence[torch.nn.Module] | torch.nn.Module) -> dict[str, int]:
        """HF tensor name -> the global rank that yields it in ``export_hf_weights(mode="distribute")``
        (from :meth:`export_plan`)."""
        return self.export_plan(model).destinations()

    def hf_tensor_specs(self, model: Sequence[torch.nn.Module] | torch.nn.Module,
                        dtype: torch.dtype | None = None) -> list[TensorSpec]:
        """Name, shape and dtype of every HF tensor an export yields, in export order (from
        :meth:`export_plan`)."""
        chunks = _as_chunks(model)
        dtypes = self._export_dtypes(chunks, dtype)
        return [TensorSpec(name, shape, dtypes.get(name, megatron_dtype)) for name, shape, megatron_dtype
                in self.export_plan(chunks).hf_tensors(self._context(_provider_of(chunks)))]

    def mapping_registry(self):
        """The family's table of Megatron <-> HF name mappings."""
        return self.model_bridge.mapping_registry()

    def checkpoint_reader(self) -> HFCheckpointReader:
        """The validated safetensors reader of the source checkpoint (downloaded when a Hub id)."""
        return self.source.reader()

    # --- helpers ----------------------------------------------------------------------------
    @staticmethod
    def _family(config: PretrainedConfig) -> type[ModelBridge]:
        for architecture in config.architectures or _causal_lm_architectures(config):
            family = families.family_for(architecture)
            if family is not None:
                return family
        name = ", ".join(config.architectures or [f"model_type={getattr(config, 'model_type', '?')}"])
        raise ValueError(
            f"Model architecture {name} is not supported. Supported architectures: "
            f"{', '.join(families.supported_architectures())}."
        )

    def _context(self, provider: GPTModelProvider) -> ConversionContext:
        return ConversionContext.from_config(provider, provider.vocab_size, provider.padded_vocab_size)

    def _kept_tied(self) -> list[str]:
        """Tied Megatron parameters whose HF tensor the source checkpoint stores anyway."""
        return self.mapping_registry().tied_stored_in(self.source.tensor_names())

    def _export_dtypes(self, chunks: list[torch.nn.Module], dtype: torch.dtype | None) -> dict[str, torch.dtype]:
        """Per HF tensor: the asked dtype, else the source checkpoint's, else the config's."""
        stored = {} if dtype is not None else self.source.tensor_dtypes()
        if stored:
            return stored
        return dict.fromkeys(self.export_plan(chunks).destinations(), dtype or families.base.hf_dtype(self.hf_config))


class CausalLMBridge(AutoBridge):
    """The bridge for causal language models (every family supported today is one)."""


@dataclasses.dataclass
class _HFWeightLoader:
    """A provider's weight loader reading the bridge's HF checkpoint. It overwrites every parameter
    (or raises), so the provider builds the model without random initialisation."""

    bridge: AutoBridge
    show_progress: bool
    fills_every_parameter: ClassVar[bool] = True

    def __call__(self, chunks: list[torch.nn.Module], provider: GPTModelProvider) -> list[str]:
        return self.bridge.load_hf_weights(chunks, provider, show_progress=self.show_progress)


def _causal_lm_architectures(config: PretrainedConfig) -> list[str]:
    """transformers' causal-LM class for a config made in code (no ``architectures`` set)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(config, "model_type", None))
    return [name] if isinstance(name, str) else []


def _attention_backend(attn_implementation: str | None) -> str | None:
    if attn_implementation is None:
        return None
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation={attn_implementation!r} is not supported by the bridge; use one of "
                         f"{sorted(ATTN_IMPLEMENTATIONS)}, or set attention_backend on "
                         "bridge.to_megatron_provider() (lightning_bridge.attention.BACKENDS).")
    return ATTN_IMPLEMENTATIONS[attn_implementation]


def _load_config(path_or_id, trust_remote_code, revision, hub_kwargs, overrides) -> PretrainedConfig:
    path = Path(str(path_or_id)).expanduser()
    looks_local = path.is_absolute() or str(path_or_id).startswith((".", "~")) or isinstance(path_or_id, Path)
    if looks_local and not path.exists():
        raise ValueError(f"The folder {path} does not exist. Check the path (or pass a Hub id such as 'org/name').")
    if path.is_dir() and not (path / hub_kwargs.get("subfolder", "") / "config.json").is_file():
        path = path / hub_kwargs.get("subfolder", "")
        raise ValueError(
            f"{path} has no config.json, so it is not a Hugging Face checkpoint folder. Point to the "
            "folder that holds config.json and the *.safetensors files."
        )
    try:
        config, unused = AutoConfig.from_pretrained(
            str(path_or_id), trust_remote_code=trust_remote_code, revision=revision,
            return_unused_kwargs=True, **hub_kwargs, **overrides,
        )
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise ValueError(
                f"{path_or_id} needs custom code from its repository. Read that code, then pass "
                "trust_remote_code=True if you trust it."
            ) from exc
        raise
    if unused:
        raise TypeError(f"Unknown arguments to from_hf_pretrained: {sorted(unused)}")
    return config


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    return getattr(torch, str(dtype).removeprefix("torch."))


def _as_chunks(model) -> list[torch.nn.Module]:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def _provider_of(chunks: Sequence[torch.nn.Module]) -> GPTModelProvider:
    from lightning_bridge.conversion.parallel import unwrap

    config = unwrap(chunks[0]).config
    if not isinstance(config, GPTModelProvider):
        raise TypeError("These model chunks were not built by a lightning_bridge provider.")
    return config
