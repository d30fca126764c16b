"""CausalLMModule's targets: which tokens count, with labels, loss_mask and padding."""

from __future__ import annotations

import torch

from lightning_bridge.module import IGNORE_INDEX, next_token_targets


def test_targets_are_the_next_tokens_and_the_last_position_predicts_nothing():
    ids = torch.tensor([[5, 6, 7, 8]])
    labels, counted = next_token_targets({"input_ids": ids})
    assert labels.tolist() == [[6, 7, 8, 0]]
    assert counted.tolist() == [[True, True, True, False]]


def test_labels_and_loss_mask_choose_the_counted_tokens():
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 7, 8, 9]])  # the prompt is not learned
    _, counted = next_token_targets({"input_ids": ids, "labels": labels})
    assert counted.tolist() == [[False, True, True, True, False]]
    _, counted = next_token_targets({"input_ids": ids, "loss_mask": torch.tensor([[1, 1, 1, 0, 1]])})
    assert counted.tolist() == [[True, True, False, True, False]]


def test_padding_is_never_counted_left_or_right():
    ids = torch.tensor([[0, 0, 5, 6, 7], [5, 6, 7, 0, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    _, counted = next_token_targets({"input_ids": ids, "attention_mask": mask})
    # left: the last padding position would predict the first real token; it is padding, so it does not
    assert counted.tolist() == [[False, False, True, True, False], [True, True, False, False, False]]


def test_step_scheduler_steps_megatrons_scheduler_and_torchs_once():
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from lightning_bridge.module import step_scheduler

    param = torch.nn.Parameter(torch.zeros(1))
    torch_optimizer = torch.optim.SGD([param], lr=1.0)
    torch_scheduler = torch.optim.lr_scheduler.StepLR(torch_optimizer, step_size=1, gamma=0.5)
    step_scheduler(torch_scheduler)
    assert torch_optimizer.param_groups[0]["lr"] == 0.5
    megatron = OptimizerParamScheduler(torch.optim.SGD([param], lr=1.0), init_lr=0.0, max_lr=1.0, min_lr=0.0,
                                       lr_warmup_steps=4, lr_decay_steps=8, lr_decay_style="linear", start_wd=0.0,
                                       end_wd=0.0, wd_incr_steps=8, wd_incr_style="constant")
    step_scheduler(megatron)
    assert megatron.num_steps == 1 and megatron.optimizer.param_groups[0]["lr"] == 0.25  # warmup: 1 of 4 steps
