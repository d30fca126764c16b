"""CausalLMModule: a ready LightningModule for causal-LM training with MegatronBridgeStrategy.

Batches are dicts with ``input_ids`` [batch, seq] and optionally ``labels`` (HF convention:
same length as ``input_ids``, shifted inside, -100 ignored), ``attention_mask`` and
``loss_mask`` (1 = count the token). The loss is token-weighted next-token cross-entropy over
the whole global batch, whatever the parallel layout.

To change the loss, override :meth:`CausalLMModule.loss_function`; to change the optimizer or
schedule, override :meth:`CausalLMModule.configure_optimizers` (it returns one Megatron optimizer in
any of Lightning's forms, e.g. ``{"optimizer": ..., "lr_scheduler": ...}``; the module steps the
scheduler itself, Megatron's ``OptimizerParamScheduler`` by ``step(increment=1)``). The same code
runs at PP=1 and PP>1.
"""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import torch
import torchmetrics

from lightning_bridge.cross_entropy import vocab_parallel_cross_entropy
from lightning_bridge.optim import megatron_optimizer

IGNORE_INDEX = -100


class CausalLMModule(pl.LightningModule):
    """Next-token training of a Megatron model built by :class:`MegatronBridgeStrategy`."""

    def __init__(
        self,
        hf_model: str | os.PathLike | None = None,
        *,
        learning_rate: float = 2e-5,
        min_learning_rate: float | None = None,
        weight_decay: float = 0.01,
        warmup_steps: int = 0,
        lr_decay_steps: int | None = None,
        adam_betas: tuple[float, float] = (0.9, 0.95),
        adam_eps: float = 1e-8,
        gradient_clip_val: float = 1.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.hf_model = hf_model
        self.automatic_optimization = False  # Megatron's schedule runs forward and backward
        self.megatron_model: torch.nn.ModuleList | None = None
        self.vocab_size = 0
        self.tokens_seen = 0
        self.val_loss = torchmetrics.MeanMetric()
        self.test_loss = torchmetrics.MeanMetric()

    # --- set by the strategy ---------------------------------------------------------------------
    def configure_megatron_model(self, chunks: list[torch.nn.Module], strategy: Any) -> None:
        """Receive this rank's model chunks (called by the strategy once they are built)."""
        self.megatron_model = torch.nn.ModuleList(chunks)
        self.vocab_size = strategy.provider.vocab_size

    # --- what to override --------------------------------------------------------------------------
    def loss_function(self, batch: dict[str, torch.Tensor], logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of per-token losses, number of tokens) for one microbatch.

        ``logits`` are this tensor-parallel rank's vocabulary slice, [batch, seq, vocab / TP].
        """
        labels, mask = next_token_targets(batch)
        return causal_lm_loss(logits, labels, mask, self.vocab_size)

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW (Megatron's, distributed or not as the strategy's DDP) with linear warmup then cosine decay."""
        from megatron.core.optimizer import OptimizerConfig
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        hp = self.hparams
        strategy = self.trainer.strategy
        provider = strategy.provider
        config = OptimizerConfig(
            optimizer="adam", lr=hp.learning_rate, min_lr=self._min_lr(), weight_decay=hp.weight_decay,
            adam_beta1=hp.adam_betas[0], adam_beta2=hp.adam_betas[1], adam_eps=hp.adam_eps,
            clip_grad=hp.gradient_clip_val, **provider.precision(),  # the model's precision
            use_distributed_optimizer=strategy.ddp_config.use_distributed_optimizer,  # DDP reduces for it
        )
        optimizer = megatron_optimizer(config, list(self.megatron_model))
        decay_steps = hp.lr_decay_steps or max(int(self.trainer.estimated_stepping_batches), 1)
        scheduler = OptimizerParamScheduler(
            optimizer, init_lr=0.0 if hp.warmup_steps else hp.learning_rate, max_lr=hp.learning_rate,
            min_lr=self._min_lr(), lr_warmup_steps=hp.warmup_steps,
            lr_decay_steps=max(decay_steps, hp.warmup_steps + 1), lr_decay_style="cosine",
            start_wd=hp.weight_decay, end_wd=hp.weight_decay, wd_incr_steps=decay_steps, wd_incr_style="constant",
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- Lightning hooks -------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, tokens = self.trainer.strategy.forward_backward(batch, self.loss_function)
        self.optimizers().step()
        for scheduler in _as_list(self.lr_schedulers()):
            step_scheduler(scheduler)
        self.tokens_seen += int(tokens)
        self.log("train_loss", loss, prog_bar=True, batch_size=_batch_size(batch))
        self.log("lr", self.trainer.strategy.megatron_optimizer.param_groups[0]["lr"], batch_size=_batch_size(batch))
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, self.val_loss)

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation(self.val_loss, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, self.test_loss)

    def on_test_epoch_end(self) -> None:
        self._log_evaluation(self.test_loss, "test")

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Logits over the real vocabulary, [batch, seq, vocab], on every rank."""
        return self(batch["input_ids"])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        from lightning_bridge.verify import megatron_logits

        return megatron_logits(list(self.megatron_model), input_ids)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["tokens_seen"] = self.tokens_seen

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.tokens_seen = checkpoint.get("tokens_seen", 0)

    def _evaluate(self, batch: dict[str, torch.Tensor], metric: torchmetrics.MeanMetric) -> torch.Tensor:
        loss, tokens = self.trainer.strategy.forward_backward(batch, self.loss_function, forward_only=True)
        metric.update(loss, weight=tokens)  # token-weighted over the whole evaluation
        return loss

    def _log_evaluation(self, metric: torchmetrics.MeanMetric, prefix: str) -> None:
        if metric.update_count:
            loss = metric.compute()
            self.log(f"{prefix}_loss", loss, prog_bar=prefix == "val")
            self.log(f"{prefix}_ppl", torch.exp(loss))
        metric.reset()

    def _min_lr(self) -> float:
        hp = self.hparams
        return hp.min_learning_rate if hp.min_learning_rate is not None else hp.learning_rate * 0.1


def next_token_targets(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels shifted left by one (position t predicts token t+1) and the mask of counted tokens.

    A target counts when its label is not -100 and ``loss_mask`` (if given) keeps it; with an
    ``attention_mask``, both the target token and the position predicting it must be real tokens:
    padding is never counted.
    """
    labels = batch.get("labels", batch["input_ids"])
    counted = labels != IGNORE_INDEX
    real = batch.get("attention_mask")
    for key in ("attention_mask", "loss_mask"):
        if batch.get(key) is not None:
            counted = counted & batch[key].bool()
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    shifted_mask = torch.zeros_like(counted)
    shifted_mask[:, :-1] = counted[:, 1:]
    if real is not None:
        shifted_mask[:, :-1] &= real[:, :-1].bool()
    return shifted.masked_fill(~shifted_mask, 0), shifted_mask


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                   vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of cross-entropy over masked tokens, with the vocabulary split across TP ranks.

    Megatron pads the vocabulary; padded entries are excluded so the loss equals the HF loss.
    """
    losses = vocab_parallel_cross_entropy(logits, labels, vocab_size)  # fp32, no fp32 copy of the logits
    mask = mask.to(losses.dtype)
    return (losses * mask).sum(), mask.sum()


def step_scheduler(scheduler: Any) -> None:
    """Step a scheduler once per optimizer step: Megatron's ``OptimizerParamScheduler`` (not a torch
    ``LRScheduler``) by ``step(increment=1)``, a torch scheduler by ``step()``."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    if isinstance(scheduler, OptimizerParamScheduler):
        scheduler.step(increment=1)
    else:
        scheduler.step()


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _batch_size(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["input_ids"].shape[0])

