"""The agent's loop against a real device runtime (``edgepeft serve``) and a real fleet server: install, activate,
roll back, refuse downgrades and bad bundles, survive failures, report."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from edgepeft.agent.loop import EVENTS_PER_REPORT, Agent, AgentConfig
from edgepeft.agent.runtime_api import RuntimeApi
from edgepeft.agent.state import AgentStateFile
from edgepeft.bench.loadtest import ServerProcess, payloads
from tests.unit.agent.conftest import ASSET, Assignments, enrol
from tests.unit.fleet.conftest import FleetServer

ROWS = payloads(2, 96)[1]


@pytest.fixture
def agent_parts(tmp_path: Path, device_runtime: ServerProcess, fleet: FleetServer, request: pytest.FixtureRequest
                ) -> Iterator[tuple[Agent, Assignments]]:
    credential = enrol(fleet, request.node.name[5:45])  # the device id: the test's name
    assignments = Assignments()
    with AgentStateFile.open(tmp_path / "agent") as saved:
        agent = Agent(AgentConfig(server=fleet.url, credential=credential, poll_seconds=1.0), assignments,
                      RuntimeApi(device_runtime.url, device_runtime.token), saved, rng=random.Random(0),
                      download_cache=tmp_path / "downloads")
        yield agent, assignments
        agent.close()


def _active(runtime: ServerProcess) -> dict[str, object]:
    return {a["asset_id"]: (a["active"], sorted(v["version"] for v in a["versions"]))
            for a in httpx.get(f"{runtime.url}/v1/assets", timeout=30).json()}


def _score(runtime: ServerProcess) -> str:
    answer = httpx.post(f"{runtime.url}/v1/assets/{ASSET}/score", json={"rows": ROWS.tolist()}, timeout=60)
    assert answer.status_code == 200, answer.text
    return str(answer.json()["version"])


def _kinds(agent: Agent) -> list[tuple[str, str | None]]:
    return [(e["kind"], e["version"]) for e in agent.saved.state.events]


def test_install_activate_roll_back_and_refuse(
    agent_parts: tuple[Agent, Assignments], device_runtime: ServerProcess, make_bundle: Callable[..., bytes]
) -> None:
    agent, assignments = agent_parts
    assignments.bundles = {"v1": make_bundle("v1", 1), "v2": make_bundle("v2", 2), "v0": make_bundle("v0", 1),
                           "v3": make_bundle("v3", 3), "evil": make_bundle("evil", 9, untrusted=True)}
    # Nothing assigned: a quiet cycle that reports (the fleet answers with its poll interval).
    first = agent.cycle()
    assert first.ok, first.errors
    assert first.poll_seconds is not None and agent.saved.state.events == []

    assignments.assign("v1")
    result = agent.cycle()
    assert result.ok and result.installed == [f"{ASSET} v1"], result.errors
    assert _active(device_runtime) == {ASSET: ("v1", ["v1"])} and _score(device_runtime) == "v1"

    assignments.assign("v2")
    assert agent.cycle().installed == [f"{ASSET} v2"]
    assert _score(device_runtime) == "v2"
    assert agent.cycle().ok and assignments.downloads == ["v1", "v2"], "converged: nothing more to fetch"
    base = httpx.get(f"{device_runtime.url}/health", timeout=30).json()["base_sha256"]
    assert set(assignments.bases) == {base}, "assignments are asked for the runtime's base"

    # The fleet rolls the device back: the director lists v1 again, which is installed: activated, not fetched.
    assignments.assign("v1")
    agent.saved.state.events.clear()
    rolled = agent.cycle()
    assert rolled.activated == [f"{ASSET} v1"] and assignments.downloads == ["v1", "v2"]
    assert _kinds(agent) == [] and _score(device_runtime) == "v1", "reported and acknowledged"

    # A bundle never installed here with a release not newer than the installed one: refused, once.
    assignments.assign("v0")
    before = _active(device_runtime)
    refused = agent.cycle()
    assert not refused.ok and "downgrade" in refused.errors[0]
    assert "v0" not in assignments.downloads
    assert agent.report_body()["events"] == [], "the refusal went out with the report"
    assert not agent.cycle().ok and agent.saved.state.events == [], "the same refusal is told once"

    # A verification failure, a hand-over that does not match, a bundle the runtime refuses: nothing changes.
    cached = agent.download_cache / "pump-1%2Fv3.edelta"  # what the update client would have kept
    cached.parent.mkdir()
    cached.write_bytes(b"bundle")
    assignments.assign("v3")
    assignments.broken["v3"] = RuntimeError("VerificationFailed: bad signature on targets")
    assert "VerificationFailed" in agent.cycle().errors[0]
    assignments.broken.clear()
    assignments.tamper.add("v3")
    assert "does not match" in agent.cycle().errors[0]
    assignments.tamper.clear()
    assignments.assign("evil")
    assert "not trusted" in agent.cycle().errors[0] or "signature" in agent.cycle().errors[0]
    assert _active(device_runtime) == before and _score(device_runtime) == "v1"

    assert cached.exists(), "kept while an assigned bundle is not installed"
    # Once the fleet assigns something good again, the device converges, and the downloads are let go.
    assignments.assign("v3")
    assert agent.cycle().ok and _score(device_runtime) == "v3"
    assert not cached.exists()


def test_report_carries_health_and_survives_outages(
    agent_parts: tuple[Agent, Assignments], device_runtime: ServerProcess, fleet: FleetServer,
    make_bundle: Callable[..., bytes], request: pytest.FixtureRequest
) -> None:
    agent, assignments = agent_parts
    assignments.bundles = {"v1": make_bundle("v1", 1)}
    assignments.assign("v1")
    agent.saved.state.events.clear()
    # Assignments failing (here while the report still gets through): errors, backoff, one event.
    assignments.fail = ConnectionError("fleet unreachable")
    waits = []
    for _ in range(3):
        result = agent.cycle()
        assert not result.ok and not result.server_ok and result.reported
        waits.append(agent.next_wait(result))
    assert waits[0] < waits[2] <= 8.0 and agent.backoff.failures == 3
    assert _active(device_runtime) == {}

    assignments.fail = None
    result = agent.cycle()
    assert result.ok, result.errors
    assert agent.next_wait(result) <= 1.2 and agent.backoff.failures == 0
    for _ in range(2):
        _score(device_runtime)
    body = agent.report_body()
    health = body["assets"][0]["health"]
    assert body["assets"][0]["active_version"] == "v1" and body["assets"][0]["active_release"] == 1
    assert health["version"] == "v1" and health["rows"] == 2 * len(ROWS) and health["errors"] == 0
    assert body["crashes"] == 0 and body["agent"].startswith("edgepeft-agent/")
    assert agent.cycle().ok
    # What the fleet keeps of it.
    with fleet.client() as http:
        history = http.get(f"/v1/devices/{request.node.name[5:45]}/history")
    assert history.status_code == 200, history.text
    assert "v1" in history.text

    # The runtime down: the agent keeps going and says so once.
    device_runtime.stop()
    down = agent.cycle()
    assert not down.ok and not down.runtime_ok and "did not answer" in down.errors[0]
    assert down.reported, "the fleet hears of it"
    # What the runtime ran when last seen, without health: not an empty device.
    assert agent.report_body()["assets"] == [{"asset_id": ASSET, "active_version": "v1", "active_release": 1,
                                              "versions": ["v1"], "health": None}]


def test_a_server_without_the_report_endpoint_is_survived(
    tmp_path: Path, device_runtime: ServerProcess, make_bundle: Callable[..., bytes]
) -> None:
    """A fleet server that answers 404 to the report (an older one; here the runtime itself stands in, a real
    server without that route): the device still converges, the events wait."""
    assignments = Assignments(bundles={"v1": make_bundle("v1", 1)})
    assignments.assign("v1")
    with AgentStateFile.open(tmp_path / "agent") as saved:
        agent = Agent(AgentConfig(server=device_runtime.url, credential="efd_x", poll_seconds=1.0), assignments,
                      RuntimeApi(device_runtime.url, device_runtime.token), saved, rng=random.Random(0))
        agent.announce()
        result = agent.cycle()
        agent.close()
    assert result.installed == [f"{ASSET} v1"] and not result.reported
    assert "404" in result.errors[0] and _score(device_runtime) == "v1"
    assert [e["kind"] for e in saved.state.events] == ["started", "installed", "activated"]
    assert agent.next_wait(result) <= 2.0 and agent.backoff.failures == 1


def test_a_long_backlog_goes_out_in_batches(agent_parts: tuple[Agent, Assignments]) -> None:
    agent, _ = agent_parts
    for index in range(EVENTS_PER_REPORT + 30):
        agent.saved.add_event("error", ASSET, "v9", f"error {index}")
    assert agent.cycle().reported and len(agent.saved.state.events) == 30
    assert agent.cycle().reported and agent.saved.state.events == []
