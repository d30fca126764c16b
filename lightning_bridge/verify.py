"""Check a converted model against transformers: full logits from Megatron at any layout.

Used by the tests, the examples and ``lightning-bridge convert --verify``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from lightning_bridge.conversion.parallel import unwrap


@torch.no_grad()
def megatron_logits(model: Sequence[torch.nn.Module] | torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits [batch, seq, vocab] over the real vocabulary, on every rank (a collective).

    Runs Megatron's own forward schedule, so it works at any TP/PP layout.
    """
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    config = unwrap(chunks[0]).config
    device = next(chunks[0].parameters()).device
    input_ids = input_ids.to(device)
    batch, seq = input_ids.shape
    position_ids = torch.arange(seq, device=device).expand(batch, seq)
    for chunk in chunks:
        chunk.eval()

    def forward_step(data_iterator, chunk):
        return chunk(next(data_iterator), position_ids, None), None

    outputs = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=[iter([input_ids]) for _ in chunks] if len(chunks) > 1 else iter([input_ids]),
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=1,
        seq_length=seq,
        micro_batch_size=batch,
        forward_only=True,
    )
    vocab = config.vocab_size
    logits = torch.empty(batch, seq, vocab, dtype=torch.float32, device=device)
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        full = gather_from_tensor_model_parallel_region(outputs[0])
        logits.copy_(full[..., :vocab].float())
    if ps.get_pipeline_model_parallel_world_size() > 1:
        last = ps.get_pipeline_model_parallel_last_rank()
        dist.broadcast(logits, src=last, group=ps.get_pipeline_model_parallel_group())
    return logits


@torch.no_grad()
def transformers_logits(hf_model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The reference logits from a transformers model, float32."""
    return hf_model(input_ids.to(next(hf_model.parameters()).device)).logits.float()


def relative_difference(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """Max absolute difference divided by the reference logits' scale (max |logit|)."""
    ours, reference = ours.float().cpu(), reference.float().cpu()
    return ((ours - reference).abs().max() / reference.abs().max().clamp_min(1e-12)).item()
