"""The lightning-bridge command."""

from __future__ import annotations

from lightning_bridge.builtin import tiny_llama
from lightning_bridge.cli import main


def test_inspect_lists_supported_architectures(capsys):
    assert main(["inspect"]) == 0
    assert "LlamaForCausalLM" in capsys.readouterr().out


def test_inspect_shows_a_checkpoints_mapping_table(tmp_path, capsys):
    assert main(["inspect", str(tiny_llama(tmp_path / "tiny"))]) == 0
    out = capsys.readouterr().out
    assert "LlamaBridge" in out
    assert "qkv: decoder.layers.*.self_attention.linear_qkv.weight <- model.layers.*.self_attn.q_proj.weight" in out


def test_roundtrip_reports_bitwise_identity(tmp_path, capsys):
    assert main(["roundtrip", str(tiny_llama(tmp_path / "tiny")), "--output", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "bitwise identical" in out and "(OK)" in out


def test_hub_serve_answers_until_stopped(tmp_path):
    import re
    import subprocess
    import sys

    from huggingface_hub import HfApi

    server = subprocess.Popen([sys.executable, "-m", "lightning_bridge.cli", "hub", "serve", "--root", str(tmp_path),
                               "--port", "0", "--token", "secret-token"], stdout=subprocess.PIPE, text=True)
    try:
        endpoint = None
        for line in server.stdout:
            found = re.search(r"http://127\.0\.0\.1:\d+", line)
            if found:
                endpoint = found.group(0)
                break
        assert endpoint is not None
        assert HfApi(endpoint=endpoint, token="secret-token").whoami()["name"]
    finally:
        server.terminate()
        server.wait(timeout=30)
