"""Model cards of PushToHub: metadata, summary, and the loss plot (SVG fallback, PNG with matplotlib)."""

from __future__ import annotations

import math
import sys
import xml.etree.ElementTree as ET
from datetime import datetime, timezone

import pytest
import yaml

from lightning_bridge.sources import ConfigOnlySource, HFCheckpointSource
from lightning_bridge.callbacks.model_card import (
    TrainingSummary,
    adapter_kind,
    nice_ticks,
    base_model_for,
    card_metadata,
    render_loss_plot,
    render_loss_svg,
    render_model_card,
)

SVG = "{http://www.w3.org/2000/svg}"


def _split(card: str) -> tuple[dict, str]:
    _, front, body = card.split("---\n", 2)
    return yaml.safe_load(front), body


def test_base_model_from_hub_id_cache_and_local_folder(tmp_path):
    assert base_model_for("meta-llama/Llama-3.2-1B") == ("meta-llama/Llama-3.2-1B", None)
    assert base_model_for("gpt2") == ("gpt2", None)
    cached = tmp_path / "hub" / "models--Qwen--Qwen3-0.6B" / "snapshots" / "abc123"
    cached.mkdir(parents=True)
    assert base_model_for(cached) == ("Qwen/Qwen3-0.6B", None)
    local = tmp_path / "my-llama"
    local.mkdir()
    assert base_model_for(str(local)) == (None, "my-llama")  # a local path never becomes base_model
    assert base_model_for("./not/../an-id") == (None, "an-id")
    assert base_model_for(None) == (None, None)
    assert base_model_for(object()) == (None, None)
    bridge = type("Bridge", (), {"source": HFCheckpointSource("org/model")})()  # an AutoBridge's source
    assert base_model_for(bridge) == ("org/model", None)
    assert base_model_for(HFCheckpointSource(str(local))) == (None, "my-llama")
    assert base_model_for(ConfigOnlySource()) == (None, None)


def test_metadata_and_summary():
    summary = TrainingSummary(
        steps=1000, checkpoint_step=900, tokens_seen=4_096_000, train_loss=2.0, val_loss=2.5, val_ppl=12.0,
        parallel={"TP": 2, "PP": 2, "DP": 4}, base_model="org/base", model_type="llama",
        architecture="LlamaForCausalLM", started_at=datetime(2026, 1, 2, 3, 4, tzinfo=timezone.utc),
        finished_at=datetime(2026, 1, 2, 5, 6, tzinfo=timezone.utc))
    assert card_metadata(summary, tags=["extra", "llama"]) == {
        "base_model": "org/base", "library_name": "transformers",
        "tags": ["lightning-bridge", "megatron-core", "llama", "extra"], "pipeline_tag": "text-generation"}
    meta, body = _split(render_model_card("me/model", summary, plot_filename="training_loss.svg", revision="step-900"))
    assert meta["base_model"] == "org/base" and meta["pipeline_tag"] == "text-generation"
    for row in ("| Base model | `org/base` |", "| Architecture | `LlamaForCausalLM` |", "| Checkpoint | step 900 |",
                "| Training steps | 1,000 |", "| Tokens seen | 4,096,000 |",
                f"| Final train loss | 2.0000 (perplexity {math.exp(2):,.2f}) |",
                "| Final validation loss | 2.5000 (perplexity 12.00) |", "| Parallel layout | TP=2, PP=2, DP=4 |",
                "| Training started | 2026-01-02 03:04 UTC |", "| Training finished | 2026-01-02 05:06 UTC |"):
        assert row in body
    assert "![Training loss per step](training_loss.svg)" in body
    assert 'from_pretrained("me/model", revision="step-900")' in body


def test_an_adapter_card_says_peft_and_loads_the_adapter_on_its_base(tmp_path):
    assert adapter_kind(tmp_path) is None  # full weights
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "use_dora": true}')
    assert adapter_kind(tmp_path) == "DoRA"
    summary = TrainingSummary(steps=10, base_model="meta-llama/Llama-3.2-1B", model_type="llama", adapter="LoRA")
    meta, body = _split(render_model_card("me/llama-lora", summary))
    assert meta["library_name"] == "peft" and meta["base_model"] == "meta-llama/Llama-3.2-1B"
    assert "lora" in meta["tags"]
    assert "exported as a PEFT LoRA adapter" in body
    assert 'PeftModel.from_pretrained(base, "me/llama-lora")' in body
    assert 'AutoModelForCausalLM.from_pretrained("meta-llama/Llama-3.2-1B")' in body


def test_minimal_card_and_local_source():
    meta, body = _split(render_model_card("me/model", TrainingSummary(source_name="my-llama")))
    assert "base_model" not in meta and meta["library_name"] == "transformers"
    assert "`my-llama`" in body and "Training loss" not in body and 'from_pretrained("me/model")' in body
    assert "(perplexity inf)" in render_model_card("me/m", TrainingSummary(train_loss=1e6))


def test_svg_plot_is_valid_and_follows_the_data():
    steps, losses = list(range(1, 51)), [5.0 / s for s in range(1, 51)]
    root = ET.fromstring(render_loss_svg(steps, losses))
    assert root.tag == f"{SVG}svg"
    line = root.find(f"{SVG}polyline")
    points = [tuple(map(float, p.split(","))) for p in line.get("points").split()]
    assert len(points) == 50
    xs, ys = zip(*points)
    assert list(xs) == sorted(xs) and ys[0] < ys[-1]  # loss falls: the line goes down (SVG y grows downwards)
    assert {t.text for t in root.iter(f"{SVG}text")} >= {"Training loss", "step", "train loss"}


def test_svg_plot_edge_cases():
    one = ET.fromstring(render_loss_svg([3], [2.0]))
    assert one.find(f"{SVG}circle") is not None
    flat = ET.fromstring(render_loss_svg([1, 2, 3], [1.0, 1.0, 1.0]))
    assert flat.find(f"{SVG}polyline") is not None
    many = ET.fromstring(render_loss_svg(list(range(10_001)), [1.0 + (i % 7) for i in range(10_001)]))
    assert len(many.find(f"{SVG}polyline").get("points").split()) <= 2001
    gaps = ET.fromstring(render_loss_svg([1, 2, 3], [1.0, float("nan"), float("inf")]))
    assert gaps.find(f"{SVG}circle") is not None  # one finite point left
    for low, high in ((0.0, 1.0), (2.31, 2.34), (1, 10_000), (5.0, 5.0)):
        ticks = nice_ticks(low, high)
        assert ticks[0] <= low and ticks[-1] >= high and ticks == sorted(set(ticks)) and len(ticks) >= 2


def test_plot_falls_back_to_svg_without_matplotlib(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    plot = render_loss_plot([1, 2, 3], [3.0, 2.0, 1.5])
    assert plot.filename == "training_loss.svg" and plot.data.startswith(b"<svg")
    with pytest.raises(ImportError):
        render_loss_plot([1], [1.0], fmt="png")
    assert render_loss_plot([1, 2], [float("nan"), float("nan")]) is None
    assert render_loss_plot([], []) is None
    assert render_loss_plot([1], [1.0], fmt="svg").filename == "training_loss.svg"


def test_png_plot_with_matplotlib():
    pytest.importorskip("matplotlib")  # not in the CPU venv; on the GPU image
    plot = render_loss_plot([1, 2, 3], [3.0, 2.0, 1.5])
    assert plot.filename == "training_loss.png" and plot.data.startswith(b"\x89PNG\r\n\x1a\n")
