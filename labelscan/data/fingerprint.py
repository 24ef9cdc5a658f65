"""Content fingerprints, so `rank` can refuse data that changed since `summarize`."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

_CHUNK = 1 << 20


def fingerprint_files(files: list[Path]) -> str:
    """sha256 hex, streamed. One file: of its bytes (what `sha256sum` prints). Several: of each
    file's path relative to their common folder, length and bytes, in sorted path order, so
    that renaming, moving or editing any file changes it."""
    digest = hashlib.sha256()
    if len(files) == 1:
        _update(digest, files[0])
        return digest.hexdigest()
    root = Path(os.path.commonpath(files))
    for rel in sorted(f.relative_to(root).as_posix() for f in files):
        path = root / rel
        digest.update(rel.encode() + b"\0" + path.stat().st_size.to_bytes(8, "big"))
        _update(digest, path)
    return digest.hexdigest()


def _update(digest, path: Path) -> None:
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
