"""Megatron logits against transformers, and the round-trip report `convert --verify` prints."""

from __future__ import annotations

import pytest
import torch
import transformers
from factories import make_checkpoint
from megatron.core import parallel_state as ps

from lightning_bridge import AutoBridge
from lightning_bridge.hf_io import HFCheckpointReader
from lightning_bridge.verify import (
    megatron_logits,
    print_round_trip,
    relative_difference,
    round_trip,
    transformers_logits,
)


def test_relative_difference_is_the_max_difference_over_the_reference_scale():
    reference = torch.tensor([[1.0, -4.0], [2.0, 0.5]])
    assert relative_difference(reference.clone(), reference) == 0.0
    assert relative_difference(reference + torch.tensor([[0.0, 0.0], [0.0, 1.0]]), reference) == 0.25
    assert relative_difference(torch.ones(2), torch.zeros(2)) == pytest.approx(1e12)  # no division by zero


def test_megatron_logits_match_transformers(tmp_path):
    folder = make_checkpoint("qwen2", tmp_path / "qwen2")
    bridge = AutoBridge.from_hf_pretrained(folder, torch_dtype=torch.float32)
    input_ids = torch.randint(0, bridge.hf_config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    try:
        ours = megatron_logits(bridge.to_megatron_model(show_progress=False), input_ids)
    finally:
        ps.destroy_model_parallel()
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    theirs = transformers_logits(reference, input_ids)
    assert ours.shape == theirs.shape == (2, 9, bridge.hf_config.vocab_size) and theirs.dtype == torch.float32
    assert relative_difference(ours, theirs) <= 1e-5


def test_round_trip_reports_bitwise_identity_and_prints_it(tmp_path, capsys):
    folder = make_checkpoint("llama", tmp_path / "llama")
    try:
        report = round_trip(str(folder), str(tmp_path / "out"))
    finally:
        ps.destroy_model_parallel()
    assert report["bitwise"] is True and report["logits_relative_difference"] <= 1e-5
    assert report["architecture"] == "LlamaForCausalLM" and report["layout"] == "TP=1 PP=1 on 1 process(es)"
    tensors = len(HFCheckpointReader(folder).names())
    assert report["saved"] == str(tmp_path / "out") and report["tensors"] == tensors
    assert print_round_trip(report) is True
    printed = capsys.readouterr().out
    assert f"bitwise identical ({tensors} tensors)" in printed and "(OK)" in printed
    assert print_round_trip({**report, "bitwise": False}) is False
    assert "DIFFERENT" in capsys.readouterr().out
