"""Attention masks for padded and packed batches, in Megatron's convention ([batch, 1, seq, seq], True = hidden).

A batch says what it holds with transformers' keys:

- ``attention_mask`` [batch, seq], 1 = a real token, 0 = padding;
- ``position_ids`` [batch, seq] restarting at 0 where a new example begins: several examples
  packed into one sequence (as transformers' packed training reads them).

:func:`attention_mask_for` turns them into the mask Megatron's attention takes, or None where
causality alone is right (no padding before a real token, nothing packed), so that the fused
causal kernels keep their fast path. Real tokens attend only to earlier real tokens of their own
example; a padding position attends to itself alone (it is never counted, and a row with nothing
to attend to gives NaN in fused kernels).
"""

from __future__ import annotations

import torch


def needs_mask(attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None) -> bool:
    """True when causality alone would let a real token see padding or another packed example."""
    if position_ids is not None and bool((position_ids[:, 1:] == 0).any()):
        return True
    if attention_mask is None:
        return False
    real = attention_mask.bool()
    return not bool((real[:, 1:] <= real[:, :-1]).all())  # not "real tokens, then padding" in every row


def attention_mask_for(attention_mask: torch.Tensor | None,
                       position_ids: torch.Tensor | None) -> torch.Tensor | None:
    """Megatron's [batch, 1, seq, seq] mask (True = hidden) for this batch, or None for plain causal."""
    if not needs_mask(attention_mask, position_ids):
        return None
    reference = attention_mask if attention_mask is not None else position_ids
    batch, seq = reference.shape
    device = reference.device
    allowed = torch.ones(seq, seq, dtype=torch.bool, device=device).tril().expand(batch, seq, seq)
    if position_ids is not None:
        example = (position_ids == 0).cumsum(-1)
        allowed = allowed & (example[:, :, None] == example[:, None, :])
    if attention_mask is not None:
        eye = torch.eye(seq, dtype=torch.bool, device=device)
        allowed = allowed & (attention_mask.bool()[:, None, :] | eye)
    return ~allowed[:, None]
