"""The agent's own small state: events not yet reported, errors already reported, unclean restarts.

Everything the agent must not forget across a restart or an outage lives in one JSON file (``STATE/agent.json``),
rewritten whole through a temp file, fsync and rename, so a crash leaves the old file or the new one. What the
device *runs* is not here: the runtime's state directory is the only truth about that, and the agent reads it back
over HTTP every cycle.

Unclean restarts are counted with a marker file (``STATE/agent.running``) written at start and removed at a clean
stop: finding it at start means the last run was killed (SIGKILL, power cut, OOM). ``STATE/agent.lock`` (an
``flock``) keeps a second agent off the same folder.

Example:
    >>> import tempfile
    >>> root = tempfile.mkdtemp()
    >>> with AgentStateFile.open(root) as first:
    ...     first.add_event("error", "pump-1", "v2", "disk full")
    ...     first.state.crashes
    0
    >>> with AgentStateFile.open(root) as again:
    ...     [e["detail"] for e in again.state.events]
    ['disk full']
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgepeft.core.config import atomic_write_bytes
from edgepeft.core.errors import ConfigError

STATE_FILE = "agent.json"
RUNNING_MARKER = "agent.running"
LOCK_FILE = "agent.lock"
# Events wait here while the server cannot be reached; a week offline with an error every few minutes stays far
# below this, and a flood keeps its most recent events (older ones are summarised by a count).
MAX_EVENTS = 1000
MAX_DETAIL = 1000  # characters of an event's detail (what the fleet server keeps)

logger = logging.getLogger("edgepeft.agent")


def utc_now() -> str:
    """Now as ISO 8601, UTC (what the fleet server stores)."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class AgentState:
    """What the agent keeps between runs.

    Attributes:
        events: events not yet accepted by the fleet server, oldest first (``at, kind, asset_id, version, detail``).
        errors: the last error reported per subject (``server``, ``runtime``, ``asset:<id>``): the same error
            is reported once, not on every poll.
        crashes: unclean restarts of the agent so far (the marker was found at start).
        dropped_events: events dropped because the list was full.
        seen: per asset, the runtime's ``active`` version and installed ``versions`` as the agent last saw them:
            a change it did not make itself (an install whose answer a kill cut off, an operator's activation)
            is reported when it is noticed.

    Example:
        >>> AgentState.from_dict({"crashes": 2}).crashes
        2
    """

    events: list[dict[str, Any]] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    crashes: int = 0
    dropped_events: int = 0
    seen: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AgentState:
        return cls(events=list(data.get("events", [])), errors=dict(data.get("errors", {})),
                   crashes=int(data.get("crashes", 0)), dropped_events=int(data.get("dropped_events", 0)),
                   seen=dict(data.get("seen", {})))


class AgentStateFile:
    """The agent's state in ``folder`` (created if missing), held with a lock; see the module docstring.

    A write that fails (the disk is full) is logged and retried at the next change: the state stays in memory and
    the agent keeps working; nothing is lost unless the agent also dies before the disk recovers.
    """

    def __init__(self, folder: Path, state: AgentState, lock_fd: int) -> None:
        self.folder = folder
        self.state = state
        self._lock_fd = lock_fd
        self.dirty = False

    @classmethod
    def open(cls, folder: str | Path) -> AgentStateFile:
        folder = Path(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            lock_fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise ConfigError(f"cannot use {folder} as the agent's state folder ({exc.strerror or exc}); "
                              "give a writable --state") from exc
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise ConfigError(f"another agent is running on {folder}; stop it first (one agent per device)") from None
        try:
            state = cls._read(folder / STATE_FILE)
            marker = folder / RUNNING_MARKER
            if marker.exists():
                state.crashes += 1  # the previous run never reached its clean stop
            opened = cls(folder, state, lock_fd)
            opened.save()
            with contextlib.suppress(OSError):  # on a full disk the crash is still counted, in memory
                marker.write_text(f"{os.getpid()}\n")
        except BaseException:
            os.close(lock_fd)
            raise
        return opened

    @staticmethod
    def _read(path: Path) -> AgentState:
        try:
            return AgentState.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            return AgentState()
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            # Only a bug or a damaged disk gets here (writes are atomic); the runtime still knows what runs, so
            # starting afresh loses at most unreported events.
            logger.error("agent state %s is unreadable (%s); starting with an empty one", path, exc)
            return AgentState()

    def add_event(self, kind: str, asset_id: str | None, version: str | None, detail: str) -> None:
        """Queue an event for the next report (and save)."""
        events = self.state.events
        events.append({"at": utc_now(), "kind": kind, "asset_id": asset_id, "version": version,
                       "detail": " ".join(detail.split())[:MAX_DETAIL]})
        if len(events) > MAX_EVENTS:
            drop = len(events) - MAX_EVENTS
            del events[:drop]
            self.state.dropped_events += drop
        self.save()

    def error(self, subject: str, asset_id: str | None, version: str | None, detail: str, *,
              kind: str = "error") -> bool:
        """Queue an error (or ``refused``) event unless the same error of ``subject`` was queued last; True if
        queued."""
        detail = " ".join(detail.split())[:MAX_DETAIL]
        if self.state.errors.get(subject) == detail:
            return False
        self.state.errors[subject] = detail
        self.add_event(kind, asset_id, version, detail)
        return True

    def clear_error(self, subject: str) -> None:
        """``subject`` works again: its next error is news."""
        if self.state.errors.pop(subject, None) is not None:
            self.save()

    def acknowledge(self, count: int) -> None:
        """The server accepted the first ``count`` events (and the note of dropped ones, if it was sent)."""
        del self.state.events[:count]
        if not self.state.events:
            self.state.dropped_events = 0
        self.save()

    def save(self) -> bool:
        """Write the state (atomically); False, logged, when the disk refuses."""
        payload = json.dumps(asdict(self.state), indent=1).encode()
        try:
            atomic_write_bytes(self.folder / STATE_FILE, payload)
        except OSError as exc:
            if not self.dirty:
                logger.error("cannot write the agent state to %s (%s); kept in memory, retried at the next change",
                             self.folder, exc.strerror or exc)
            self.dirty = True
            return False
        self.dirty = False
        return True

    def close(self) -> None:
        """A clean stop: save, remove the running marker, release the lock."""
        try:
            self.save()
            with contextlib.suppress(FileNotFoundError):
                (self.folder / RUNNING_MARKER).unlink()
        finally:
            os.close(self._lock_fd)

    def __enter__(self) -> AgentStateFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
