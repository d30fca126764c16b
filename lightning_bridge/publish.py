"""Staging and atomic publishing of checkpoint folders, for every writer in the project.

A checkpoint is written under a staging name beside its final place and renamed into place when
complete, so a reader (or a crash) never sees half of one under its final name:

- staging names are ``.<final>.tmp-<pid>-<8 hex>`` (``.old-`` for a replaced folder on its way
  out): the pid says whether the writer is still alive, the random part keeps two saves apart;
- :func:`publish_folder` renames a finished staging folder into place; an existing folder is first
  renamed aside and put back if the second rename fails, so the final name always holds either the
  old or the new checkpoint;
- :func:`cleanup_stale_temp_dirs` removes the staging folders of writers that died, and puts back a
  folder a crash left renamed aside;
- in a distributed save one rank stages and publishes: :func:`make_staging_folder` and
  :func:`run_on_rank_zero` raise that rank's error on every rank, so no rank waits in a collective
  that never comes;
- faults of the disk or of the files (disk full, permission denied, read-only target, a corrupt or
  truncated checkpoint) are raised as one type, :class:`CheckpointIOError`, whose message names the
  path and the fix (the CLI prints it as one line).

Writers: :class:`~lightning_bridge.hf_io.ShardedSafetensorsWriter`, ``save_megatron_checkpoint``,
``MegatronBridgeStrategy.save_checkpoint`` and ``HFCheckpoint`` (both modes).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist

logger = logging.getLogger(__name__)

TEMP_NAME = re.compile(r"^\.(?P<final>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]+$")


# --- the error of a save or load fault -----------------------------------------------------------
class CheckpointIOError(OSError, RuntimeError):
    """A checkpoint could not be saved or loaded because of the disk or the files: disk full,
    permission denied, a read-only target, a corrupt or truncated checkpoint. ``str()`` is one
    sentence naming the path and the fix; ``errno`` is kept, ``path`` is the checkpoint.

    An ``OSError``; also a ``RuntimeError``, which is what these faults raised before in
    distributed saves, so code that caught that keeps working.
    """

    def __init__(self, code: int | None, message: str, path: str | os.PathLike | None = None):
        super().__init__(code, message)
        self.path = None if path is None else str(path)

    def __str__(self) -> str:
        return self.strerror

    def __reduce__(self) -> tuple:
        return type(self), (self.errno, self.strerror, self.path)


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)
_ERRNO_IN_TEXT = re.compile(r"\[Errno (\d+)\]|os error (\d+)")  # inside torch's / safetensors' messages


def error_code(exc: BaseException) -> int | None:
    """The errno of an OS error, also when a library wrapped it in its own error's text."""
    code = getattr(exc, "errno", None)
    if isinstance(code, int):
        return code
    match = _ERRNO_IN_TEXT.search(str(exc))
    return int(match[1] or match[2]) if match else None


def write_probe_error(folder: str | os.PathLike) -> int | None:
    """The errno a small write into ``folder`` fails with now (None when it succeeds): the diagnosis of
    a library's write failure that lost its errno (torch's "unexpected pos" on a full disk)."""
    probe = Path(folder) / f".write-probe-{temp_token()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 65536)
            f.flush()
            os.fsync(f.fileno())
        return None
    except OSError as exc:
        return exc.errno
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


def save_fault(exc: BaseException, target: str | os.PathLike, doing: str, *,
               outcome: str | None = None, probe: str | os.PathLike | None = None) -> CheckpointIOError | None:
    """``exc`` as a :class:`CheckpointIOError` when it is a disk fault (disk full, no permission,
    read-only), else None. ``doing`` completes "Could not ..."; ``outcome`` says what was left (by
    default: nothing, the target untouched); with ``probe`` (a folder on the target's disk) a
    failure without an errno is diagnosed by a small write there."""
    if isinstance(exc, CheckpointIOError):
        return exc
    code = error_code(exc)
    if code is None and probe is not None and not isinstance(exc, (ValueError, TypeError, KeyboardInterrupt)) \
            and Path(probe).is_dir():
        code = write_probe_error(probe)
    target = Path(target)
    where = target.parent
    if code in _DISK_FULL:
        fix = f"free disk space on the filesystem of {where} (or choose a bigger disk) and save again"
    elif code in _NOT_WRITABLE:
        fix = f"make {where} writable for this user or choose another directory"
    else:
        return None
    outcome = outcome or f"The partial output was removed and {target} was not touched"
    return CheckpointIOError(code, f"Could not {doing}: {os.strerror(code).lower()}. {outcome}; {fix}.", target)


def corrupt_checkpoint(path: str | os.PathLike, why: str, fix: str) -> CheckpointIOError:
    """The error for a checkpoint whose files are corrupt or truncated."""
    return CheckpointIOError(errno.EIO, f"The checkpoint {path} is corrupt or truncated ({why}). {fix}", path)


# --- names --------------------------------------------------------------------------------------
def temp_token() -> str:
    """``<pid>-<8 hex>``: the suffix of a staging name, unique to this process and call."""
    return f"{os.getpid()}-{secrets.token_hex(4)}"


def staging_path(final: str | os.PathLike, kind: str = "tmp") -> Path:
    """The staging name of ``final``: ``.<name>.<kind>-<pid>-<hex>`` in the same folder (so the
    publishing rename stays on one file system); ``kind`` is ``tmp`` or ``old``."""
    final = Path(final)
    return final.parent / f".{final.name}.{kind}-{temp_token()}"


# --- files --------------------------------------------------------------------------------------
def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a folder (a folder's entries are durable only once it is synced); platforms
    that cannot open or sync folders are let be."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (a pid we may not ask about counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):
        pass
    return True


def remove(path: Path) -> None:
    """Remove a folder or a file, whichever ``path`` is."""
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def publish_folder(staging: str | os.PathLike, final: str | os.PathLike, *, overwrite: bool = True) -> None:
    """Rename the finished ``staging`` folder to ``final``; ``final`` is always either the old or the
    new folder. An existing ``final`` is replaced only with ``overwrite`` (it goes through a
    ``.old-`` staging name and is put back if the new folder cannot take its place)."""
    staging, final = Path(staging), Path(final)
    if not final.exists():
        os.rename(staging, final)
    elif not overwrite:
        raise FileExistsError(errno.EEXIST, f"{final} appeared while it was being written; pass overwrite=True to replace "
                              "it, or choose another folder.")
    else:
        old = staging_path(final, "old")
        os.rename(final, old)
        try:
            os.rename(staging, final)
        except OSError:
            os.rename(old, final)
            raise
        remove(old)
    fsync_path(final.parent)


def cleanup_stale_temp_dirs(parent: str | os.PathLike, *,
                            is_complete: Callable[[Path], bool] = Path.exists,
                            final_name: str | None = None) -> list[Path]:
    """Remove the staging folders writers that died left in ``parent``; return them.

    Folders of processes still alive on this host are kept. A ``.<name>.old-…`` folder left by a crash
    while publishing is renamed back to ``<name>`` if that is missing, and removed once ``<name>`` is
    complete (``is_complete``). ``final_name`` limits the clean-up to the temporaries of that name.
    """
    parent, removed = Path(parent), []
    for path in sorted(parent.iterdir()) if parent.is_dir() else []:
        match = TEMP_NAME.match(path.name)
        if (not match or not path.is_dir() or (final_name is not None and match["final"] != final_name)
                or process_alive(int(match["pid"]))):
            continue
        final = parent / match["final"]
        if match["kind"] == "old":
            if not final.exists():
                os.rename(path, final)
                logger.warning("Restored %s from %s (a writer crashed while publishing).", final, path)
                continue
            if not is_complete(final):
                continue
        shutil.rmtree(path, ignore_errors=True)
        logger.info("Removed stale temporary folder %s", path)
        removed.append(path)
    return removed


# --- one rank writes, every rank learns the outcome ----------------------------------------------
def rank() -> int:
    """This process's global rank (0 without torch.distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a collective; ``value`` itself in a single process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def raise_on_every_rank(error: BaseException | str | None, what: str = "Saving the Megatron checkpoint") -> None:
    """Raise rank 0's ``error`` (an exception, a description, or None) on every rank. Collective.

    A :class:`CheckpointIOError` stays one (its message already says what and how to fix it); any
    other error becomes ``RuntimeError("<what> failed: <type>: <message>")``.
    """
    if isinstance(error, CheckpointIOError):
        error = (error.errno, error.strerror, error.path)
    elif isinstance(error, BaseException):
        error = f"{type(error).__name__}: {error}"
    error = broadcast(error)
    if isinstance(error, tuple):
        raise CheckpointIOError(*error)
    if error:
        raise RuntimeError(f"{what} failed: {error}")


def run_on_rank_zero(action: Callable[[], Any], what: str = "Saving the Megatron checkpoint",
                     target: str | os.PathLike | None = None) -> None:
    """Run ``action`` on rank 0 only and raise its error, if any, on every rank. Collective.

    With ``target`` (the checkpoint being written) a disk fault is raised as a :class:`CheckpointIOError`."""
    error = None
    if rank() == 0:
        try:
            action()
        except Exception as exc:  # noqa: BLE001 - every rank must reach the broadcast
            error = exc
            if target is not None:
                error = save_fault(exc, target, f"save the checkpoint {target}") or exc
    raise_on_every_rank(error, what)


def make_staging_folder(final: str | os.PathLike, check: Callable[[], None] | None = None,
                        what: str = "Saving the Megatron checkpoint") -> Path:
    """Rank 0 runs ``check``, removes ``final``'s stale temporaries and creates its staging folder;
    every rank gets that folder's path, or rank 0's error. Collective."""
    staging = Path(broadcast(str(staging_path(Path(final).absolute()))))

    def create() -> None:
        if check is not None:
            check()
        cleanup_stale_temp_dirs(staging.parent, final_name=Path(final).name)
        staging.mkdir(parents=True)

    run_on_rank_zero(create, what, target=final)
    return staging
