"""One training step inside every rank of a gloo launch, compared with transformers' gradients.

The oracle: an SGD-like step (:class:`GradientStep`: no momentum, weight decay or clipping) moves
every weight by ``-lr x gradient``, so ``(weights before - weights after) / lr``, exported to HF names through the
bridge, is the gradient of the token-weighted mean loss over the whole global batch. The same
gradient computed by transformers in one process (:func:`reference_gradients`) must come out at
every layout: TP, PP, VPP, DP, EP, SP and their products, with unequal token counts per
microbatch and per data-parallel rank.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core import parallel_state as ps
from strategies.strategy_checks import _trainer, _world_size
from torch.utils.data import DataLoader

from lightning_bridge import CausalLMModule, MegatronBridgeStrategy

SEQ = 16
# Tokens counted per sequence (loss_mask), all different: microbatches and DP ranks weigh unequally.
COUNTED = (15, 11, 7, 4)


def gradient_batch(vocab: int = 96, padding: str | None = None) -> list[dict[str, torch.Tensor]]:
    """Four sequences; ``padding`` ("left" / "right") also marks the uncounted tokens as padding."""
    g = torch.Generator().manual_seed(7)
    samples = []
    for counted in COUNTED:
        ids = torch.randint(0, vocab, (SEQ,), generator=g)
        real = torch.zeros(SEQ, dtype=torch.long)
        if padding == "left":
            real[SEQ - counted - 1:] = 1
        else:
            real[:counted + 1] = 1  # counted + 1 tokens give `counted` next-token targets
        sample = {"input_ids": ids, "loss_mask": real}
        if padding is not None:
            sample["attention_mask"] = real
        samples.append(sample)
    return samples


# Two examples per packed row: (length of the first, length of the second); the rest is padding.
PACKED = ((9, 7), (6, 6), (10, 3), (5, 8))


def packed_batch(vocab: int = 96) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
    """Four rows of two packed examples each, and the same eight examples unpacked (right-padded).

    Packed rows number each example's positions from 0 (transformers' packed ``position_ids``) and
    count no example's first token, as an unpacked example cannot count its own first token.
    """
    g = torch.Generator().manual_seed(11)
    packed, unpacked = [], []
    for lengths in PACKED:
        ids, positions, counted = torch.zeros(SEQ, dtype=torch.long), torch.zeros(SEQ, dtype=torch.long), []
        start = 0
        for length in lengths:
            example = torch.randint(0, vocab, (length,), generator=g)
            ids[start:start + length] = example
            positions[start:start + length] = torch.arange(length)
            alone = torch.zeros(SEQ, dtype=torch.long)
            alone[:length] = example
            real = (torch.arange(SEQ) < length).long()
            unpacked.append({"input_ids": alone, "loss_mask": real, "attention_mask": real})
            counted.append((start, length))
            start += length
        real = (torch.arange(SEQ) < start).long()
        loss_mask = real.clone()
        for first, _ in counted:
            loss_mask[first] = 0
        packed.append({"input_ids": ids, "position_ids": positions, "attention_mask": real, "loss_mask": loss_mask})
    return packed, unpacked


def reference_gradients(folder: str, samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """transformers' gradient of the token-weighted mean next-token loss over ``samples``, by the
    tensor names of the checkpoint on disk (transformers saves some in another layout, e.g. experts)."""
    import tempfile

    import transformers
    from safetensors.torch import load_file

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager",
                                                              dtype=torch.float32)
    model.train()
    model.config.use_cache = False
    batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
    logits = model(batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
    targets, counted = batch["input_ids"][:, 1:], batch["loss_mask"][:, 1:].bool()
    if "attention_mask" in batch:  # a padding position predicts nothing
        counted = counted & batch["attention_mask"][:, :-1].bool()
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), reduction="none")
    loss = (losses * counted.flatten()).sum() / counted.sum()
    loss.backward()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.grad)
        for buffer in model.buffers():  # stored buffers (a router's correction bias) have no gradient
            buffer.zero_()
    with tempfile.TemporaryDirectory() as saved:
        model.save_pretrained(saved)
        return load_file(f"{saved}/model.safetensors")


class GradientStep(CausalLMModule):
    """CausalLMModule whose one optimizer step moves each weight by ``-lr x gradient``.

    Megatron's distributed optimizer takes only Adam, so this is Adam with beta1 = beta2 = 0 and a
    huge epsilon: its update ``lr' g / (|g| + eps)`` with ``lr' = lr x eps`` is ``lr g (1 - |g| / eps)``,
    plain SGD to a relative 1e-6 for gradients below 1, through the real optimizer path
    (distributed or not, fp32 main weights under mixed precision, loss scaling under fp16).
    """

    EPS = 1e6

    def __init__(self, lr: float = 1.0, loss_scale: float | None = None,
                 use_distributed_optimizer: bool | None = None) -> None:
        super().__init__(learning_rate=lr)
        self.lr, self.loss_scale = lr, loss_scale
        self.use_distributed_optimizer = use_distributed_optimizer

    def configure_optimizers(self) -> Any:
        from megatron.core.optimizer import OptimizerConfig

        from lightning_bridge.optim import megatron_optimizer

        provider = self.trainer.strategy.provider
        distributed = self.use_distributed_optimizer
        if distributed is None:
            distributed = self.trainer.strategy.ddp_config.use_distributed_optimizer
        config = OptimizerConfig(
            optimizer="adam", lr=self.lr * self.EPS, min_lr=self.lr * self.EPS, adam_beta1=0.0, adam_beta2=0.0,
            adam_eps=self.EPS, weight_decay=0.0, clip_grad=0.0, **provider.precision(), loss_scale=self.loss_scale,
            use_distributed_optimizer=distributed,
        )
        return megatron_optimizer(config, list(self.megatron_model))


def step_gradients(cases: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per layout: the weights after one GradientStep, by HF name (rank 0), or the error raised.

    A layout is a dict of strategy arguments plus optional ``precision``, ``lr``, ``loss_scale``,
    ``padding`` ("left", "right", or "packed": checked against the examples unpacked), ``module`` (GradientStep kwargs) and ``micro_batch_size`` (default 1).
    """
    results = []
    for folder, layout in cases:
        layout = dict(layout)
        precision = layout.pop("precision", "32-true")
        lr = layout.pop("lr", 1.0)
        module_kwargs = layout.pop("module", {})
        loss_scale = layout.pop("loss_scale", None)
        padding = layout.pop("padding", None)
        samples, reference = packed_batch() if padding == "packed" else (gradient_batch(padding=padding),) * 2
        layout.setdefault("micro_batch_size", 1)
        try:
            strategy = MegatronBridgeStrategy(folder, **layout)
            tp, pp = strategy.tensor_model_parallel_size, strategy.pipeline_model_parallel_size
            cp = strategy.parallel_sizes["context_parallel_size"]
            dp = _world_size() // (tp * pp * cp)
            trainer = _trainer(strategy, max_steps=1, enable_checkpointing=False, precision=precision)
            trainer.fit(GradientStep(lr=lr, loss_scale=loss_scale, **module_kwargs),
                        DataLoader(samples, batch_size=len(samples) // dp))
            after = dict(strategy.bridge.export_hf_weights(strategy.model_chunks, mode="consolidate"))
            results.append({"after": after or None, "lr": lr, "samples": reference})
        except Exception as error:  # noqa: BLE001 - the test asserts on the message
            results.append({"error": f"{type(error).__name__}: {error}"})
        finally:
            ps.destroy_model_parallel()
            destroy_subgroups()
    return results


def destroy_subgroups() -> None:
    """Destroy every process group but the world: megatron-core's ``destroy_model_parallel`` forgets its
    groups without destroying them, and each gloo group keeps its threads (about 1,800 per rank after
    40 layouts, which starves a 2-core machine)."""
    import torch.distributed as dist

    world = dist.group.WORLD
    for group in list(dist.distributed_c10d._world.pg_map):
        if group is not world:
            dist.destroy_process_group(group)
