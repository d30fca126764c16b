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
