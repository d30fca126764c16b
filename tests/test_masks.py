"""Attention masks for padded and packed batches (True = hidden from the query row)."""

from __future__ import annotations

import torch

from lightning_bridge.masks import attention_mask_for


def test_plain_causal_and_right_padding_need_no_mask():
    assert attention_mask_for(None, None) is None
    assert attention_mask_for(torch.tensor([[1, 1, 1, 0, 0]]), None) is None
    assert attention_mask_for(None, torch.arange(4)[None]) is None  # one example: causal is right


def test_left_padding_is_hidden_from_real_tokens():
    hidden = attention_mask_for(torch.tensor([[0, 1, 1]]), None)[0, 0]
    assert hidden.tolist() == [[False, True, True],   # padding attends to itself only
                               [True, False, True],   # the first real token: itself
                               [True, False, False]]


def test_packed_examples_do_not_see_each_other():
    hidden = attention_mask_for(torch.tensor([[1, 1, 1, 1, 0]]), torch.tensor([[0, 1, 0, 1, 0]]))[0, 0]
    seen = (~hidden).int().tolist()
    assert seen == [[1, 0, 0, 0, 0],
                    [1, 1, 0, 0, 0],
                    [0, 0, 1, 0, 0],   # the second example starts afresh
                    [0, 0, 1, 1, 0],
                    [0, 0, 0, 0, 1]]   # padding: itself only
