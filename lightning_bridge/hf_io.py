"""Validated reading and atomic, shard-by-shard writing of Hugging Face safetensors checkpoints."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import struct
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import NoReturn

import torch
from tqdm.auto import tqdm

from lightning_bridge.mapped_read import MappedFile
from lightning_bridge.pinned_read import read_to_device
from lightning_bridge import publish
from lightning_bridge.publish import error_code, fsync_path, publish_folder, save_fault, staging_path
from lightning_bridge.safetensors_stream import DTYPE_CODES, StreamedSafetensorsFile

logger = logging.getLogger(__name__)

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"  # PEFT's adapter file
UNINDEXED_FILES = {SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME}  # alone in a folder, they need no index
PT_WEIGHTS_NAME = "pytorch_model.bin"
PT_WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"

_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}  # safetensors dtype code -> torch


def _corrupt(path: Path, why: str) -> ValueError:
    return ValueError(f"Safetensors file {path} is corrupt or truncated ({why}). "
                      "Re-download it (or re-save it from the original model).")


def _read_header(path: Path) -> tuple[dict[str, dict], int]:
    """Tensor name -> header entry, in header order, and the offset of the first data byte; checks the
    file is as long as its offsets say."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else None
        if length is None or length > min(size - 8, 100 * 2**20):
            raise _corrupt(path, f"bad header length in a {size}-byte file")
        raw = f.read(length)
    try:
        entries = {k: v for k, v in json.loads(raw.decode("utf-8")).items() if k != "__metadata__"}
        for v in entries.values():
            v["shape"] = tuple(int(d) for d in v["shape"])
        end = max((int(v["data_offsets"][1]) for v in entries.values()), default=0)
    except (UnicodeDecodeError, ValueError, AttributeError, KeyError, TypeError, IndexError) as exc:
        raise _corrupt(path, f"unreadable header: {exc!r}") from None
    if 8 + length + end > size:
        raise _corrupt(path, f"the header needs {8 + length + end} bytes but the file has {size}")
    return entries, 8 + length


def _check_relative(name: object, where: str) -> str:
    """Refuse file names that are absolute or climb out of the folder with '..'."""
    bad = not isinstance(name, str) or not name
    if not bad:
        posix, win = PurePosixPath(name), PureWindowsPath(name)
        bad = posix.is_absolute() or bool(win.drive) or win.is_absolute() or ".." in posix.parts + win.parts
    if bad:
        raise ValueError(f"{where} points outside the checkpoint folder: {name!r}. File names must be "
                         "relative to the folder; fix or re-download the checkpoint.")
    return name


def _member(folder: Path, name: object, index: Path) -> Path:
    """The existing shard an index names, also refusing symlinks that resolve outside the folder."""
    path = folder / _check_relative(name, f"The index {index}")
    real, roots = path.resolve(), [folder.resolve()]
    if roots[0].parent.name == "snapshots":  # Hugging Face cache: snapshot files link into ../../blobs
        roots.append(roots[0].parent.parent / "blobs")
    if not any(real.is_relative_to(root) for root in roots):
        raise ValueError(f"The index {index} points outside the checkpoint folder: {name!r} (a symlink to "
                         f"{real}). Copy the real file into the folder or re-download the checkpoint.")
    if not path.is_file():
        raise ValueError(f"The index {index} names shard {name!r}, which does not exist in {folder}. "
                         "The download is incomplete: re-download the checkpoint with all its shards.")
    return path


def _load_index(path: Path) -> tuple[dict[str, str], dict]:
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        weight_map, metadata = index["weight_map"], index.get("metadata") or {}
        if not isinstance(weight_map, dict) or not isinstance(metadata, dict):
            raise TypeError("weight_map and metadata must be objects")
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"Index {path} is not a valid checkpoint index ({exc!r}); re-download it.") from None
    return weight_map, metadata


class HFCheckpointReader:
    """Lazy, validated read access to the safetensors weights of an HF checkpoint folder."""

    def __init__(self, folder: str | os.PathLike, *, allow_pickle: bool = False):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"Checkpoint folder {self.folder} does not exist or is not a folder; "
                                    "check the path or download the checkpoint first.")
        self.has_index, self.metadata = False, {}
        self._headers: dict[str, dict[str, dict]] = {}  # safetensors file -> name -> header entry
        self._pickled: dict[str, dict[str, torch.Tensor]] | None = None  # .bin file -> state dict
        self._maps: dict[str, MappedFile] = {}  # safetensors file -> its memory map, for CPU reads
        self._maps_lock = threading.Lock()  # reader threads map a file once
        self._data_start: dict[str, int] = {}  # safetensors file -> offset of its first tensor byte
        single, index = self.folder / SAFE_WEIGHTS_NAME, self.folder / SAFE_WEIGHTS_INDEX_NAME
        if single.is_file():  # transformers prefers the single file too
            if index.is_file():
                logger.warning("%s has both %s and an index; using the former.", self.folder, single.name)
            self._headers[single.name], self._data_start[single.name] = _read_header(single)
            self.weight_map = dict.fromkeys(self._headers[single.name], single.name)
        elif index.is_file():
            self.has_index = True
            self.weight_map, self.metadata = _load_index(index)
            self._check_shards(index)
        elif (self.folder / PT_WEIGHTS_NAME).is_file() or (self.folder / PT_WEIGHTS_INDEX_NAME).is_file():
            self._init_pickled(allow_pickle)
        else:
            found = ", ".join(sorted(p.name for p in self.folder.iterdir())) or "nothing"
            raise ValueError(f"No weights in {self.folder}: expected {SAFE_WEIGHTS_NAME} or "
                             f"{SAFE_WEIGHTS_INDEX_NAME} but found {found}. Download the weight files too.")

    def _check_shards(self, index: Path) -> None:
        owner: dict[str, str] = {}
        for file in dict.fromkeys(self.weight_map.values()):
            self._headers[file], self._data_start[file] = _read_header(_member(self.folder, file, index))
            for name in self._headers[file]:
                if name in owner:
                    raise ValueError(f"Tensor {name!r} is in two shards of {self.folder}: {owner[name]} and "
                                     f"{file}. The checkpoint is inconsistent; re-download or re-save it.")
                owner[name] = file
        for name, file in self.weight_map.items():
            if owner.get(name) != file:
                raise ValueError(f"The index {index} puts tensor {name!r} in {file}, which does not hold it. "
                                 "The checkpoint is inconsistent; re-download or re-save it.")

    def _init_pickled(self, allow_pickle: bool) -> None:
        if not allow_pickle:
            raise ValueError(
                f"{self.folder} only has pickled PyTorch weights ({PT_WEIGHTS_NAME}), and loading pickled "
                ".bin files can run arbitrary code. If you trust the source, pass allow_pickle=True; "
                "otherwise convert the checkpoint to safetensors first.")
        self._pickled = {}
        if (self.folder / PT_WEIGHTS_NAME).is_file():
            self.weight_map = dict.fromkeys(self._load_pickled(PT_WEIGHTS_NAME), PT_WEIGHTS_NAME)
        else:
            index = self.folder / PT_WEIGHTS_INDEX_NAME
            self.has_index = True
            self.weight_map, self.metadata = _load_index(index)
            for file in set(self.weight_map.values()):
                _member(self.folder, file, index)

    def _load_pickled(self, file: str) -> dict[str, torch.Tensor]:
        if file not in self._pickled:
            path = self.folder / file
            try:
                try:
                    state = torch.load(path, weights_only=True, mmap=True, map_location="cpu")
                except RuntimeError as exc:  # legacy (non-zip) files cannot be memory-mapped
                    if "mmap" not in str(exc):
                        raise
                    state = torch.load(path, weights_only=True, map_location="cpu")
                self._pickled[file] = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
            except Exception as exc:
                raise ValueError(f"Could not load pickled weights {path} ({exc!r}): corrupt, truncated or "
                                 "not a plain state dict. Re-download it or convert it to safetensors."
                                 ) from None
        return self._pickled[file]

    def names(self) -> list[str]:
        """All tensor names, in the checkpoint's own order."""
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def _file(self, name: str) -> str:
        if name not in self.weight_map:
            raise KeyError(f"Tensor {name!r} is not in the checkpoint {self.folder}.")
        return self.weight_map[name]

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape, from the header, without reading its data."""
        file = self._file(name)
        if self._pickled is not None:
            return tuple(self._load_pickled(file)[name].shape)
        return self._headers[file][name]["shape"]

    def dtype(self, name: str) -> torch.dtype:
        """The tensor's dtype, from the header, without reading its data."""
        file = self._file(name)
        if self._pickled is not None:
            return self._load_pickled(file)[name].dtype
        code = self._headers[file][name]["dtype"]
        if code not in _DTYPES:
            raise ValueError(f"Tensor {name!r} in {self.folder / file} has dtype {code}, which is not "
                             "supported here; convert it to a standard dtype such as BF16 or F32.")
        return _DTYPES[code]

    def get(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """Read one tensor onto ``device``, opening (and caching) its file on first use.

        Onto a CUDA device the bytes go through pinned buffers (:mod:`~lightning_bridge.pinned_read`),
        several times faster than copying the memory map; elsewhere the tensor is a view of the
        file's private memory map (:mod:`~lightning_bridge.mapped_read`): writable, and writes never
        reach the file. Call :meth:`release` when done with it to keep resident memory low.
        """
        file = self._file(name)
        if self._pickled is not None:
            return self._load_pickled(file)[name].to(device, copy=True)
        device = torch.device(device)
        offset, nbytes = self._byte_range(name, file)
        dtype, shape = self.dtype(name), self._headers[file][name]["shape"]
        if device.type == "cuda":
            try:
                data = read_to_device(self.folder / file, offset, nbytes, device)
            except EOFError as exc:
                raise _corrupt(self.folder / file, str(exc)) from None
            return data.view(dtype).view(shape)
        return self._mapped(file).tensor(offset, nbytes, dtype, shape).to(device)

    def release(self, name: str) -> None:
        """Done with tensor ``name`` for now: drop its memory-mapped pages from this process's
        resident memory (they stay in the page cache; a later :meth:`get` reads them again)."""
        file = self._file(name)
        if self._pickled is None and file in self._maps:
            self._maps[file].release(*self._byte_range(name, file))

    def _byte_range(self, name: str, file: str) -> tuple[int, int]:
        """Where the tensor's bytes lie in its file: (offset, length), checked against its shape."""
        entry, dtype = self._headers[file][name], self.dtype(name)
        begin, end = (int(offset) for offset in entry["data_offsets"])
        expected = math.prod(entry["shape"]) * dtype.itemsize
        if end - begin != expected:
            shape = list(entry["shape"])
            raise _corrupt(self.folder / file, f"tensor {name!r} has {end - begin} bytes for shape {shape} "
                                               f"of {entry['dtype']}, which needs {expected}")
        return self._data_start[file] + begin, end - begin

    def _mapped(self, file: str) -> MappedFile:
        with self._maps_lock:
            if file not in self._maps:
                self._maps[file] = MappedFile(self.folder / file)
            return self._maps[file]

    def close(self) -> None:
        """Drop the cached memory maps (tensors read from them stay valid)."""
        self._maps.clear()
        if self._pickled:
            self._pickled.clear()

    def __enter__(self) -> HFCheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of a tensor to be written, so shards can be planned before any data exists."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _greedy(specs: Sequence[TensorSpec], max_shard_size: int) -> list[list[str]]:
    groups: list[list[str]] = []
    size = 0
    for spec in specs:
        if not groups or size + spec.nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(spec.name)
        size += spec.nbytes
    return groups


def plan_shards(specs: Sequence[TensorSpec], *, max_shard_size: int = 5 * 2**30,
                source_weight_map: Mapping[str, str] | None = None) -> dict[str, list[str]]:
    """File name -> tensor names, in write order: the source checkpoint's layout if given, else greedy.

    With a source map its files and grouping are kept, and tensors it lacks go into new, non-colliding
    ``model-extra-NNNNN.safetensors`` shards; a single-file source stays one ``model.safetensors``. Source
    ``.bin`` files are renamed ``model-NNNNN-of-NNNNN.safetensors`` by position. A tensor bigger than
    ``max_shard_size`` gets a shard of its own.
    """
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        repeated = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"Tensor names repeat in the specs: {repeated}; each tensor must be planned once.")
    if not source_weight_map:
        groups = _greedy(specs, max_shard_size)
        if len(groups) <= 1:
            return {SAFE_WEIGHTS_NAME: names}
        return {f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors": g for i, g in enumerate(groups)}
    files = list(dict.fromkeys(source_weight_map.values()))
    if len(files) == 1 and files[0] in (SAFE_WEIGHTS_NAME, PT_WEIGHTS_NAME):
        return {SAFE_WEIGHTS_NAME: names}
    rename = {f: f for f in files}
    if not all(f.endswith(".safetensors") for f in files):
        rename = {f: f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i, f in enumerate(files)}
    plan: dict[str, list[str]] = {rename[f]: [] for f in files}
    extra = []
    for spec in specs:
        if spec.name in source_weight_map:
            plan[rename[source_weight_map[spec.name]]].append(spec.name)
        else:
            extra.append(spec)
    plan = {file: group for file, group in plan.items() if group}
    counter = 0
    for group in _greedy(extra, max_shard_size):
        while (file := f"model-extra-{counter + 1:05d}.safetensors") in plan:
            counter += 1
        plan[file] = group
    return plan


class ShardedSafetensorsWriter:
    """Writes a planned set of safetensors shards as their tensors arrive, then publishes the folder
    atomically. With ``specs`` (name, shape, dtype of every tensor) each tensor is written at its place
    at once and not kept; without, a shard's tensors are kept until it is complete. Either way the
    bytes go through one path, :class:`~lightning_bridge.safetensors_stream.StreamedSafetensorsFile`."""

    def __init__(self, final_dir: str | os.PathLike, plan: dict[str, list[str]], *,
                 metadata: dict[str, str] | None = None, show_progress: bool = False,
                 overwrite: bool = False, specs: Sequence[TensorSpec] = ()):
        self.final_dir, self.overwrite = Path(final_dir).absolute(), overwrite
        if self.final_dir.exists() and not overwrite:
            raise FileExistsError(f"{self.final_dir} already exists: pass overwrite=True to replace it, "
                                  "or choose another directory.")
        self._owner: dict[str, str] = {}
        for file, group in plan.items():
            _check_relative(file, "The shard plan")
            for name in group:
                if name in self._owner:
                    raise ValueError(f"Tensor {name!r} is planned twice: in {self._owner[name]} and {file}.")
                self._owner[name] = file
        self.plan = {file: list(group) for file, group in plan.items() if group}
        self.metadata = {"format": "pt", **(metadata or {})}
        # A shard whose every tensor has a spec is streamed: each tensor is written as it arrives.
        # Without specs a shard's tensors are buffered until it is complete, then streamed at once.
        spec_of = {spec.name: spec for spec in specs}
        self._specs = {file: [spec_of[n] for n in group] for file, group in self.plan.items()
                       if all(n in spec_of for n in group)}
        self._streams: dict[str, StreamedSafetensorsFile] = {}
        self._pending: dict[str, dict[str, torch.Tensor]] = {file: {} for file in self.plan}
        self._written: set[str] = set()
        self._total_size, self._state = 0, "open"
        self._progress = tqdm(desc=f"Saving {self.final_dir.name}", unit="B", unit_scale=True,
                              disable=not show_progress)
        self.tmp_dir = staging_path(self.final_dir)
        try:
            self.tmp_dir.mkdir(parents=True)
        except OSError as exc:
            self._fail(exc, "create a temporary folder")

    def _fail(self, exc: BaseException, doing: str) -> NoReturn:
        """Abort, and raise ``exc`` as an error naming the folder and the fix (a
        :class:`~lightning_bridge.publish.CheckpointIOError` for a disk fault)."""
        self.abort()
        doing = f"{doing} while saving the checkpoint to {self.final_dir}"
        fault = save_fault(exc, self.final_dir, doing, probe=self.final_dir.parent)
        if fault is not None:
            raise fault from exc
        code = error_code(exc)
        reason = os.strerror(code).lower() if code else str(exc)
        raise OSError(code, f"Could not {doing}: {reason}. The partial output was removed and {self.final_dir} "
                            "was not touched; fix the cause above and save again.") from exc

    def _check_open(self) -> None:
        if self._state != "open":
            raise ValueError(f"The writer for {self.final_dir} is already {self._state}; make a new one.")

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Buffer one tensor, and write its shard as soon as every tensor of that shard is present."""
        self._check_open()
        file = self._owner.get(name)
        if file is None:
            raise ValueError(f"Tensor {name!r} is not in the shard plan for {self.final_dir}; plan it first.")
        if name in self._written or name in self._pending[file]:
            raise ValueError(f"Tensor {name!r} was already added to the writer for {self.final_dir}.")
        if file in self._specs:
            self._stream(file, name, tensor)
            return
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.untyped_storage().nbytes() != tensor.nbytes:
            tensor = tensor.clone()  # a view would keep its whole, possibly huge, storage alive
        self._pending[file][name] = tensor
        if len(self._pending[file]) == len(self.plan[file]):
            self._write_shard(file)

    def _stream(self, file: str, name: str, tensor: torch.Tensor) -> None:
        try:
            if file not in self._streams:
                (self.tmp_dir / file).parent.mkdir(parents=True, exist_ok=True)
                self._streams[file] = StreamedSafetensorsFile(self.tmp_dir / file, self._specs[file],
                                                              self.metadata)
            stream = self._streams[file]
            stream.write(name, tensor)
        except OSError as exc:
            self._fail(exc, f"write shard {file}")
        self._written.add(name)
        self._total_size += tensor.nbytes
        self._progress.update(tensor.nbytes)
        if stream.complete:
            stream.close()
            logger.debug("Wrote %s (%d tensors, %d bytes)", stream.path, len(self.plan[file]), stream.nbytes)

    def _write_shard(self, file: str) -> None:
        """A buffered shard is complete: write it through the same streamed writer, now that its
        tensors are known (one write path; the file is byte for byte what ``save_file`` writes)."""
        tensors = self._pending.pop(file)
        self._specs[file] = [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
        for name, tensor in tensors.items():
            self._stream(file, name, tensor)

    def _write_extra(self, relative_name: str, write: Callable[[Path], object]) -> None:
        self._check_open()
        _check_relative(relative_name, "An extra file name")
        if relative_name in self.plan or relative_name == SAFE_WEIGHTS_INDEX_NAME:
            raise ValueError(f"Extra file {relative_name!r} would overwrite a weight file; rename it.")
        path = self.tmp_dir / relative_name
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write(path)
        except OSError as exc:
            self._fail(exc, f"write {relative_name}")

    def add_file(self, relative_name: str, data: bytes | str) -> None:
        """Write an extra file (config.json, tokenizer files) into the checkpoint."""
        data = data.encode("utf-8") if isinstance(data, str) else data
        self._write_extra(relative_name, lambda path: path.write_bytes(data))

    def copy_file(self, src: str | os.PathLike, relative_name: str | None = None) -> None:
        """Copy an existing file (e.g. a tokenizer file) into the checkpoint."""
        src = Path(src)
        if not src.is_file():
            raise FileNotFoundError(f"Cannot copy {src} into the checkpoint: it does not exist.")
        self._write_extra(relative_name or src.name, lambda path: shutil.copyfile(src, path))

    def finalize(self) -> Path:
        """Check every planned tensor arrived, write the index, fsync, and atomically publish the folder."""
        self._check_open()
        missing = [n for n, f in self._owner.items() if n not in self._written and n not in self._pending[f]]
        if missing:
            shown = ", ".join(missing[:20]) + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
            raise ValueError(f"Cannot finalize {self.final_dir}: {len(missing)} planned tensors were never "
                             f"added: {shown}. Add them, or abort().")
        try:
            if len(self.plan) > 1 or (self.plan and not set(self.plan) & UNINDEXED_FILES):
                index = {"metadata": {"total_size": self._total_size},
                         "weight_map": dict(sorted(self._owner.items()))}
                (self.tmp_dir / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
            for root, _, files in os.walk(self.tmp_dir):
                for file in files:
                    fsync_path(Path(root) / file)
                fsync_path(Path(root))
            publish_folder(self.tmp_dir, self.final_dir, overwrite=self.overwrite)
        except OSError as exc:
            self._fail(exc, "publish the checkpoint")
        self._state = "finalized"
        self._progress.close()
        logger.info("Saved %d shard(s), %d bytes, to %s", len(self.plan), self._total_size, self.final_dir)
        return self.final_dir

    def abort(self) -> None:
        """Remove the temporary folder and drop buffered tensors; the final folder is never touched."""
        if self._state == "open":
            self._state = "aborted"
            self._pending.clear()
            for stream in self._streams.values():
                stream.close()
            self._progress.close()
            shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def __enter__(self) -> ShardedSafetensorsWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None and self._state == "open":
            logger.warning("Writer for %s exited without finalize(); discarding its output.", self.final_dir)
        self.abort()


def is_complete_checkpoint(folder: str | os.PathLike) -> bool:
    """Whether a folder holds a complete, readable safetensors checkpoint (used to clean up after crashes)."""
    try:
        HFCheckpointReader(folder).close()
        return True
    except (ValueError, OSError):
        return False


def cleanup_stale_temp_dirs(parent: str | os.PathLike) -> list[Path]:
    """Remove the ``.<name>.tmp-<pid>-<hex>`` folders crashed writers left in ``parent``; return them.

    Folders of processes still alive on this host are kept. A ``.<name>.old-…`` folder left by a crash while
    publishing is renamed back to ``<name>`` if that is missing, and removed if ``<name>`` is complete
    (:func:`lightning_bridge.publish.cleanup_stale_temp_dirs` with a check of the safetensors checkpoint).
    """
    return publish.cleanup_stale_temp_dirs(parent, is_complete=is_complete_checkpoint)
