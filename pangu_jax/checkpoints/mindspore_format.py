"""Streaming reader and byte-exact writer for MindSpore ``.ckpt`` checkpoints.

A ``.ckpt`` file is one protobuf message (MindSpore's ``checkpoint.proto``, proto2)::

    message Checkpoint  { repeated Value value = 1; }
    message Value       { required string tag = 1; required TensorProto tensor = 2; }
    message TensorProto { repeated int64 dims = 1; required string tensor_type = 2;
                          required bytes tensor_content = 3; }

The released PanGu-alpha 13B file is about 26 GB, far past protobuf's 2 GB message
limit, so the wire format is walked by hand over an mmap, one entry at a time.

Layout written by ``mindspore.save_checkpoint`` (checked against MindSpore 2.10 output):
each entry is ``0a <len>``, then the tag ``0a <len> <utf-8 name>``, then the tensor
``12 <len>``; inside the tensor every dim is its own unpacked varint field
``08 <dim>`` (a 0-d tensor has none), then ``12 <len> <dtype string>``, then
``1a <len> <little-endian row-major bytes>``. There is no header, trailer or checksum.

Arrays returned by the reader are read-only views into the mmap; the mapping stays
open while any of them is referenced, so copy or cast whatever you keep.
"""

from __future__ import annotations

import math
import mmap
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..atomic import atomic_file
from .errors import CheckpointFormatError
from .storage import implausible_dims

__all__ = [
    "CheckpointFormatError",
    "TensorRecord",
    "iter_mindspore",
    "read_mindspore_index",
    "write_mindspore",
]

# MindSpore dtype string -> numpy dtype name ("bfloat16" comes from ml_dtypes).
_MS_TO_NUMPY: dict[str, str] = {
    "Bool": "bool",
    "Int8": "int8",
    "Int16": "int16",
    "Int32": "int32",
    "Int64": "int64",
    "UInt8": "uint8",
    "UInt16": "uint16",
    "UInt32": "uint32",
    "UInt64": "uint64",
    "Float16": "float16",
    "Float32": "float32",
    "Float64": "float64",
    "BFloat16": "bfloat16",
}
_NUMPY_TO_MS: dict[str, str] = {np_name: ms_name for ms_name, np_name in _MS_TO_NUMPY.items()}

_VALUE_KEY = 0x0A  # Checkpoint.value: field 1, wire type 2
_MAX_VARINT_BYTES = 10
_MAX_NDIM = 32  # numpy 1.x limit; far above any real parameter
_INT64_LIMIT = 1 << 63
_WRITE_CHUNK = 64 << 20
_WIRE_TYPES = {0: "varint", 1: "64-bit", 2: "length-delimited", 3: "start-group", 4: "end-group", 5: "32-bit"}
_KNOWN_MAGIC = {
    b"PK\x03\x04": "a zip archive (e.g. a PyTorch .bin)",
    b"\x93NUMPY": "a .npy array",
    b"\x80": "a pickle",
}


@dataclass(frozen=True, eq=False)
class TensorRecord:
    """One checkpoint entry; ``data`` is a read-only zero-copy view into the mmap."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    data: np.ndarray


@dataclass
class _Context:
    """Who and where, for error messages: the file and the entry being parsed."""

    path: Path
    index: int
    name: str | None = None

    def error(self, offset: int, message: str) -> CheckpointFormatError:
        who = f"tensor {self.name!r}" if self.name is not None else f"entry #{self.index} (name not read yet)"
        return CheckpointFormatError(f"{self.path}: {who}, byte offset {offset}: {message}")


class _Cursor:
    """Reads protobuf primitives from ``buf[pos:end]``, never past ``end``."""

    def __init__(self, buf: mmap.mmap, pos: int, end: int, scope: str, ctx: _Context) -> None:
        self.buf, self.pos, self.end, self.scope, self.ctx = buf, pos, end, scope, ctx

    def at_end(self) -> bool:
        return self.pos >= self.end

    def varint(self, what: str) -> int:
        start, result = self.pos, 0
        for i in range(_MAX_VARINT_BYTES):
            if start + i >= self.end:
                raise self.ctx.error(start, f"{what}: varint runs past the end of the {self.scope}")
            byte = self.buf[start + i]
            result |= (byte & 0x7F) << (7 * i)
            if byte < 0x80:
                if result >> 64:
                    raise self.ctx.error(start, f"{what}: varint exceeds 64 bits")
                self.pos = start + i + 1
                return result
        raise self.ctx.error(start, f"{what}: varint longer than {_MAX_VARINT_BYTES} bytes")

    def key(self) -> tuple[int, int]:
        """Field number and wire type of the next field."""
        key = self.varint(f"field key in the {self.scope}")
        return key >> 3, key & 7

    def length_delimited(self, what: str) -> tuple[int, int]:
        """Start and stop of the next length-delimited payload; advances past it."""
        length_offset = self.pos
        length = self.varint(f"length of {what}")
        if length > self.end - self.pos:
            raise self.ctx.error(
                length_offset,
                f"{what} declares {length} bytes but only {self.end - self.pos} remain in the {self.scope}"
                + (" (truncated file?)" if self.scope == "file" else ""),
            )
        start, self.pos = self.pos, self.pos + length
        return start, self.pos

    def unexpected(self, offset: int, field: int, wire: int, expected: str) -> CheckpointFormatError:
        wire_name = _WIRE_TYPES.get(wire, "invalid")
        return self.ctx.error(
            offset, f"unexpected field {field} (wire type {wire}, {wire_name}) in the {self.scope}; expected {expected}"
        )


def iter_mindspore(path: str | os.PathLike[str]) -> Iterator[TensorRecord]:
    """Yield the tensors of a MindSpore checkpoint in file order, without reading it whole.

    Raises CheckpointFormatError (lazily, at the offending entry) for malformed files.
    """
    path = Path(path)
    buf = _map_checkpoint(path)
    first_index: dict[str, int] = {}
    top = _Cursor(buf, 0, len(buf), "file", _Context(path, 0))
    while not top.at_end():
        top.ctx = _Context(path, len(first_index))
        record = _parse_entry(top)
        if record.name in first_index:
            raise top.ctx.error(record.offset, _duplicate_message(first_index[record.name], top.ctx.index))
        first_index[record.name] = top.ctx.index
        yield record


def read_mindspore_index(path: str | os.PathLike[str]) -> dict[str, TensorRecord]:
    """All records of a checkpoint by name (still zero-copy views into one mmap)."""
    return {record.name: record for record in iter_mindspore(path)}


def _map_checkpoint(path: Path) -> mmap.mmap:
    """Map the file read-only after checking it is non-empty and starts like a checkpoint."""
    ctx = _Context(path, 0)
    with path.open("rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise ctx.error(0, "file is empty (0 bytes), not a checkpoint")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if buf[0] != _VALUE_KEY:
        first, hint = buf[0], _guess_format(buf[:16])
        buf.close()
        raise ctx.error(
            0,
            f"not a MindSpore checkpoint: first byte is 0x{first:02x}, "
            f"expected 0x{_VALUE_KEY:02x} (the Checkpoint.value field key){hint}",
        )
    return buf


def _guess_format(head: bytes) -> str:
    for magic, description in _KNOWN_MAGIC.items():
        if head.startswith(magic):
            return f"; it looks like {description}"
    return ""


def _duplicate_message(first: int, current: int) -> str:
    message = f"duplicate tensor name, first stored as entry #{first}; expected unique names"
    if first == current - 1:
        # MindSpore splits tensors over 512 MiB into consecutive same-name entries.
        message += " (consecutive repeats are MindSpore's slices of a >512 MiB tensor, which are not supported)"
    return message


def _parse_entry(top: _Cursor) -> TensorRecord:
    """Parse one Checkpoint.value at ``top.pos`` and advance past it."""
    offset = top.pos
    field, wire = top.key()
    if (field, wire) != (1, 2):
        raise top.unexpected(offset, field, wire, "field 1 (value, length-delimited)")
    length_offset = top.pos
    length = top.varint("length of the entry")
    if length > top.end - top.pos:
        top.ctx.name = _peek_tag(top.buf, top.pos, top.ctx)
        raise top.ctx.error(
            length_offset,
            f"entry declares {length} bytes but only {top.end - top.pos} remain in the file (truncated file?)",
        )
    value = _Cursor(top.buf, top.pos, top.pos + length, "entry", top.ctx)
    top.pos = value.end
    return _parse_value(value)


def _peek_tag(buf: mmap.mmap, pos: int, ctx: _Context) -> str | None:
    """Best-effort name of a truncated entry, so its error can name the tensor."""
    try:
        cursor = _Cursor(buf, pos, len(buf), "file", _Context(ctx.path, ctx.index))
        if cursor.key() != (1, 2):
            return None
        return _decode_tag(cursor, *cursor.length_delimited("tag"))
    except CheckpointFormatError:
        return None


def _decode_tag(cur: _Cursor, start: int, stop: int) -> str:
    try:
        return cur.buf[start:stop].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise cur.ctx.error(start + exc.start, f"tag is not valid UTF-8 ({exc.reason}); expected a tensor name")


def _parse_value(value: _Cursor) -> TensorRecord:
    """Parse a Value message: its tag (the name) and its TensorProto, each exactly once."""
    tensor_span: tuple[int, int] | None = None
    while not value.at_end():
        offset = value.pos
        field, wire = value.key()
        if (field, wire) == (1, 2) and value.ctx.name is None:
            value.ctx.name = _decode_tag(value, *value.length_delimited("tag"))
        elif (field, wire) == (2, 2) and tensor_span is None:
            tensor_span = value.length_delimited("tensor")
        else:
            expected = "field 1 (tag) and field 2 (tensor), each once and length-delimited"
            raise value.unexpected(offset, field, wire, expected)
    if value.ctx.name is None:
        raise value.ctx.error(value.end, "entry has no tag (field 1); expected the tensor name")
    if tensor_span is None:
        raise value.ctx.error(value.end, "entry has no tensor (field 2); expected a TensorProto")
    return _parse_tensor(_Cursor(value.buf, *tensor_span, "tensor", value.ctx), value.ctx.name)


def _parse_tensor(tensor: _Cursor, name: str) -> TensorRecord:
    """Parse a TensorProto and return its record with a zero-copy view of the content."""
    dims: list[tuple[int, int]] = []  # (offset, raw uint64 value)
    dtype_span: tuple[int, int] | None = None
    content: tuple[int, int] | None = None
    while not tensor.at_end():
        offset = tensor.pos
        field, wire = tensor.key()
        if (field, wire) == (1, 0):
            if len(dims) == _MAX_NDIM:
                raise tensor.ctx.error(offset, f"more than {_MAX_NDIM} dims; expected a real tensor shape")
            dims.append((offset, tensor.varint("dims entry")))
        elif (field, wire) == (2, 2) and dtype_span is None:
            dtype_span = tensor.length_delimited("tensor_type")
        elif (field, wire) == (3, 2) and content is None:
            content = tensor.length_delimited("tensor_content")
        else:
            expected = (
                "field 1 (dims, unpacked varints), field 2 (tensor_type) "
                "and field 3 (tensor_content), each once and length-delimited"
            )
            raise tensor.unexpected(offset, field, wire, expected)
    if dtype_span is None:
        raise tensor.ctx.error(tensor.end, "tensor has no tensor_type (field 2); expected a dtype string")
    if content is None:
        raise tensor.ctx.error(tensor.end, "tensor has no tensor_content (field 3); expected the raw data")
    ms_dtype = _read_dtype(tensor, *dtype_span)
    np_dtype = _numpy_dtype(ms_dtype)
    shape = _validate_shape(tensor, dims, np_dtype.itemsize, content)
    count = (content[1] - content[0]) // np_dtype.itemsize
    data = np.frombuffer(tensor.buf, dtype=np_dtype, count=count, offset=content[0]).reshape(shape)
    return TensorRecord(name, ms_dtype, shape, content[0], data)


def _read_dtype(tensor: _Cursor, start: int, stop: int) -> str:
    raw = tensor.buf[start : min(stop, start + 64)]
    name = raw.decode("ascii", errors="replace")
    if stop - start > len(raw) or name not in _MS_TO_NUMPY:
        raise tensor.ctx.error(
            start, f"unknown tensor_type {name!r}; expected one of {', '.join(sorted(_MS_TO_NUMPY))}"
        )
    return name


def _numpy_dtype(ms_dtype: str) -> np.dtype:
    """Little-endian numpy dtype for a supported MindSpore dtype string."""
    if ms_dtype == "BFloat16":
        import ml_dtypes  # ships with jax; only needed for bfloat16 files

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(_MS_TO_NUMPY[ms_dtype]).newbyteorder("<")


def _validate_shape(
    tensor: _Cursor, dims: list[tuple[int, int]], itemsize: int, content: tuple[int, int]
) -> tuple[int, ...]:
    """Shape from the dims, checked against the content length."""
    for i, (offset, raw) in enumerate(dims):
        if raw >= _INT64_LIMIT:
            raise tensor.ctx.error(offset, f"dims[{i}] is negative ({raw - (1 << 64)}); expected a size >= 0")
    shape = tuple(raw for _, raw in dims)
    content_len = content[1] - content[0]
    if shape == (0,) and content_len == itemsize:
        return ()  # MindSpore 1.x stored a 0-d tensor as dims [0]
    why = implausible_dims(shape, itemsize, len(tensor.buf))
    if why:
        largest = max(dims, key=lambda dim: dim[1])
        raise tensor.ctx.error(largest[0], why)
    expected = math.prod(shape) * itemsize
    if expected != content_len:
        raise tensor.ctx.error(
            content[0],
            f"dims {list(shape)} with itemsize {itemsize} need {expected} content bytes, found {content_len}",
        )
    return shape


def write_mindspore(path: str | os.PathLike[str], tensors: Iterable[tuple[str, np.ndarray]]) -> None:
    """Write ``(name, array)`` pairs in order, byte-identical to ``mindspore.save_checkpoint``.

    Tensors are streamed one at a time into a temporary sibling file that replaces
    ``path`` only once everything is written; on any failure it is removed and an
    existing ``path`` is left untouched. (MindSpore would split a tensor over 512 MiB
    into several entries; this writer always stores one entry per tensor.)
    """
    path = Path(path)
    with atomic_file(path) as tmp, tmp.open("xb") as f:
        seen: set[str] = set()
        for name, array in tensors:
            if name in seen:
                raise ValueError(f"{path}: tensor {name!r}: duplicate tensor name; names must be unique")
            seen.add(name)
            _write_entry(f, path, name, array)
        f.flush()
        os.fsync(f.fileno())


def _write_entry(f: BinaryIO, path: Path, name: str, array: np.ndarray) -> None:
    if not isinstance(name, str):
        raise TypeError(f"{path}: tensor {name!r}: name must be a str, got {type(name).__name__}")
    array = np.asarray(array)
    ms_dtype = _NUMPY_TO_MS.get(array.dtype.name)
    if ms_dtype is None:
        raise TypeError(
            f"{path}: tensor {name!r}: unsupported dtype {array.dtype}; expected one of "
            + ", ".join(f"{np_name} ({ms_name})" for np_name, ms_name in _NUMPY_TO_MS.items())
        )
    data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).reshape(-1).view(np.uint8)
    f.write(_entry_header(name, ms_dtype, array.shape, data.nbytes))
    for start in range(0, data.nbytes, _WRITE_CHUNK):
        f.write(data[start : start + _WRITE_CHUNK])


def _entry_header(name: str, ms_dtype: str, shape: tuple[int, ...], nbytes: int) -> bytes:
    """Everything of one entry up to the raw content, with MindSpore's field order."""
    dims = b"".join(b"\x08" + _varint(dim) for dim in shape)
    tensor_head = dims + _field(0x12, ms_dtype.encode("ascii")) + b"\x1a" + _varint(nbytes)
    tensor_len = len(tensor_head) + nbytes
    value_head = _field(0x0A, name.encode("utf-8")) + b"\x12" + _varint(tensor_len) + tensor_head
    return b"\x0a" + _varint(len(value_head) + nbytes) + value_head


def _field(key: int, payload: bytes) -> bytes:
    return bytes([key]) + _varint(len(payload)) + payload


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
