"""Rollouts: a bundle goes to a group canary first, then wave by wave, each wave behind health gates; a regression
halts the rollout and rolls the affected devices back, automatically.

How it fits together:

- The engine writes **assignments** (``device_assignments``: which bundle a device should run for an asset). The
  TUF director (:mod:`edgepeft.fleet.distribution`) signs, per device, exactly its assignments; the device's agent
  installs what its director lists. So a device can only ever be moved to a bundle a rollout approved.
- Devices **report** (``POST /v1/device/self/report``) what they run and the health of each active version: rows
  scored, alerts, quantiles of score / threshold, errors. A device's report is judged at once against the gates,
  with the device's own previous version as its baseline (a device that always raised 2 % alerts is not a
  regression at 2 %; one that jumps from 0.5 % to 30 % is).
- **Waves**: wave 0 is the canary. A wave opens (its devices get assigned, at most ``max_devices_per_minute``)
  only when every device of the previous wave is healthy and has stayed so for ``soak_seconds``. One unhealthy
  device, or more install failures than ``max_failures`` in a wave, **halts** the rollout: every device it
  assigned is assigned its previous bundle again (still installed on the device, so the agent only re-activates
  it), devices not reached yet are never assigned.
- **A/B**: with ``bundle_b``, a share of the devices (``ab_split``) gets the second bundle; the rollout's view
  compares the two arms' health. Gates apply to both.
- Everything is in the database, so a server killed mid-rollout resumes where it was when it restarts, and API
  replicas can share the work (each rollout is advanced in one transaction that locks its row on PostgreSQL).

A background thread (started and stopped with the app) calls :meth:`RolloutEngine.tick` every ``tick_seconds``
for what time alone moves on (soak, rate limits); reports move a rollout on at once.

Example (a throw-away SQLite registry, no devices yet):
    >>> import tempfile
    >>> from edgepeft.fleet.db import Database
    >>> from edgepeft.fleet.registry import Registry
    >>> from edgepeft.fleet.storage import BundleStore
    >>> root = tempfile.mkdtemp()
    >>> engine = RolloutEngine(Registry(Database.open(f"sqlite:///{root}/f.db"), BundleStore(root), []))
    >>> engine.list_rollouts()
    []
    >>> engine.tick()
    0
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Annotated, Any

import anyio
from fastapi import Depends, FastAPI, Query
from fastapi import Path as PathParam
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from edgepeft.delta.manifest import as_utc
from edgepeft.fleet import schemas as s
from edgepeft.fleet.errors import Conflict, NotFound, UnknownReference
from edgepeft.fleet.models import (
    AuditEntry,
    BundleRecord,
    DeviceAsset,
    DeviceAssignment,
    DeviceBase,
    DeviceEvent,
    DeviceHealth,
    DeviceStatus,
    Group,
    GroupMember,
    Rollout,
    RolloutDevice,
    RolloutWave,
)
from edgepeft.fleet.registry import Operator, Registry, iso, now
from edgepeft.fleet.server import ApiContext, error_responses

log = logging.getLogger("edgepeft.fleet.rollouts")

ACTIVE = ("running", "paused")
# Device statuses once the device has been given the new bundle (what a halt must undo).
REACHED = ("assigned", "installed", "healthy", "unhealthy", "failed")
GATE_ACTOR = "fleet:health-gate"
MAX_EVENTS_KEPT_PER_REPORT = 100
RolloutId = Annotated[int, PathParam(ge=1, le=2**62, description="The rollout's id.")]


def _order_key(rollout_id: int, device_id: str) -> str:
    """A device's place in a rollout: a hash, so canaries are spread over the group, yet reproducible."""
    return hashlib.sha256(f"{rollout_id}:{device_id}".encode()).hexdigest()


def plan_waves(n: int, strategy: dict[str, Any]) -> list[int]:
    """Wave sizes for ``n`` devices: the canary, then the cumulative shares of the rest.

    Example:
        >>> plan_waves(1000, {"canary": 10, "waves": [10, 50, 100]})
        [10, 99, 396, 495]
        >>> plan_waves(3, {"canary": 1, "waves": [50, 100]})
        [1, 1, 1]
    """
    if n <= 0:
        return []
    pct = strategy.get("canary_percent")
    canary = min(n, math.ceil(n * pct / 100) if pct else int(strategy.get("canary", 1)))
    rest = n - canary
    sizes = [canary]
    reached = 0
    for share in strategy.get("waves", [100.0]):
        upto = rest if share >= 100 else math.ceil(rest * share / 100)
        if upto > reached:
            sizes.append(upto - reached)
            reached = upto
    return sizes


def judge(health: dict[str, Any] | None, baseline: dict[str, Any] | None, gates: dict[str, Any]) -> tuple[str, str]:
    """A device's verdict on the new version: ``("wait"|"healthy"|"unhealthy", why)``.

    Example:
        >>> gates = s.Gates().model_dump()
        >>> judge({"rows": 500, "alerts": 150, "errors": 0}, {"rows": 500, "alerts": 3}, gates)[0]
        'unhealthy'
        >>> judge({"rows": 500, "alerts": 4, "errors": 0}, {"rows": 500, "alerts": 3}, gates)[0]
        'healthy'
    """
    if health is None:
        return "wait", "no health report on the new version yet"
    if int(health.get("errors", 0)) > gates["max_errors"]:
        return "unhealthy", f"{health['errors']} failed score call(s) on the new version (gate: {gates['max_errors']})"
    if baseline is not None and int(health.get("crashes", 0)) > int(baseline.get("crashes", 0)):
        return "unhealthy", (f"the agent crashed {int(health['crashes']) - int(baseline.get('crashes', 0))} "
                             "time(s) since the new version was installed")
    rows = int(health.get("rows", 0))
    if rows < gates["min_rows"]:
        return "wait", f"{rows} of {gates['min_rows']} rows scored on the new version"
    rate = int(health["alerts"]) / rows
    if rate > gates["max_alert_rate"]:
        return "unhealthy", f"alert rate {rate:.4f} over the cap {gates['max_alert_rate']:g}"
    if baseline and int(baseline.get("rows", 0)) > 0:
        base_rate = int(baseline["alerts"]) / int(baseline["rows"])
        limit = max(gates["max_alert_ratio"] * base_rate, base_rate + gates["alert_margin"])
        if rate > limit:
            return "unhealthy", (f"alert rate {rate:.4f} vs {base_rate:.4f} on the previous version (limit "
                                 f"{limit:.4f})")
        ratio = gates.get("max_q95_ratio")
        if (ratio and health.get("score_q95") is not None and baseline.get("score_q95")
                and health["score_q95"] > ratio * baseline["score_q95"]):
            return "unhealthy", (f"score q95 {health['score_q95']:.3f} vs {baseline['score_q95']:.3f} on the "
                                     "previous version")
    return "healthy", f"alert rate {rate:.4f} over {rows} rows"


def _health_view(row: DeviceHealth | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {"version": row.version, "rows": row.rows, "alerts": row.alerts, "score_q50": row.score_q50,
            "score_q95": row.score_q95, "score_q99": row.score_q99, "errors": row.errors, "crashes": row.crashes,
            "since": iso(row.since), "reported_at": iso(row.reported_at)}


def _parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return as_utc(datetime.fromisoformat(text.replace("Z", "+00:00")))
    except ValueError:
        return None


class RolloutEngine:
    """Creates rollouts, judges device reports against their gates and moves waves on.

    ``tick_seconds``: how often the background thread advances rollouts (soak times and rate limits);
    ``poll_seconds``: the poll interval suggested to agents in the answer to their reports.
    """

    def __init__(self, registry: Registry, *, tick_seconds: float = 1.0, poll_seconds: float = 30.0,
                 clock: Callable[[], datetime] = now) -> None:
        self.registry = registry
        self.clock = clock  # tests move time on for soak and rate limits
        self.db = registry.db
        self.tick_seconds = tick_seconds
        self.poll_seconds = poll_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --------------------------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Start the background ticker (idempotent)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="rollout-ticker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.tick_seconds):
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - the ticker must outlive a transient database error
                log.exception("rollout tick failed; retrying at the next tick")

    # --------------------------------------------------------------------------------------------- create
    def create(self, request: s.RolloutRequest, *, actor: str) -> dict[str, Any]:
        """A new running rollout; its canary is assigned at once."""
        strategy, gates = request.strategy.model_dump(), request.gates.model_dump()
        with self.registry._change("creating the rollout") as session:
            bundle = session.get(BundleRecord, request.bundle)
            if bundle is None:
                raise UnknownReference(f"bundle {request.bundle[:16]}… is not in the catalogue; publish it first "
                                       "with POST /v1/bundles")
            bundle_b = None
            if request.bundle_b is not None:
                bundle_b = session.get(BundleRecord, request.bundle_b)
                if bundle_b is None:
                    raise UnknownReference(f"bundle_b {request.bundle_b[:16]}… is not in the catalogue")
                if bundle_b.asset_id != bundle.asset_id or bundle_b.sha256 == bundle.sha256:
                    raise UnknownReference("bundle_b must be another bundle of the same asset "
                                           f"({bundle.asset_id})")
            if session.get(Group, request.group) is None:
                raise UnknownReference(f"no group {request.group!r}; create it with POST /v1/groups")
            devices = self._eligible(session, request.group, bundle)
            if not devices:
                raise UnknownReference(
                    f"no device of group {request.group!r} monitors asset {bundle.asset_id!r} and holds base "
                    f"{bundle.base_sha256[:12]}…; enrol devices with that asset and base (or let their agents "
                    "report them) first")
            busy = session.execute(
                select(RolloutDevice.device_id, Rollout.id).join(Rollout, Rollout.id == RolloutDevice.rollout_id)
                .where(Rollout.state.in_(ACTIVE), Rollout.asset_id == bundle.asset_id,
                       RolloutDevice.device_id.in_(devices)).limit(1)).first()
            if busy is not None:
                raise Conflict(f"device {busy[0]!r} is already in rollout {busy[1]} of asset {bundle.asset_id!r}; "
                               "let it finish, or cancel it first")
            moment = self.clock()
            rollout = Rollout(name=request.name, asset_id=bundle.asset_id, group_name=request.group,
                              bundle_sha256=bundle.sha256, bundle_b_sha256=bundle_b.sha256 if bundle_b else None,
                              strategy=strategy, gates=gates, state="running", current_wave=0, waves=0, outcome="",
                              created_at=moment, created_by=actor, updated_at=moment)
            session.add(rollout)
            session.flush()
            ordered = sorted(devices, key=lambda d: _order_key(rollout.id, d))
            plan = dict(strategy)
            if strategy.get("canary_group"):
                chosen = set(session.scalars(select(GroupMember.device_id).where(
                    GroupMember.group_name == strategy["canary_group"])))
                ordered = [d for d in ordered if d in chosen] + [d for d in ordered if d not in chosen]
                plan.update(canary=sum(d in chosen for d in ordered), canary_percent=None)
                if plan["canary"] == 0:
                    raise UnknownReference(f"canary_group {strategy['canary_group']!r} has none of the rollout's "
                                           "devices")
            sizes = plan_waves(len(ordered), plan)
            rollout.waves = len(sizes)
            start = 0
            for wave, size in enumerate(sizes):
                session.add(RolloutWave(rollout_id=rollout.id, wave=wave, size=size,
                                        opened_at=moment if wave == 0 else None))
                for position, device_id in enumerate(ordered[start:start + size], start=start):
                    # Arm b for a share ab_split of the devices, spread evenly along the (hashed) order.
                    split = request.strategy.ab_split
                    arm = "b" if bundle_b is not None and math.floor((position + 1) * split) > math.floor(
                        position * split) else "a"
                    session.add(RolloutDevice(
                        rollout_id=rollout.id, device_id=device_id, wave=wave, arm=arm,
                        bundle_sha256=(bundle_b.sha256 if arm == "b" and bundle_b else bundle.sha256),
                        status="pending", detail="", updated_at=moment))
                start += size
            session.flush()
            self.registry._audit(session, actor, "rollout.create", f"rollout:{rollout.id}", request.reason, {
                "name": request.name, "group": request.group, "asset": bundle.asset_id, "bundle": bundle.sha256,
                "version": bundle.version, "bundle_b": bundle_b.sha256 if bundle_b else None,
                "devices": len(ordered), "waves": sizes, "strategy": strategy, "gates": gates})
            self._advance(session, rollout, moment)
            rollout_id = rollout.id
        return self.get(rollout_id)

    @staticmethod
    def _eligible(session: Session, group: str, bundle: BundleRecord) -> list[str]:
        query = (select(GroupMember.device_id).where(GroupMember.group_name == group)
                 .where(GroupMember.device_id.in_(select(DeviceAsset.device_id)
                                                  .where(DeviceAsset.asset_id == bundle.asset_id)))
                 .where(GroupMember.device_id.in_(select(DeviceBase.device_id)
                                                  .where(DeviceBase.base_sha256 == bundle.base_sha256))))
        return list(session.scalars(query))

    # --------------------------------------------------------------------------------------------- operator actions
    def act(self, rollout_id: int, action: str, *, actor: str, reason: str) -> dict[str, Any]:
        """``pause``, ``resume``, ``cancel`` (stop; devices keep what they got) or ``rollback`` (stop and move every
        device this rollout reached back to its previous bundle)."""
        with self.registry._change(f"changing rollout {rollout_id}") as session:
            rollout = self._locked(session, rollout_id)
            allowed = {"pause": ("running",), "resume": ("paused",), "cancel": ACTIVE,
                       "rollback": (*ACTIVE, "completed")}[action]
            if rollout.state not in allowed:
                raise Conflict(f"rollout {rollout_id} is {rollout.state}; {action} needs it "
                               f"{' or '.join(allowed)}")
            moment = self.clock()
            if action == "pause":
                rollout.state = "paused"
            elif action == "resume":
                rollout.state = "running"
            elif action == "cancel":
                rollout.state = "cancelled"
                rollout.outcome = f"cancelled: {reason}"
                self._cancel_pending(session, rollout, moment)
            else:
                self._halt(session, rollout, f"rolled back by {actor}: {reason}", moment, audit=False)
                rollout.state = "rolled_back"
            rollout.updated_at = moment
            self.registry._audit(session, actor, f"rollout.{action}", f"rollout:{rollout_id}", reason,
                                 {"state": rollout.state})
            if action == "resume":
                self._advance(session, rollout, moment)
        return self.get(rollout_id)

    @staticmethod
    def _locked(session: Session, rollout_id: int) -> Rollout:
        # FOR UPDATE: two replicas (or the ticker and a report) never advance one rollout at the same time.
        rollout = session.scalar(select(Rollout).where(Rollout.id == rollout_id).with_for_update())
        if rollout is None:
            raise NotFound(f"no rollout {rollout_id}; list them with GET /v1/rollouts")
        return rollout

    # --------------------------------------------------------------------------------------------- the state machine
    def tick(self) -> int:
        """Advance every running rollout once (what time alone moves on); returns how many are running."""
        with self.db.read() as session:
            ids = list(session.scalars(select(Rollout.id).where(Rollout.state == "running").order_by(Rollout.id)))
        for rollout_id in ids:
            with self.db.write() as session:
                rollout = self._locked(session, rollout_id)
                if rollout.state == "running":
                    self._advance(session, rollout, self.clock())
        return len(ids)

    def _advance(self, session: Session, rollout: Rollout, moment: datetime) -> None:
        """Judge the current wave; halt, complete, or open and assign the next, as far as the rules allow now."""
        while rollout.state == "running":
            rows = list(session.scalars(select(RolloutDevice).where(RolloutDevice.rollout_id == rollout.id,
                                                                    RolloutDevice.wave <= rollout.current_wave)))
            bad = [r for r in rows if r.status == "unhealthy"]
            failed = [r for r in rows if r.status == "failed" and r.wave == rollout.current_wave]
            if bad or len(failed) > rollout.gates["max_failures"]:
                first = (bad or failed)[0]
                self._halt(session, rollout, f"device {first.device_id} {first.status}: {first.detail}", moment)
                return
            wave = session.get(RolloutWave, (rollout.id, rollout.current_wave))
            current = [r for r in rows if r.wave == rollout.current_wave]
            self._assign_pending(session, rollout, wave, current, moment)
            done = all(r.status in ("healthy", "failed") for r in current)
            if not done:
                if wave.healthy_at is not None:  # a device slipped back (e.g. re-assigned); wait again
                    wave.healthy_at = None
                return
            if wave.healthy_at is None:
                wave.healthy_at = moment
            soak = timedelta(seconds=float(rollout.strategy.get("soak_seconds", 0.0)))
            if as_utc(moment) - as_utc(wave.healthy_at) < soak:
                return
            if rollout.current_wave + 1 >= rollout.waves:
                rollout.state = "completed"
                rollout.outcome = f"completed: {sum(r.status == 'healthy' for r in rows)} device(s) healthy"
                rollout.updated_at = moment
                self.registry._audit(session, "fleet:rollouts", "rollout.complete", f"rollout:{rollout.id}",
                                     "every wave healthy", {"devices": len(rows)})
                return
            rollout.current_wave += 1
            rollout.updated_at = moment
            nxt = session.get(RolloutWave, (rollout.id, rollout.current_wave))
            nxt.opened_at = moment

    def _assign_pending(self, session: Session, rollout: Rollout, wave: RolloutWave, current: list[RolloutDevice],
                        moment: datetime) -> None:
        pending = [r for r in current if r.status == "pending"]
        if not pending:
            return
        rate = rollout.strategy.get("max_devices_per_minute")
        if rate:
            elapsed = (as_utc(moment) - as_utc(wave.opened_at or moment)).total_seconds()
            budget = int(rate) + int(rate * elapsed / 60.0) - (len(current) - len(pending))
            pending = sorted(pending, key=lambda r: _order_key(rollout.id, r.device_id))[:max(0, budget)]
        for row in pending:
            self._assign(session, rollout, row, moment)

    def _assign(self, session: Session, rollout: Rollout, row: RolloutDevice, moment: datetime) -> None:
        current = session.get(DeviceAssignment, (row.device_id, rollout.asset_id))
        status = session.get(DeviceStatus, row.device_id)
        installed = (status.installed or {}).get(rollout.asset_id, {}) if status else {}
        row.previous_sha256 = current.bundle_sha256 if current else None
        row.previous_version = installed.get("active_version")
        if row.previous_version:
            row.baseline = _health_view(session.get(DeviceHealth, (row.device_id, rollout.asset_id,
                                                                   row.previous_version)))
        bundle = session.get(BundleRecord, row.bundle_sha256)
        if current is None:
            session.add(DeviceAssignment(device_id=row.device_id, asset_id=rollout.asset_id,
                                         bundle_sha256=row.bundle_sha256, rollout_id=rollout.id, assigned_at=moment))
        else:
            current.bundle_sha256, current.rollout_id, current.assigned_at = row.bundle_sha256, rollout.id, moment
        # Already running it (an A/B arm re-run, or a device that got it elsewhere): installed at once.
        row.status = "installed" if row.previous_version == bundle.version else "assigned"
        row.detail = f"assigned {bundle.version}"
        row.updated_at = moment
        session.add(DeviceEvent(device_id=row.device_id, at=moment, kind="assigned", asset_id=rollout.asset_id,
                                version=bundle.version, rollout_id=rollout.id,
                                detail=f"wave {row.wave}, arm {row.arm}"))

    def _cancel_pending(self, session: Session, rollout: Rollout, moment: datetime) -> None:
        for row in session.scalars(select(RolloutDevice).where(RolloutDevice.rollout_id == rollout.id,
                                                               RolloutDevice.status == "pending")):
            row.status, row.detail, row.updated_at = "cancelled", "rollout stopped before this wave", moment

    def _halt(self, session: Session, rollout: Rollout, why: str, moment: datetime, *, audit: bool = True) -> None:
        """Stop the rollout and give every device it reached its previous bundle again."""
        rollout.state = "halted"
        rollout.outcome = f"halted: {why}"
        rollout.updated_at = moment
        self._cancel_pending(session, rollout, moment)
        reverted, stranded = 0, []
        for row in session.scalars(select(RolloutDevice).where(RolloutDevice.rollout_id == rollout.id,
                                                               RolloutDevice.status.in_(REACHED))):
            assignment = session.get(DeviceAssignment, (row.device_id, rollout.asset_id))
            if row.previous_sha256 is not None:
                if assignment is None:
                    session.add(DeviceAssignment(device_id=row.device_id, asset_id=rollout.asset_id,
                                                 bundle_sha256=row.previous_sha256, rollout_id=rollout.id,
                                                 assigned_at=moment))
                else:
                    assignment.bundle_sha256, assignment.rollout_id = row.previous_sha256, rollout.id
                    assignment.assigned_at = moment
                row.status, row.detail = "rolled_back", f"back to {row.previous_version or 'the previous bundle'}"
                reverted += 1
            else:
                # Nothing in the catalogue to go back to (the device ran a provisioned adapter): stop assigning the
                # new one; the device keeps its history and an operator decides.
                if assignment is not None and assignment.rollout_id == rollout.id:
                    session.delete(assignment)
                row.status, row.detail = "rolled_back", "no previous bundle in the catalogue: assignment removed"
                stranded.append(row.device_id)
            row.updated_at = moment
            session.add(DeviceEvent(device_id=row.device_id, at=moment, kind="rolled_back",
                                    asset_id=rollout.asset_id, version=row.previous_version or "",
                                    rollout_id=rollout.id, detail=why[:500]))
        if audit:
            session.add(AuditEntry(at=moment, actor=GATE_ACTOR, action="rollout.halt", target=f"rollout:{rollout.id}",
                                   reason=why[:1000], details={"rolled_back": reverted, "without_previous": stranded}))
        log.warning("rollout %s halted (%s); %d device(s) rolled back", rollout.id, why, reverted)

    # --------------------------------------------------------------------------------------------- device reports
    def report(self, device_id: str, body: s.DeviceReport) -> dict[str, Any]:
        """Store what the device reports, judge its rollouts' gates and move those rollouts on."""
        moment = self.clock()
        touched: set[int] = set()
        with self.registry._change(f"the report of {device_id!r}") as session:
            status = session.get(DeviceStatus, device_id)
            if status is None:
                status = DeviceStatus(device_id=device_id, last_seen_at=moment, installed={}, last_error="",
                                      reports=0)
                session.add(status)
            status.last_seen_at = moment
            status.reports = (status.reports or 0) + 1
            status.installed = {a.asset_id: {"active_version": a.active_version, "active_release": a.active_release,
                                             "versions": a.versions} for a in body.assets}
            errors = [e for e in body.events if e.kind in ("error", "refused")]
            if errors:
                status.last_error = f"{errors[-1].at} {errors[-1].kind}: {errors[-1].detail}"[:1000]
            for asset in body.assets:
                if asset.health is None:
                    continue
                h = asset.health
                row = session.get(DeviceHealth, (device_id, asset.asset_id, h.version))
                if row is None:
                    row = DeviceHealth(device_id=device_id, asset_id=asset.asset_id, version=h.version)
                    session.add(row)
                row.rows, row.alerts, row.errors, row.crashes = h.rows, h.alerts, h.errors, body.crashes
                row.score_q50, row.score_q95, row.score_q99 = h.score_q50, h.score_q95, h.score_q99
                row.since, row.reported_at = _parse_time(h.since), moment
            for event in body.events[-MAX_EVENTS_KEPT_PER_REPORT:]:
                session.add(DeviceEvent(device_id=device_id, at=_parse_time(event.at) or moment, kind=event.kind,
                                        asset_id=event.asset_id or "", version=event.version or "",
                                        detail=" ".join(event.detail.split())[:1000]))
            session.flush()
            touched = self._judge_device(session, device_id, body, moment)
        for rollout_id in sorted(touched):
            with self.db.write() as session:
                rollout = self._locked(session, rollout_id)
                if rollout.state == "running":
                    self._advance(session, rollout, self.clock())
        return {"poll_seconds": self.poll_seconds}

    def _judge_device(self, session: Session, device_id: str, body: s.DeviceReport, moment: datetime) -> set[int]:
        rows = session.execute(
            select(RolloutDevice, Rollout).join(Rollout, Rollout.id == RolloutDevice.rollout_id)
            .where(RolloutDevice.device_id == device_id, Rollout.state.in_(ACTIVE),
                   RolloutDevice.status.in_(("assigned", "installed", "healthy")))).all()
        touched = set()
        reported = {a.asset_id: a for a in body.assets}
        for row, rollout in rows:
            bundle = session.get(BundleRecord, row.bundle_sha256)
            asset = reported.get(rollout.asset_id)
            before = row.status
            failure = next((e for e in body.events if e.kind in ("error", "refused")
                            and e.asset_id == rollout.asset_id and e.version == bundle.version), None)
            if failure is not None and row.status == "assigned":
                row.status, row.detail = "failed", f"install failed: {failure.detail}"[:1000]
            elif asset is not None and asset.active_version == bundle.version:
                if row.status == "assigned":
                    row.status, row.detail = "installed", f"running {bundle.version}"
                health = session.get(DeviceHealth, (device_id, rollout.asset_id, bundle.version))
                verdict, why = judge(_health_view(health), row.baseline, rollout.gates)
                if verdict != "wait":
                    row.status, row.detail = verdict, why
            if row.status != before:
                row.updated_at = moment
                touched.add(rollout.id)
        return touched

    # --------------------------------------------------------------------------------------------- reading
    def list_rollouts(self, *, state: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        query = select(Rollout).order_by(Rollout.id.desc()).limit(limit)
        if state is not None:
            query = query.where(Rollout.state == state)
        with self.db.read() as session:
            return [self._view(session, r, devices=False) for r in session.scalars(query)]

    def get(self, rollout_id: int, *, devices: bool = True) -> dict[str, Any]:
        with self.db.read() as session:
            rollout = session.get(Rollout, rollout_id)
            if rollout is None:
                raise NotFound(f"no rollout {rollout_id}; list them with GET /v1/rollouts")
            return self._view(session, rollout, devices=devices)

    @staticmethod
    def _view(session: Session, rollout: Rollout, *, devices: bool) -> dict[str, Any]:
        counts: dict[tuple[int, str], int] = {}
        for wave, status, n in session.execute(
                select(RolloutDevice.wave, RolloutDevice.status, func.count())
                .where(RolloutDevice.rollout_id == rollout.id).group_by(RolloutDevice.wave, RolloutDevice.status)):
            counts[(wave, status)] = n
        waves = []
        for wave in session.scalars(select(RolloutWave).where(RolloutWave.rollout_id == rollout.id)
                                    .order_by(RolloutWave.wave)):
            waves.append({"wave": wave.wave, "size": wave.size, "opened_at": iso(wave.opened_at),
                          "healthy_at": iso(wave.healthy_at),
                          "status": {k[1]: v for k, v in sorted(counts.items()) if k[0] == wave.wave}})
        versions = {sha: version for sha, version in session.execute(
            select(BundleRecord.sha256, BundleRecord.version).where(
                BundleRecord.sha256.in_([x for x in (rollout.bundle_sha256, rollout.bundle_b_sha256) if x])))}
        arms = []
        for arm, sha in (("a", rollout.bundle_sha256), ("b", rollout.bundle_b_sha256)):
            if sha is None:
                continue
            version = versions.get(sha, "")
            rows_alerts = session.execute(
                select(func.count(DeviceHealth.device_id), func.coalesce(func.sum(DeviceHealth.rows), 0),
                       func.coalesce(func.sum(DeviceHealth.alerts), 0), func.avg(DeviceHealth.score_q95))
                .where(DeviceHealth.asset_id == rollout.asset_id, DeviceHealth.version == version,
                       DeviceHealth.device_id.in_(select(RolloutDevice.device_id).where(
                           RolloutDevice.rollout_id == rollout.id, RolloutDevice.arm == arm)))).one()
            n, rows, alerts, q95 = rows_alerts
            arms.append({"arm": arm, "bundle": sha, "version": version, "devices_reporting": int(n),
                         "rows": int(rows), "alerts": int(alerts),
                         "alert_rate": (int(alerts) / int(rows)) if rows else None,
                         "mean_score_q95": float(q95) if q95 is not None else None})
        out: dict[str, Any] = {
            "id": rollout.id, "name": rollout.name, "asset_id": rollout.asset_id, "group": rollout.group_name,
            "bundle": rollout.bundle_sha256, "bundle_b": rollout.bundle_b_sha256, "state": rollout.state,
            "current_wave": rollout.current_wave, "waves": waves, "arms": arms, "outcome": rollout.outcome,
            "strategy": rollout.strategy, "gates": rollout.gates, "created_at": iso(rollout.created_at),
            "created_by": rollout.created_by, "updated_at": iso(rollout.updated_at),
            "devices_by_status": _totals(counts),
        }
        if devices:
            out["devices"] = [
                {"device_id": r.device_id, "wave": r.wave, "arm": r.arm, "status": r.status, "detail": r.detail,
                 "previous_version": r.previous_version, "updated_at": iso(r.updated_at)}
                for r in session.scalars(select(RolloutDevice).where(RolloutDevice.rollout_id == rollout.id)
                                         .order_by(RolloutDevice.wave, RolloutDevice.device_id))]
        return out

    def device_history(self, device_id: str, *, limit: int = 200) -> dict[str, Any]:
        """A device's assignments, latest status, health per version and its recent events (newest first)."""
        self.registry.get_device(device_id)  # 404 for an unknown device
        with self.db.read() as session:
            status = session.get(DeviceStatus, device_id)
            assignments = [
                {"asset_id": a.asset_id, "bundle": a.bundle_sha256, "version": v, "rollout_id": a.rollout_id,
                 "assigned_at": iso(a.assigned_at)}
                for a, v in session.execute(select(DeviceAssignment, BundleRecord.version)
                                            .join(BundleRecord, BundleRecord.sha256 == DeviceAssignment.bundle_sha256)
                                            .where(DeviceAssignment.device_id == device_id))]
            health = [{"asset_id": h.asset_id, **(_health_view(h) or {})} for h in session.scalars(
                select(DeviceHealth).where(DeviceHealth.device_id == device_id).order_by(DeviceHealth.asset_id,
                                                                                         DeviceHealth.version))]
            events = [{"id": e.id, "at": iso(e.at), "kind": e.kind, "asset_id": e.asset_id, "version": e.version,
                       "rollout_id": e.rollout_id, "detail": e.detail}
                      for e in session.scalars(select(DeviceEvent).where(DeviceEvent.device_id == device_id)
                                               .order_by(DeviceEvent.id.desc()).limit(limit))]
            return {"device_id": device_id, "last_seen_at": iso(status.last_seen_at) if status else None,
                    "installed": status.installed if status else {}, "last_error": status.last_error if status else "",
                    "assignments": assignments, "health": health, "events": events}

    def clear_assignments(self, device_ids: Iterable[str]) -> None:
        """Forget devices' assignments (used when devices are removed from the fleet)."""
        with self.db.write() as session:
            session.execute(delete(DeviceAssignment).where(DeviceAssignment.device_id.in_(list(device_ids))))

    # --------------------------------------------------------------------------------------------- HTTP
    def mount(self, app: FastAPI, ctx: ApiContext) -> None:
        """``/v1/rollouts`` (operators), ``/v1/devices/{id}/history`` and ``POST /v1/device/self/report``."""
        previous = app.router.lifespan_context

        @asynccontextmanager
        async def lifespan(application: FastAPI) -> AsyncIterator[Any]:
            self.start()
            try:
                async with previous(application) as state:
                    yield state
            finally:
                self.stop()

        app.router.lifespan_context = lifespan

        @app.post("/v1/rollouts", tags=["rollouts"], status_code=201, summary="Start a rollout (canary first)",
                  responses=error_responses(400, 401, 403, 409, 413, 422))
        def create_rollout(body: s.RolloutRequest, who: Operator = ctx.operator("deploy")) -> dict[str, Any]:
            return ctx.changed(self.create(body, actor=who.actor))

        @app.get("/v1/rollouts", tags=["rollouts"], summary="Rollouts, newest first",
                 responses=error_responses(401, 403, 422))
        def list_rollouts(
            state: Annotated[str | None, Query(pattern="^(running|paused|completed|halted|cancelled|rolled_back)$")
                             ] = None,
            limit: Annotated[int, Query(ge=1, le=1000)] = 100,
            who: Operator = ctx.operator("read"),
        ) -> list[dict[str, Any]]:
            return self.list_rollouts(state=state, limit=limit)

        @app.get("/v1/rollouts/{rollout_id}", tags=["rollouts"], summary="A rollout wave by wave, with its devices",
                 responses=error_responses(401, 403, 404, 422))
        def get_rollout(rollout_id: RolloutId, who: Operator = ctx.operator("read")) -> dict[str, Any]:
            return self.get(rollout_id)

        def action_endpoint(action: str) -> Any:
            def endpoint(rollout_id: RolloutId, body: s.RolloutAction,
                         who: Operator = ctx.operator("deploy")) -> dict[str, Any]:
                return ctx.changed(self.act(rollout_id, action, actor=who.actor, reason=body.reason))

            return endpoint

        for action, text in (("pause", "Pause: no new assignments"), ("resume", "Resume a paused rollout"),
                             ("cancel", "Cancel: no new assignments; devices keep what they got"),
                             ("rollback", "Roll back every device this rollout reached")):
            app.post(f"/v1/rollouts/{{rollout_id}}/{action}", tags=["rollouts"], summary=text,
                     name=f"rollout_{action}", responses=error_responses(400, 401, 403, 404, 409, 413, 422)
                     )(action_endpoint(action))

        @app.get("/v1/devices/{device_id}/history", tags=["devices"], summary="A device's assignments, health and "
                 "events", responses=error_responses(401, 403, 404, 422))
        def history(device_id: str, limit: Annotated[int, Query(ge=1, le=1000)] = 200,
                    who: Operator = ctx.operator("read")) -> dict[str, Any]:
            return self.device_history(device_id, limit=limit)

        @app.post("/v1/device/self/report", tags=["device"], response_model=s.ReportAnswer,
                  summary="The agent reports what the device runs, its health and its events",
                  responses=error_responses(400, 401, 409, 413, 422))
        async def report(body: s.DeviceReport, device_id: str = Depends(ctx.device)) -> dict[str, Any]:
            return await anyio.to_thread.run_sync(self.report, device_id, body)


def _totals(counts: dict[tuple[int, str], int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for (_wave, status), n in counts.items():
        out[status] = out.get(status, 0) + n
    return out
