"""GPU checks, for the device machines: ``pytest -m gpu tests/test_gpu.py`` (deselected in CI).

The CPU suite covers every layout; these make sure the same code paths hold on CUDA: weights
loaded onto the GPU, cuBLAS logits against transformers, pinned-memory staging in HFCheckpoint.
"""

from __future__ import annotations

import pytest
import torch
from factories import make_checkpoint

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("family", ["llama", "llama3.2", "qwen3", "mixtral", "qwen3-moe", "phi2", "gemma2"])
def test_round_trip_and_logits_on_gpu(family, tmp_path):
    from lightning_bridge.verify import round_trip

    source = make_checkpoint(family, tmp_path / "source")
    report = round_trip(str(source), str(tmp_path / "out"))
    assert report["bitwise"], report
    assert report["logits_relative_difference"] <= 2e-5, report


def test_hf_checkpoint_stages_in_pinned_memory_and_writes_the_model(tmp_path):
    from lightning_bridge import AutoBridge
    from lightning_bridge.callbacks import HFCheckpoint
    from lightning_bridge.hf_io import HFCheckpointReader

    source = make_checkpoint("llama", tmp_path / "source", dtype=torch.bfloat16)
    bridge = AutoBridge.from_hf_pretrained(source)
    chunks = bridge.to_megatron_model(show_progress=False)
    assert next(chunks[0].parameters()).is_cuda
    callback = HFCheckpoint(tmp_path / "checkpoints")
    callback.warm_up(bridge, chunks)
    for step in (1, 2):
        callback.save(bridge, chunks, step)
        stats = callback.wait()
        assert stats["staged_all"] and stats["blocked_s"] < stats["total_s"]
    original, saved = HFCheckpointReader(source), HFCheckpointReader(tmp_path / "checkpoints" / "step-2")
    assert sorted(saved.names()) == sorted(original.names())
    assert all(torch.equal(original.get(n), saved.get(n)) for n in original.names())
