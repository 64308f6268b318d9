"""The agent's loop: ask the fleet what this device should run, make the runtime run it, report.

One cycle (:meth:`Agent.cycle`):
1. read the runtime's assets (``GET /v1/assets``): what is installed and active is the runtime's truth;
2. ask the update client for the assigned targets (TUF: director + image repository, verified);
3. per target: installed already -> activate it unless it is active (an automatic rollback reaches the device
   this way: the director lists the previous bundle again); not installed and its release is not newer than the
   asset's installed release -> refuse (a downgrade to a bundle this device never ran), error event; else
   download (verified by TUF) and install it through the runtime, which verifies the bundle again and commits
   atomically; an event either way;
4. report the runtime's state, each active version's health (``GET /v1/assets/{id}/stats``) and the pending
   events to the fleet (``POST /v1/device/self/report``); the answer suggests the poll interval.

Between cycles it sleeps the poll interval with +-20 % jitter (devices started together do not stay in step),
or after a failed cycle an exponential backoff with jitter, capped (5 minutes by default). Nothing is ever
half-installed: the update client keeps a download under a temporary name until it is complete and verified, and
the runtime's install is one atomic commit, so a kill at any moment leaves the previous adapter serving, and the
next start converges from the runtime's state (a change whose answer the kill cut off is noticed and reported).
Events wait in the agent's state file (:mod:`edgepeft.agent.state`) until the fleet accepts them.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx

from edgepeft.agent.runtime_api import RuntimeApi, RuntimeRefused, RuntimeUnavailable
from edgepeft.agent.state import AgentStateFile, utc_now
from edgepeft.core.errors import ConfigError

AGENT_NAME = "edgepeft-agent/0.1"
DEFAULT_POLL_S = 30.0
REPORT_PATH = "/v1/device/self/report"
# Events per report (the server's list limit); a longer backlog goes out over the next cycles, oldest first.
EVENTS_PER_REPORT = 100

logger = logging.getLogger("edgepeft.agent")


class Target(Protocol):
    """An assigned target as the update client gives it (``edgepeft.agent.updates.AssignedTarget``)."""

    asset_id: str
    version: str
    release: int
    sha256: str
    length: int


class UpdateSource(Protocol):
    """What the loop needs of the update client (``edgepeft.agent.updates.UpdateClient``): verified assignments
    (for this device's base) and verified downloads. Any exception means "not now": the loop reports it and tries
    again later."""

    def assigned(self, base_sha256: str | None = None) -> list[Any]: ...

    def download(self, target: Any) -> bytes: ...


@dataclass
class Backoff:
    """Exponential backoff with jitter: ``first`` seconds after the first failure, doubling up to ``cap``; each
    wait is drawn from [50 %, 100 %] of that, so devices that lost the server together do not return together.

    Example:
        >>> backoff = Backoff(first=2.0, cap=10.0, rng=random.Random(0))
        >>> [round(backoff.next(), 2) for _ in range(5)]
        [1.84, 3.52, 5.68, 6.29, 7.56]
        >>> backoff.reset(); backoff.failures
        0
    """

    first: float = 2.0
    cap: float = 300.0
    rng: random.Random = field(default_factory=random.Random)
    failures: int = 0

    def next(self) -> float:
        ceiling = min(self.cap, self.first * 2 ** min(self.failures, 32))
        self.failures += 1
        return ceiling * self.rng.uniform(0.5, 1.0)

    def reset(self) -> None:
        self.failures = 0


@dataclass
class CycleResult:
    """What one cycle did: ``ok`` when the fleet and the runtime were both reached and every target converged.

    Example:
        >>> CycleResult(server_ok=True, runtime_ok=True, reported=True).ok
        True
        >>> CycleResult(server_ok=True, runtime_ok=True, reported=True, errors=["install failed"]).ok
        False
    """

    installed: list[str] = field(default_factory=list)
    activated: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    server_ok: bool = False
    runtime_ok: bool = False
    reported: bool = False
    poll_seconds: float | None = None

    @property
    def ok(self) -> bool:
        return self.server_ok and self.runtime_ok and self.reported and not self.errors


@dataclass
class AgentConfig:
    """How this agent runs (nothing here is persisted).

    Attributes:
        server: the fleet server's base URL.
        credential: this device's credential (``efd_...``), sent as a bearer token to the fleet.
        poll_seconds: poll interval; None: the server's suggestion (``DEFAULT_POLL_S`` until it gives one).
        max_backoff_seconds: the longest wait after repeated failures.
        timeout: seconds for one request to the fleet server.

    Example:
        >>> AgentConfig(server="http://127.0.0.1:8080", credential="efd_x").poll_seconds is None
        True
        >>> AgentConfig(server="http://127.0.0.1:8080", credential="efd_x", poll_seconds=0)
        Traceback (most recent call last):
        ...
        edgepeft.core.errors.ConfigError: poll seconds must be positive, got 0
    """

    server: str
    credential: str
    poll_seconds: float | None = None
    max_backoff_seconds: float = 300.0
    timeout: float = 30.0

    def __post_init__(self) -> None:
        if self.poll_seconds is not None and not self.poll_seconds > 0:
            raise ConfigError(f"poll seconds must be positive, got {self.poll_seconds}")
        if not self.max_backoff_seconds > 0:
            raise ConfigError(f"max backoff seconds must be positive, got {self.max_backoff_seconds}")


class Agent:
    """The update agent of one device; see the module docstring.

    Example (a device with a running runtime and a fleet server; ``edgepeft agent`` builds the same):
        >>> from edgepeft.agent.updates import UpdateClient                                   # doctest: +SKIP
        >>> updates = UpdateClient(server, "pump-7", credential, state / "tuf", image_root, director_root)
        ...                                                                                   # doctest: +SKIP
        >>> with AgentStateFile.open(state) as saved:                                         # doctest: +SKIP
        ...     agent = Agent(AgentConfig(server, credential), updates, RuntimeApi(runtime, token), saved)
        ...     agent.cycle().ok
        True
    """

    def __init__(self, config: AgentConfig, updates: UpdateSource, runtime: RuntimeApi, saved: AgentStateFile,
                 *, rng: random.Random | None = None, download_cache: Path | None = None) -> None:
        self.config = config
        # Where the update client keeps downloaded bundles; emptied once the runtime holds every assigned one (its
        # journal keeps them for rollbacks), so the device's disk does not fill up with old bundles.
        self.download_cache = download_cache
        self.updates = updates
        self.runtime = runtime
        self.saved = saved
        self.rng = rng or random.Random()
        self.started_at = utc_now()
        self.server_poll_seconds: float | None = None
        self.base_sha256: str | None = None  # the runtime's resident base, read each cycle
        self.backoff = Backoff(first=min(2.0, self.poll_seconds), cap=config.max_backoff_seconds, rng=self.rng)
        self._http = httpx.Client(base_url=config.server.rstrip("/"), timeout=config.timeout,
                                  headers={"Authorization": f"Bearer {config.credential}"})

    def announce(self, *, only_after_crash: bool = False) -> None:
        """Queue a ``started`` event, saying whether the last run ended uncleanly (each unclean stop is told once).
        ``only_after_crash``: nothing after a clean stop (``--once`` runs from a timer would flood the history)."""
        saved = self.saved
        crashed = saved.state.crashes > 0 and saved.state.errors.get("crash") != str(saved.state.crashes)
        if crashed:
            saved.state.errors["crash"] = str(saved.state.crashes)
        elif only_after_crash:
            return
        saved.add_event("started", None, None, f"{AGENT_NAME} started" + (
            f" after an unclean stop ({saved.state.crashes} so far)" if crashed else ""))

    @property
    def poll_seconds(self) -> float:
        """The interval between successful cycles (before jitter)."""
        if self.config.poll_seconds is not None:
            return self.config.poll_seconds
        return self.server_poll_seconds or DEFAULT_POLL_S

    # ------------------------------------------------------------------ one cycle
    def cycle(self) -> CycleResult:
        """Converge once and report; never raises for a server, network, runtime or disk failure."""
        result = CycleResult()
        assets = self._runtime_assets(result)
        if assets is not None:
            self._apply_assignments(assets, result)
        self._report(result)
        return result

    def _runtime_assets(self, result: CycleResult) -> dict[str, dict[str, Any]] | None:
        try:
            self.base_sha256 = str(self.runtime.health()["base_sha256"])
            assets = {a["asset_id"]: a for a in self.runtime.assets()}
        except (RuntimeUnavailable, RuntimeRefused, KeyError) as exc:
            self._fail(result, "runtime", None, None, str(exc))
            return None
        result.runtime_ok = True
        self.saved.clear_error("runtime")
        self._notice(assets)
        return assets

    def _notice(self, assets: dict[str, dict[str, Any]]) -> None:
        """Report what changed in the runtime since the agent last looked, if the agent did not do it itself (an
        install whose answer was lost when the agent was killed, an operator's activation)."""
        seen = self.saved.state.seen
        changed = False
        for asset_id, asset in assets.items():
            versions = sorted(v["version"] for v in asset.get("versions", []))
            before = seen.get(asset_id)
            if before is not None:
                for version in sorted(set(versions) - set(before.get("versions", []))):
                    self.saved.add_event("installed", asset_id, version, "found installed in the runtime")
                if asset.get("active") != before.get("active") and asset.get("active") is not None:
                    self.saved.add_event("activated", asset_id, asset["active"], "found active in the runtime "
                                         f"(was {before.get('active')})")
            now = {"active": asset.get("active"), "versions": versions,
                   "releases": {v["version"]: v["release"] for v in asset.get("versions", [])}}
            if before != now:
                seen[asset_id] = now
                changed = True
        if changed:
            self.saved.save()

    def _saw(self, asset_id: str, version: str, release: int) -> None:
        """The agent's own change (``version`` installed and active): known, so not reported twice."""
        entry = self.saved.state.seen.setdefault(asset_id, {"active": None, "versions": [], "releases": {}})
        entry["active"] = version
        entry["versions"] = sorted({*entry.get("versions", []), version})
        entry["releases"] = {**entry.get("releases", {}), version: release}

    def _apply_assignments(self, assets: dict[str, dict[str, Any]], result: CycleResult) -> None:
        try:
            # With the runtime's base: a target built for another base is refused before any download.
            targets = self.updates.assigned(base_sha256=self.base_sha256)
        except Exception as exc:  # noqa: BLE001 - unreachable, refused or forged: reported, retried later
            self._fail(result, "server", None, None, f"assignments not fetched: {_describe(exc)}")
            return
        result.server_ok = True
        self.saved.clear_error("server")
        for target in targets:
            try:
                self._apply(target, assets.get(target.asset_id), result)
            except RuntimeUnavailable as exc:
                self._fail(result, "runtime", target.asset_id, target.version, str(exc))
                result.runtime_ok = False
                return  # the runtime is gone: the other targets would fail the same way
        if not result.errors:
            self._empty_download_cache()

    def _empty_download_cache(self) -> None:
        """Every assigned bundle is in the runtime: the downloaded copies are no longer needed."""
        if self.download_cache is None or not self.download_cache.is_dir():
            return
        for path in self.download_cache.iterdir():
            if path.is_file():
                try:
                    path.unlink()
                except OSError as exc:
                    logger.warning("cannot remove %s from the download cache: %s", path, exc)

    def _apply(self, target: Any, asset: dict[str, Any] | None, result: CycleResult) -> None:
        subject = f"asset:{target.asset_id}"
        installed = {v["version"]: v for v in (asset or {}).get("versions", [])}
        label = f"{target.asset_id} {target.version}"
        if target.version in installed:
            if asset is not None and asset.get("active") != target.version:
                active = installed.get(asset.get("active") or "")
                kind = "rolled_back" if active is not None and installed[target.version]["release"] < \
                    active["release"] else "activated"
                try:
                    self.runtime.activate(target.asset_id, target.version)
                except RuntimeRefused as exc:
                    self._fail(result, subject, target.asset_id, target.version, f"activation failed: {exc.detail}")
                    return
                logger.info("%s %s", kind.replace("_", " "), label)
                self._saw(target.asset_id, target.version, installed[target.version]["release"])
                self.saved.add_event(kind, target.asset_id, target.version,
                                     f"activated installed release {installed[target.version]['release']}"
                                     + (f" (was {asset.get('active')})" if asset.get("active") else ""))
                result.activated.append(label)
            self.saved.clear_error(subject)
            return
        if asset is not None and target.release <= int(asset.get("release", 0)):
            self._fail(result, subject, target.asset_id, target.version,
                       f"refused {label}: release {target.release} is not newer than the installed release "
                       f"{asset.get('release')} and this version was never installed here (a downgrade)",
                       kind="refused")
            return
        try:
            data = self.updates.download(target)
        except Exception as exc:  # noqa: BLE001 - network, verification or disk: reported, retried later
            self._fail(result, subject, target.asset_id, target.version, f"download of {label} failed: "
                       f"{_describe(exc)}")
            return
        if hashlib.sha256(data).hexdigest() != target.sha256 or len(data) != target.length:
            # The update client verified it; this guards the hand-over itself (and a client bug).
            self._fail(result, subject, target.asset_id, target.version,
                       f"download of {label} does not match its verified length and sha256; not installed")
            return
        try:
            answer = self.runtime.install(data)
        except RuntimeRefused as exc:
            # 4xx: the runtime refused the bundle (signature, base, release); 5xx: its disk (full?) failed. Either
            # way nothing changed there and the previous adapter keeps serving; a later cycle tries again.
            self._fail(result, subject, target.asset_id, target.version, f"install of {label} failed: {exc.detail}")
            return
        logger.info("installed %s (release %s)", label, target.release)
        self._saw(target.asset_id, target.version, target.release)
        self.saved.add_event("installed", target.asset_id, target.version, f"installed release {target.release}")
        self.saved.add_event("activated", target.asset_id, target.version,
                             f"active (install took {float(answer.get('install_seconds', 0.0)):.3f} s)")
        result.installed.append(label)
        self.saved.clear_error(subject)

    def _fail(self, result: CycleResult, subject: str, asset_id: str | None, version: str | None,
              detail: str, *, kind: str = "error") -> None:
        result.errors.append(detail)
        if self.saved.error(subject, asset_id, version, detail, kind=kind):
            logger.warning("%s", detail)

    # ------------------------------------------------------------------ report
    def report_body(self) -> dict[str, Any]:
        """The device report: the runtime's assets with each active version's health, and the pending events."""
        assets = []
        try:
            listing = self.runtime.assets()
        except (RuntimeUnavailable, RuntimeRefused):
            # Reported as an error event already. What the runtime ran when last seen, without health: an empty
            # list would tell the fleet the device runs nothing.
            listing = [{"asset_id": asset_id, "active": seen.get("active"),
                        "versions": [{"version": v, "release": seen.get("releases", {}).get(v)}
                                     for v in seen.get("versions", [])], "unreachable": True}
                       for asset_id, seen in sorted(self.saved.state.seen.items())]
        for asset in listing:
            active = asset.get("active")
            releases = {v["version"]: v["release"] for v in asset.get("versions", [])}
            health = None
            if active is not None and not asset.get("unreachable"):
                try:
                    health = next((row for row in self.runtime.stats(asset["asset_id"])
                                   if row["version"] == active), None)
                except (RuntimeUnavailable, RuntimeRefused) as exc:
                    logger.warning("no health for %s: %s", asset["asset_id"], exc)
            if health is not None:
                for name in ("score_q50", "score_q95", "score_q99"):  # score/threshold; a score is never below 0
                    if health.get(name) is not None:
                        health[name] = max(0.0, float(health[name]))
            assets.append({"asset_id": asset["asset_id"], "active_version": active,
                           "active_release": releases.get(active) if active else None,
                           "versions": list(releases), "health": health})
        events = list(self.saved.state.events[:EVENTS_PER_REPORT])
        if self.saved.state.dropped_events and len(events) < EVENTS_PER_REPORT:
            events = [{"at": utc_now(), "kind": "error", "asset_id": None, "version": None,
                       "detail": f"{self.saved.state.dropped_events} older events were dropped while the server "
                                 "was out of reach"}, *events]
        return {"agent": AGENT_NAME, "started_at": self.started_at, "crashes": self.saved.state.crashes,
                "assets": assets, "events": events}

    def _report(self, result: CycleResult) -> None:
        body = self.report_body()
        sent = min(len(self.saved.state.events), EVENTS_PER_REPORT)
        try:
            response = self._http.post(REPORT_PATH, json=body)
        except httpx.HTTPError as exc:
            # No event for this: the assignments' error event already says the server is out of reach.
            result.errors.append(f"report not sent: {type(exc).__name__}: {exc}")
            logger.debug("report not sent: %s", exc)
            return
        if response.status_code >= 400:
            # A 404 is a fleet server without the report endpoint yet: not fatal, the events stay queued.
            detail = " ".join(response.text.split())[:300]
            result.errors.append(f"report refused: {response.status_code} {detail}")
            logger.warning("report refused by the fleet server: %s %s", response.status_code, detail)
            return
        result.reported = True
        self.saved.acknowledge(sent)
        try:
            suggested = float(response.json().get("poll_seconds"))
        except (ValueError, TypeError, AttributeError):
            return
        if suggested > 0:
            self.server_poll_seconds = result.poll_seconds = suggested

    # ------------------------------------------------------------------ the loop
    def next_wait(self, result: CycleResult) -> float:
        """Seconds to sleep after ``result``: the poll interval with jitter, or the backoff after a failure."""
        if result.server_ok and result.runtime_ok and result.reported:
            self.backoff.reset()
            return self.poll_seconds * self.rng.uniform(0.8, 1.2)
        return self.backoff.next()

    def run(self, stop: threading.Event, *, on_cycle: Callable[[CycleResult], None] | None = None) -> None:
        """Cycle until ``stop`` is set (a signal handler sets it)."""
        self.announce()
        while not stop.is_set():
            started = time.monotonic()
            try:
                result = self.cycle()
            except Exception as exc:  # noqa: BLE001 - a bug must not stop the updates: told, then backed off
                logger.exception("cycle failed unexpectedly")
                result = CycleResult(errors=[f"unexpected {_describe(exc)}"])
                self.saved.error("agent", None, None, f"agent cycle failed: {_describe(exc)}")
            if on_cycle is not None:
                on_cycle(result)
            wait = self.next_wait(result)
            logger.debug("cycle took %.2f s; next in %.1f s", time.monotonic() - started, wait)
            stop.wait(wait)

    def close(self) -> None:
        self._http.close()


def _describe(exc: BaseException) -> str:
    """One line: the error's type and message (the update client's errors say what failed)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
