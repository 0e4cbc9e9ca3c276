"""Reading vdiff's own JSON descriptions (latent caches, export bundles) with one error style,
the file digests that manifests record, and the atomic writes that publish them.

Kept free of heavy imports: the serving side of an export bundle reads its manifest
through here without loading any model code.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Any

from vdiff.errors import UserError


def read_versioned_json(
    path: Path, *, fmt: str, version_key: str, version: int, what: str, fix: str
) -> dict[str, Any]:
    """Loads ``path`` and checks its ``"format"`` and version fields.

    Args:
        path: the JSON file (it must exist).
        fmt: expected value of the ``"format"`` field.
        version_key: name of the version field.
        version: the version this vdiff reads.
        what: what the file describes, for messages ("vdiff latent cache").
        fix: what the user should do, appended to every message.

    Raises:
        UserError: not JSON, not that format, or another version.
    """
    try:
        data = json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); {fix}") from None
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise UserError(f"{path} is not a {what}; {fix}")
    if data.get(version_key) != version:
        raise UserError(
            f"{path} has {what} version {data.get(version_key)}, this vdiff reads {version}; {fix}"
        )
    return data


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes (hex), read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    """Writes ``path`` whole or not at all: a temporary file of this host and process, then
    a rename, so readers never see half a file and concurrent writers never share one."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{socket.gethostname()}-{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
