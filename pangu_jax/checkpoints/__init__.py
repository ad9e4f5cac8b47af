"""Checkpoint formats: readers, writers and the name mapping they share."""

from .convert import detect_format, load_checkpoint
from .loader import CheckpointMismatchError
from .mindspore_format import CheckpointFormatError
from .orbax_store import load_orbax, save_orbax, save_orbax_stream

__all__ = [
    "CheckpointFormatError",
    "CheckpointMismatchError",
    "detect_format",
    "load_checkpoint",
    "load_orbax",
    "save_orbax",
    "save_orbax_stream",
]
