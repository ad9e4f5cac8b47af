"""Tests for the MindSpore .ckpt reader/writer against real MindSpore-written fixtures."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fuzzing import mutate, mutation

from pangu_jax.checkpoints.mindspore_format import (
    CheckpointFormatError,
    TensorRecord,
    iter_mindspore,
    read_mindspore_index,
    write_mindspore,
)

FIXTURES = Path(__file__).parent / "fixtures"
CKPTS = ["tiny_fp32.ckpt", "tiny_fp16.ckpt", "tiny_fp16_mixed.ckpt"]
FIRST = "backbone.word_embedding.embedding_table"
SECOND = "backbone.position_embedding.embedding_table"
LAST = "backbone.top_query_layer.output.projection.bias"


# --- hand-built protobuf pieces (independent of the module under test) -------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes(out + bytes([value]))


def _ld(key: int, payload: bytes) -> bytes:
    return bytes([key]) + _varint(len(payload)) + payload


def _proto(dims: tuple[int, ...] = (2,), dtype: bytes = b"Float32", content: bytes = bytes(8)) -> bytes:
    return b"".join(b"\x08" + _varint(d) for d in dims) + _ld(0x12, dtype) + _ld(0x1A, content)


def _tag(name: str = "w") -> bytes:
    return _ld(0x0A, name.encode())


def _tensor(proto: bytes) -> bytes:
    return _ld(0x12, proto)


def _entry(*fields: bytes) -> bytes:
    return _ld(0x0A, b"".join(fields))


def _expected_dtype(ckpt: str, name: str) -> str:
    if ckpt == "tiny_fp32.ckpt" or (ckpt == "tiny_fp16_mixed.ckpt" and ".layernorm" in name):
        return "Float32"
    return "Float16"


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _error(path: Path, *fragments: str) -> tuple[str, list[TensorRecord]]:
    """Read ``path`` expecting a CheckpointFormatError naming the file and every fragment."""
    records: list[TensorRecord] = []
    with pytest.raises(CheckpointFormatError) as info:
        for record in iter_mindspore(path):
            records.append(record)
    message = str(info.value)
    assert str(path) in message and "byte offset" in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message, records


# --- reading the fixtures ------------------------------------------------------------


@pytest.mark.parametrize("ckpt", CKPTS)
def test_values_and_dtypes_match_npy(ckpt: str) -> None:
    records = read_mindspore_index(FIXTURES / ckpt)
    assert sorted(records) == sorted(p.stem for p in (FIXTURES / "npy").glob("*.npy"))
    for name, record in records.items():
        expected = np.load(FIXTURES / "npy" / f"{name}.npy")
        assert record.dtype == _expected_dtype(ckpt, name)
        expected = expected.astype(np.float32 if record.dtype == "Float32" else np.float16)
        assert record.shape == expected.shape == record.data.shape
        assert record.data.dtype == expected.dtype
        np.testing.assert_array_equal(record.data, expected)


@pytest.mark.parametrize("ckpt", CKPTS)
def test_records_are_read_only_views_at_their_offset(ckpt: str) -> None:
    raw = (FIXTURES / ckpt).read_bytes()
    for record in iter_mindspore(FIXTURES / ckpt):
        assert not record.data.flags.writeable and not record.data.flags.owndata
        assert raw[record.offset : record.offset + record.data.nbytes] == record.data.tobytes()


@pytest.mark.parametrize("ckpt", CKPTS)
def test_rewrite_is_byte_exact(ckpt: str, tmp_path: Path) -> None:
    out = tmp_path / ckpt
    write_mindspore(out, ((r.name, r.data) for r in iter_mindspore(FIXTURES / ckpt)))
    assert out.read_bytes() == (FIXTURES / ckpt).read_bytes()


# --- writer ----------------------------------------------------------------------------


def test_write_read_roundtrip_every_dtype(tmp_path: Path) -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(0)
    arrays = {
        "bool": rng.random((3, 4)) > 0.5,
        "i8": np.array([-128, 0, 127], np.int8),
        "i16": np.array([-(2**15), 2**15 - 1], np.int16),
        "i32": np.arange(-6, 6, dtype=np.int32).reshape(3, 2, 2),
        "i64": np.array([-(2**63), 2**63 - 1], np.int64),
        "u8": np.array([0, 255], np.uint8),
        "u16": np.array([0, 2**16 - 1], np.uint16),
        "u32": np.array([0, 2**32 - 1], np.uint32),
        "u64": np.array([0, 2**64 - 1], np.uint64),
        "f16": rng.standard_normal(5).astype(np.float16),
        "f32_transposed": rng.standard_normal((4, 3)).astype(np.float32).T,
        "f32_big_endian": np.arange(4, dtype=">f4"),
        "f64": rng.standard_normal((2, 2)),
        "bf16": rng.standard_normal(7).astype(ml_dtypes.bfloat16),
        "scalar": np.float32(1.5),
        "empty": np.zeros((0, 3), np.float32),
    }
    out = tmp_path / "all.ckpt"
    write_mindspore(out, arrays.items())
    records = list(iter_mindspore(out))
    assert [r.name for r in records] == list(arrays)
    expected_types = ["Bool", "Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64"]
    expected_types += ["Float16", "Float32", "Float32", "Float64", "BFloat16", "Float32", "Float32"]
    assert [r.dtype for r in records] == expected_types
    for record, array in zip(records, arrays.values()):
        assert record.shape == np.shape(array)
        assert record.data.dtype == np.asarray(array).dtype.newbyteorder("=")
        np.testing.assert_array_equal(record.data, array)


def test_scalar_layout_and_legacy_scalar(tmp_path: Path) -> None:
    value = np.float32(2.5).tobytes()
    out = tmp_path / "s.ckpt"
    write_mindspore(out, [("s", np.float32(2.5))])
    # MindSpore 2.x stores a 0-d tensor without dims; 1.x stored dims [0].
    assert out.read_bytes() == _entry(_tag("s"), _tensor(_proto((), b"Float32", value)))
    legacy = _write(tmp_path / "legacy.ckpt", _entry(_tag("s"), _tensor(_proto((0,), b"Float32", value))))
    (record,) = iter_mindspore(legacy)
    assert record.shape == () and record.data == np.float32(2.5)


@pytest.mark.parametrize("array", [np.zeros(2, np.complex64), np.array(["a"]), np.array([None])])
def test_writer_rejects_unsupported_dtype(array: np.ndarray, tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"tensor 'bad'.*unsupported dtype.*float32 \(Float32\)"):
        write_mindspore(tmp_path / "x.ckpt", [("ok", np.zeros(1, np.float32)), ("bad", array)])
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_duplicate_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"tensor 'a'.*duplicate"):
        write_mindspore(tmp_path / "x.ckpt", [("a", np.zeros(1)), ("a", np.ones(1))])
    assert list(tmp_path.iterdir()) == []


def _failing_tensors() -> Iterator[tuple[str, np.ndarray]]:
    yield "a", np.zeros((64, 64), np.float32)
    raise RuntimeError("boom")


def test_failed_write_leaves_no_file(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        write_mindspore(tmp_path / "x.ckpt", _failing_tensors())
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_existing_destination(tmp_path: Path) -> None:
    dest = _write(tmp_path / "x.ckpt", b"previous contents")
    with pytest.raises(RuntimeError, match="boom"):
        write_mindspore(dest, _failing_tensors())
    assert list(tmp_path.iterdir()) == [dest] and dest.read_bytes() == b"previous contents"
    write_mindspore(dest, [("a", np.ones(2, np.float32))])
    assert list(tmp_path.iterdir()) == [dest] and read_mindspore_index(dest)["a"].data.tolist() == [1, 1]


# --- malformed files -------------------------------------------------------------------


def _first_entry(raw: bytes) -> bytes:
    record = next(iter_mindspore(FIXTURES / "tiny_fp16.ckpt"))
    return raw[: record.offset + record.data.nbytes]


TRUNCATIONS: list[tuple[str, Callable[[list[TensorRecord]], int], str, int]] = [
    # (id, cut position from the records, who the message must name, records yielded before the error)
    ("value-key-only", lambda r: 1, "entry #0", 0),
    ("inside-value-length", lambda r: 2, "entry #0", 0),
    ("inside-first-tag", lambda r: 10, "entry #0", 0),
    ("inside-first-tensor-header", lambda r: 50, repr(FIRST), 0),
    ("inside-first-content", lambda r: r[0].offset + 1000, repr(FIRST), 0),
    ("inside-second-header", lambda r: r[0].offset + r[0].data.nbytes + 50, repr(SECOND), 1),
    ("last-byte-missing", lambda r: r[-1].offset + r[-1].data.nbytes - 1, repr(LAST), 52),
]


@pytest.mark.parametrize(("cut", "who", "yielded"), [t[1:] for t in TRUNCATIONS], ids=[t[0] for t in TRUNCATIONS])
def test_truncated_file(cut: Callable[[list[TensorRecord]], int], who: str, yielded: int, tmp_path: Path) -> None:
    source = FIXTURES / "tiny_fp16.ckpt"
    position = cut(list(iter_mindspore(source)))
    path = _write(tmp_path / "t.ckpt", source.read_bytes()[:position])
    _, records = _error(path, who, "runs past the end" if position <= 2 else "truncated file?")
    assert len(records) == yielded


HEADER_FLIPS = [
    # (offset in tiny_fp16.ckpt, new byte, who, what the message says)
    (4, 0x1A, "entry #0", "unexpected field 3 (wire type 2"),  # tag key -> field 3
    (45, 0x15, repr(FIRST), "unexpected field 2 (wire type 5"),  # tensor key -> 32-bit wire type
    (49, 0x0A, repr(FIRST), "unexpected field 1 (wire type 2"),  # dims key -> packed
    (54, 0x22, repr(FIRST), "unexpected field 4 (wire type 2"),  # tensor_type key -> field 4
    (63, 0x18, repr(FIRST), "unexpected field 3 (wire type 0"),  # tensor_content key -> varint
    (50, 0xE9, repr(FIRST), "need 128128 content bytes, found 128000"),  # dims[0] 1000 -> 1001
    (1, 0xBE, repr(FIRST), "tensor declares 128018 bytes but only 128017 remain in the entry"),
]


@pytest.mark.parametrize(("offset", "byte", "who", "what"), HEADER_FLIPS)
def test_flipped_header_byte(offset: int, byte: int, who: str, what: str, tmp_path: Path) -> None:
    raw = bytearray((FIXTURES / "tiny_fp16.ckpt").read_bytes())
    raw[offset] = byte
    _error(_write(tmp_path / "f.ckpt", bytes(raw)), who, what)


def test_trailing_garbage_names_the_entry(tmp_path: Path) -> None:
    raw = (FIXTURES / "tiny_fp16.ckpt").read_bytes()
    _, records = _error(_write(tmp_path / "g.ckpt", raw + b"\x00"), "entry #53", "unexpected field 0")
    assert len(records) == 53


def test_unknown_dtype_lists_supported(tmp_path: Path) -> None:
    raw = (FIXTURES / "tiny_fp16.ckpt").read_bytes().replace(b"Float16", b"Float17", 1)
    message, _ = _error(_write(tmp_path / "d.ckpt", raw), repr(FIRST), "unknown tensor_type 'Float17'")
    for supported in ("BFloat16", "Bool", "Float16", "Float32", "Float64", "Int8", "Int64", "UInt8"):
        assert supported in message


def test_duplicate_names(tmp_path: Path) -> None:
    raw = (FIXTURES / "tiny_fp16.ckpt").read_bytes()
    first = _first_entry(raw)
    _, records = _error(_write(tmp_path / "a.ckpt", raw + first), repr(FIRST), "duplicate tensor name", "#0")
    assert len(records) == 53
    consecutive = _write(tmp_path / "b.ckpt", first + raw)
    _error(consecutive, repr(FIRST), "duplicate tensor name", ">512 MiB")


@pytest.mark.parametrize(
    ("data", "who", "what"),
    [
        (b"\x0a" + b"\xff" * 10 + b"\x01", "entry #0", "varint longer than 10 bytes"),
        (b"\x0a" + b"\xff" * 9 + b"\x7f", "entry #0", "varint exceeds 64 bits"),
        (b"\x0a\xff\xff", "entry #0", "varint runs past the end of the file"),
        (_entry(_tag(), _tensor(b"\x80" * 11)), "'w'", "varint longer than 10 bytes"),
        (_entry(_tag(), _tensor(b"\x08\xff")), "'w'", "varint runs past the end of the tensor"),
        (_entry(_tag(), b"\x12\x05abc"), "'w'", "tensor declares 5 bytes but only 3 remain in the entry"),
        (
            _entry(_tag(), _tensor(b"\x08\x02" + _ld(0x12, b"Float32") + b"\x1a\x09" + bytes(8))),
            "'w'",
            "tensor_content declares 9 bytes but only 8 remain in the tensor",
        ),
        (_entry(_tensor(_proto())), "entry #0", "no tag (field 1)"),
        (_entry(_tag()), "'w'", "no tensor (field 2)"),
        (_entry(_tag(), _tag("v"), _tensor(_proto())), "'w'", "unexpected field 1"),
        (_entry(_tag(), _tensor(b"\x08\x02" + _ld(0x1A, bytes(8)))), "'w'", "no tensor_type (field 2)"),
        (_entry(_tag(), _tensor(b"\x08\x02" + _ld(0x12, b"Float32"))), "'w'", "no tensor_content (field 3)"),
        (_entry(_tag(), _tensor(_proto((2**64 - 2,)))), "'w'", "dims[0] is negative (-2)"),
        (_entry(_tag(), _tensor(_proto((2**62, 2**62)))), "'w'", "need 85070591730234615865843651857942052864 bytes"),
        (_entry(_tag(), _tensor(_proto((2**61, 0)))), "'w'", "corrupt tensor header"),
        (
            _entry(_tag(), _tensor(_proto((10**12, 0), content=b""))),
            "'w', byte offset 7",
            "dims [1000000000000, 0] cannot be real: with each 0 taken as 1 they need 4000000000000 bytes, "
            "more than the whole file (27 bytes); corrupt tensor header",
        ),
        (_entry(_tag(), _tensor(_proto((3,)))), "'w'", "need 12 content bytes, found 8"),
        (_entry(_tag(), _tensor(_proto((1,) * 33, content=bytes(4)))), "'w'", "more than 32 dims"),
        (_entry(_tag(), _tensor(_proto(dtype=b"x" * 100))), "'w'", "unknown tensor_type"),
        (_entry(_ld(0x0A, b"\xff\xfe"), _tensor(_proto())), "entry #0", "tag is not valid UTF-8"),
    ],
    ids=lambda v: v if isinstance(v, str) and " " in v else None,
)
def test_malformed_wire_format(data: bytes, who: str, what: str, tmp_path: Path) -> None:
    _error(_write(tmp_path / "m.ckpt", data), who, what)


@pytest.mark.parametrize(
    ("source", "what"),
    [
        ("hf/pytorch_model.bin", "looks like a zip archive"),
        (f"npy/{FIRST}.npy", "looks like a .npy array"),
        ("hf/model.safetensors", "first byte is 0xc0"),
    ],
)
def test_not_a_checkpoint(source: str, what: str) -> None:
    _error(FIXTURES / source, "entry #0", "not a MindSpore checkpoint", "expected 0x0a", what)


def test_empty_file(tmp_path: Path) -> None:
    _error(_write(tmp_path / "e.ckpt", b""), "file is empty", "not a checkpoint")


# --- fuzzing ---------------------------------------------------------------------------

FUZZ_SOURCE = (FIXTURES / "tiny_fp16.ckpt").read_bytes()


def _header_positions() -> list[int]:
    """Every byte offset that belongs to an entry header rather than tensor content."""
    positions, start = [], 0
    for record in iter_mindspore(FIXTURES / "tiny_fp16.ckpt"):
        positions.extend(range(start, record.offset))
        start = record.offset + record.data.nbytes
    return positions


_mutation = mutation(st.one_of(st.sampled_from(_header_positions()), st.integers(0, len(FUZZ_SOURCE) - 1)))


@pytest.fixture(scope="module")
def fuzz_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "fuzz.ckpt"


@settings(max_examples=300, deadline=None)
@given(mutations=st.lists(_mutation, min_size=1, max_size=4))
def test_fuzz_reader_yields_valid_records_or_format_error(fuzz_file: Path, mutations: list) -> None:
    data = mutate(FUZZ_SOURCE, mutations)
    fuzz_file.write_bytes(data)
    names: set[str] = set()
    try:
        for record in iter_mindspore(fuzz_file):
            assert record.name not in names
            names.add(record.name)
            assert record.data.shape == record.shape
            end = record.offset + record.data.nbytes
            assert data[record.offset : end] == record.data.tobytes()
    except CheckpointFormatError as error:
        assert str(fuzz_file) in str(error)
