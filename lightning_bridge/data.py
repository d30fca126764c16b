"""Causal-LM data: text packed into fixed-length token blocks, as batches of dicts."""

from __future__ import annotations

from typing import Iterable

import torch
from torch.utils.data import Dataset


class TokenBlocks(Dataset):
    """Texts tokenized, joined with EOS, and cut into ``block_size`` blocks (the tail dropped)."""

    def __init__(self, texts: Iterable[str], tokenizer, block_size: int = 128):
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
