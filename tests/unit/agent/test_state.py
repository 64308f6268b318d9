"""The agent's state file: events survive restarts, unclean stops are counted, one agent per folder, a full disk
is survived."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from edgepeft.agent.loop import Backoff
from edgepeft.agent.state import MAX_EVENTS, RUNNING_MARKER, STATE_FILE, AgentStateFile
from edgepeft.core.errors import ConfigError
from tests.unit.agent.conftest import fill, mount_tmpfs


def test_events_and_errors_survive_a_restart(tmp_path: Path) -> None:
    with AgentStateFile.open(tmp_path) as saved:
        saved.add_event("installed", "pump-1", "v2", "installed\nrelease 2")
        assert saved.error("asset:pump-1", "pump-1", "v3", "download failed")
        assert not saved.error("asset:pump-1", "pump-1", "v3", "download  failed"), "the same error is told once"
    with AgentStateFile.open(tmp_path) as again:
        assert [(e["kind"], e["detail"]) for e in again.state.events] == [
            ("installed", "installed release 2"), ("error", "download failed")]
        assert again.state.crashes == 0
        again.clear_error("asset:pump-1")
        assert again.error("asset:pump-1", "pump-1", "v3", "download failed"), "after a success it is news again"
        again.acknowledge(2)
        assert [e["kind"] for e in again.state.events] == ["error"]
    assert not (tmp_path / RUNNING_MARKER).exists()


def test_an_unclean_stop_is_counted_and_a_second_agent_is_refused(tmp_path: Path) -> None:
    # A real process opens the state and is killed without its clean stop.
    code = ("import os, sys; from edgepeft.agent.state import AgentStateFile; "
            f"s = AgentStateFile.open({str(tmp_path)!r}); s.add_event('started', None, None, 'x'); os._exit(0)")
    for _ in range(2):
        subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    with AgentStateFile.open(tmp_path) as saved:
        assert saved.state.crashes == 2
        with pytest.raises(ConfigError, match="another agent is running"):
            AgentStateFile.open(tmp_path)
    with AgentStateFile.open(tmp_path) as saved:
        assert saved.state.crashes == 2, "a clean stop is not a crash"


def test_the_backlog_is_bounded(tmp_path: Path) -> None:
    with AgentStateFile.open(tmp_path) as saved:
        for index in range(MAX_EVENTS + 5):
            saved.state.events.append({"at": "t", "kind": "error", "asset_id": None, "version": None,
                                       "detail": str(index)})
        saved.add_event("error", None, None, "last")
        assert len(saved.state.events) == MAX_EVENTS and saved.state.dropped_events == 6
        assert saved.state.events[-1]["detail"] == "last" and saved.state.events[0]["detail"] == "6"


def test_a_full_disk_keeps_the_state_in_memory(tmp_path: Path) -> None:
    folder = tmp_path / "small"
    if not mount_tmpfs(folder, "64k"):
        pytest.skip("a small tmpfs cannot be mounted here (needs root)")
    try:
        with AgentStateFile.open(folder) as saved:
            fill(folder / "filler")
            saved.add_event("error", "pump-1", "v2", "x" * 900)
            assert not saved.save() and saved.dirty
            assert saved.state.events[-1]["version"] == "v2"
            (folder / "filler").unlink()
            saved.add_event("installed", "pump-1", "v2", "space is back")
            assert not saved.dirty
        assert [e["kind"] for e in json.loads((folder / STATE_FILE).read_text())["events"]] == ["error", "installed"]
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_backoff_doubles_to_its_cap_with_jitter() -> None:
    backoff = Backoff(first=1.0, cap=8.0, rng=random.Random(1))
    waits = [backoff.next() for _ in range(8)]
    assert all(0.5 * c <= w <= c for w, c in zip(waits, [1, 2, 4, 8, 8, 8, 8, 8], strict=True))
    assert len({round(w, 6) for w in waits[3:]}) == 5, "jitter: no two waits alike"
    backoff.reset()
    assert backoff.next() <= 1.0
