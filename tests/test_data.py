"""Causal-LM data: TokenBlocks and TextDataModule."""

from __future__ import annotations

import pytest
import torch

from lightning_bridge.builtin import build_tokenizer, tiny_llama
from lightning_bridge.data import TextDataModule, TokenBlocks


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    return str(tiny_llama(tmp_path_factory.mktemp("data") / "tiny"))


def test_token_blocks_pack_texts_with_eos_and_drop_the_tail():
    tokenizer = build_tokenizer()
    texts = ["the red cat", "lives near the river"]
    ids = [i for t in texts for i in tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]
    blocks = TokenBlocks(texts, tokenizer, block_size=4)
    assert len(blocks) == len(ids) // 4
    assert torch.equal(torch.cat([blocks[i]["input_ids"] for i in range(len(blocks))]), torch.tensor(ids[: len(blocks) * 4]))
    with pytest.raises(ValueError, match="fewer than one block of 1000"):
        TokenBlocks(texts, tokenizer, block_size=1000)


def test_text_data_module_splits_a_text_file_into_train_and_validation_blocks(tmp_path, tokenizer_folder):
    text = "\n\n".join(f"document {i}: the red cat lives near the river bank." for i in range(40))
    (tmp_path / "train.txt").write_text(text)
    data = TextDataModule(tokenizer=tokenizer_folder, text_file=str(tmp_path / "train.txt"), block_size=16,
                          batch_size=4, val_blocks=4, shuffle=False)
    data.setup("fit")
    total = len(data.train_set) + len(data.val_set)
    assert len(data.val_set) == 4 and total > 8
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape == (4, 16)
    assert len(data.train_dataloader()) == len(data.train_set) // 4  # drop_last
    assert next(iter(data.val_dataloader()))["input_ids"].shape == (4, 16)


def test_text_data_module_defaults_to_the_builtin_corpus_and_names_bad_settings(tmp_path, tokenizer_folder):
    data = TextDataModule(tokenizer=tokenizer_folder)
    data.setup("fit")
    assert len(data.train_set) > 8 and data.val_dataloader() == []
    with pytest.raises(FileNotFoundError, match="text_file='nope.txt' does not exist"):
        TextDataModule(tokenizer=tokenizer_folder, text_file="nope.txt").setup("fit")
    with pytest.raises(ValueError, match="val_blocks=100000 leaves no training data"):
        TextDataModule(tokenizer=tokenizer_folder, val_blocks=100000).setup("fit")
    with pytest.raises(ValueError, match="block_size >= 2"):
        TextDataModule(block_size=1)


def test_sets_smaller_than_one_batch_are_refused_rather_than_giving_no_batches(tmp_path, tokenizer_folder):
    (tmp_path / "short.txt").write_text("the red cat lives near the river bank. " * 8)
    short = TextDataModule(tokenizer=tokenizer_folder, text_file=str(tmp_path / "short.txt"), block_size=16,
                           batch_size=64)
    with pytest.raises(ValueError, match=r"The training set has \d+ blocks of 16 tokens, fewer than one batch "
                                         r"\(batch_size=64\)\. Lower batch_size"):
        short.setup("fit")
    with pytest.raises(ValueError, match=r"val_blocks=2 is fewer than one batch \(batch_size=8\), so validation "
                                         r"would get no batches"):
        TextDataModule(tokenizer=tokenizer_folder, val_blocks=2, batch_size=8).setup("fit")
