"""Byte-level mutations for fuzzing the checkpoint readers with hypothesis."""

from __future__ import annotations

from hypothesis import strategies as st


def mutation(position: st.SearchStrategy[int]) -> st.SearchStrategy[tuple[str, int, object]]:
    """One edit of a file's bytes at a drawn position: set, insert, delete, or truncate there."""
    return st.one_of(
        st.tuples(st.just("set"), position, st.integers(0, 255)),
        st.tuples(st.just("insert"), position, st.binary(min_size=1, max_size=12)),
        st.tuples(st.just("delete"), position, st.integers(1, 12)),
        st.tuples(st.just("truncate"), position, st.just(0)),
    )


def mutate(data: bytes, mutations: list[tuple[str, int, object]]) -> bytes:
    out = bytearray(data)
    for kind, position, arg in mutations:
        position = min(position, max(len(out) - 1, 0))
        if kind == "set" and out:
            out[position] = arg
        elif kind == "insert":
            out[position:position] = arg
        elif kind == "delete":
            del out[position : position + arg]
        elif kind == "truncate":
            del out[position:]
    return bytes(out)
