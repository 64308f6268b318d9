"""The install journal: one append-only file that holds each installed bundle and the state change it made.

Why a journal: an install must be durable before it is acknowledged. Written as files, that took a bundle file
(write, fsync, fsync of its folder) and a new ``state.json`` (temp file, fsync, rename, fsync of the folder):
four flushes, about 2.6 ms of a 5 ms budget on our test machine's virtual disk. Appending one record to a file
that already exists and flushing it once (``fdatasync``) is the commit instead: about 0.6 ms. ``state.json``
stays the readable checkpoint; it records how much of the journal it already includes, and start-up replays
the records after that (see :class:`edgepeft.runtime.state.StateStore`). The same technique as a database's
write-ahead log; no library fits a dozen-line record format whose bundle bytes must stay addressable.

Record layout (integers big-endian)::

    offset  size  field
    0       4     magic b"EPJ1"
    4       4     bundle length B
    8       4     change length D
    12      32    sha256(magic || B || D || change)
    44      B     the bundle, byte for byte as received (read back with ``pread`` at this offset)
    44+B    D     the state change, compact JSON

The hash covers the change, not the bundle: a bundle damaged on disk is that one version's problem (its own
sha256, recorded in the change, is checked whenever it is loaded), not a reason to distrust the records after it.
At start-up, a record that is not whole (a crash during its append, before it was acknowledged) can only be the
last one; it is moved to a side file and cut off, never silently dropped.

Example:
    >>> import tempfile, os
    >>> journal = Journal(os.path.join(tempfile.mkdtemp(), "journal"))
    >>> journal.open(writable=True)
    []
    >>> start = journal.append(b"bundle bytes", {"op": "install"})
    >>> [(record.bundle_offset, record.change) for record in journal.records()]
    [(44, {'op': 'install'})]
    >>> journal.read(44, 12)
    b'bundle bytes'
    >>> journal.close()
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepeft.core.config import fsync_dir
from edgepeft.core.errors import ArtifactError, OutputError

MAGIC = b"EPJ1"
HEAD = struct.Struct(">4sII")
DIGEST_BYTES = 32
HEADER_BYTES = HEAD.size + DIGEST_BYTES

logger = logging.getLogger("edgepeft.runtime")


@dataclass(frozen=True)
class JournalRecord:
    """One whole record: where it starts and ends, where its bundle lies, and the state change it made."""

    start: int
    end: int
    bundle_offset: int
    bundle_length: int
    change: dict[str, Any]


class Journal:
    """An append-only record file; see the module docstring for the format and why it exists."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        self.end = 0  # where the next record goes: the end of the last whole record

    def open(self, *, writable: bool, start: int = 0) -> list[JournalRecord]:
        """Open (creating it when ``writable``) and return the whole records from ``start`` on.

        ``start`` is where the caller's checkpoint ends; a journal shorter than that was replaced or cut by
        something else, and is refused. With ``writable``, a partial last record (a crash during its append) is
        moved to a side file and cut off. Without it (someone inspecting a state directory another process may
        be writing), nothing is changed.
        """
        try:
            if writable:
                created = not self.path.exists()
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                if created:
                    fsync_dir(self.path.parent)  # the file's entry must survive: installs assume it exists
            elif self.path.exists():
                self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            self.close()
            raise OutputError(f"cannot open {self.path} ({exc.strerror or exc}); check the state directory's "
                              "permissions and free space") from exc
        if self._fd is None and start == 0:
            self.end = 0
            return []
        size = os.fstat(self._fd).st_size if self._fd is not None else 0
        if size < start:
            self.close()
            raise ArtifactError(f"{self.path} holds {size:,} bytes but state.json includes {start:,} of it: the "
                                "journal was replaced or cut; restore the state directory from a backup")
        found = list(self.records(start))
        self.end = found[-1].end if found else start
        if size > self.end and writable:
            self._cut_tail(size)
        return found

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def records(self, start: int = 0) -> Iterator[JournalRecord]:
        """Every whole record from ``start`` on, in order; stops at the first partial one.

        Raises :class:`ArtifactError` for a record whose change fails its hash while whole records follow it:
        that is damage after the fact, not an interrupted append, and guessing past it could lose installs.
        """
        fd = self._require_fd()
        size = os.fstat(fd).st_size
        position = start
        while position < size:
            record = self._read_record(fd, position, size)
            if record is None:
                return
            yield record
            position = record.end

    def append(self, bundle: bytes, change: dict[str, Any]) -> int:
        """Write one record and flush it (the commit point); returns where its bundle starts.

        On failure (a full disk) the file is cut back to where it was and :class:`OutputError` is raised:
        nothing was committed. A crash mid-append leaves a partial record that :meth:`open` cuts off.
        """
        fd = self._require_fd()
        encoded = json.dumps(change, sort_keys=True, separators=(",", ":")).encode()
        head = HEAD.pack(MAGIC, len(bundle), len(encoded))
        blob = b"".join([head, hashlib.sha256(head + encoded).digest(), bundle, encoded])
        start = self.end
        try:
            view, position = memoryview(blob), start
            while view:
                written = os.pwrite(fd, view, position)
                view, position = view[written:], position + written
            os.fdatasync(fd)  # data and the file's new size; the file's folder entry was flushed when it was made
        except OSError as exc:
            # If even this fails, the next append overwrites from `start` and open() cuts off any remainder.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise OutputError(f"cannot write {self.path} ({exc.strerror or exc}); nothing was installed, free "
                              "space on the device or fix the state directory, then retry") from exc
        self.end = start + len(blob)
        return start + HEADER_BYTES

    def next_bundle_offset(self) -> int:
        """Where the bundle of the next appended record will start."""
        return self.end + HEADER_BYTES

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (a stored bundle); short if the file no longer holds them."""
        return os.pread(self._require_fd(), length, offset)

    def _read_record(self, fd: int, position: int, size: int) -> JournalRecord | None:
        header = os.pread(fd, HEADER_BYTES, position)
        if len(header) < HEADER_BYTES:
            return None
        magic, bundle_length, change_length = HEAD.unpack_from(header)
        end = position + HEADER_BYTES + bundle_length + change_length
        if magic != MAGIC or end > size:
            return None
        encoded = os.pread(fd, change_length, end - change_length)
        if hashlib.sha256(header[: HEAD.size] + encoded).digest() != header[HEAD.size :]:
            if end < size:
                raise ArtifactError(
                    f"{self.path} is damaged at byte {position:,} (a record fails its hash and more follow it); "
                    "copy the state directory for inspection, then restore it from a backup or start a new --state"
                )
            return None
        try:
            change = json.loads(encoded)
        except ValueError as exc:
            raise ArtifactError(f"{self.path} holds an unreadable record at byte {position:,} ({exc})") from exc
        return JournalRecord(position, end, position + HEADER_BYTES, bundle_length, change)

    def _cut_tail(self, size: int) -> None:
        """Move bytes after the last whole record to a side file, then cut them off (they were never committed)."""
        fd = self._require_fd()
        tail = os.pread(fd, size - self.end, self.end)
        side = self.path.with_name(f"{self.path.name}.partial-{time.strftime('%Y%m%dT%H%M%S')}-{self.end}")
        try:
            side.write_bytes(tail)  # kept first: if it cannot be, nothing is cut
            os.ftruncate(fd, self.end)
            os.fsync(fd)
            fsync_dir(self.path.parent)
        except OSError as exc:
            raise OutputError(f"cannot set aside the partial last record of {self.path} in {side} "
                              f"({exc.strerror or exc}); free space on the device, then start again") from exc
        logger.warning("%s: %d bytes after the last whole record (an install interrupted before it was "
                       "committed) were moved to %s", self.path, len(tail), side)

    def _require_fd(self) -> int:
        if self._fd is None:
            raise ArtifactError(f"{self.path} is not open")
        return self._fd
