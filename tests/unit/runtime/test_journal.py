"""The install journal's record format on its own: append, read back, partial tails, damage, read-only opens."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from edgepeft.core.errors import ArtifactError, OutputError
from edgepeft.runtime.journal import HEADER_BYTES, Journal


def _journal(path: Path, records: list[tuple[bytes, dict]]) -> list[int]:
    journal = Journal(path)
    assert journal.open(writable=True) == []
    offsets = [journal.append(bundle, change) for bundle, change in records]
    journal.close()
    return offsets


def test_records_append_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    records = [(b"first bundle", {"n": 1}), (b"", {"n": 2, "text": "é\n"}), (bytes(range(256)) * 40, {"n": 3})]
    offsets = _journal(path, records)
    assert offsets[0] == HEADER_BYTES
    journal = Journal(path)
    found = journal.open(writable=True)
    assert [r.change for r in found] == [change for _, change in records]
    assert [journal.read(r.bundle_offset, r.bundle_length) for r in found] == [bundle for bundle, _ in records]
    assert [r.bundle_offset for r in found] == offsets and journal.end == path.stat().st_size
    assert journal.open(writable=True, start=found[1].start) and journal.end == path.stat().st_size
    journal.close()


def test_a_partial_tail_is_set_aside_only_by_the_owner(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    _journal(path, [(b"a" * 100, {"n": 1}), (b"b" * 100, {"n": 2})])
    whole = path.read_bytes()
    path.write_bytes(whole + whole[: HEADER_BYTES + 50])  # a third record cut inside its bundle
    onlooker = Journal(path)
    assert len(onlooker.open(writable=False)) == 2
    onlooker.close()
    assert path.stat().st_size == len(whole) + HEADER_BYTES + 50, "a read-only open changes nothing"
    owner = Journal(path)
    assert len(owner.open(writable=True)) == 2
    assert path.read_bytes() == whole
    (side,) = tmp_path.glob("journal.partial-*")
    assert side.read_bytes() == whole[: HEADER_BYTES + 50]
    owner.append(b"c", {"n": 3})
    assert [r.change["n"] for r in owner.records()] == [1, 2, 3]
    owner.close()


def test_damage_before_whole_records_and_a_short_journal_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    _journal(path, [(b"a" * 100, {"n": 1}), (b"b" * 100, {"n": 2})])
    data = bytearray(path.read_bytes())
    data[HEADER_BYTES + 100 + 2] ^= 0x01  # inside record 1's change
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="damaged at byte 0"):
        Journal(path).open(writable=True)
    data[HEADER_BYTES + 100 + 2] ^= 0x01
    data[HEADER_BYTES + 5] ^= 0x01  # inside record 1's bundle: only that bundle's own hash will tell
    path.write_bytes(bytes(data))
    journal = Journal(path)
    assert [r.change["n"] for r in journal.open(writable=True)] == [1, 2]
    journal.close()
    with pytest.raises(ArtifactError, match="replaced or cut"):
        Journal(path).open(writable=True, start=len(data) + 1)


def test_a_failed_append_leaves_the_journal_as_it_was(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    path = tmp_path / "journal"
    _journal(path, [(b"a" * 100, {"n": 1})])
    before = path.read_bytes()
    journal = Journal(path)
    journal.open(writable=True)

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdatasync", full)
    with pytest.raises(OutputError, match="No space left"):
        journal.append(b"b" * 100, {"n": 2})
    monkeypatch.undo()
    assert path.read_bytes() == before and journal.end == len(before)
    journal.append(b"c", {"n": 3})
    assert [r.change["n"] for r in journal.records()] == [1, 3]
    journal.close()


def test_a_tail_that_cannot_be_set_aside_is_not_cut(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "journal"
    _journal(path, [(b"a" * 100, {"n": 1})])
    path.write_bytes(path.read_bytes() + b"EPJ1 partial")
    before = path.read_bytes()

    def full(self: Path, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(OutputError, match="set aside"):
        Journal(path).open(writable=True)
    monkeypatch.undo()
    assert path.read_bytes() == before


def test_a_journal_that_cannot_be_opened_is_a_clear_error(tmp_path: Path) -> None:
    import os

    path = tmp_path / "journal"
    _journal(path, [(b"a", {"n": 1})])
    path.chmod(0o000)
    try:
        if os.access(path, os.R_OK):  # root reads anything: make the path a folder instead
            path.chmod(0o644)
            path.unlink()
            path.mkdir()
        with pytest.raises(OutputError, match="cannot open"):
            Journal(path).open(writable=True)
    finally:
        if path.is_file():
            path.chmod(0o644)
