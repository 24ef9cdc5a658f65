"""Files on disk: fingerprints, and writes that never leave a half-written file behind."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from labelscan.errors import LabelscanError
from labelscan.interruption import signals_held


def payload_fingerprint(payload: bytes) -> str:
    """What ``file_fingerprint`` gives for a file holding ``payload``, before it is written."""
    return hashlib.sha256(payload).hexdigest()


def file_fingerprint(path: Path) -> str:
    """sha256 of a file's bytes, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_writable(path: Path) -> None:
    """Refuse, before any work, an output path whose file could not be written."""
    path = Path(path)
    if path.is_dir():
        raise LabelscanError(f"{path} is a folder; give a file path for the output")
    if not path.parent.is_dir():
        raise LabelscanError(f"cannot write {path}: the folder {path.parent} does not exist; create it or choose another path")


def write_atomically(path: Path, payload: bytes) -> None:
    """Write to a temporary file beside ``path``, flush it to disk, then rename over it. Ctrl-C
    waits for the rename, so an interrupted command leaves no temporary file behind."""
    path = Path(path)
    check_writable(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with signals_held():
        try:
            with open(temporary, "wb") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        except OSError as exc:
            raise LabelscanError(f"could not write {path} ({exc.strerror or exc}); check the path and permissions") from None
        finally:
            temporary.unlink(missing_ok=True)
