"""Checkpoint formats: readers, writers, the name mapping they share, loading and conversion."""

from .errors import CheckpointFormatError, CheckpointMismatchError
from .loading import detect_format, load_checkpoint
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
