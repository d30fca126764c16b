"""Launch under torchrun, including two simulated nodes on one machine."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from processes import clean_environment

from lightning_bridge.builtin import tiny_llama

FINETUNE = Path(__file__).resolve().parents[2] / "examples" / "finetune.py"


@pytest.mark.slow
def test_two_simulated_nodes_under_torchrun(tmp_path):
    """torchrun --nnodes=2, one process per node: TP=2 spans the two 'nodes'."""
    model = tiny_llama(tmp_path / "tiny")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    common = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
              "--master_addr=127.0.0.1", f"--master_port={port}"]
    args = [str(FINETUNE), "--model", str(model), "--accelerator", "cpu", "--devices", "1", "--num-nodes", "2",
            "--tp", "2", "--max-steps", "4", "--output", str(tmp_path / "out")]
    env = {**clean_environment(), "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen([*common, f"--node_rank={rank}", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path) for rank in (0, 1)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (out, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
    assert "fit: 4 steps" in outputs[0][0]
