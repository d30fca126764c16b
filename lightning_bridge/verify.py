"""Check a converted model against transformers: full logits from Megatron at any layout.

Used by the tests, the examples and ``lightning-bridge convert --verify``.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def round_trip(source: str, output: str, *, tensor_model_parallel_size: int = 1,
               pipeline_model_parallel_size: int = 1) -> dict | None:
    """HF -> Megatron -> HF at a layout, checked: logits vs transformers and bitwise equality.

    A collective: call it on every rank. Returns the report on global rank 0, None elsewhere.
    """
    import time

    import transformers

    from lightning_bridge.bridge import AutoBridge
    from lightning_bridge.hf_io import HFCheckpointReader

    started = time.perf_counter()
    bridge = AutoBridge.from_hf_pretrained(source, torch_dtype=torch.float32)
    provider = bridge.to_megatron_provider(show_progress=False)
    provider.tensor_model_parallel_size = tensor_model_parallel_size
    provider.pipeline_model_parallel_size = pipeline_model_parallel_size
    model = provider(wrap_with_ddp=False)
    import_s = time.perf_counter() - started

    input_ids = torch.randint(0, bridge.hf_config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    ours = megatron_logits(model, input_ids)
    started = time.perf_counter()
    saved = bridge.save_hf_pretrained(model, output, show_progress=False)
    export_s = time.perf_counter() - started
    if dist.get_rank() != 0:
        return None
    # eager attention: transformers' reference math (its SDPA path skips Gemma 2's score soft-capping)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        source, dtype=torch.float32, attn_implementation="eager").eval()
    original, result = bridge.checkpoint_reader(), HFCheckpointReader(saved)
    bitwise = sorted(original.names()) == sorted(result.names()) and all(
        torch.equal(original.get(n), result.get(n)) for n in original.names())
    transformers.AutoModelForCausalLM.from_pretrained(saved)  # transformers loads the result
    return {
        "model": str(source), "architecture": bridge.hf_config.architectures[0],
        "layout": f"TP={tensor_model_parallel_size} PP={pipeline_model_parallel_size} on {dist.get_world_size()} process(es)",
        "import_s": import_s, "export_s": export_s, "saved": str(saved), "tensors": len(original.names()),
        "logits_relative_difference": relative_difference(ours, transformers_logits(reference, input_ids)),
        "bitwise": bitwise,
    }


def print_round_trip(report: dict) -> bool:
    """Print a round-trip report; True when both checks pass."""
    ok_logits = report["logits_relative_difference"] <= 1e-5
    print(f"model                 {report['model']} ({report['architecture']})")
    print(f"layout                {report['layout']}")
    print(f"HF -> Megatron        {report['import_s']:.2f} s")
    print(f"logits vs transformers max |diff| / max |logit| = {report['logits_relative_difference']:.2e}"
          f"  ({'OK' if ok_logits else 'MISMATCH'})")
    print(f"Megatron -> HF        {report['export_s']:.2f} s -> {report['saved']}")
    print(f"round trip            {'bitwise identical' if report['bitwise'] else 'DIFFERENT'} ({report['tensors']} tensors)")
    return ok_logits and report["bitwise"]
