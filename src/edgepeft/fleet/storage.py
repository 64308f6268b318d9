"""Bundle files on disk, content-addressed: ``ROOT/bundles/<sha256[:2]>/<sha256>.edelta``.

A file's name is its own hash, so the same bytes are stored once, a name can never point at other bytes, and a
reader checks what it got against the name. Files are written atomically and fsynced before the database row that
names them is committed.

Example:
    >>> import tempfile
    >>> store = BundleStore(tempfile.mkdtemp())
    >>> digest = store.put(b"bundle bytes")
    >>> store.get(digest)
    b'bundle bytes'
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from edgepeft.core.config import atomic_write_bytes
from edgepeft.core.errors import ArtifactError, OutputError
from edgepeft.delta.bundle import SUFFIX


class BundleStore:
    """Content-addressed bundle files under ``root``."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def path(self, sha256: str) -> Path:
        return self.root / "bundles" / sha256[:2] / f"{sha256}{SUFFIX}"

    def check_writable(self) -> None:
        """Fail at start-up, not at the first upload, when the storage folder cannot be written."""
        try:
            (self.root / "bundles").mkdir(parents=True, exist_ok=True)
            probe = self.root / "bundles" / ".write-probe"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise OutputError(f"cannot write to the bundle storage {self.root} ({exc.strerror or exc}); "
                              "choose another --storage") from None

    def put(self, data: bytes) -> str:
        """Store ``data`` (if not stored already) and return its sha256."""
        sha256 = hashlib.sha256(data).hexdigest()
        path = self.path(sha256)
        if not path.exists():
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(path, data)
            except OSError as exc:
                raise OutputError(f"cannot store bundle {sha256[:16]}… under {self.root} ({exc.strerror or exc}); "
                                  "free some space or fix the --storage folder's permissions") from None
        return sha256

    def get(self, sha256: str) -> bytes:
        """The stored bytes of ``sha256``, checked against it."""
        try:
            data = self.path(sha256).read_bytes()
        except FileNotFoundError:
            raise ArtifactError(f"bundle file {sha256[:16]}… is missing from the storage {self.root}; restore it "
                                "from a backup, or publish the bundle again") from None
        if hashlib.sha256(data).hexdigest() != sha256:
            raise ArtifactError(f"bundle file {sha256[:16]}… in {self.root} is damaged (its sha256 changed); "
                                "restore it from a backup, or publish the bundle again")
        return data
