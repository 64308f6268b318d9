"""The web console: server-rendered, read-only pages over the registry's tables, served by the fleet app.

=====================================  ==============================================================================
GET  /console                          fleet overview: devices online, versions per asset with device counts and
                                       health (alert rate per version), running rollouts
GET  /console/devices                  devices, with last-seen and active versions (filter by tag, group, asset)
GET  /console/devices/{device_id}      one device: record, assignments, installed versions, health, history
GET  /console/rollouts                 rollouts, newest first
GET  /console/rollouts/{rollout_id}    one rollout wave by wave; arms with their health for an A/B test
GET  /console/audit                    the audit log, newest first, paged (filter by target, actor, action)
GET  /console/login, POST same         sign in with an operator token (any scope: every scope includes read)
POST /console/logout                   sign out
=====================================  ==============================================================================

Authentication: the login form takes an operator token; the server checks it (and the ``read`` scope) and keeps
it in an ``HttpOnly``, ``SameSite=Strict`` cookie scoped to ``/console``, checked again on every page (a revoked
token signs the console out at its next request). Nothing is stored server-side, so API replicas stay stateless.
The pages only read, so the only state-changing requests are login and logout; they refuse a cross-origin
``Origin`` header, and SameSite=Strict keeps the cookie off cross-site requests. Every value from the database is
escaped (device ids, tags, reasons and a device's event details are user input), and a strict Content Security
Policy (no inline script) backs that up. A little JavaScript refreshes the page's ``<main>`` every few seconds.

The queries are small read-only functions over :mod:`edgepeft.fleet.models`, one database session per page. The
overview reads every ``device_status`` row's ``installed`` JSON to count active versions: linear in the fleet, fine
for thousands of devices; a fleet of millions would want that count kept by the report endpoint.

Example:
    >>> import tempfile
    >>> from fastapi.testclient import TestClient
    >>> from edgepeft.fleet.db import Database
    >>> from edgepeft.fleet.registry import Registry
    >>> from edgepeft.fleet.server import create_app
    >>> from edgepeft.fleet.storage import BundleStore
    >>> root = tempfile.mkdtemp()
    >>> registry = Registry(Database.open(f"sqlite:///{root}/f.db"), BundleStore(root), [])
    >>> _, token = registry.create_token("ops", "read", actor="cli:doc", reason="console")
    >>> http = TestClient(create_app(registry, mounts=[mount]), follow_redirects=False)
    >>> http.get("/console").headers["location"]
    '/console/login?next=%2Fconsole'
    >>> http.post("/console/login", data={"token": token}).status_code
    303
    >>> "0 devices enrolled" in http.get("/console").text
    True
"""

from __future__ import annotations

import html
import json
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, quote, urlencode, urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from edgepeft.delta.manifest import as_utc
from edgepeft.fleet.errors import Forbidden, Unauthenticated
from edgepeft.fleet.models import (
    AuditEntry,
    BundleRecord,
    Device,
    DeviceAssignment,
    DeviceEvent,
    DeviceHealth,
    DeviceStatus,
    DeviceTag,
    Group,
    GroupMember,
    Rollout,
    RolloutDevice,
    RolloutWave,
)
from edgepeft.fleet.models import DeviceAsset as DeviceAssetRow
from edgepeft.fleet.registry import Operator, now
from edgepeft.fleet.server import ApiContext

PREFIX = "/console"
COOKIE = "edgepeft_console"
# A device polls every ~30 s (the report endpoint's suggestion); five minutes of silence is several missed polls,
# not jitter or one slow backoff.
ONLINE_WITHIN = timedelta(minutes=5)
# Seconds between the page's background refreshes: quick enough to watch a canary, slow enough to cost nothing.
REFRESH_SECONDS = 5
# A signed-in console outlives a working day, not a week: the cookie holds a real operator token.
SESSION_SECONDS = 12 * 3600
PAGE = 50
HISTORY = 200
WAVE_DEVICES_SHOWN = 100
ACTIVE_ROLLOUT_STATES = ("running", "paused")
_INT = re.compile(r"^[0-9]{1,18}$")

# No inline script or style anywhere: an escaping mistake could not run code even if one slipped through.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class BadInput(Exception):
    """A query parameter or path part the console cannot use; answered with a one-line 400 or 404 page.

    Example:
        >>> exc = BadInput(404, "no device 'pump-9' in the registry; see the device list")
        >>> exc.status, str(exc)
        (404, "no device 'pump-9' in the registry; see the device list")
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# ================================================================================================ queries
@dataclass(frozen=True)
class VersionRow:
    """One adapter version of one asset across the fleet: devices assigned to it, devices reporting it active,
    and the health those devices report for it (sums over devices; quantiles are the mean of devices' q95 and the
    worst q99).

    Example:
        >>> VersionRow("pump-1", "1.1.0", release=2, active=1, health_devices=1, rows=400, alerts=140).alert_rate
        0.35
    """

    asset_id: str
    version: str
    release: int | None = None
    assigned: int = 0
    active: int = 0
    health_devices: int = 0
    rows: int = 0
    alerts: int = 0
    errors: int = 0
    crashes: int = 0
    score_q95: float | None = None
    score_q99: float | None = None

    @property
    def alert_rate(self) -> float | None:
        """Alerts per scored row (None before any row was scored)."""
        return self.alerts / self.rows if self.rows else None


def installed_assets(installed: Any) -> list[dict[str, Any]]:
    """A ``device_status.installed`` value as a list of ``{asset_id, active_version, active_release, versions}``.

    The report endpoint stores either a mapping asset -> entry or the report's list of entries; both read the same.

    Example:
        >>> installed_assets({"pump-a": {"active_version": "v2", "active_release": 2, "versions": ["v1", "v2"]}})
        [{'asset_id': 'pump-a', 'active_version': 'v2', 'active_release': 2, 'versions': ['v1', 'v2']}]
    """
    if isinstance(installed, dict):
        entries = [{"asset_id": asset, **entry} if isinstance(entry, dict) else {"asset_id": asset,
                                                                                  "active_version": entry}
                   for asset, entry in installed.items()]
    elif isinstance(installed, list):
        entries = [entry for entry in installed if isinstance(entry, dict)]
    else:
        return []
    result = []
    for entry in entries:
        versions = entry.get("versions")
        result.append({"asset_id": str(entry.get("asset_id", "")),
                       "active_version": _opt_str(entry.get("active_version", entry.get("version"))),
                       "active_release": entry.get("active_release", entry.get("release")),
                       "versions": [str(v) for v in versions] if isinstance(versions, list) else []})
    return sorted(result, key=lambda e: e["asset_id"])


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _count(session: Session, query: Any) -> int:
    return int(session.scalar(query) or 0)


def read_overview(session: Session, moment: datetime) -> dict[str, Any]:
    """What the overview page shows, as of ``moment``: device counts, versions per asset, running rollouts."""
    devices = _count(session, select(func.count()).select_from(Device))
    reporting = _count(session, select(func.count()).select_from(DeviceStatus))
    online = _count(session, select(func.count()).select_from(DeviceStatus)
                    .where(DeviceStatus.last_seen_at >= moment - ONLINE_WITHIN))
    groups = session.execute(select(Group.name, func.count(GroupMember.device_id))
                             .outerjoin(GroupMember, GroupMember.group_name == Group.name)
                             .group_by(Group.name).order_by(Group.name)).all()

    rows: dict[tuple[str, str], dict[str, Any]] = defaultdict(dict)
    assigned = session.execute(
        select(BundleRecord.asset_id, BundleRecord.version, func.count(DeviceAssignment.device_id))
        .join(DeviceAssignment, DeviceAssignment.bundle_sha256 == BundleRecord.sha256)
        .group_by(BundleRecord.asset_id, BundleRecord.version))
    for asset, version, n in assigned:
        rows[(asset, version)]["assigned"] = int(n)
    # The active versions live in each status row's JSON: counted here (see the module docstring on scale).
    active: Counter[tuple[str, str]] = Counter()
    for installed in session.scalars(select(DeviceStatus.installed).execution_options(yield_per=1000)):
        for entry in installed_assets(installed):
            if entry["active_version"] is not None:
                active[(entry["asset_id"], entry["active_version"])] += 1
    for key, n in active.items():
        rows[key]["active"] = n
    health = session.execute(
        select(DeviceHealth.asset_id, DeviceHealth.version, func.count(), func.sum(DeviceHealth.rows),
               func.sum(DeviceHealth.alerts), func.sum(DeviceHealth.errors), func.sum(DeviceHealth.crashes),
               func.avg(DeviceHealth.score_q95), func.max(DeviceHealth.score_q99))
        .group_by(DeviceHealth.asset_id, DeviceHealth.version))
    for asset, version, n, total, alerts, errors, crashes, q95, q99 in health:
        rows[(asset, version)].update(health_devices=int(n), rows=int(total or 0), alerts=int(alerts or 0),
                                      errors=int(errors or 0), crashes=int(crashes or 0),
                                      score_q95=None if q95 is None else float(q95),
                                      score_q99=None if q99 is None else float(q99))
    releases = {(a, v): r for a, v, r in session.execute(
        select(BundleRecord.asset_id, BundleRecord.version, BundleRecord.release))}
    versions = [VersionRow(asset_id=a, version=v, release=releases.get((a, v)), **fields)
                for (a, v), fields in rows.items()]
    versions.sort(key=lambda r: (r.asset_id, -(r.release if r.release is not None else -1), r.version))

    active_rollouts = list(session.scalars(select(Rollout).where(Rollout.state.in_(ACTIVE_ROLLOUT_STATES))
                                           .order_by(Rollout.id.desc())))
    recent = list(session.scalars(select(Rollout).where(Rollout.state.not_in(ACTIVE_ROLLOUT_STATES))
                                  .order_by(Rollout.id.desc()).limit(5)))
    return {"devices": devices, "reporting": reporting, "online": online, "groups": [(g, int(n)) for g, n in groups],
            "versions": versions, "rollouts": active_rollouts, "recent_rollouts": recent,
            "status_counts": _rollout_status_counts(session, [r.id for r in active_rollouts + recent]),
            "versions_by_sha": _versions_by_sha(session, active_rollouts + recent)}


def _rollout_status_counts(session: Session, rollout_ids: Sequence[int]) -> dict[int, Counter[str]]:
    counts: dict[int, Counter[str]] = defaultdict(Counter)
    if rollout_ids:
        query = (select(RolloutDevice.rollout_id, RolloutDevice.status, func.count())
                 .where(RolloutDevice.rollout_id.in_(rollout_ids))
                 .group_by(RolloutDevice.rollout_id, RolloutDevice.status))
        for rollout_id, status, n in session.execute(query):
            counts[rollout_id][status] = int(n)
    return counts


def _versions_by_sha(session: Session, rollouts: Iterable[Rollout]) -> dict[str, str]:
    shas = {sha for r in rollouts for sha in (r.bundle_sha256, r.bundle_b_sha256) if sha}
    if not shas:
        return {}
    return dict(session.execute(select(BundleRecord.sha256, BundleRecord.version)
                                .where(BundleRecord.sha256.in_(shas))).tuples().all())


def read_devices(session: Session, *, after: str | None, limit: int, tag: str | None = None,
                 group: str | None = None, asset: str | None = None) -> list[dict[str, Any]]:
    """A page of devices in id order (after ``after``) with their status row, filtered like ``GET /v1/devices``."""
    query = (select(Device, DeviceStatus).outerjoin(DeviceStatus, DeviceStatus.device_id == Device.id)
             .order_by(Device.id).limit(limit))
    if tag:
        query = query.where(Device.id.in_(select(DeviceTag.device_id).where(DeviceTag.tag == tag)))
    if group:
        query = query.where(Device.id.in_(select(GroupMember.device_id).where(GroupMember.group_name == group)))
    if asset:
        query = query.where(Device.id.in_(select(DeviceAssetRow.device_id).where(DeviceAssetRow.asset_id == asset)))
    if after:
        query = query.where(Device.id > after)
    return [{"device": device, "status": status, "tags": [t.tag for t in device.tags],
             "groups": [m.group_name for m in device.memberships]}
            for device, status in session.execute(query).all()]


def read_device(session: Session, device_id: str) -> dict[str, Any] | None:
    """Everything the device page shows, or None for an unknown device."""
    device = session.get(Device, device_id)
    if device is None:
        return None
    assignments = session.execute(
        select(DeviceAssignment, BundleRecord).join(BundleRecord, BundleRecord.sha256 == DeviceAssignment.bundle_sha256)
        .where(DeviceAssignment.device_id == device_id).order_by(DeviceAssignment.asset_id)).all()
    health = list(session.scalars(select(DeviceHealth).where(DeviceHealth.device_id == device_id)
                                  .order_by(DeviceHealth.asset_id, DeviceHealth.reported_at.desc())))
    rollouts = session.execute(
        select(RolloutDevice, Rollout).join(Rollout, Rollout.id == RolloutDevice.rollout_id)
        .where(RolloutDevice.device_id == device_id).order_by(Rollout.id.desc()).limit(PAGE)).all()
    events = list(session.scalars(select(DeviceEvent).where(DeviceEvent.device_id == device_id)
                                  .order_by(DeviceEvent.id.desc()).limit(HISTORY)))
    audit = list(session.scalars(select(AuditEntry).where(AuditEntry.target == f"device:{device_id}")
                                 .order_by(AuditEntry.id.desc()).limit(HISTORY)))
    return {"device": device, "tags": [t.tag for t in device.tags],
            "groups": [m.group_name for m in device.memberships], "assets": [a.asset_id for a in device.assets],
            "bases": [b.base_sha256 for b in device.bases], "status": session.get(DeviceStatus, device_id),
            "assignments": assignments, "health": health, "rollouts": rollouts, "events": events, "audit": audit}


def read_rollouts(session: Session, *, before: int | None, limit: int) -> dict[str, Any]:
    """A page of rollouts, newest first (ids below ``before``), with device counts per status."""
    query = select(Rollout).order_by(Rollout.id.desc()).limit(limit)
    if before is not None:
        query = query.where(Rollout.id < before)
    rollouts = list(session.scalars(query))
    return {"rollouts": rollouts, "status_counts": _rollout_status_counts(session, [r.id for r in rollouts]),
            "versions_by_sha": _versions_by_sha(session, rollouts)}


def _arm_health(session: Session, rollout: Rollout, arm: str, version: str | None) -> dict[str, Any]:
    """The arm's devices' health on the rollout's version for that arm, and on what they ran before (baseline)."""
    members = select(RolloutDevice.device_id).where(RolloutDevice.rollout_id == rollout.id, RolloutDevice.arm == arm)
    devices = _count(session, select(func.count()).select_from(members.subquery()))
    row = session.execute(
        select(func.count(), func.sum(DeviceHealth.rows), func.sum(DeviceHealth.alerts), func.sum(DeviceHealth.errors),
               func.sum(DeviceHealth.crashes), func.avg(DeviceHealth.score_q50), func.avg(DeviceHealth.score_q95),
               func.max(DeviceHealth.score_q99))
        .where(DeviceHealth.device_id.in_(members), DeviceHealth.asset_id == rollout.asset_id,
               DeviceHealth.version == (version or ""))).one()
    reporting, rows, alerts, errors, crashes, q50, q95, q99 = row
    base_rows = base_alerts = 0
    for baseline in session.scalars(select(RolloutDevice.baseline).where(RolloutDevice.rollout_id == rollout.id,
                                                                         RolloutDevice.arm == arm)):
        # The engine's baseline is the device's health row on its previous version; anything else is skipped.
        if isinstance(baseline, dict):
            base_rows += _int(baseline.get("rows"))
            base_alerts += _int(baseline.get("alerts"))
    return {"arm": arm, "version": version, "devices": devices, "reporting": int(reporting or 0),
            "rows": int(rows or 0), "alerts": int(alerts or 0), "errors": int(errors or 0),
            "crashes": int(crashes or 0), "score_q50": q50, "score_q95": q95, "score_q99": q99,
            "baseline_rows": base_rows, "baseline_alerts": base_alerts}


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def read_rollout(session: Session, rollout_id: int) -> dict[str, Any] | None:
    """Everything the rollout page shows, or None for an unknown rollout."""
    rollout = session.get(Rollout, rollout_id)
    if rollout is None:
        return None
    bundle_a = session.get(BundleRecord, rollout.bundle_sha256)
    bundle_b = session.get(BundleRecord, rollout.bundle_b_sha256) if rollout.bundle_b_sha256 else None
    waves = list(session.scalars(select(RolloutWave).where(RolloutWave.rollout_id == rollout_id)
                                 .order_by(RolloutWave.wave)))
    counts: dict[int, Counter[str]] = defaultdict(Counter)
    for wave, status, n in session.execute(select(RolloutDevice.wave, RolloutDevice.status, func.count())
                                           .where(RolloutDevice.rollout_id == rollout_id)
                                           .group_by(RolloutDevice.wave, RolloutDevice.status)):
        counts[wave][status] = int(n)
    # Each wave's devices, at most WAVE_DEVICES_SHOWN of them (problems first: they are what an operator looks for).
    order = {"failed": 0, "unhealthy": 1, "rolled_back": 2, "assigned": 3, "installed": 4, "pending": 5}
    listed: dict[int, list[RolloutDevice]] = defaultdict(list)
    for wave in sorted(set(counts) | {w.wave for w in waves}):
        members = list(session.scalars(select(RolloutDevice).where(RolloutDevice.rollout_id == rollout_id,
                                                                   RolloutDevice.wave == wave)
                                       .order_by(RolloutDevice.device_id)))
        members.sort(key=lambda d: order.get(d.status, 9))
        listed[wave] = members[:WAVE_DEVICES_SHOWN]
    arms = [_arm_health(session, rollout, "a", bundle_a.version if bundle_a else None)]
    if rollout.bundle_b_sha256:
        arms.append(_arm_health(session, rollout, "b", bundle_b.version if bundle_b else None))
    audit = list(session.scalars(select(AuditEntry).where(AuditEntry.target == f"rollout:{rollout_id}")
                                 .order_by(AuditEntry.id.desc()).limit(HISTORY)))
    return {"rollout": rollout, "bundle_a": bundle_a, "bundle_b": bundle_b, "waves": waves, "counts": counts,
            "devices": listed, "arms": arms, "audit": audit}


def read_audit(session: Session, *, before: int | None, limit: int, target: str | None = None,
               actor: str | None = None, action: str | None = None) -> list[AuditEntry]:
    """A page of the audit log, newest first (ids below ``before``), filtered by exact target, actor, action."""
    query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
    if before is not None:
        query = query.where(AuditEntry.id < before)
    for column, value in ((AuditEntry.target, target), (AuditEntry.actor, actor), (AuditEntry.action, action)):
        if value:
            query = query.where(column == value)
    return list(session.scalars(query))


# ================================================================================================ rendering
def h(value: Any) -> str:
    """``value`` as HTML text, escaped (quotes too: it may land in an attribute); None reads as a dash.

    Example:
        >>> h("<script>alert('x')</script>")
        '&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;'
    """
    return "–" if value is None else html.escape(str(value), quote=True)


def _link(path: str, text: Any, **params: Any) -> str:
    query = urlencode({k: v for k, v in params.items() if v not in (None, "")})
    return f'<a href="{h(path + ("?" + query if query else ""))}">{h(text)}</a>'


def _device_link(device_id: str) -> str:
    return _link(f"{PREFIX}/devices/{quote(device_id, safe='')}", device_id)


def _rollout_link(rollout_id: int | None, text: Any = None) -> str:
    if rollout_id is None:
        return "–"
    return _link(f"{PREFIX}/rollouts/{rollout_id}", text if text is not None else f"#{rollout_id}")


def _target_link(target: str) -> str:
    """An audit target, linked to its console page when it has one."""
    kind, _, name = target.partition(":")
    if kind == "device" and name:
        return _device_link(name)
    if kind == "rollout" and _INT.match(name):
        return _rollout_link(int(name), target)
    return h(target)


def _when(moment: datetime | None, reference: datetime) -> str:
    if moment is None:
        return "–"
    moment = as_utc(moment)
    seconds = (reference - moment).total_seconds()
    if seconds < 0:
        ago = "just now"
    elif seconds < 90:
        ago = f"{seconds:.0f} s ago"
    elif seconds < 5400:
        ago = f"{seconds / 60:.0f} min ago"
    elif seconds < 2 * 86400:
        ago = f"{seconds / 3600:.1f} h ago"
    else:
        ago = f"{seconds / 86400:.0f} days ago"
    stamp = moment.strftime("%Y-%m-%d %H:%M:%SZ")
    return f'<time datetime="{h(moment.isoformat())}" title="{h(stamp)}">{h(stamp)} <small>({h(ago)})</small></time>'


def _rate(alerts: int, rows: int) -> str:
    return "–" if not rows else f"{100.0 * alerts / rows:.2f} %"


def _num(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _badge(text: str, kind: str | None = None) -> str:
    return f'<span class="badge {h(kind or text)}">{h(text)}</span>'


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], empty: str, *, css: str = "") -> str:
    """A table of already-rendered cells (each built with h() or a helper that escapes)."""
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    if not body:
        return f'<p class="empty">{h(empty)}</p>'
    head = "".join(f"<th>{h(name)}</th>" for name in headers)
    return f'<table class="{h(css)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _stat(label: str, value: Any, note: str = "") -> str:
    return (f'<div class="stat"><div class="value">{h(value)}</div><div class="label">{h(label)}</div>'
            f'{f"<div class=note>{h(note)}</div>" if note else ""}</div>')


def _tags(values: Iterable[str]) -> str:
    return " ".join(f'<span class="tag">{h(v)}</span>' for v in values) or "–"


def _statuses(counts: Counter[str]) -> str:
    return " ".join(_badge(f"{status} {n}", status) for status, n in sorted(counts.items())) or "–"


NAV = (("overview", PREFIX, "Overview"), ("devices", f"{PREFIX}/devices", "Devices"),
       ("rollouts", f"{PREFIX}/rollouts", "Rollouts"), ("audit", f"{PREFIX}/audit", "Audit log"))


def _page(title: str, main: str, *, who: Operator | None, active: str = "", refresh: bool = True) -> str:
    nav = "".join(f'<a href="{h(path)}" class="{"active" if key == active else ""}">{h(text)}</a>'
                  for key, path, text in NAV) if who else ""
    account = (f'<form method="post" action="{PREFIX}/logout" class="logout"><span>{h(who.name)}</span>'
               f'<label><input type="checkbox" id="autorefresh" checked> auto-refresh</label>'
               f'<span id="refreshed"></span><button type="submit">Sign out</button></form>') if who else ""
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{h(title)} · edgepeft fleet</title><link rel="icon" href="data:,">'
            f'<link rel="stylesheet" href="{PREFIX}/static/console.css"></head>'
            f'<body data-refresh="{REFRESH_SECONDS if (refresh and who) else 0}">'
            f'<header><a class="brand" href="{PREFIX}">edgepeft fleet</a><nav>{nav}</nav>{account}</header>'
            f'<main><h1>{h(title)}</h1>{main}</main>'
            f'<script src="{PREFIX}/static/console.js"></script></body></html>')


def _html(text: str, status: int = 200, headers: dict[str, str] | None = None) -> HTMLResponse:
    return HTMLResponse(text, status_code=status, headers={**SECURITY_HEADERS, **(headers or {})})


def _problem(status: int, message: str, who: Operator | None) -> HTMLResponse:
    titles = {400: "Bad request", 403: "Refused", 404: "Not found"}
    main = f'<p class="error">{h(message)}</p><p><a href="{PREFIX}">Back to the overview</a></p>'
    return _html(_page(titles.get(status, "Error"), main, who=who, refresh=False), status)


def render_overview(data: dict[str, Any], moment: datetime) -> str:
    stats = "".join([
        _stat("devices enrolled", data["devices"]),
        _stat("online", data["online"], f"seen in the last {ONLINE_WITHIN.seconds // 60} min"),
        _stat("reporting", data["reporting"], "sent at least one report"),
        _stat("never seen", data["devices"] - data["reporting"]),
        _stat("rollouts in progress", len(data["rollouts"])),
    ])
    versions = _table(
        ["Asset", "Version", "Release", "Assigned", "Active", "Reporting health", "Rows", "Alerts", "Alert rate",
         "Score q95 (mean)", "Score q99 (max)", "Errors", "Crashes"],
        ([h(v.asset_id), h(v.version), h(v.release), h(v.assigned), h(v.active), h(v.health_devices), h(v.rows),
          h(v.alerts), _rate(v.alerts, v.rows), _num(v.score_q95), _num(v.score_q99), h(v.errors), h(v.crashes)]
         for v in data["versions"]),
        "No versions assigned or reported yet.", css="versions")
    groups = _table(["Group", "Devices"], ([_link(f"{PREFIX}/devices", g, group=g), h(n)] for g, n in data["groups"]),
                    "No groups yet.")
    return (f'<p class="lead">{h(data["devices"])} devices enrolled, {h(data["online"])} online.</p>'
            f'<section class="stats">{stats}</section>'
            f'<h2>Rollouts in progress</h2>{_rollout_table(data["rollouts"], data, moment, "No rollout running.")}'
            f'<h2>Versions per asset</h2><p class="hint">Assigned: devices the rollouts point at it; active: devices '
            f'whose agent reports it running. Health sums what those devices report for the version; the alert rate '
            f'is alerts per scored row.</p>{versions}'
            f'<h2>Recently finished rollouts</h2>'
            f'{_rollout_table(data["recent_rollouts"], data, moment, "None yet.")}'
            f'<h2>Groups</h2>{groups}')


def _rollout_table(rollouts: Sequence[Rollout], data: dict[str, Any], moment: datetime, empty: str) -> str:
    by_sha = data["versions_by_sha"]

    def version(r: Rollout) -> str:
        a = by_sha.get(r.bundle_sha256, r.bundle_sha256[:12])
        if not r.bundle_b_sha256:
            return h(a)
        return f"A {h(a)} / B {h(by_sha.get(r.bundle_b_sha256, r.bundle_b_sha256[:12]))}"

    return _table(["Rollout", "Name", "Asset", "Version", "Group", "State", "Wave", "Devices", "Updated"],
                  ([_rollout_link(r.id), h(r.name), h(r.asset_id), version(r), h(r.group_name), _badge(r.state),
                    h(_wave_label(r)),
                    _statuses(data["status_counts"].get(r.id, Counter())), _when(r.updated_at, moment)]
                   for r in rollouts), empty, css="rollouts")


def render_devices(rows: list[dict[str, Any]], moment: datetime, filters: dict[str, str | None]) -> str:
    def online(status: DeviceStatus | None) -> str:
        if status is None:
            return _badge("never seen", "pending")
        fresh = as_utc(status.last_seen_at) >= moment - ONLINE_WITHIN
        return f'{_badge("online" if fresh else "offline")} {_when(status.last_seen_at, moment)}'

    def active(status: DeviceStatus | None) -> str:
        entries = installed_assets(status.installed) if status else []
        return "<br>".join(f"{h(e['asset_id'])}: {h(e['active_version'])}" for e in entries) or "–"

    table = _table(["Device", "Seen", "Active versions", "Tags", "Groups", "Last error"],
                   ([_device_link(r["device"].id), online(r["status"]), active(r["status"]), _tags(r["tags"]),
                     _tags(r["groups"]), h(r["status"].last_error if r["status"] and r["status"].last_error else None)]
                    for r in rows), "No devices match.")
    form = ('<form method="get" class="filters">'
            + "".join(f'<label>{h(name)} <input name="{h(name)}" value="{h(filters.get(name) or "")}"></label>'
                      for name in ("tag", "group", "asset"))
            + '<button type="submit">Filter</button></form>')
    more = (_link(f"{PREFIX}/devices", "Next page →", after=rows[-1]["device"].id, **filters)
            if len(rows) == PAGE else "")
    return f'{form}{table}<p class="pager">{more}</p>'


def render_device(data: dict[str, Any], moment: datetime) -> str:
    device: Device = data["device"]
    status: DeviceStatus | None = data["status"]
    record = _table(["Field", "Value"], [
        ["Enrolled", f"{_when(device.enrolled_at, moment)} by {h(device.enrolled_by)}"],
        ["Updated", _when(device.updated_at, moment)],
        ["Tags", _tags(data["tags"])], ["Groups", _tags(data["groups"])], ["Assets", _tags(data["assets"])],
        ["Bases", _tags(sha[:16] + "…" for sha in data["bases"])],
        ["Last seen", _when(status.last_seen_at, moment) if status else "never (no report yet)"],
        ["Reports", h(status.reports if status else 0)],
        ["Last error", h(status.last_error if status and status.last_error else None)],
    ], "", css="record")
    installed = _table(["Asset", "Active version", "Active release", "Installed versions"],
                       ([h(e["asset_id"]), h(e["active_version"]), h(e["active_release"]), _tags(e["versions"])]
                        for e in installed_assets(status.installed if status else None)),
                       "The device has not reported what it runs.")
    assignments = _table(["Asset", "Version", "Release", "Bundle", "Rollout", "Assigned"],
                         ([h(a.asset_id), h(b.version), h(b.release), f"<code>{h(b.sha256[:16])}…</code>",
                           _rollout_link(a.rollout_id), _when(a.assigned_at, moment)]
                          for a, b in data["assignments"]), "Nothing assigned: the director lists no target for it.")
    health = _table(["Asset", "Version", "Rows", "Alerts", "Alert rate", "q50", "q95", "q99", "Errors", "Crashes",
                     "Since", "Reported"],
                    ([h(x.asset_id), h(x.version), h(x.rows), h(x.alerts), _rate(x.alerts, x.rows), _num(x.score_q50),
                      _num(x.score_q95), _num(x.score_q99), h(x.errors), h(x.crashes), _when(x.since, moment),
                      _when(x.reported_at, moment)] for x in data["health"]), "No health reported yet.")
    rollouts = _table(["Rollout", "Name", "Wave", "Arm", "Status", "Previous version", "Detail", "Updated"],
                      ([_rollout_link(r.id), h(r.name), h(d.wave), h(d.arm), _badge(d.status),
                        h(d.previous_version), h(d.detail or None), _when(d.updated_at, moment)]
                       for d, r in data["rollouts"]), "Not part of any rollout.")
    # The device's own events and the operators' changes to it, as one timeline (newest first).
    timeline: list[tuple[datetime, int, list[str]]] = []
    for e in data["events"]:
        what = " ".join(part for part in (e.asset_id, e.version) if part)
        timeline.append((as_utc(e.at), 0, [_when(e.at, moment), h("device event"),
                                           _badge(e.kind), h(what or None),
                                           (_rollout_link(e.rollout_id) + " " if e.rollout_id else "") + h(e.detail)]))
    for a in data["audit"]:
        timeline.append((as_utc(a.at), 1, [_when(a.at, moment), h(a.actor), _badge(a.action, "audit"),
                                           h(a.reason), _details(a.details)]))
    timeline.sort(key=lambda item: item[0], reverse=True)
    history = _table(["When", "Source", "What", "Version / reason", "Detail"], (row for _, _, row in timeline),
                     "No history yet.", css="history")
    note = (f'<p class="hint">The latest {HISTORY} device events and {HISTORY} audit entries; the whole audit trail '
            f'is under {_link(f"{PREFIX}/audit", "the audit log", target=f"device:{device.id}")}.</p>')
    return (f'<section class="columns"><div><h2>Record</h2>{record}</div>'
            f'<div><h2>Installed (as reported)</h2>{installed}<h2>Assigned (what the director lists)</h2>'
            f'{assignments}</div></section>'
            f'<h2>Health per version</h2>{health}<h2>Rollouts</h2>{rollouts}<h2>History</h2>{note}{history}')


def _details(details: Any, shown: int = 60) -> str:
    """A JSON value as a cell: short ones inline, long ones folded (``<details>`` needs no script)."""
    text = json.dumps(details, sort_keys=True, default=str)
    if len(text) <= shown:
        return f"<code>{h(text)}</code>"
    full = json.dumps(details, sort_keys=True, default=str, indent=1)
    return f"<details><summary><code>{h(text[:shown])}…</code></summary><pre>{h(full[:4000])}</pre></details>"


def _wave_label(r: Rollout) -> str:
    """Where a rollout stands: the canary, or wave n of the waves after it."""
    after = max(r.waves - 1, 0)
    if r.current_wave == 0:
        return "canary (the only wave)" if not after else f"canary (then {after} wave{'s' if after != 1 else ''})"
    return f"wave {r.current_wave} of {after}"


def render_rollouts(data: dict[str, Any], moment: datetime) -> str:
    rollouts = data["rollouts"]
    more = (_link(f"{PREFIX}/rollouts", "Older →", before=rollouts[-1].id) if len(rollouts) == PAGE else "")
    return f'{_rollout_table(rollouts, data, moment, "No rollouts yet.")}<p class="pager">{more}</p>'


def render_rollout(data: dict[str, Any], moment: datetime) -> str:
    r: Rollout = data["rollout"]
    a, b = data["bundle_a"], data["bundle_b"]

    def bundle(record: BundleRecord | None, sha: str) -> str:
        return (f"{h(record.version)} (release {h(record.release)}, <code>{h(sha[:16])}…</code>)" if record
                else f"<code>{h(sha[:16])}…</code>")

    facts = [
        ("State", _badge(r.state)), ("Wave", h(_wave_label(r))), ("Asset", h(r.asset_id)),
        ("Group", _link(f"{PREFIX}/devices", r.group_name, group=r.group_name)),
        ("Bundle" if not r.bundle_b_sha256 else "Arm A", bundle(a, r.bundle_sha256)),
        *([("Arm B", bundle(b, r.bundle_b_sha256))] if r.bundle_b_sha256 else []),
        ("Created", f"{_when(r.created_at, moment)} by {h(r.created_by)}"), ("Updated", _when(r.updated_at, moment)),
        ("Strategy", _details(r.strategy, 40)), ("Gates", _details(r.gates, 40)),
    ]
    summary = ('<dl class="facts">' + "".join(f"<div><dt>{h(k)}</dt><dd>{v}</dd></div>" for k, v in facts)
               + "</dl>" + (f'<p class="outcome {h(r.state)}">{h(r.outcome)}</p>' if r.outcome else ""))
    arms = _table(["Arm", "Version", "Devices", "Reporting", "Rows", "Alerts", "Alert rate", "Baseline alert rate",
                   "q50 (mean)", "q95 (mean)", "q99 (max)", "Errors", "Crashes"],
                  ([h(x["arm"].upper()), h(x["version"]), h(x["devices"]), h(x["reporting"]), h(x["rows"]),
                    h(x["alerts"]), _rate(x["alerts"], x["rows"]), _rate(x["baseline_alerts"], x["baseline_rows"]),
                    _num(x["score_q50"]), _num(x["score_q95"]), _num(x["score_q99"]), h(x["errors"]), h(x["crashes"])]
                   for x in data["arms"]), "No devices yet.", css="arms")
    wave_rows = {w.wave: w for w in data["waves"]}
    sections = []
    for number in sorted(set(wave_rows) | set(data["counts"])):
        wave = wave_rows.get(number)
        counts = data["counts"].get(number, Counter())
        size = wave.size if wave else sum(counts.values())
        healthy = counts.get("healthy", 0)
        state = ("healthy" if wave and wave.healthy_at else "open" if wave and wave.opened_at else "pending")
        if number == r.current_wave and r.state in ("halted", "cancelled", "rolled_back"):
            state = r.state
        elif state == "pending" and r.state in ("halted", "cancelled", "rolled_back"):
            state = "cancelled"  # the rollout stopped before this wave opened: it never will
        members = data["devices"].get(number, [])
        devices = _table(["Device", "Arm", "Status", "Previous version", "Detail", "Updated"],
                         ([_device_link(d.device_id), h(d.arm.upper()), _badge(d.status), h(d.previous_version),
                           h(d.detail or None), _when(d.updated_at, moment)] for d in members),
                         "No devices in this wave.", css="wave-devices")
        shown = len(members)
        hidden = f'<p class="hint">{h(size - shown)} more not shown.</p>' if size > shown else ""
        title = "Canary (wave 0)" if number == 0 else f"Wave {number}"
        sections.append(
            f'<section class="wave" data-wave="{number}"><h3>{h(title)} {_badge(state)}</h3>'
            f'<p><progress max="{max(size, 1)}" value="{healthy}"></progress> {h(healthy)} of {h(size)} healthy · '
            f'opened {_when(wave.opened_at if wave else None, moment)} · healthy '
            f'{_when(wave.healthy_at if wave else None, moment)}</p><p>{_statuses(counts)}</p>{devices}{hidden}'
            f'</section>')
    audit = _table(["When", "Who", "Action", "Reason", "Details"],
                   ([_when(e.at, moment), h(e.actor), _badge(e.action, "audit"), h(e.reason),
                     _details(e.details)] for e in data["audit"]), "No audit entries yet.")
    compare = ("Arms: each arm's health on its version against the same devices' previous version (baseline)"
               if r.bundle_b_sha256 else "Health on the new version against the same devices' previous version "
               "(baseline)")
    return (f'{summary}<h2>{h(compare)}</h2>{arms}'
            f'<h2>Waves</h2>{"".join(sections) or "<p class=empty>No waves yet.</p>"}'
            f'<h2>Audit</h2>{audit}')


def render_audit(entries: list[AuditEntry], moment: datetime, filters: dict[str, str | None]) -> str:
    form = ('<form method="get" class="filters">'
            + "".join(f'<label>{h(name)} <input name="{h(name)}" value="{h(filters.get(name) or "")}"></label>'
                      for name in ("target", "actor", "action"))
            + '<button type="submit">Filter</button></form>')
    table = _table(["#", "When", "Actor", "Action", "Target", "Reason", "Details"],
                   ([h(e.id), _when(e.at, moment), h(e.actor), _badge(e.action, "audit"), _target_link(e.target),
                     h(e.reason), _details(e.details)] for e in entries),
                   "No entries match.", css="audit")
    pager = [_link(f"{PREFIX}/audit", "Newest", **filters)]
    if len(entries) == PAGE:
        pager.append(_link(f"{PREFIX}/audit", "Older →", before=entries[-1].id, **filters))
    return f'{form}{table}<p class="pager">{" · ".join(pager)}</p>'


def render_login(error: str, next_path: str) -> str:
    message = f'<p class="error" role="alert">{h(error)}</p>' if error else ""
    return (f'{message}<form method="post" action="{PREFIX}/login" class="login">'
            f'<input type="hidden" name="next" value="{h(next_path)}">'
            f'<label>Operator token <input type="password" name="token" autocomplete="current-password" '
            f'placeholder="efo_…" required autofocus></label><button type="submit">Sign in</button></form>'
            f'<p class="hint">Any operator token works (every scope includes read); create one with '
            f'<code>edgepeft fleet token --db URL --scopes read --name you</code>. The console only reads.</p>')


# ================================================================================================ routes
def _safe_next(value: str | None) -> str:
    """Where to go after signing in: a console path on this server, never another site (``//evil``, ``/\\evil``)."""
    if not value or not value.isprintable():
        return PREFIX
    parts = urlsplit(value)
    if parts.scheme or parts.netloc or not parts.path.startswith(PREFIX) or "\\" in value or value.startswith("//"):
        return PREFIX
    return value


def _same_origin(request: Request) -> bool:
    """A browser sends Origin on a form POST; one naming another host is a cross-site request (refused)."""
    origin = request.headers.get("origin")
    if origin is None:
        return True  # not a browser's cross-site form (curl, an old browser on the same page): nothing to forge
    return urlsplit(origin).netloc == request.headers.get("host", "")


def _param(request: Request, name: str, *, integer: bool = False, max_chars: int = 256) -> Any:
    value = request.query_params.get(name)
    if value is None or value == "":
        return None
    if len(value) > max_chars or not value.isprintable():
        raise BadInput(400, f"{name} must be at most {max_chars} printable characters")
    if integer:
        if not _INT.match(value):
            raise BadInput(400, f"{name} must be a whole number, not {value[:40]!r}")
        return int(value)
    return value


def mount(app: FastAPI, ctx: ApiContext) -> None:
    """Add the console's pages (see the module docstring) to ``app``; they stay out of the OpenAPI schema."""
    registry = ctx.registry

    def signed_in(request: Request) -> Operator | None:
        token = request.cookies.get(COOKIE)
        if not token:
            return None
        try:
            who = registry.authenticate_operator(token)
            who.require("read")
        except (Unauthenticated, Forbidden):
            return None
        return who

    def to_login(request: Request) -> Response:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        response = RedirectResponse(f"{PREFIX}/login?{urlencode({'next': target})}", status_code=303)
        response.delete_cookie(COOKIE, path=PREFIX)  # a revoked token's cookie goes with it
        return response

    def page(route: str, active: str) -> Callable[[Callable[..., tuple[str, str]]], Any]:
        """Register a signed-in GET page: ``build(request, session, moment, *path)`` returns (title, main HTML)."""

        def register(build: Callable[..., tuple[str, str]]) -> Any:
            @app.get(route, include_in_schema=False, response_class=HTMLResponse, name=f"console.{build.__name__}")
            def view(request: Request) -> Response:
                who = signed_in(request)
                if who is None:
                    return to_login(request)
                try:
                    with registry.db.read() as session:
                        title, main = build(request, session, now(), **request.path_params)
                except BadInput as exc:
                    return _problem(exc.status, str(exc), who)
                return _html(_page(title, main, who=who, active=active))

            return view

        return register

    @app.get(PREFIX + "/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        if name not in STATIC:
            return Response("not found", status_code=404, media_type="text/plain")
        media, text = STATIC[name]
        return Response(text, media_type=media, headers={"Cache-Control": "max-age=300",
                                                         "X-Content-Type-Options": "nosniff"})

    @app.get(PREFIX + "/login", include_in_schema=False, response_class=HTMLResponse)
    def login_form(request: Request) -> Response:
        next_path = _safe_next(request.query_params.get("next"))
        if signed_in(request) is not None:
            return RedirectResponse(next_path, status_code=303)
        return _html(_page("Sign in", render_login("", next_path), who=None))

    @app.post(PREFIX + "/login", include_in_schema=False, response_class=HTMLResponse)
    async def login(request: Request) -> Response:
        if not _same_origin(request):
            return _problem(403, "sign-in refused: the form was posted from another site", None)
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
            return _problem(400, "send the sign-in form (application/x-www-form-urlencoded)", None)
        # python-multipart is not a dependency: a URL-encoded form is a query string, parsed by the stdlib.
        form = parse_qs((await request.body()).decode("utf-8", "replace"), max_num_fields=10)
        token = (form.get("token") or [""])[0].strip()
        next_path = _safe_next((form.get("next") or [None])[0])
        try:
            who = registry.authenticate_operator(token)
            who.require("read")
        except (Unauthenticated, Forbidden) as exc:
            ctx.metrics.count("auth_failures")
            return _html(_page("Sign in", render_login(str(exc) if token else "enter an operator token (efo_...)",
                                                       next_path), who=None), 401)
        response = RedirectResponse(next_path, status_code=303)
        response.set_cookie(COOKIE, token, max_age=SESSION_SECONDS, path=PREFIX, httponly=True, samesite="strict",
                            secure=request.url.scheme == "https")
        return response

    @app.post(PREFIX + "/logout", include_in_schema=False)
    def logout(request: Request) -> Response:
        if not _same_origin(request):
            return _problem(403, "sign-out refused: the form was posted from another site", None)
        response = RedirectResponse(f"{PREFIX}/login", status_code=303)
        response.delete_cookie(COOKIE, path=PREFIX)
        return response

    @page(PREFIX, "overview")
    def overview(request: Request, session: Session, moment: datetime) -> tuple[str, str]:
        return "Fleet overview", render_overview(read_overview(session, moment), moment)

    @page(PREFIX + "/devices", "devices")
    def devices(request: Request, session: Session, moment: datetime) -> tuple[str, str]:
        filters = {name: _param(request, name, max_chars=128) for name in ("tag", "group", "asset")}
        rows = read_devices(session, after=_param(request, "after", max_chars=128), limit=PAGE, **filters)
        return "Devices", render_devices(rows, moment, filters)

    @page(PREFIX + "/devices/{device_id}", "devices")
    def device(request: Request, session: Session, moment: datetime, device_id: str) -> tuple[str, str]:
        data = read_device(session, device_id)
        if data is None:
            raise BadInput(404, f"no device {device_id!r} in the registry; see the device list")
        return f"Device {device_id}", render_device(data, moment)

    @page(PREFIX + "/rollouts", "rollouts")
    def rollouts(request: Request, session: Session, moment: datetime) -> tuple[str, str]:
        data = read_rollouts(session, before=_param(request, "before", integer=True), limit=PAGE)
        return "Rollouts", render_rollouts(data, moment)

    @page(PREFIX + "/rollouts/{rollout_id}", "rollouts")
    def rollout(request: Request, session: Session, moment: datetime, rollout_id: str) -> tuple[str, str]:
        if not _INT.match(rollout_id):
            raise BadInput(404, f"no rollout {rollout_id!r}: rollout ids are whole numbers; see the rollout list")
        data = read_rollout(session, int(rollout_id))
        if data is None:
            raise BadInput(404, f"no rollout {rollout_id} in the registry; see the rollout list")
        return f"Rollout #{rollout_id}: {data['rollout'].name}", render_rollout(data, moment)

    @page(PREFIX + "/audit", "audit")
    def audit(request: Request, session: Session, moment: datetime) -> tuple[str, str]:
        filters = {name: _param(request, name) for name in ("target", "actor", "action")}
        entries = read_audit(session, before=_param(request, "before", integer=True), limit=PAGE, **filters)
        return "Audit log", render_audit(entries, moment, filters)

    @app.get(PREFIX + "/{rest:path}", include_in_schema=False, response_class=HTMLResponse)
    def unknown(request: Request, rest: str) -> Response:
        who = signed_in(request)
        if who is None:
            return to_login(request)
        if not rest:  # /console/ is the overview, as people type it
            return RedirectResponse(PREFIX, status_code=303)
        return _problem(404, f"no console page {request.url.path!r}; start from the overview", who)


# ================================================================================================ static files
CSS = """
:root { --fg: #1d2330; --muted: #5d6675; --line: #dfe3ea; --bg: #f6f7f9; --accent: #2456c7;
        --ok: #1d7a46; --warn: #a35f00; --bad: #b3261e; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--fg);
       background: var(--bg); }
header { display: flex; align-items: center; gap: 24px; padding: 10px 24px; background: #1d2330; color: #fff; }
header a { color: #d7def0; text-decoration: none; }
header a.brand { font-weight: 700; color: #fff; }
header nav { display: flex; gap: 16px; flex: 1; }
header nav a.active { color: #fff; border-bottom: 2px solid #8fb0ff; }
header form.logout { display: flex; align-items: center; gap: 12px; color: #d7def0; font-size: 13px; }
main { padding: 16px 24px 40px; max-width: 1400px; }
h1 { font-size: 22px; margin: 4px 0 12px; }
h2 { font-size: 16px; margin: 24px 0 8px; }
h3 { font-size: 14px; margin: 0 0 6px; }
a { color: var(--accent); }
table { border-collapse: collapse; width: 100%; background: #fff; border: 1px solid var(--line); }
th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { background: #eef1f6; font-weight: 600; font-size: 12px; color: var(--muted); }
table.record td:first-child { width: 130px; color: var(--muted); }
code, pre { font: 12px ui-monospace, SFMono-Regular, Menlo, monospace; overflow-wrap: anywhere; }
pre { white-space: pre-wrap; margin: 4px 0; max-width: 520px; }
summary { cursor: pointer; }
time { white-space: nowrap; }
time small { color: var(--muted); }
td time small { display: block; }
/* Fixed layouts where a column holds free text or JSON: long values wrap inside their column. */
table.audit, table.history { table-layout: fixed; }
table.audit td, table.history td { overflow-wrap: anywhere; }
table.audit th:nth-child(1) { width: 48px; }
table.audit th:nth-child(2), table.history th:nth-child(1) { width: 170px; }
table.audit th:nth-child(3), table.history th:nth-child(2) { width: 170px; }
table.audit th:nth-child(4), table.history th:nth-child(3) { width: 140px; }
table.audit th:nth-child(5) { width: 150px; }
table.audit th:nth-child(7), table.history th:nth-child(5) { width: 320px; }
dl.facts { display: grid; grid-template-columns: repeat(4, minmax(0, 1fr)); gap: 1px; background: var(--line);
           border: 1px solid var(--line); margin: 0; }
dl.facts div { background: #fff; padding: 6px 10px; }
dl.facts dt { font-size: 12px; color: var(--muted); }
dl.facts dd { margin: 2px 0 0; }
p.outcome { padding: 8px 12px; background: #fff; border: 1px solid var(--line); border-left: 4px solid var(--ok); }
p.outcome.halted, p.outcome.rolled_back, p.outcome.cancelled { border-left-color: var(--bad); }
.stats { display: flex; gap: 12px; flex-wrap: wrap; }
.stat { background: #fff; border: 1px solid var(--line); padding: 10px 16px; min-width: 150px; }
.stat .value { font-size: 24px; font-weight: 700; }
.stat .label { color: var(--muted); }
.stat .note { color: var(--muted); font-size: 12px; }
.lead { color: var(--muted); }
.hint, .empty { color: var(--muted); font-size: 13px; }
.error { color: var(--bad); font-weight: 600; }
.badge { display: inline-block; padding: 0 7px; border-radius: 9px; background: #e7eaf0; font-size: 12px;
         white-space: nowrap; }
.badge.running, .badge.open, .badge.assigned, .badge.installed, .badge.online { background: #dbe6ff; }
.badge.healthy, .badge.completed, .badge.activated { background: #d5f0df; color: var(--ok); }
.badge.paused, .badge.pending, .badge.offline { background: #f6ebd5; color: var(--warn); }
.badge.halted, .badge.unhealthy, .badge.failed, .badge.rolled_back, .badge.error, .badge.cancelled
  { background: #f8dcd9; color: var(--bad); }
.badge.audit { background: #ece5f7; }
.tag { display: inline-block; padding: 0 6px; border: 1px solid var(--line); border-radius: 4px; background: #fff;
       font-size: 12px; margin: 1px 0; }
.columns { display: grid; grid-template-columns: minmax(320px, 1fr) 2fr; gap: 24px; }
.wave { background: #fff; border: 1px solid var(--line); padding: 10px 12px; margin-bottom: 10px; }
.wave table { border: none; }
progress { width: 180px; vertical-align: middle; }
form.filters { display: flex; gap: 12px; margin-bottom: 10px; align-items: end; }
form.login { display: flex; flex-direction: column; gap: 10px; max-width: 420px; }
form.login input { width: 100%; padding: 6px; font: inherit; }
button { font: inherit; padding: 3px 12px; }
.pager { margin-top: 8px; }
"""

JS = """
// Auto-refresh: fetch this page again every few seconds and swap in its <main>; the server renders, the script
// only moves the result in (nothing is built from strings here, so there is nothing to escape).
(function () {
  "use strict";
  var seconds = parseInt(document.body.getAttribute("data-refresh") || "0", 10);
  var toggle = document.getElementById("autorefresh");
  var stamp = document.getElementById("refreshed");
  var key = "edgepeft.console.autorefresh";
  if (!seconds || !toggle) { return; }
  toggle.checked = window.localStorage.getItem(key) !== "off";
  toggle.addEventListener("change", function () {
    window.localStorage.setItem(key, toggle.checked ? "on" : "off");
  });
  async function refresh() {
    try {
      var response = await fetch(window.location.href, { credentials: "same-origin", cache: "no-store" });
      if (response.redirected) { window.location.reload(); return; }  // signed out or token revoked
      if (!response.ok) { stamp.textContent = "refresh failed (" + response.status + ")"; return; }
      var fresh = new DOMParser().parseFromString(await response.text(), "text/html").querySelector("main");
      var current = document.querySelector("main");
      if (fresh && current) { current.replaceWith(document.adoptNode(fresh)); }
      stamp.textContent = "updated " + new Date().toLocaleTimeString();
    } catch (error) {
      // The server is unreachable: keep the last page on screen; the next tick tries again.
      stamp.textContent = "server unreachable";
    }
  }
  // Swapping <main> under a person would close what they opened, clear what they type and drop what they select.
  function busy() {
    var main = document.querySelector("main");
    var focused = document.activeElement;
    return Boolean(main.querySelector("details[open]")) || (focused && focused !== document.body &&
      main.contains(focused) && focused.tagName === "INPUT") || String(window.getSelection()) !== "";
  }
  window.consoleRefresh = refresh;
  window.setInterval(function () {
    if (toggle.checked && !document.hidden && !busy()) { refresh(); }
  }, seconds * 1000);
})();
"""

STATIC = {"console.css": ("text/css; charset=utf-8", CSS), "console.js": ("text/javascript; charset=utf-8", JS)}

__all__ = ["VersionRow", "h", "installed_assets", "mount", "read_audit", "read_device", "read_devices",
           "read_overview", "read_rollout", "read_rollouts"]
