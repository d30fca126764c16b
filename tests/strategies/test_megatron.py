"""MegatronBridgeStrategy on gloo: TP, PP, DP and TP x PP agree; checkpoints resume exactly."""

from __future__ import annotations

import math
import re

import lightning.pytorch as pl
import pytest
import torch
import transformers
from factories import make_checkpoint
from processes import launch
from strategies.strategy_checks import layouts_agree, resume_and_validate

from lightning.pytorch.plugins.precision import Precision
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from lightning_bridge import CausalLMModule, MegatronBridgeStrategy
from lightning_bridge import provider as provider_module
from lightning_bridge.strategies.megatron import parse_optimizers

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]  # (TP, PP) on 4 ranks: DP 4, 2, 2, 1


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return str(make_checkpoint("llama", tmp_path_factory.mktemp("strategy") / "llama"))


@pytest.fixture(scope="module")
def four_layouts(source):
    return launch(layouts_agree, 4, source, LAYOUTS)[0]


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", LAYOUTS[1:])
def test_one_step_matches_data_parallel_only(four_layouts, tp, pp):
    """The same global batch gives the same update at every layout (float32 tolerance)."""
    reference, weights = four_layouts[(1, 1)]["one_step"], four_layouts[(tp, pp)]["one_step"]
    assert weights.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(weights[name], reference[name], rtol=0, atol=2e-6, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_loss_falls(four_layouts, tp, pp):
    losses = four_layouts[(tp, pp)]["losses"]
    assert len(losses) == 12
    assert losses[-1] < 0.8 * losses[0]  # 12 steps of a tiny model: a clear fall
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(four_layouts[(1, 1)]["losses"]), rtol=1e-3, atol=1e-3)


@pytest.fixture(scope="module")
def resumed(source, tmp_path_factory):
    return launch(resume_and_validate, 2, source, str(tmp_path_factory.mktemp("ckpt")), 1, 2)


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(resumed):
    full, again = resumed[0]["full"], resumed[0]["resumed"]
    steps_per_epoch = len(full) // 2
    assert again == full[steps_per_epoch:]  # bitwise: same weights, optimizer, schedule, data


@pytest.mark.slow
def test_validation_metrics_are_right_on_rank_zero(resumed, source):
    result = resumed[0]
    model = transformers.AutoModelForCausalLM.from_pretrained(source)
    model.load_state_dict({**model.state_dict(), **result["weights"]})
    total, tokens = 0.0, 0
    with torch.no_grad():
        for ids in result["val_batches"]:
            logits = model(ids).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                     reduction="sum")
            total, tokens = total + loss.item(), tokens + ids[:, 1:].numel()
    assert result["metrics"]["val_loss"] == pytest.approx(total / tokens, rel=1e-4)
    assert result["metrics"]["val_ppl"] == pytest.approx(math.exp(total / tokens), rel=1e-4)
    assert all(r["metrics"]["val_loss"] == result["metrics"]["val_loss"] for r in resumed)


# --- clear errors, in one process ---------------------------------------------------------------

def _fit_one_process(strategy, module=None, **trainer_kwargs):
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=strategy, max_steps=1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         **trainer_kwargs)
    data = torch.utils.data.DataLoader([{"input_ids": torch.arange(8)}] * 6, batch_size=3)
    trainer.fit(module or CausalLMModule(), data)
    return trainer


class ReturnsInLightningForm(CausalLMModule):
    """CausalLMModule's optimizer and scheduler, returned in another of Lightning's forms."""

    def __init__(self, form):
        super().__init__()
        self.form = form

    def configure_optimizers(self):
        conf = super().configure_optimizers()
        return self.form(conf["optimizer"], conf["lr_scheduler"]["scheduler"])


def test_parse_optimizers_reads_lightnings_documented_forms():
    opt, other, sched = object(), object(), object()
    assert parse_optimizers(opt) == ([opt], [])
    assert parse_optimizers([opt]) == ([opt], []) and parse_optimizers((opt, other)) == ([opt, other], [])
    assert parse_optimizers(([opt], [sched])) == ([opt], [sched]) and parse_optimizers(([opt], sched)) == ([opt], [sched])
    assert parse_optimizers({"optimizer": opt, "lr_scheduler": sched}) == ([opt], [sched])
    assert parse_optimizers({"optimizer": opt}) == ([opt], [])
    assert parse_optimizers([{"optimizer": opt}, {"optimizer": other, "lr_scheduler": sched}]) == ([opt, other], [sched])
    assert parse_optimizers(None) == ([], [])
    with pytest.raises(ValueError, match='without "optimizer"'):
        parse_optimizers({"lr_scheduler": sched})


def test_one_fit_builds_once_in_the_trainers_precision_and_steps_the_dict_forms_scheduler(source, monkeypatch):
    calls = []
    initialize = provider_module.initialize_model_parallel
    monkeypatch.setattr(provider_module, "initialize_model_parallel", lambda **kw: calls.append(kw) or initialize(**kw))
    trainer = _fit_one_process(MegatronBridgeStrategy(source), precision="bf16-mixed")
    strategy = trainer.strategy
    assert len(calls) == 1  # Megatron's parallel groups: made once, by the model build
    assert strategy.provider.precision() == {"params_dtype": torch.bfloat16, "bf16": True, "fp16": False}
    assert type(strategy.precision_plugin) is Precision  # Float16Module, not Lightning's autocast
    (config,) = trainer.lr_scheduler_configs
    assert isinstance(config.scheduler, OptimizerParamScheduler) and config.interval == "step"
    assert config.scheduler.num_steps == 1 and trainer.optimizers == [strategy.megatron_optimizer]


def test_configure_optimizers_in_the_two_lists_form(source):
    trainer = _fit_one_process(MegatronBridgeStrategy(source), ReturnsInLightningForm(lambda o, s: ([o], [s])))
    (config,) = trainer.lr_scheduler_configs
    assert config.scheduler.num_steps == 1 and config.scheduler.optimizer is trainer.strategy.megatron_optimizer


@pytest.mark.parametrize("form,count", [(lambda o, s: (o, s), "returned 2 (ChainedOptimizer, OptimizerParamScheduler)"),
                                        (lambda o, s: None, "returned 0 (none)")])
def test_exactly_one_megatron_optimizer_is_required(source, form, count):
    with pytest.raises(ValueError, match=rf"exactly one Megatron optimizer.*{re.escape(count)}.*\"lr_scheduler\""):
        _fit_one_process(MegatronBridgeStrategy(source), ReturnsInLightningForm(form))


def test_devices_not_divisible_by_tp_x_pp(source):
    with pytest.raises(ValueError, match=r"not divisible by tensor_model_parallel_size \(2\)"):
        _fit_one_process(MegatronBridgeStrategy(source, tensor_model_parallel_size=2))


def test_microbatch_must_divide_the_batch(source):
    with pytest.raises(ValueError, match="batch size 3 is not divisible by micro_batch_size=2"):
        _fit_one_process(MegatronBridgeStrategy(source, micro_batch_size=2))


def test_lightning_gradient_accumulation_is_refused(source):
    with pytest.raises(ValueError, match="micro_batch_size"):
        _fit_one_process(MegatronBridgeStrategy(source), accumulate_grad_batches=2)


def test_unsupported_precision_is_refused(source):
    with pytest.raises(ValueError, match="precision='64-true'"):
        _fit_one_process(MegatronBridgeStrategy(source), precision="64-true")


def test_context_parallelism_is_refused_at_construction(source):
    with pytest.raises(ValueError, match=r"context_parallel_size=2 is not supported.*sequence_parallel=True"):
        MegatronBridgeStrategy(source, context_parallel_size=2)


def test_sequence_parallel_needs_a_sequence_length_divisible_by_tp(source):
    strategy = MegatronBridgeStrategy(source, tensor_model_parallel_size=2, sequence_parallel=True)
    with pytest.raises(ValueError, match="sequence length 7 is not divisible by 2"):
        strategy._check_sequence_length(7)


def test_an_unknown_recompute_is_refused_at_construction(source):
    with pytest.raises(ValueError, match=r"recompute='layers' is not one of \[None, 'full', 'selective'\]"):
        MegatronBridgeStrategy(str(source), recompute="layers")


def test_left_padding_is_refused_for_unfused_sliding_window_attention(tmp_path):
    strategy = MegatronBridgeStrategy(str(make_checkpoint("mistral", tmp_path / "mistral")))
    strategy.provider = strategy._resolve_bridge().to_megatron_provider(load_weights=False)
    left = {"attention_mask": torch.tensor([[0, 1, 1, 1]])}
    assert strategy._attention_mask(left) is not None  # the fused attention combines mask and window
    strategy.provider.attention_backend = "local"
    right = torch.tensor([[1, 1, 1, 0]])
    assert strategy._attention_mask({"attention_mask": right}) is None  # causal never looks forward
    with pytest.raises(ValueError, match="pad on the right"):
        strategy._attention_mask({"attention_mask": torch.tensor([[0, 1, 1, 1]])})
    with pytest.raises(ValueError, match="do not pack"):
        strategy._attention_mask({"position_ids": torch.tensor([[0, 1, 0, 1]])})


def test_missing_model_is_explained():
    with pytest.raises(ValueError, match="needs a model"):
        _fit_one_process(MegatronBridgeStrategy())


def test_registered_by_name():
    assert "megatron_bridge" in pl.strategies.StrategyRegistry


def test_validate_test_and_predict_without_fit(source):
    """Evaluation entry points work on their own; predict gives transformers' logits."""
    batches = [{"input_ids": (torch.arange(8) * 7 + i) % 96} for i in range(4)]

    class Data(pl.LightningDataModule):  # a LightningDataModule works as well as a DataLoader
        def val_dataloader(self):
            return torch.utils.data.DataLoader(batches, batch_size=2)

        test_dataloader = predict_dataloader = val_dataloader

    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=MegatronBridgeStrategy(source), logger=False,
                         enable_progress_bar=False, enable_model_summary=False)
    module = CausalLMModule()
    (validated,) = trainer.validate(module, datamodule=Data())
    (tested,) = trainer.test(module, datamodule=Data())
    assert validated["val_loss"] == pytest.approx(tested["test_loss"])
    assert validated["val_ppl"] == pytest.approx(math.exp(validated["val_loss"]), rel=1e-5)
    predicted = torch.cat(trainer.predict(module, datamodule=Data()))
    reference = transformers.AutoModelForCausalLM.from_pretrained(source)(torch.stack([b["input_ids"] for b in batches])).logits
    torch.testing.assert_close(predicted, reference, rtol=1e-4, atol=1e-5)
