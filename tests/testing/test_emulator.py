"""HubEmulator's own surface: start and stop, its endpoint, faults queued and cleared, where repos live."""

from __future__ import annotations

import pytest

from lightning_bridge.testing import HubEmulator
from lightning_bridge.testing.hub_emulator.faults import FaultList


def test_start_stop_and_the_endpoint(tmp_path):
    emulator = HubEmulator(root=tmp_path / "hub")
    with pytest.raises(RuntimeError, match=r"not started: call start\(\)"):
        emulator.endpoint
    with emulator:
        assert emulator.running and emulator.endpoint.startswith("http://127.0.0.1:")
        assert emulator.repo_path("alice/tiny") == emulator.repo_path("alice/tiny", "model")
        assert emulator.repo_path("alice/data", "dataset").parts[-3:] == ("datasets", "alice", "data")
    assert not emulator.running
    emulator.stop()  # idempotent


def test_faults_are_queued_checked_and_cleared():
    emulator = HubEmulator()
    emulator.inject_fault("status", path_regex=r"/commit/", status=500, times=2)
    emulator.inject_fault("drop", path_regex=r"^/_lfs/")
    assert emulator.pending_faults == 2
    emulator.clear_faults()
    assert emulator.pending_faults == 0
    with pytest.raises(ValueError, match="kind must be one of"):
        emulator.inject_fault("explode", path_regex=".")


def test_a_fault_list_hands_out_each_fault_as_many_times_as_asked():
    faults = FaultList()
    faults.add("status", path_regex=r"/commit/", method="post", times=2, delay=0.0, status=503)
    faults.add("delay", path_regex=r".", method=None, times=None, delay=0.5, status=500)
    assert faults.take("POST", "/api/models/a/b/commit/main").status == 503
    assert faults.take("GET", "/api/models/a/b/commit/main").kind == "delay"  # the first fault is POST only
    assert faults.take("POST", "/api/models/a/b/commit/main").status == 503
    assert faults.take("POST", "/api/models/a/b/commit/main").kind == "delay" and len(faults) == 1  # unlimited
    for bad, message in [({"kind": "status", "status": 200}, "HTTP error code"), ({"kind": "delay", "times": 0},
                         "times must be >= 1"), ({"kind": "delay", "delay": -1.0}, "delay must be >= 0")]:
        kwargs = {"path_regex": ".", "method": None, "times": None, "delay": 0.0, "status": 500, **bad}
        with pytest.raises(ValueError, match=message):
            faults.add(kwargs.pop("kind"), **kwargs)
