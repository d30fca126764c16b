"""Causal-LM data: text packed into fixed-length token blocks, as batches of dicts.

``TokenBlocks`` is the dataset; ``TextDataModule`` wraps it for a Trainer (and for
``lightning-bridge fit --data lightning_bridge.TextDataModule``). Chat and prompt/completion data:
:mod:`lightning_bridge.sft_data`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, Subset

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class TokenBlocks(Dataset):
    """Texts tokenized, joined with EOS, and cut into ``block_size`` blocks (the tail dropped)."""

    def __init__(self, texts: Iterable[str], tokenizer: PreTrainedTokenizerBase, block_size: int = 128):
        ids: list[int] = []
        for text in texts:
            ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
            if tokenizer.eos_token_id is not None:
                ids.append(tokenizer.eos_token_id)
        count = len(ids) // block_size
        if count == 0:
            raise ValueError(f"Only {len(ids)} tokens: fewer than one block of {block_size}. Use more text "
                             "or a smaller block_size.")
        self.blocks = torch.tensor(ids[: count * block_size]).view(count, block_size)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[index]}


class TextDataModule(pl.LightningDataModule):
    """Plain text for causal-LM training: tokenized with the model's tokenizer, packed into blocks.

    The text is a local file (``text_file``) or, by default, the corpus shipped with the package;
    it is split into documents at ``separator`` and packed by :class:`TokenBlocks`. The last
    ``val_blocks`` blocks are held out for validation. ``batch_size`` is per data-parallel replica
    (Lightning gives each replica its own sampler). ``tokenizer`` is an HF id or folder; the
    ``lightning-bridge fit`` command sets it to the model being trained.
    """

    def __init__(self, tokenizer: str | None = None, text_file: str | None = None, block_size: int = 64,
                 batch_size: int = 8, val_blocks: int = 0, separator: str = "\n\n", shuffle: bool = True,
                 num_workers: int = 0) -> None:
        super().__init__()
        if val_blocks < 0 or block_size < 2 or batch_size < 1:
            raise ValueError(f"TextDataModule needs block_size >= 2, batch_size >= 1 and val_blocks >= 0; got "
                             f"block_size={block_size}, batch_size={batch_size}, val_blocks={val_blocks}.")
        self.tokenizer_source, self.text_file = tokenizer, text_file
        self.block_size, self.batch_size, self.val_blocks = block_size, batch_size, val_blocks
        self.separator, self.shuffle, self.num_workers = separator, shuffle, num_workers
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from transformers import AutoTokenizer

        from lightning_bridge.builtin import corpus_text, tiny_llama

        tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_source or str(tiny_llama()))
        if self.text_file is not None:
            path = Path(self.text_file)
            if not path.is_file():
                raise FileNotFoundError(f"text_file={self.text_file!r} does not exist. Pass a UTF-8 text file, "
                                        "or leave it unset to train on the built-in corpus.")
            text = path.read_text(encoding="utf-8")
        else:
            text = corpus_text()
        blocks = TokenBlocks([t for t in text.split(self.separator) if t.strip()], tokenizer, self.block_size)
        if self.val_blocks >= len(blocks):
            raise ValueError(f"val_blocks={self.val_blocks} leaves no training data: the text makes only "
                             f"{len(blocks)} blocks of {self.block_size} tokens. Lower val_blocks.")
        split = len(blocks) - self.val_blocks
        # The loaders drop a ragged last batch: a set smaller than one batch would give no batches, silently.
        if split < self.batch_size:
            raise ValueError(f"The training set has {split} blocks of {self.block_size} tokens, fewer than one "
                             f"batch (batch_size={self.batch_size}). Lower batch_size, block_size or val_blocks, "
                             "or use more text.")
        if 0 < self.val_blocks < self.batch_size:
            raise ValueError(f"val_blocks={self.val_blocks} is fewer than one batch (batch_size={self.batch_size}), "
                             "so validation would get no batches. Set val_blocks to 0 or to at least batch_size.")
        self.train_set = Subset(blocks, range(split))
        self.val_set = Subset(blocks, range(split, len(blocks))) if self.val_blocks else None

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=self.shuffle, drop_last=True,
                          num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        return DataLoader(self.val_set, batch_size=self.batch_size, drop_last=True, num_workers=self.num_workers)
