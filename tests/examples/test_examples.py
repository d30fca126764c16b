"""Each example runs in a small setting."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from multiprocess import clean_environment

from lightning_bridge.builtin import tiny_llama

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_2_way_hf_binding(tmp_path):
    model = tiny_llama(tmp_path / "tiny")
    result = subprocess.run([sys.executable, str(EXAMPLES / "models" / "2_way_hf_binding.py"), "--model", str(model),
                             "--output", str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
                            env=clean_environment())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bitwise identical" in result.stdout


def test_finetune_with_lightnings_own_launcher(tmp_path):
    """devices=2 in a plain process: Lightning starts the second process itself (TP=2)."""
    model = tiny_llama(tmp_path / "tiny")
    result = subprocess.run([sys.executable, str(EXAMPLES / "finetune.py"), "--model", str(model), "--accelerator", "cpu",
                             "--devices", "2", "--tp", "2", "--max-steps", "6", "--output", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path, env=clean_environment())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fit: 6 steps" in result.stdout
    assert (tmp_path / "out" / "final" / "config.json").is_file()


def test_quickstart_main_job(tmp_path):
    """The README's main job: fine-tune at TP=2, checkpoint, publish to the emulator, reload, generate."""
    model = tiny_llama(tmp_path / "tiny")
    result = subprocess.run([sys.executable, str(EXAMPLES / "quickstart.py"), "--model", str(model), "--max-steps", "4",
                             "--output", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path, env=clean_environment())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training     4 steps" in result.stdout
    assert "hf-checkpoints/step-4" in result.stdout
    assert "/demo/tiny-llama-finetuned/commit/" in result.stdout
    assert "generated    'The red cat lives near" in result.stdout
