"""Writing files and folders (checkpoints, caches) so that nothing is half-written: build it beside its destination, then swap it in.

A temporary sibling `.NAME.<pid>-<hex>.tmp` is built first and renamed to
NAME only once complete; an existing NAME is first renamed to
`.NAME.<pid>-<hex>.old` and removed after the swap. A process killed
outright (SIGKILL, power loss) leaves such siblings behind: `clear_stale`
removes the temporaries whose writer is gone, and restores an `.old` whose
swap never finished. The writer's process id is in the name so that a
conversion never removes the temporary of another that is still running.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_directory", "atomic_file", "clear_stale", "write_atomically"]

_SIBLING = re.compile(r"^\.(?P<name>.+)\.(?:(?P<pid>\d+)-)?[0-9a-f]{32}\.(?P<kind>tmp|old)$")


def _sibling(dst: Path, kind: str) -> Path:
    return dst.with_name(f".{dst.name}.{os.getpid()}-{uuid.uuid4().hex}.{kind}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def clear_stale(dst: str | os.PathLike) -> list[str]:
    """Tidy what an interrupted write to `dst` left beside it; returns what was done, one line each.

    A temporary of a writer no longer running is removed (one without a
    process id in its name, from an older version, counts as stale). An
    `.old` copy is the previous `dst`: put back if `dst` is missing (the
    writer died between the two renames), else removed (the swap finished).
    """
    dst = Path(dst)
    if not dst.parent.is_dir():
        return []
    done = []
    for path in sorted(dst.parent.iterdir()):
        match = _SIBLING.match(path.name)
        if not match or match["name"] != dst.name:
            continue
        if match["pid"] is not None and _alive(int(match["pid"])):
            continue
        if match["kind"] == "old" and not os.path.lexists(dst):
            os.replace(path, dst)
            done.append(f"restored {dst} from {path.name}, left by an interrupted write")
        else:
            _remove(path)
            done.append(f"removed {path}, left by an interrupted write")
    return done


@contextlib.contextmanager
def atomic_directory(dst: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary sibling of `dst`; on success it becomes `dst`.

    On any failure the temporary directory is removed and an existing `dst`
    is left as it was. An existing `dst` is replaced only once the new one
    is complete.
    """
    dst = Path(dst)
    tmp = _sibling(dst, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        _swap_in(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(dst: str | os.PathLike) -> Iterator[Path]:
    """`atomic_directory` for a single file: yield a temporary path beside `dst` to write."""
    dst = Path(dst)
    tmp = _sibling(dst, "tmp")
    try:
        yield tmp
        _swap_in(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomically(dst: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `dst` through a temporary sibling (`atomic_file`), making its folder if needed."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(dst) as tmp:
        tmp.write_bytes(data)


def _swap_in(tmp: Path, dst: Path) -> None:
    if not os.path.lexists(dst):
        os.replace(tmp, dst)
        return
    old = _sibling(dst, "old")
    os.replace(dst, old)
    try:
        os.replace(tmp, dst)
    except BaseException:
        os.replace(old, dst)
        raise
    _remove(old)
