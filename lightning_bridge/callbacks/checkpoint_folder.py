"""The checkpoint folder both callbacks share: ``step-<n>`` names, the ``latest`` pointer, temporaries.

:class:`~lightning_bridge.callbacks.HFCheckpoint` writes ``dirpath/step-<n>/`` folders and the ``latest``
text file; :class:`~lightning_bridge.callbacks.PushToHub` reads them. Also the rank helpers HFCheckpoint's
cross-rank exchanges use (plain ``torch.distributed``, a no-op in a single process).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch.distributed as dist

from lightning_bridge.publish import fsync_path, staging_path

LATEST = "latest"
STEP = re.compile(r"^step-(\d+)$")
# Temporaries HFCheckpoint leaves in dirpath: ``.<final>.tmp-<pid>-<hex>`` / ``.<final>.old-<pid>-<hex>``.
OURS_TEMP = re.compile(r"^\.(?P<final>step-\d+|latest|hf-probe)\.(?:tmp|old)-(?P<pid>\d+)-[0-9a-f]+$")


def step_folders(dirpath: Path) -> list[int]:
    """The steps of the ``step-<n>`` folders in ``dirpath``."""
    return [int(m[1]) for p in dirpath.iterdir() if (m := STEP.match(p.name)) and p.is_dir()]


def step_of(folder: Path | None) -> int | None:
    """``n`` for a ``step-<n>`` folder, else None."""
    match = STEP.match(folder.name) if folder is not None else None
    return int(match[1]) if match else None


def has_latest(dirpath: Any) -> bool:
    """Whether ``dirpath`` holds a ``latest`` file (False for anything that is not a path)."""
    try:
        return (Path(dirpath) / LATEST).is_file()
    except (TypeError, OSError):
        return False


def atomic_write(path: Path, data: bytes, durable: bool = False) -> None:
    """Write ``path`` through a temporary and ``os.replace``, so a reader never sees half of it;
    ``durable`` also fsyncs the file and its folder."""
    tmp = staging_path(path)
    try:
        tmp.write_bytes(data)
        if durable:
            fsync_path(tmp)
        os.replace(tmp, path)
        if durable:
            fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def get_rank() -> int:
    """This process's global rank (0 without torch.distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """The number of ranks (1 without torch.distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (a collective), in rank order."""
    if get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (a collective)."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
