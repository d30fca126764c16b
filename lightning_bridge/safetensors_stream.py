"""A safetensors file written tensor by tensor, in any order, as the tensors arrive.

``safetensors.torch.save_file`` needs every tensor of a file in memory at once: saving a 5 GiB
shard from a GPU means holding (and, for fast copies, pinning) 5 GiB of host memory first. When
the names, shapes and dtypes are known in advance, as they are for an export, the header and
every tensor's offset are known too, so each tensor can be written at its place the moment it
arrives and then dropped. The file is the format safetensors itself writes (an 8-byte header
length, a JSON header padded to 8 bytes, then the data, contiguous), and safetensors reads it.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

# In the order of safetensors' own dtype enum, which orders a file's tensors (last first).
DTYPE_CODES = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fn: "F8_E4M3", torch.int16: "I16", torch.uint16: "U16", torch.float16: "F16",
    torch.bfloat16: "BF16", torch.int32: "I32", torch.uint32: "U32", torch.float32: "F32",
    torch.float64: "F64", torch.int64: "I64", torch.uint64: "U64",
}
_RANK = {dtype: rank for rank, dtype in enumerate(DTYPE_CODES)}


class StreamedSafetensorsFile:
    """Create ``path`` with the header for ``specs``; then ``write`` each tensor once, in any order."""

    def __init__(self, path: str | os.PathLike, specs: Sequence, metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
        self._places: dict[str, tuple[int, torch.Size, torch.dtype]] = {}
        for spec in specs:
            if spec.dtype not in DTYPE_CODES:
                raise ValueError(f"Tensor {spec.name!r} has dtype {spec.dtype}, which safetensors cannot "
                                 "store; cast it to a supported dtype first.")
        offset = 0
        # The order safetensors' own writer uses (by dtype, then by name), so the file is byte for
        # byte the one ``save_file`` would write.
        for spec in sorted(specs, key=lambda spec: (-_RANK[spec.dtype], spec.name)):
            nbytes = spec.nbytes
            header[spec.name] = {"dtype": DTYPE_CODES[spec.dtype], "shape": list(spec.shape),
                                 "data_offsets": [offset, offset + nbytes]}
            self._places[spec.name] = (offset, torch.Size(spec.shape), spec.dtype)
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # as safetensors pads it, so the data starts 8-byte aligned
        self._data_start = 8 + len(raw)
        self.nbytes = offset
        self._missing = set(self._places)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            self._write_at(struct.pack("<Q", len(raw)) + raw, 0)
        except BaseException:
            self.close()
            raise

    @property
    def complete(self) -> bool:
        return not self._missing

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one host tensor at its place; its shape and dtype must be the planned ones."""
        if name not in self._missing:
            state = "already written" if name in self._places else "not in this file's plan"
            raise ValueError(f"Tensor {name!r} is {state} ({self.path.name}).")
        offset, shape, dtype = self._places[name]
        if tensor.shape != shape or tensor.dtype != dtype:
            raise ValueError(f"Tensor {name!r} is {tuple(tensor.shape)} {tensor.dtype} but was planned as "
                             f"{tuple(shape)} {dtype}; plan the shards from the tensors actually written.")
        if tensor.numel():
            data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            self._write_at(memoryview(data), self._data_start + offset)
        self._missing.discard(name)

    def close(self) -> None:
        """Close the file (written or not); fsync is the caller's, once per checkpoint."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _write_at(self, data: bytes | memoryview, offset: int) -> None:
        view = memoryview(data).cast("B")
        while view:
            written = os.pwrite(self._fd, view, offset)
            view, offset = view[written:], offset + written
