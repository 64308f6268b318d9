"""Rollouts: canary then waves behind health gates, automatic rollback, A/B arms, operator actions, over the engine
directly (both databases for the core path) and over a real server (HTTP contract, a server killed mid-rollout)."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from edgepeft.fleet import schemas as s
from edgepeft.fleet.db import Database
from edgepeft.fleet.errors import Conflict, UnknownReference
from edgepeft.fleet.models import DeviceAssignment, RolloutDevice
from edgepeft.fleet.registry import Registry, now
from edgepeft.fleet.rollouts import RolloutEngine, judge, plan_waves
from edgepeft.fleet.storage import BundleStore

from .conftest import ASSET, FleetServer, assert_refused

ACTOR = "test:operator"


@dataclass
class Fleet:
    registry: Registry
    engine: RolloutEngine
    bundles: dict[str, str] = field(default_factory=dict)  # version -> sha256
    devices: list[str] = field(default_factory=list)
    moment: datetime = field(default_factory=now)

    def advance(self, seconds: float) -> None:
        self.moment += timedelta(seconds=seconds)
        self.engine.tick()

    def report(self, device: str, version: str, rows: int = 400, alerts: int = 2, errors: int = 0,
               events: list[dict[str, Any]] | None = None) -> None:
        body = s.DeviceReport.model_validate({
            "assets": [{"asset_id": ASSET, "active_version": version,
                        "health": {"version": version, "rows": rows, "alerts": alerts, "score_q95": 0.5,
                                   "errors": errors}}],
            "events": events or []})
        self.engine.report(device, body)

    def assigned(self) -> dict[str, str]:
        """device -> assigned version."""
        versions = {sha: v for v, sha in self.bundles.items()}
        with self.registry.db.read() as session:
            return {a.device_id: versions[a.bundle_sha256] for a in session.scalars(select(DeviceAssignment))}

    def statuses(self, rollout_id: int) -> dict[str, str]:
        with self.registry.db.read() as session:
            return {r.device_id: r.status for r in session.scalars(
                select(RolloutDevice).where(RolloutDevice.rollout_id == rollout_id))}

    def rollout(self, version: str, *, b: str | None = None, reason: str = "test", **strategy: Any) -> int:
        gates = strategy.pop("gates", {})
        request = s.RolloutRequest.model_validate({
            "name": f"to-{version}", "group": "line", "bundle": self.bundles[version],
            **({"bundle_b": self.bundles[b]} if b else {}), "strategy": strategy, "gates": gates, "reason": reason})
        return self.engine.create(request, actor=ACTOR)["id"]

    def roll_everyone(self, version: str, alerts: int = 2) -> int:
        """A rollout of ``version`` that every device reports healthy on, to completion."""
        rollout_id = self.rollout(version, canary=1, waves=[100])
        for _ in range(3):
            for device, assigned in self.assigned().items():
                if assigned == version:
                    self.report(device, version, alerts=alerts)
        assert self.engine.get(rollout_id)["state"] == "completed"
        return rollout_id


def make_fleet(db_url: str, root: Path, keys: dict[str, Any], make_bundle: Callable[..., bytes],
               base_sha256: str, n: int = 10) -> Fleet:
    registry = Registry(Database.open(db_url), BundleStore(root / "storage"), [keys["trusted"].public_key()])
    registry.register_base("tiny", base_sha256, actor=ACTOR, reason="the base")
    registry.create_group("line", "the line", actor=ACTOR, reason="new line")
    fleet = Fleet(registry=registry, engine=RolloutEngine(registry))
    fleet.engine.clock = lambda: fleet.moment
    for version, release in (("v1", 1), ("v2", 2), ("bad", 3), ("v4", 4)):
        record = registry.publish_bundle(make_bundle(version=version, release=release), actor=ACTOR, reason="r")
        fleet.bundles[version] = record["sha256"]
    for i in range(n):
        device = f"pump-{i:02d}"
        registry.enrol_device(device, groups=["line"], assets=[ASSET], bases=[base_sha256], actor=ACTOR,
                              reason="installed")
        fleet.devices.append(device)
    return fleet


@pytest.fixture
def fleet(tmp_path: Path, keys: dict[str, Any], make_bundle: Callable[..., bytes], base_sha256: str) -> Fleet:
    return make_fleet(f"sqlite:///{tmp_path}/fleet.db", tmp_path, keys, make_bundle, base_sha256)


# ---------------------------------------------------------------------------------------------- pure rules
def test_waves_cover_every_device_once() -> None:
    for n in (1, 2, 3, 10, 999, 1000):
        for strategy in ({"canary": 1, "waves": [100]}, {"canary": 5, "waves": [10, 50, 100]},
                         {"canary_percent": 1.0, "waves": [33.3, 66.6, 100]}):
            sizes = plan_waves(n, strategy)
            assert sum(sizes) == n and all(size > 0 for size in sizes), (n, strategy, sizes)


def test_gate_compares_with_the_devices_own_baseline() -> None:
    gates = s.Gates(min_rows=100).model_dump()
    noisy = {"rows": 1000, "alerts": 40}  # a device that always raised 4 %
    assert judge({"rows": 500, "alerts": 22, "errors": 0}, noisy, gates)[0] == "healthy"
    assert judge({"rows": 500, "alerts": 80, "errors": 0}, noisy, gates)[0] == "unhealthy"
    assert judge({"rows": 50, "alerts": 50, "errors": 0}, noisy, gates)[0] == "wait", "too few rows for a verdict"
    assert judge({"rows": 500, "alerts": 0, "errors": 1}, noisy, gates)[0] == "unhealthy"
    assert judge({"rows": 500, "alerts": 150, "errors": 0}, None, gates)[0] == "unhealthy", "over the absolute cap"
    verdict, why = judge({"rows": 500, "alerts": 0, "errors": 0, "crashes": 2}, {"rows": 9, "alerts": 0,
                                                                                 "crashes": 1}, gates)
    assert verdict == "unhealthy" and "crashed 1" in why


# ---------------------------------------------------------------------------------------------- the engine
def test_canary_then_waves_then_complete(db_url: str, tmp_path: Path, keys: dict[str, Any],
                                         make_bundle: Callable[..., bytes], base_sha256: str) -> None:
    fleet = make_fleet(db_url, tmp_path, keys, make_bundle, base_sha256)
    rollout_id = fleet.rollout("v1", canary=2, waves=[50, 100])
    assigned = fleet.assigned()
    assert len(assigned) == 2, "only the canary is assigned"
    canary = sorted(assigned)
    fleet.report(canary[0], "v1")
    assert len(fleet.assigned()) == 2, "one healthy canary of two does not open the next wave"
    fleet.report(canary[1], "v1", rows=50)
    assert len(fleet.assigned()) == 2, "a canary with too few rows is not judged yet"
    fleet.report(canary[1], "v1")
    assert len(fleet.assigned()) == 2 + 4, "wave 1: half of the remaining 8"
    for device in set(fleet.assigned()) - set(canary):
        fleet.report(device, "v1")
    assert len(fleet.assigned()) == 10
    for device in fleet.assigned():
        fleet.report(device, "v1")
    view = fleet.engine.get(rollout_id)
    assert view["state"] == "completed" and view["devices_by_status"] == {"healthy": 10}
    assert [w["size"] for w in view["waves"]] == [2, 4, 4] and all(w["healthy_at"] for w in view["waves"])
    assert set(fleet.assigned().values()) == {"v1"}
    actions = [e["action"] for e in fleet.registry.audit(limit=1000)]
    assert actions.count("rollout.create") == 1 and actions.count("rollout.complete") == 1


def test_bad_canary_halts_and_rolls_back(db_url: str, tmp_path: Path, keys: dict[str, Any],
                                         make_bundle: Callable[..., bytes], base_sha256: str) -> None:
    fleet = make_fleet(db_url, tmp_path, keys, make_bundle, base_sha256)
    fleet.roll_everyone("v1")
    rollout_id = fleet.rollout("bad", canary=2, waves=[100])
    canary = sorted(d for d, v in fleet.assigned().items() if v == "bad")
    assert len(canary) == 2
    fleet.report(canary[0], "bad", rows=400, alerts=160)  # an alert storm: 40 % vs 0.5 % before
    view = fleet.engine.get(rollout_id)
    assert view["state"] == "halted" and canary[0] in view["outcome"] and "alert rate" in view["outcome"]
    assert set(fleet.assigned().values()) == {"v1"}, "every device is assigned its previous bundle again"
    statuses = fleet.statuses(rollout_id)
    assert {statuses[d] for d in canary} == {"rolled_back"}
    assert {v for d, v in statuses.items() if d not in canary} == {"cancelled"}, "the rest never got it"
    halt = [e for e in fleet.registry.audit(limit=1000) if e["action"] == "rollout.halt"]
    assert len(halt) == 1 and halt[0]["actor"] == "fleet:health-gate" and halt[0]["details"]["rolled_back"] == 2
    history = fleet.engine.device_history(canary[0])
    assert history["events"][0]["kind"] == "rolled_back" and history["assignments"][0]["version"] == "v1"
    # The halted rollout is final; a fixed release can go out next.
    with pytest.raises(Conflict):
        fleet.engine.act(rollout_id, "resume", actor=ACTOR, reason="try again")
    fleet.rollout("v4", canary=1, waves=[100])


def test_canary_group_is_the_canary(fleet: Fleet) -> None:
    fleet.registry.create_group("lab", "lab rigs", actor=ACTOR, reason="r")
    for device in ("pump-03", "pump-07"):
        fleet.registry.update_device(device, groups=["line", "lab"], actor=ACTOR, reason="r")
    rollout_id = fleet.rollout("v1", canary_group="lab", waves=[100])
    assert sorted(fleet.assigned()) == ["pump-03", "pump-07"]
    assert [w["size"] for w in fleet.engine.get(rollout_id)["waves"]] == [2, 8]


def test_install_failures_halt_past_the_allowance(fleet: Fleet) -> None:
    fleet.roll_everyone("v1")
    rollout_id = fleet.rollout("v2", canary=3, waves=[100], gates={"max_failures": 1})
    canary = sorted(d for d, v in fleet.assigned().items() if v == "v2")
    error = {"at": "2026-12-06T10:00:00Z", "kind": "error", "asset_id": ASSET, "version": "v2",
             "detail": "bundle rejected: no space left on device"}
    fleet.report(canary[0], "v1", events=[error])
    assert fleet.engine.get(rollout_id)["state"] == "running", "one failure is allowed"
    fleet.report(canary[1], "v1", events=[error])
    view = fleet.engine.get(rollout_id)
    assert view["state"] == "halted" and "install failed" in view["outcome"]


def test_rate_limit_and_soak(fleet: Fleet) -> None:
    fleet.roll_everyone("v1")
    rollout_id = fleet.rollout("v2", canary=1, waves=[100], max_devices_per_minute=3, soak_seconds=60)
    (canary,) = [d for d, v in fleet.assigned().items() if v == "v2"]
    fleet.report(canary, "v2")
    assert sum(v == "v2" for v in fleet.assigned().values()) == 1, "the canary soaks for 60 s first"
    fleet.advance(30)
    assert sum(v == "v2" for v in fleet.assigned().values()) == 1
    fleet.advance(31)
    assert sum(v == "v2" for v in fleet.assigned().values()) == 1 + 3, "the wave opens with a burst of 3"
    fleet.advance(20)
    assert sum(v == "v2" for v in fleet.assigned().values()) == 1 + 3 + 1, "then 3 per minute"
    fleet.advance(120)
    assert sum(v == "v2" for v in fleet.assigned().values()) == 10
    assert fleet.engine.get(rollout_id)["state"] == "running", "assigned, not yet healthy"


def test_ab_split_and_comparison(fleet: Fleet) -> None:
    fleet.roll_everyone("v1")
    rollout_id = fleet.rollout("v2", b="v4", canary=10, waves=[100], ab_split=0.5)
    assigned = fleet.assigned()
    arms = {v: sorted(d for d, x in assigned.items() if x == v) for v in ("v2", "v4")}
    assert len(arms["v2"]) == 5 and len(arms["v4"]) == 5
    for device in arms["v2"]:
        fleet.report(device, "v2", rows=400, alerts=2)
    for device in arms["v4"]:
        fleet.report(device, "v4", rows=400, alerts=6)
    view = fleet.engine.get(rollout_id)
    assert view["state"] == "completed"
    a, b = view["arms"]
    assert (a["version"], a["rows"], a["alerts"]) == ("v2", 2000, 10)
    assert (b["version"], b["rows"], b["alerts"]) == ("v4", 2000, 30) and b["alert_rate"] > a["alert_rate"]


def test_pause_resume_cancel_and_manual_rollback(fleet: Fleet) -> None:
    fleet.roll_everyone("v1")
    rollout_id = fleet.rollout("v2", canary=1, waves=[100])
    (canary,) = [d for d, v in fleet.assigned().items() if v == "v2"]
    fleet.engine.act(rollout_id, "pause", actor=ACTOR, reason="weekend")
    fleet.report(canary, "v2")
    assert sum(v == "v2" for v in fleet.assigned().values()) == 1, "paused: no wave opens"
    with pytest.raises(Conflict):
        fleet.engine.act(rollout_id, "pause", actor=ACTOR, reason="again")
    fleet.engine.act(rollout_id, "resume", actor=ACTOR, reason="monday")
    assert sum(v == "v2" for v in fleet.assigned().values()) == 10
    fleet.engine.act(rollout_id, "rollback", actor=ACTOR, reason="customer asked")
    assert set(fleet.assigned().values()) == {"v1"}
    assert fleet.engine.get(rollout_id)["state"] == "rolled_back"
    # cancel: devices keep what they got
    second = fleet.rollout("v4", canary=1, waves=[100])
    fleet.engine.act(second, "cancel", actor=ACTOR, reason="wrong file")
    assert sorted(fleet.assigned().values()).count("v4") == 1
    assert set(fleet.statuses(second).values()) == {"assigned", "cancelled"}


def test_refusals(fleet: Fleet) -> None:
    fleet.rollout("v1", canary=1, waves=[100])
    with pytest.raises(Conflict, match="already in rollout"):
        fleet.rollout("v2", canary=1, waves=[100])
    request = s.RolloutRequest.model_validate({"name": "x", "group": "nope", "bundle": fleet.bundles["v1"],
                                               "reason": "r"})
    with pytest.raises(UnknownReference, match="no group"):
        fleet.engine.create(request, actor=ACTOR)
    with pytest.raises(UnknownReference, match="not in the catalogue"):
        fleet.engine.create(request.model_copy(update={"group": "line", "bundle": "0" * 64}), actor=ACTOR)
    for bad in ({"waves": [50]}, {"waves": [60, 40, 100]}, {"canary": 0}, {"ab_split": 1.0}):
        with pytest.raises(ValueError):
            s.Strategy.model_validate(bad)


# ---------------------------------------------------------------------------------------------- over HTTP
def _setup_http(server: FleetServer, make_bundle: Callable[..., bytes], base_sha256: str, n: int
                ) -> tuple[httpx.Client, dict[str, str], dict[str, str]]:
    http = server.client()
    assert http.post("/v1/bases", json={"name": "tiny", "sha256": base_sha256, "reason": "r"}).status_code == 201
    assert http.post("/v1/groups", json={"name": "line", "reason": "r"}).status_code == 201
    bundles = {}
    for version, release in (("v1", 1), ("v2", 2)):
        answer = http.post("/v1/bundles", params={"reason": "r"}, content=make_bundle(version=version,
                                                                                      release=release))
        assert answer.status_code == 201, answer.text
        bundles[version] = answer.json()["sha256"]
    credentials = {}
    for i in range(n):
        answer = http.post("/v1/devices", json={"device_id": f"pump-{i}", "groups": ["line"], "assets": [ASSET],
                                                "bases": [base_sha256], "reason": "r"})
        credentials[f"pump-{i}"] = answer.json()["credential"]
    return http, bundles, credentials


def _report(server: FleetServer, credential: str, version: str, alerts: int = 1) -> httpx.Response:
    with server.client(credential) as device:
        return device.post("/v1/device/self/report", json={
            "agent": "test", "assets": [{"asset_id": ASSET, "active_version": version, "versions": [version],
                                         "health": {"version": version, "rows": 500, "alerts": alerts}}]})


def test_rollout_api_and_device_reports(server: FleetServer, make_bundle: Callable[..., bytes],
                                        base_sha256: str) -> None:
    http, bundles, credentials = _setup_http(server, make_bundle, base_sha256, 3)
    body = {"name": "first", "group": "line", "bundle": bundles["v1"], "reason": "first release",
            "strategy": {"canary": 1, "waves": [100]}}
    created = http.post("/v1/rollouts", json=body)
    assert created.status_code == 201, created.text
    rollout = created.json()
    assert rollout["state"] == "running" and [w["size"] for w in rollout["waves"]] == [1, 2]
    (canary,) = [d["device_id"] for d in rollout["devices"] if d["status"] == "assigned"]
    answer = _report(server, credentials[canary], "v1")
    assert answer.status_code == 200 and answer.json()["poll_seconds"] > 0
    rollout = http.get(f"/v1/rollouts/{rollout['id']}").json()
    assert rollout["current_wave"] == 1 and rollout["devices_by_status"] == {"healthy": 1, "assigned": 2}
    history = http.get(f"/v1/devices/{canary}/history").json()
    assert history["installed"][ASSET]["active_version"] == "v1" and history["health"][0]["rows"] == 500
    assert http.get("/v1/rollouts").json()[0]["id"] == rollout["id"]
    paused = http.post(f"/v1/rollouts/{rollout['id']}/pause", json={"reason": "look first"})
    assert paused.status_code == 200 and paused.json()["state"] == "paused"

    # Refusals: one line, nothing changed.
    before = http.get(f"/v1/rollouts/{rollout['id']}").json()
    assert_refused(http.post("/v1/rollouts", json={**body, "strategy": {"waves": [50]}}), 422, "100")
    assert_refused(http.post("/v1/rollouts", json={**body, "bundle": bundles["v2"]}), 409, "already in rollout")
    assert_refused(http.post("/v1/rollouts", json={**body, "extra": 1}), 422)
    assert_refused(http.post("/v1/rollouts", content=b"{not json", headers={"Content-Type": "application/json"}),
                   400)
    assert_refused(http.post(f"/v1/rollouts/{rollout['id']}/pause", json={"reason": "again"}), 409, "paused")
    assert_refused(http.post("/v1/rollouts/999/resume", json={"reason": "x"}), 404, "no rollout 999")
    assert_refused(http.get("/v1/devices/nope/history"), 404)
    with server.client(credentials[canary]) as device:  # a device is not an operator
        assert_refused(device.post("/v1/rollouts", json=body), 401)
    assert_refused(http.post("/v1/device/self/report", json={"assets": []}), 401)  # an operator is not a device
    with server.client(credentials[canary]) as device:
        assert_refused(device.post("/v1/device/self/report", json={"assets": [{"asset_id": ASSET, "health": {
            "version": "v1", "rows": 1, "alerts": 5}}]}), 422, "alerts")
    assert http.get(f"/v1/rollouts/{rollout['id']}").json() == before


def test_server_killed_mid_rollout_resumes_without_unapproved_versions(
        tmp_path: Path, keys: dict[str, Any], make_bundle: Callable[..., bytes], base_sha256: str) -> None:
    db = f"sqlite:///{tmp_path}/fleet.db"
    first = FleetServer(state_dir=tmp_path / "fleet", db=db, trusted_keys=(keys["public"],), startup_s=60.0)
    with first:
        http, bundles, credentials = _setup_http(first, make_bundle, base_sha256, 4)
        rollout = http.post("/v1/rollouts", json={
            "name": "r", "group": "line", "bundle": bundles["v1"], "reason": "r",
            "strategy": {"canary": 1, "waves": [100], "soak_seconds": 3}}).json()
        (canary,) = [d["device_id"] for d in rollout["devices"] if d["status"] == "assigned"]
        assert _report(first, credentials[canary], "v1").status_code == 200
        first.process.send_signal(signal.SIGKILL)  # mid-soak: the next wave must not have opened
        first.process.wait(timeout=10)
    registry = Registry(Database.open(db), BundleStore(tmp_path / "s"), [])
    with registry.db.read() as session:
        assigned = {a.device_id for a in session.scalars(select(DeviceAssignment))}
    assert assigned == {canary}, "only the approved canary has an assignment"
    registry.db.close()
    second = FleetServer(state_dir=tmp_path / "fleet2", db=db, trusted_keys=(keys["public"],), startup_s=60.0)
    with second:
        http = second.client()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            view = http.get(f"/v1/rollouts/{rollout['id']}").json()
            if view["current_wave"] == 1 and view["devices_by_status"].get("assigned") == 3:
                break
            time.sleep(0.3)
        assert view["current_wave"] == 1 and view["state"] == "running", view
        for device, credential in credentials.items():
            if device != canary:
                assert _report(second, credential, "v1").status_code == 200
        deadline = time.monotonic() + 30
        while http.get(f"/v1/rollouts/{rollout['id']}").json()["state"] != "completed":
            assert time.monotonic() < deadline, "the resumed rollout completes"
            time.sleep(0.3)

