"""Reading and writing safetensors files tensor by tensor, with no torch.

The safetensors package's numpy reader has no bfloat16, and its writer needs every tensor in memory
at once; the format is simple (8-byte header length, JSON header, raw little-endian data), so this
module memory-maps files for reading and streams tensors into a file whose header is written first.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from solarjax.errors import ConfigError, SolarjaxError

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_CODES = {v: k for k, v in DTYPES.items()}


class TensorFileError(SolarjaxError):
    """A tensor file is malformed, truncated, or does not hold what was expected."""


def dtype_code(dtype) -> str:
    try:
        return _CODES[np.dtype(dtype)]
    except KeyError:
        raise TensorFileError(f"dtype {np.dtype(dtype)} cannot be stored in safetensors") from None


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def write_all(file, data) -> None:
    """Writes every byte of `data` to the unbuffered `file`, or raises. One write() may write
    less than asked: on Linux at most 2,147,479,552 bytes, so a bigger tensor would be cut short."""
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        n = file.write(view[done:])
        if not n:
            raise OSError(f"{file.name}: write returned {n!r} after {done} of {len(view)} bytes")
        done += n


class SafetensorsFile:
    """A memory-mapped safetensors file: get() returns a read-only view, nothing is read up front."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise TensorFileError(f"{self.path}: truncated: {size} bytes, no safetensors header")
            (n,) = struct.unpack("<Q", head)
            if 8 + n > size:
                raise TensorFileError(f"{self.path}: truncated: header needs {8 + n} bytes, file has {size}")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise TensorFileError(f"{self.path}: bad safetensors header: {e}") from None
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._offset = 8 + n
        self._entries: dict[str, tuple[TensorInfo, int]] = {}
        for name, e in header.items():
            if e.get("dtype") not in DTYPES:
                raise TensorFileError(f"{self.path}: tensor {name!r} has unsupported dtype {e.get('dtype')!r}")
            info = TensorInfo(name, tuple(e["shape"]), DTYPES[e["dtype"]])
            start, end = e["data_offsets"]
            if end - start != info.nbytes:
                raise TensorFileError(f"{self.path}: tensor {name!r} has {end - start} bytes, "
                                      f"shape {list(info.shape)} {e['dtype']} needs {info.nbytes}")
            if self._offset + end > size:
                raise TensorFileError(f"{self.path}: truncated: tensor {name!r} ends at byte "
                                      f"{self._offset + end}, file has {size}")
            self._entries[name] = (info, self._offset + start)
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r") if size else None

    def keys(self) -> list[str]:
        return list(self._entries)

    def info(self, name: str) -> TensorInfo:
        return self._entries[name][0]

    def byte_range(self, name: str) -> tuple[int, int]:
        info, start = self._entries[name]
        return start, info.nbytes

    def get(self, name: str) -> np.ndarray:
        info, start = self._entries[name]
        raw = self._map[start:start + info.nbytes]
        return raw.view(info.dtype).reshape(info.shape)


class SafetensorsWriter:
    """Writes the header for `infos` up front, then takes each tensor in order, either as an array
    or as a byte range copied from another file (copy_file_range: the bytes never enter Python), so
    memory holds at most one tensor. Closing checks that every tensor arrived."""

    def __init__(self, path: str | Path, infos: list[TensorInfo], metadata: dict[str, str] | None = None):
        self.path, self.infos, self._next = Path(path), list(infos), 0
        header: dict = {"__metadata__": metadata} if metadata else {}
        offset = 0
        for info in self.infos:
            header[info.name] = {"dtype": dtype_code(info.dtype), "shape": list(info.shape),
                                 "data_offsets": [offset, offset + info.nbytes]}
            offset += info.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as the reference writer does
        self._file = open(self.path, "wb", buffering=0)  # unbuffered: copy_bytes writes at the fd's position
        write_all(self._file, struct.pack("<Q", len(blob)) + blob)
        self._size = 8 + len(blob) + offset

    def _expect(self) -> TensorInfo:
        if self._next >= len(self.infos):
            raise TensorFileError(f"{self.path}: more tensors than the {len(self.infos)} in its header")
        self._next += 1
        return self.infos[self._next - 1]

    def write_array(self, array: np.ndarray) -> None:
        info = self._expect()
        if tuple(array.shape) != info.shape or array.dtype != info.dtype:
            raise TensorFileError(f"{self.path}: tensor {info.name!r} is {array.dtype}{list(array.shape)}, "
                                  f"expected {info.dtype}{list(info.shape)}")
        # Raw bytes: bfloat16 has no buffer-protocol code.
        write_all(self._file, np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)

    def copy_bytes(self, src: SafetensorsFile, name: str) -> None:
        """The tensor `name` of `src`, byte for byte; it must match the next header entry."""
        info, (offset, nbytes) = self._expect(), src.byte_range(name)
        have = src.info(name)
        if have.shape != info.shape or have.dtype != info.dtype:
            raise TensorFileError(f"{src.path}: tensor {name!r} is {have.dtype}{list(have.shape)}, "
                                  f"expected {info.dtype}{list(info.shape)} for {info.name!r}")
        with open(src.path, "rb", buffering=0) as f_in:
            done = 0
            while done < nbytes:
                try:
                    n = os.copy_file_range(f_in.fileno(), self._file.fileno(), nbytes - done, offset + done)
                except OSError:  # e.g. EXDEV on older kernels: copy through a bounded buffer instead
                    chunk = os.pread(f_in.fileno(), min(nbytes - done, 64 << 20), offset + done)
                    write_all(self._file, chunk)
                    n = len(chunk)
                if n == 0:
                    raise TensorFileError(f"{src.path}: truncated while copying tensor {name!r}")
                done += n

    def close(self) -> None:
        size = self._file.tell()
        self._file.close()
        if self._next != len(self.infos):
            raise TensorFileError(f"{self.path}: got {self._next} tensors, expected {len(self.infos)}")
        if size != self._size:
            raise TensorFileError(f"{self.path}: wrote {size} bytes, its header needs {self._size}")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            self._file.close()


def plan_shards(infos: list[TensorInfo], max_bytes: int) -> list[list[TensorInfo]]:
    """Groups tensors in order into shards of at most max_bytes (a larger tensor gets its own)."""
    shards: list[list[TensorInfo]] = [[]]
    size = 0
    for info in infos:
        if shards[-1] and size + info.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(info)
        size += info.nbytes
    return shards


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB', '123' -> bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = str(text).strip().upper()
    num = t.rstrip("KMGIB")
    unit = t[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = -1
    if unit not in units or value <= 0:
        raise ConfigError(f"shard size {text!r} is not a size like 5GB, 500MB or 2GiB")
    return int(value * units[unit])
