"""The Hub emulator package's entry point: ``python -m lightning_bridge.testing.hub_emulator`` (its cli).

The endpoints, faults, storage and protocol have their own test modules beside this one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from huggingface_hub import HfApi
from testing.hub_fixtures import api, hf_client_env  # noqa: F401 - fixtures

from lightning_bridge.testing import hub_emulator as hub_emulator_module


def test_main_argument_errors():
    with pytest.raises(SystemExit) as excinfo:
        hub_emulator_module.main(["serve", "--port", "not-a-number"])
    assert excinfo.value.code == 2
    with pytest.raises(SystemExit):
        hub_emulator_module.main([])


def test_main_serves_until_interrupted(tmp_path):
    # Run the package on its own (`python -m hub_emulator`, not through lightning_bridge, which imports
    # torch): it only needs the standard library, so the subprocess starts fast.
    package_parent = Path(hub_emulator_module.__file__).parent.parent
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hub_emulator",
            "serve",
            "--root",
            str(tmp_path / "root"),
            "--port",
            "0",
            "--token",
            "cli-token",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(package_parent)},
    )
    # a safety net against a hung server only: a loaded 2-core CI machine can take long to start Python
    watchdog = threading.Timer(180, proc.kill)
    watchdog.start()
    try:
        lines = [proc.stdout.readline() for _ in range(2)]
        assert " at http://127.0.0.1:" in lines[0], lines
        endpoint = lines[0].rsplit(" at ", 1)[1].strip()
        assert f"HF_ENDPOINT={endpoint}" in lines[1] and "HF_HUB_DISABLE_XET=1" in lines[1]
        api = HfApi(endpoint=endpoint, token="cli-token")
        assert api.whoami()["name"]
        api.create_repo("cli/repo")
        assert api.list_repo_files("cli/repo") == [".gitattributes"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (tmp_path / "root" / "repos" / "models" / "cli" / "repo" / "refs.json").is_file()
