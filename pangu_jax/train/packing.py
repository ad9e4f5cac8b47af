"""Documents laid out in rows of ``seq_len + 1`` ids, and the arrays a training step reads from a row.

A row's first ``seq_len`` ids are the inputs, its last ``seq_len`` the targets.
Two layouts:

- ``reset``: documents packed greedily, best fit: each in turn goes into the
  row with the least space left that holds it, or into a new row, so a
  document that fits in a row is never cut. A longer one fills whole rows and
  its tail is packed like a document. Each piece of a document is a segment
  of its row (numbered from 1; padding is 0) whose positions start at 0, and
  no target outside an input's own segment is trained on.
- ``concat``: the original pre-training layout. All documents form one stream,
  cut into rows that start ``seq_len`` ids apart (each row's last id is the
  next row's first), so every id but the first is a target once. Positions run
  0..seq_len-1, the row is one segment, targets across documents are trained on.

In both, a token before a document's loss start (a prompt and its ``<sep>``)
is never trained on as a target.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pangu_jax.train.token_cache import TokenizedDocuments

__all__ = ["BATCH_FIELDS", "PACKINGS", "PackedRows", "Packing", "pack"]

PACKINGS = ("reset", "concat")

BATCH_FIELDS = {
    "tokens": np.int32,
    "targets": np.int32,
    "positions": np.int32,
    "segment_ids": np.int32,
    "loss_weights": np.float32,
}
"""Each array of a batch and its dtype; every one is [rows, seq_len]."""


@dataclass(frozen=True)
class Packing:
    """Which pieces of which documents fill each row.

    Row ``r`` holds the pieces ``row_starts[r]:row_starts[r + 1]`` in order;
    piece ``p`` is ``lengths[p]`` ids of document ``documents[p]`` from its
    id ``begins[p]`` on. Documents are numbered as in the ``lengths`` given to
    :func:`pack`.
    """

    mode: str
    seq_len: int
    row_starts: np.ndarray
    documents: np.ndarray
    begins: np.ndarray
    lengths: np.ndarray

    @property
    def num_rows(self) -> int:
        return len(self.row_starts) - 1


def pack(lengths: np.ndarray, seq_len: int, mode: str) -> Packing:
    """Lay out documents of these lengths (in ids) in rows of ``seq_len + 1`` ids (``mode`` in :data:`PACKINGS`)."""
    lengths = np.asarray(lengths, np.int64)
    if mode == "reset":
        return _pack_reset(lengths, seq_len)
    if mode == "concat":
        return _pack_concat(lengths, seq_len)
    raise ValueError(f"packing must be one of {PACKINGS}, got {mode!r}")


def _pack_reset(lengths: np.ndarray, seq_len: int) -> Packing:
    row_len = seq_len + 1
    rows: list[list[tuple[int, int, int]]] = []
    # open_rows[space]: the rows with that many ids left; a row is open while a piece
    # can still start before its last id (which is seen only as a target).
    open_rows: list[list[int]] = [[] for _ in range(row_len + 1)]
    open_counts = np.zeros(row_len + 1, np.int64)
    for document, length in enumerate(lengths.tolist()):
        begin = 0
        while length - begin > row_len:
            rows.append([(document, begin, row_len)])
            begin += row_len
        size = length - begin
        fitting = np.flatnonzero(open_counts[size:])
        if len(fitting):
            space = size + int(fitting[0])
            row = open_rows[space].pop()
            open_counts[space] -= 1
        else:
            space, row = row_len, len(rows)
            rows.append([])
        rows[row].append((document, begin, size))
        space -= size
        if space >= 2:
            open_rows[space].append(row)
            open_counts[space] += 1
    row_starts = np.cumsum([0] + [len(pieces) for pieces in rows])
    pieces = np.asarray([piece for pieces in rows for piece in pieces], np.int64).reshape(-1, 3)
    return Packing("reset", seq_len, row_starts.astype(np.int64), *pieces.T)


def _pack_concat(lengths: np.ndarray, seq_len: int) -> Packing:
    ends = np.cumsum(lengths)
    starts = ends - lengths
    total = int(ends[-1]) if len(ends) else 0
    num_rows = max(0, -(-(total - 1) // seq_len))
    row_begin = np.arange(num_rows, dtype=np.int64) * seq_len
    row_end = np.minimum(row_begin + seq_len + 1, total)
    first = np.searchsorted(ends, row_begin, side="right")
    counts = np.searchsorted(ends, row_end - 1, side="right") - first + 1
    row_starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    row_of_piece = np.repeat(np.arange(num_rows), counts)
    documents = first[row_of_piece] + np.arange(row_starts[-1]) - row_starts[row_of_piece]
    piece_begin = np.maximum(row_begin[row_of_piece], starts[documents])
    piece_end = np.minimum(row_end[row_of_piece], ends[documents])
    return Packing("concat", seq_len, row_starts, documents, piece_begin - starts[documents], piece_end - piece_begin)


class PackedRows:
    """The rows of one split as the arrays of :data:`BATCH_FIELDS`.

    Args:
        packing: the layout, its documents numbered as in ``members``.
        documents: the tokenized documents.
        members: the numbers in ``documents`` of the documents packed.
        pad_id: the id of padding.
    """

    def __init__(self, packing: Packing, documents: TokenizedDocuments, members: np.ndarray, pad_id: int) -> None:
        self.packing = packing
        self._documents = documents
        self._members = np.asarray(members, np.int64)
        self._pad_id = pad_id

    def __len__(self) -> int:
        return self.packing.num_rows

    def __getitem__(self, row: int) -> dict[str, np.ndarray]:
        """The arrays of one row, each [seq_len]."""
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} is outside [0, {len(self)})")
        seq_len = self.packing.seq_len
        ids = np.full(seq_len + 1, self._pad_id, np.int32)
        segments = np.zeros(seq_len + 1, np.int32)
        positions = np.zeros(seq_len + 1, np.int32)
        trained = np.zeros(seq_len + 1, bool)
        offset = 0
        pieces = range(self.packing.row_starts[row], self.packing.row_starts[row + 1])
        for segment, piece in enumerate(pieces, start=1):
            document = self._members[self.packing.documents[piece]]
            begin, length = int(self.packing.begins[piece]), int(self.packing.lengths[piece])
            span = slice(offset, offset + length)
            ids[span] = self._documents.tokens(document)[begin : begin + length]
            segments[span] = segment
            positions[span] = np.arange(length)
            trained[span] = np.arange(begin, begin + length) >= self._documents.loss_starts[document]
            offset += length
        if self.packing.mode == "concat":
            segments = (segments != 0).astype(np.int32)
            positions = np.where(segments != 0, np.arange(seq_len + 1), 0).astype(np.int32)
        same_segment = (segments[:-1] != 0) & (segments[1:] == segments[:-1])
        return {
            "tokens": ids[:-1],
            "targets": ids[1:],
            "positions": positions[:-1],
            "segment_ids": segments[:-1],
            "loss_weights": (same_segment & trained[1:]).astype(np.float32),
        }

    def stack(self, rows: Sequence[int], size: int | None = None) -> dict[str, np.ndarray]:
        """The arrays of these rows, each [size, seq_len]; rows past ``len(rows)`` are padding."""
        size = len(rows) if size is None else size
        seq_len = self.packing.seq_len
        batch = {name: np.zeros((size, seq_len), dtype) for name, dtype in BATCH_FIELDS.items()}
        batch["tokens"][:] = batch["targets"][:] = self._pad_id
        for index, row in enumerate(rows):
            for name, values in self[int(row)].items():
                batch[name][index] = values
        return batch
