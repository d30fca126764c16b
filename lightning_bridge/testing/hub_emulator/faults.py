"""Fault injection for the Hub emulator: injected faults, and which request each one hits.

:meth:`HubEmulator.inject_fault` adds a :class:`Fault` to the emulator's :class:`FaultList`; the
request handler asks :meth:`FaultList.take` for the fault that applies to each request, before
authentication, and answers with an HTTP error status, a delay, or a dropped connection.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass

FAULT_KINDS = ("status", "delay", "drop")


@dataclass
class Fault:
    """How to misbehave (``kind``) on which requests (``pattern``, ``method``), and how many more times."""

    kind: str
    pattern: re.Pattern
    method: str | None
    remaining: int | None
    delay: float
    status: int


class FaultList:
    """The injected faults not used up yet, in injection order; safe to use from any thread."""

    def __init__(self) -> None:
        self._faults: list[Fault] = []
        self._lock = threading.Lock()

    def add(
        self, kind: str, *, path_regex: str, method: str | None, times: int | None, delay: float, status: int
    ) -> None:
        """Validate and queue a fault (see :meth:`HubEmulator.inject_fault` for the arguments)."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"kind must be one of {FAULT_KINDS}, got {kind!r}")
        if times is not None and times < 1:
            raise ValueError("times must be >= 1 (or None for unlimited)")
        if kind == "status" and not 400 <= int(status) <= 599:
            raise ValueError(f"status must be an HTTP error code (4xx/5xx), got {status}")
        if delay < 0:
            raise ValueError("delay must be >= 0")
        fault = Fault(
            kind, re.compile(path_regex), method.upper() if method else None, times, float(delay), int(status)
        )
        with self._lock:
            self._faults.append(fault)

    def clear(self) -> None:
        """Forget all pending faults."""
        with self._lock:
            self._faults.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._faults)

    def take(self, method: str, path: str) -> Fault | None:
        """The first fault matching this request, counting it as used once; ``None`` if none matches."""
        with self._lock:
            for fault in self._faults:
                if (fault.method is None or fault.method == method) and fault.pattern.search(path):
                    if fault.remaining is not None:
                        fault.remaining -= 1
                        if fault.remaining <= 0:
                            self._faults.remove(fault)
                    return fault
        return None
