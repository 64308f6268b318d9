"""``edgepeft bench rollout``: the fleet server under a fleet's polling load, rolling adapters out and a bad one back.

One run, per database (SQLite, then PostgreSQL):

1. A real fleet server process (``python -m edgepeft.fleet serve``) with TUF initialised by ``fleet tuf init``.
2. **Devices**: ``--devices`` light in-process devices plus ``--real-agents`` real ones.
   - A light device runs the real update protocol: it fetches through the real TUF client
     (:class:`edgepeft.agent.updates.UpdateClient`: director + image repository, verified) and downloads
     and verifies the real bundle bytes. It reports each poll like an agent. It runs no model. On a poll it
     makes the requests the real client makes (probe for a new root, fetch the timestamp, for the director and
     the image repository); only when a timestamp differs from the one it last verified, or a new root exists,
     does it run the full client. This saves the simulator the CPU of re-verifying unchanged cached metadata;
     the server sees the same requests. Its health
     report emulates scoring: 100 rows per second since the version became active, with alerts drawn at the
     rate the version's real detector raises on this asset's live stream. That rate is measured once, at the
     start, by scoring a held-out stream with the real detector.
   - A real device is a device runtime (``edgepeft serve``) and an ``edgepeft agent`` process. A feeder
     streams that asset's normal rows into the runtime, so its health is the runtime's own.
3. **Phases**:
   1. Install v1 on the whole fleet.
   2. Upgrade to v2: the time to roll a good adapter to the whole fleet.
   3. Steady polling: server CPU per poll and API latency.
   4. A bad v3, an adapter fitted on another pump. The canary is the lab group (the real devices and a few
      light ones). The bad canary must be rolled back to v2 automatically, and no device outside the canary
      may ever run v3.

Everything shares the machine's cores with the simulated fleet, so the server's numbers are pessimistic; the
results name the machine.
"""

from __future__ import annotations

import heapq
import json
import math
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from edgepeft.bench.harness import jsonable, run_info, write_results
from edgepeft.bench.loadtest import ServerProcess, series
from edgepeft.core.errors import ConfigError, OutputError

ASSET = "pump-a"
LIGHT_ROWS_PER_SECOND = 100.0
FEED_ROWS = 300  # a request needs history: a detector never flags its first rows (warm-up, 64 on tiny)
FEED_PERIOD_S = 3.0  # 100 rows/s into each real runtime
LATENCY_QUANTILES = (0.5, 0.95, 0.99)


# ---------------------------------------------------------------------------------------------- artefacts
@dataclass
class Artefacts:
    """Signed bundles, the key that signed them, each version's measured alert rate on the live stream."""

    root: Path
    public_key: Path
    bundles: dict[str, bytes]
    releases: dict[str, int]
    alert_rates: dict[str, float]
    base_sha256: str
    base_bytes: int
    live: np.ndarray


def prepare(root: Path, *, seed: int = 0, steps: int = 40) -> Artefacts:
    """Fit the three adapters (two good, one fitted on another pump's data) and pack them; measure their alert
    rates on a held-out normal stream of this asset."""
    import torch

    from edgepeft.delta import generate_key, pack_bundle, read_bundle, save_keypair
    from edgepeft.detect.detector import AnomalyDetector
    from edgepeft.models.registry import weights_path

    torch.set_num_threads(1)
    root.mkdir(parents=True, exist_ok=True)
    key = generate_key()
    public = save_keypair(key, root / "release")
    normal = series(2000, seed=seed)
    other_pump = series(2000, seed=seed) * 0.3  # the same kind of pump, running at a third of the amplitude
    live = series(4000, seed=seed + 7)
    plans = {"v1": (normal, seed, 1), "v2": (normal, seed + 1, 2), "v3-bad": (other_pump, seed, 3)}
    bundles, rates, releases = {}, {}, {}
    for version, (data, fit_seed, release) in plans.items():
        detector = AnomalyDetector(base="tiny", method="lora", rank=4, steps=steps, seed=fit_seed).fit(data)
        folder = detector.save(root / version)
        bundles[version] = pack_bundle(folder, key, asset_id=ASSET, version=version, release=release)
        rates[version] = float(np.mean(detector.predict(live)))
        releases[version] = release
    base_sha = read_bundle(bundles["v1"]).base_sha256
    return Artefacts(root=root, public_key=public, bundles=bundles, releases=releases, alert_rates=rates,
                     base_sha256=base_sha, base_bytes=weights_path("tiny").stat().st_size, live=live)


# ---------------------------------------------------------------------------------------------- processes
def _run(*args: str, timeout: float = 120) -> str:
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise OutputError(f"{' '.join(args[:4])} failed: {done.stderr.strip()[-500:]}")
    return done.stdout


@dataclass
class FleetProcess(ServerProcess):
    """``python -m edgepeft.fleet serve`` with TUF keys, on a free port."""

    db: str = ""
    online_keys: Path | None = None
    trusted_key: Path | None = None
    poll_seconds: float = 20.0

    def command(self) -> list[str]:
        return [self.python, "-m", "edgepeft.fleet", "serve", "--db", self.db, "--storage",
                str(self.state_dir / "storage"), "--port", str(self.port), "--trusted-key", str(self.trusted_key),
                "--online-keys", str(self.online_keys), "--poll-seconds", str(self.poll_seconds)]


# ---------------------------------------------------------------------------------------------- light devices
class CountingTransport(httpx.BaseTransport):
    """Counts response body bytes (what a device downloads) into a shared counter."""

    def __init__(self, counter: list[int]) -> None:
        self.counter = counter
        self.inner: httpx.HTTPTransport | None = None

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self.inner is None:
            self.inner = httpx.HTTPTransport()
        response = self.inner.handle_request(request)
        response.stream = _CountingStream(response.stream, self.counter)  # type: ignore[arg-type]
        return response

    def close(self) -> None:
        if self.inner is not None:
            self.inner.close()
            self.inner = None


class _CountingStream(httpx.SyncByteStream):
    def __init__(self, inner: Any, counter: list[int]) -> None:
        self.inner, self.counter = inner, counter

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.inner:
            self.counter[0] += len(chunk)
            yield chunk

    def close(self) -> None:
        self.inner.close()


@dataclass
class LightDevice:
    """A device that runs the real update protocol and emulates its runtime (see the module docstring)."""

    device_id: str
    credential: str
    client: Any
    rng: random.Random
    installed: dict[str, int] = field(default_factory=dict)
    active: str | None = None
    since: float = 0.0
    rows: int = 0
    alerts: int = 0
    activated: list[tuple[float, str]] = field(default_factory=list)
    downloaded: list[int] = field(default_factory=lambda: [0])
    events: list[dict[str, Any]] = field(default_factory=list)

    def activate(self, version: str, moment: float) -> None:
        self.active, self.since, self.rows, self.alerts = version, moment, 0, 0
        self.activated.append((moment, version))

    seen: dict[str, bytes] = field(default_factory=dict)  # the timestamps (and root versions) last verified
    targets: list[Any] = field(default_factory=list)

    def _unchanged(self, fleet: Fleet) -> bool:
        """The requests the real client makes on a poll (probe the next root, fetch the timestamp; director, then
        image); True when both timestamps are the ones last verified and no new root exists."""
        if not self.seen:
            return False
        auth = {"Authorization": f"Bearer {self.credential}"}
        same = True
        for repo, prefix in (("director", f"/tuf/director/{self.device_id}/metadata"),
                             ("image", "/tuf/image/metadata")):
            probe = fleet.http.get(f"{prefix}/{int(self.seen[repo + '-root']) + 1}.root.json", headers=auth)
            stamp = fleet.http.get(f"{prefix}/timestamp.json", headers=auth)
            self.downloaded[0] += len(probe.content) + len(stamp.content)
            if probe.status_code != 404 or stamp.status_code != 200:
                return False
            same = same and stamp.content == self.seen[repo]
            if not same:
                return False
        return True

    def _remember(self) -> None:
        folder = Path(self.client.state_dir) / "tuf"
        for repo in ("director", "image"):
            self.seen[repo] = (folder / repo / "timestamp.json").read_bytes()
            root = json.loads((folder / repo / "root.json").read_bytes())
            self.seen[repo + "-root"] = str(root["signed"]["version"]).encode()

    def poll(self, fleet: Fleet) -> float:
        started = time.perf_counter()
        if not self._unchanged(fleet):
            # Something changed (or first contact): the real TUF client, verifying everything.
            self.targets = self.client.assigned(fleet.art.base_sha256)
            self._remember()
        fleet.record("assigned", time.perf_counter() - started)
        for target in self.targets:
            now = time.monotonic()
            if target.version in self.installed:
                if self.active != target.version:
                    self.activate(target.version, now)
                    self.events.append(_event("activated", target.version))
            elif target.release <= max(self.installed.values(), default=0):
                self.events.append(_event("refused", target.version, "older than the installed release"))
            else:
                self.client.download(target)
                self.installed[target.version] = target.release
                self.activate(target.version, time.monotonic())
                self.events.append(_event("installed", target.version))
        assets = []
        if self.active is not None:
            new_rows = int(LIGHT_ROWS_PER_SECOND * (time.monotonic() - self.since)) - self.rows
            rate = fleet.art.alert_rates[self.active]
            self.alerts += sum(self.rng.random() < rate for _ in range(max(0, new_rows)))
            self.rows += max(0, new_rows)
            assets.append({"asset_id": ASSET, "active_version": self.active,
                           "active_release": self.installed[self.active], "versions": sorted(self.installed),
                           "health": {"version": self.active, "rows": self.rows, "alerts": self.alerts,
                                      "errors": 0}})
        body = {"agent": "bench-light/1", "assets": assets, "events": self.events[-20:]}
        started = time.perf_counter()
        answer = fleet.http.post("/v1/device/self/report", json=body,
                                 headers={"Authorization": f"Bearer {self.credential}"})
        fleet.record("report", time.perf_counter() - started)
        if answer.status_code != 200:
            raise OutputError(f"report of {self.device_id} refused: {answer.status_code} {answer.text[:200]}")
        self.events.clear()
        return float(answer.json()["poll_seconds"])


def _event(kind: str, version: str, detail: str = "") -> dict[str, Any]:
    return {"at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "kind": kind, "asset_id": ASSET,
            "version": version, "detail": detail}


@dataclass
class Fleet:
    """The simulated fleet: light devices polling from worker threads, plus latency and poll counters."""

    art: Artefacts
    url: str
    devices: list[LightDevice]
    workers: int = 16
    http: httpx.Client = field(init=False)
    latencies: dict[str, list[float]] = field(default_factory=lambda: {"assigned": [], "report": []})
    polls: int = 0
    errors: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.http = httpx.Client(base_url=self.url, timeout=60.0,
                                 limits=httpx.Limits(max_connections=self.workers * 2))

    def record(self, kind: str, seconds: float) -> None:
        with self._lock:
            self.latencies[kind].append(seconds)

    def start(self, poll_seconds: float) -> None:
        for w in range(self.workers):
            mine = self.devices[w::self.workers]
            thread = threading.Thread(target=self._work, args=(mine, poll_seconds, w), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _work(self, devices: list[LightDevice], poll_seconds: float, w: int) -> None:
        rng = random.Random(w)
        due = [(time.monotonic() + rng.uniform(0, poll_seconds), i) for i in range(len(devices))]
        heapq.heapify(due)
        while due and not self._stop.is_set():
            at, i = heapq.heappop(due)
            if self._stop.wait(max(0.0, at - time.monotonic())):
                return
            try:
                poll_seconds = devices[i].poll(self)
                with self._lock:
                    self.polls += 1
            except Exception as exc:  # noqa: BLE001 - a failed poll is retried, and counted
                with self._lock:
                    self.errors.append(f"{devices[i].device_id}: {type(exc).__name__}: {exc}"[:300])
            heapq.heappush(due, (time.monotonic() + poll_seconds * rng.uniform(0.8, 1.2), i))

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)
        self.http.close()


# ---------------------------------------------------------------------------------------------- real devices
@dataclass
class RealDevice:
    """A device runtime process, an agent process and a feeder thread streaming normal rows into the runtime."""

    device_id: str
    runtime: ServerProcess
    agent: subprocess.Popen[bytes]
    feeder: threading.Thread
    stop: threading.Event

    def active(self) -> str | None:
        try:
            assets = httpx.get(f"{self.runtime.url}/v1/assets", timeout=5).json()
        except (httpx.HTTPError, ValueError):
            return None
        return next((a["active"] for a in assets if a["asset_id"] == ASSET), None)

    def close(self) -> None:
        self.stop.set()
        self.agent.terminate()
        try:
            self.agent.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.agent.kill()
        self.feeder.join(timeout=10)
        self.runtime.stop()


def _feed(url: str, live: np.ndarray, stop: threading.Event) -> None:
    position = 0
    with httpx.Client(base_url=url, timeout=30) as http:
        while not stop.wait(FEED_PERIOD_S):
            rows = live[position:position + FEED_ROWS]
            position = (position + FEED_ROWS) % (len(live) - FEED_ROWS)
            with suppress(httpx.HTTPError):
                http.post(f"/v1/assets/{ASSET}/score", json={"rows": rows.tolist()})


def start_real(work: Path, device_id: str, credential: str, server_url: str, roots: Path, art: Artefacts,
               poll_seconds: float) -> RealDevice:
    folder = work / device_id
    folder.mkdir(parents=True, exist_ok=True)
    runtime = ServerProcess(state_dir=folder / "runtime", token=secrets.token_urlsafe(24),
                            args=["--trusted-key", str(art.public_key)], startup_s=120.0).start()
    (folder / "credential").write_text(credential + "\n")
    (folder / "runtime-token").write_text(runtime.token + "\n")
    log = open(folder / "agent.log", "wb")  # noqa: SIM115 - kept open for the agent's lifetime
    agent = subprocess.Popen(
        [sys.executable, "-m", "edgepeft.agent", "--server", server_url, "--device-id", device_id,
         "--credential-file", str(folder / "credential"), "--image-root", str(roots / "image-root.json"),
         "--director-root", str(roots / "director-root.json"), "--runtime", runtime.url,
         "--runtime-token-file", str(folder / "runtime-token"), "--state", str(folder / "agent"),
         "--poll-seconds", str(poll_seconds), "--max-backoff-seconds", str(poll_seconds)],
        stdout=log, stderr=subprocess.STDOUT)
    stop = threading.Event()
    feeder = threading.Thread(target=_feed, args=(runtime.url, art.live, stop), daemon=True)
    feeder.start()
    return RealDevice(device_id, runtime, agent, feeder, stop)


# ---------------------------------------------------------------------------------------------- one backend
def _quantiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {f"p{int(q * 100)}_ms": None for q in LATENCY_QUANTILES}
    array = np.asarray(values) * 1000
    return {f"p{int(q * 100)}_ms": float(np.quantile(array, q)) for q in LATENCY_QUANTILES}


def _wait(predicate: Any, timeout: float, what: str, poll: float = 0.2) -> float:
    started = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise OutputError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


def run_backend(name: str, db_url: str, work: Path, art: Artefacts, *, n_devices: int, n_real: int,
                poll_seconds: float, steady_seconds: float, lab_light: int, console: Any) -> dict[str, Any]:
    """One full run against one database; returns its measurements."""
    import psutil

    from edgepeft.agent.updates import UpdateClient

    work.mkdir(parents=True, exist_ok=True)
    offline, online, roots = work / "keys-offline", work / "keys-online", work / "roots"
    _run("-m", "edgepeft.fleet", "tuf", "init", "--db", db_url, "--offline-keys", str(offline), "--online-keys",
         str(online))
    _run("-m", "edgepeft.fleet", "tuf", "roots", "--db", db_url, "--out", str(roots))
    token = _run("-m", "edgepeft.fleet", "token", "--db", db_url, "--scopes", "admin", "--name", "bench").strip()
    server = FleetProcess(state_dir=work / "server", db=db_url, online_keys=online, trusted_key=art.public_key,
                          poll_seconds=poll_seconds, startup_s=120.0).start()
    out: dict[str, Any] = {"database": name}
    real: list[RealDevice] = []
    fleet: Fleet | None = None
    try:
        api = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=60)

        def ok(response: httpx.Response) -> Any:
            if response.status_code >= 300:
                raise OutputError(f"{response.request.method} {response.request.url.path}: {response.status_code} "
                                  f"{response.text[:300]}")
            return response.json()

        ok(api.post("/v1/bases", json={"name": "tiny", "sha256": art.base_sha256, "reason": "bench"}))
        for group in ("fleet", "lab"):
            ok(api.post("/v1/groups", json={"name": group, "reason": "bench"}))
        sha = {v: ok(api.post("/v1/bundles", params={"reason": "bench"}, content=data))["sha256"]
               for v, data in art.bundles.items()}
        started = time.monotonic()
        ids = [f"real-{i}" for i in range(n_real)] + [f"sim-{i:05d}" for i in range(n_devices)]
        lab = set(ids[:n_real + lab_light])
        credentials = {}
        for device_id in ids:
            credentials[device_id] = ok(api.post("/v1/devices", json={
                "device_id": device_id, "groups": ["fleet", "lab"] if device_id in lab else ["fleet"],
                "assets": [ASSET], "bases": [art.base_sha256], "reason": "bench"}))["credential"]
        out["enrol_seconds"] = time.monotonic() - started
        image_root = (roots / "image-root.json").read_bytes()
        director_root = (roots / "director-root.json").read_bytes()
        lights = []
        for i, device_id in enumerate(ids[n_real:]):
            light = LightDevice(device_id, credentials[device_id], None, random.Random(i))
            light.client = UpdateClient(server.url, device_id, credentials[device_id], work / "light" / device_id,
                                        image_root, director_root, timeout=60.0,
                                        transport=CountingTransport(light.downloaded))
            lights.append(light)
        for device_id in ids[:n_real]:
            real.append(start_real(work / "real", device_id, credentials[device_id], server.url, roots, art,
                                   poll_seconds))
        fleet = Fleet(art, server.url, lights)
        fleet.start(poll_seconds)

        def everyone_on(version: str) -> bool:
            return all(d.active == version for d in lights) and all(r.active() == version for r in real)

        def rollout(version: str, **strategy: Any) -> tuple[int, float]:
            body = {"name": f"to-{version}", "group": "fleet", "bundle": sha[version], "reason": "bench",
                    "strategy": strategy, "gates": {"min_rows": 200}}
            return ok(api.post("/v1/rollouts", json=body))["id"], time.monotonic()

        def state(rollout_id: int) -> str:
            return ok(api.get(f"/v1/rollouts/{rollout_id}"))["state"]

        waves = {"canary_group": "lab", "waves": [10, 50, 100]}
        limit = 40 * poll_seconds + 120
        for version in ("v1", "v2"):
            before = sum(d.downloaded[0] for d in lights)
            # v1 is the first install (the lab, then everyone); v2, the upgrade, goes canary + 3 waves.
            rollout_id, t0 = rollout(version, **(waves if version == "v2" else {**waves, "waves": [100]}))
            _wait(lambda rid=rollout_id: state(rid) in ("completed", "halted"), limit, f"rollout of {version}")
            completed = time.monotonic() - t0
            if state(rollout_id) != "completed":
                raise OutputError(f"the rollout of good {version} halted: {ok(api.get(f'/v1/rollouts/{rollout_id}'))}")
            _wait(lambda v=version: everyone_on(v), limit, f"every device on {version}")
            view = ok(api.get(f"/v1/rollouts/{rollout_id}"))
            out[f"rollout_{version}"] = {
                "seconds_to_completed": completed, "seconds_to_all_active": time.monotonic() - t0,
                "waves": [{"wave": w["wave"], "size": w["size"], "opened_at": w["opened_at"],
                           "healthy_at": w["healthy_at"]} for w in view["waves"]],
                "bytes_per_light_device": (sum(d.downloaded[0] for d in lights) - before) / len(lights),
            }
            console.print(f"  {name}: {version} on all {len(ids)} devices in {completed:.1f} s", highlight=False)

        # Steady polling: nothing to roll out, every device polls and reports.
        proc = psutil.Process(server.process.pid)
        cpu0, polls0, bytes0 = sum(proc.cpu_times()[:2]), fleet.polls, sum(d.downloaded[0] for d in lights)
        with fleet._lock:
            for values in fleet.latencies.values():
                values.clear()
        time.sleep(steady_seconds)
        cpu1, polls1 = sum(proc.cpu_times()[:2]), fleet.polls
        polls = max(1, polls1 - polls0)
        with fleet._lock:
            lat = {k: list(v) for k, v in fleet.latencies.items()}
        out["steady"] = {
            "seconds": steady_seconds, "polls": polls, "polls_per_second": polls / steady_seconds,
            "server_cpu_seconds": cpu1 - cpu0, "server_cpu_ms_per_poll": 1000 * (cpu1 - cpu0) / polls,
            "server_cpu_share": (cpu1 - cpu0) / steady_seconds,
            "poll_latency": _quantiles(lat["assigned"]), "report_latency": _quantiles(lat["report"]),
            "bytes_per_idle_poll": (sum(d.downloaded[0] for d in lights) - bytes0) / polls,
        }
        console.print(f"  {name}: steady {polls / steady_seconds:.1f} polls/s, server "
                      f"{out['steady']['server_cpu_ms_per_poll']:.2f} ms CPU per poll", highlight=False)

        # The bad adapter: its canary (the lab group) must be rolled back to v2 by the health gate.
        canary_ids = sorted(lab)
        rollout_id, t0 = rollout("v3-bad", **waves)

        def canary_on(version: str) -> list[str]:
            on = [d.device_id for d in lights if d.device_id in lab and d.active == version]
            return on + [r.device_id for r in real if r.active() == version]

        first_bad = _wait(lambda: bool(canary_on("v3-bad")), limit, "a canary device on v3-bad") + 0.0
        t_first = t0 + first_bad
        _wait(lambda: state(rollout_id) == "halted", limit, "the health gate to halt the bad rollout")
        t_halt = time.monotonic()
        _wait(lambda: len(canary_on("v2")) == len(canary_ids), limit, "the canary back on v2")
        t_back = time.monotonic()
        view = ok(api.get(f"/v1/rollouts/{rollout_id}"))
        bad_elsewhere = sorted(d.device_id for d in lights if d.device_id not in lab
                               and any(v == "v3-bad" for _, v in d.activated))
        real_bad = [r.device_id for r in real]  # every real device is in the canary by construction
        out["bad_rollout"] = {
            "canary": len(canary_ids), "real_in_canary": len(real_bad),
            "seconds_to_first_bad_install": first_bad, "seconds_bad_install_to_halt": t_halt - t_first,
            "seconds_bad_install_to_all_rolled_back": t_back - t_first, "outcome": view["outcome"],
            "devices_outside_canary_that_ran_it": bad_elsewhere, "devices_by_status": view["devices_by_status"],
        }
        console.print(f"  {name}: bad canary halted {t_halt - t_first:.1f} s after its first install, all "
                      f"{len(canary_ids)} back on v2 after {t_back - t_first:.1f} s", highlight=False)
        out["poll_errors"] = {"count": len(fleet.errors), "first": fleet.errors[:5]}
        out["metrics_server_p99"] = _server_p99(api)
    finally:
        if fleet is not None:
            fleet.stop()
        for device in real:
            device.close()
        server.stop()
    return out


def _server_p99(api: httpx.Client) -> dict[str, float | None]:
    """p99 per route from the server's own latency histogram (bucket upper bounds: coarse, but server-side)."""
    text = api.get("/metrics").text
    buckets: dict[str, list[tuple[float, int]]] = {}
    for line in text.splitlines():
        if line.startswith("edgepeft_request_duration_seconds_bucket{"):
            labels, value = line.rsplit(" ", 1)
            route = labels.split('route="', 1)[1].split('"', 1)[0]
            le = labels.split('le="', 1)[1].split('"', 1)[0]
            buckets.setdefault(route, []).append((math.inf if le == "+Inf" else float(le), int(float(value))))
    out = {}
    for route, pairs in buckets.items():
        pairs.sort()
        total = max(count for _, count in pairs) if pairs else 0
        if total < 100:
            continue
        out[route] = next((bound for bound, count in pairs if count >= 0.99 * total), None)
    return out


# ---------------------------------------------------------------------------------------------- the suite
@contextmanager
def _postgres(work: Path) -> Iterator[Any]:
    from edgepeft.bench.postgres import PostgresServer, postgres_bindir

    bindir = postgres_bindir()
    if bindir is None:
        raise ConfigError("PostgreSQL's server programs are not installed (apt-get install postgresql); run with "
                          "--backends sqlite")
    root = Path(tempfile.mkdtemp(prefix="edgepeft-bench-pg-"))
    server = PostgresServer(bindir, root).start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def run_rollout_bench(out: Path, *, n_devices: int = 1000, n_real: int = 3, poll_seconds: float = 20.0,
                      steady_seconds: float = 60.0, backends: tuple[str, ...] = ("sqlite", "postgresql"),
                      lab_light: int = 7, seed: int = 0, console: Any = None) -> dict[str, Any]:
    """Run the suite and write ``OUT/results.json`` and ``OUT/results.md``."""
    from rich.console import Console

    console = console or Console(stderr=True)
    out = Path(out)
    work = Path(tempfile.mkdtemp(prefix="edgepeft-rollout-"))
    started = time.monotonic()
    try:
        console.print("fitting and packing v1, v2 and the bad v3 …", highlight=False)
        art = prepare(work / "artefacts", seed=seed)
        results: dict[str, Any] = {
            "suite": "rollout", **run_info(),
            "settings": {"devices": n_devices, "real_agents": n_real, "poll_seconds": poll_seconds,
                         "steady_seconds": steady_seconds, "lab_light_devices": lab_light, "seed": seed,
                         "light_rows_per_second": LIGHT_ROWS_PER_SECOND,
                         "real_feed_rows_per_second": FEED_ROWS / FEED_PERIOD_S},
            "bundles": {v: {"bytes": len(b), "release": art.releases[v], "alert_rate_on_live_stream":
                            art.alert_rates[v]} for v, b in art.bundles.items()},
            "full_model_bytes": art.base_bytes + len(art.bundles["v2"]),
            "backends": {},
        }
        for backend in backends:
            console.print(f"[bold]{backend}[/]", highlight=False)
            if backend == "sqlite":
                results["backends"][backend] = run_backend(
                    backend, f"sqlite:///{work / 'sqlite' / 'fleet.db'}", work / "sqlite", art, n_devices=n_devices,
                    n_real=n_real, poll_seconds=poll_seconds, steady_seconds=steady_seconds, lab_light=lab_light,
                    console=console)
            else:
                with _postgres(work) as pg:
                    results["backends"][backend] = run_backend(
                        backend, pg.create_database(), work / "postgresql", art, n_devices=n_devices,
                        n_real=n_real, poll_seconds=poll_seconds, steady_seconds=steady_seconds,
                        lab_light=lab_light, console=console)
        results["wall_seconds"] = time.monotonic() - started
        out.mkdir(parents=True, exist_ok=True)
        write_results(out, jsonable(results))
        (out / "results.md").write_text(render(results))
        return results
    finally:
        shutil.rmtree(work, ignore_errors=True)


def render(results: dict[str, Any]) -> str:
    """The suite's Markdown section (docs/BENCHMARKS.md shows it as is)."""
    s = results["settings"]
    machine = results.get("machine", {})
    lines = [
        "# Fleet rollouts (edgepeft bench rollout)",
        "",
        f"Machine: {machine.get('cpu_model', '?')}, {machine.get('cores_usable', '?')} cores; "
        f"date {results.get('date')}; "
        f"commit `{results.get('commit')}`. Command: `{results.get('command')}`.",
        "",
        f"{s['devices']:,} light devices (the real TUF client, real bundle downloads, emulated scoring) and "
        f"{s['real_agents']} real devices (a device runtime and an `edgepeft agent` process each, fed "
        f"{s['real_feed_rows_per_second']:.0f} normal rows/s), polling every {s['poll_seconds']:g} s with ±20 % "
        "jitter, all on this one machine with the server: server CPU and latency are pessimistic.",
        "",
        "| Bundle | Bytes | Release | Alert rate on the live stream (real detector) |",
        "|---|---|---|---|",
    ]
    for version, b in results["bundles"].items():
        lines.append(f"| {version} | {b['bytes']:,} | {b['release']} | {b['alert_rate_on_live_stream']:.3f} |")
    lines += ["", f"Shipping the full model instead (tiny base weights + adapter): {results['full_model_bytes']:,} "
              "bytes per device.", ""]
    header = ["Measure", *results["backends"]]
    rows: list[list[str]] = []

    def row(label: str, fn: Any) -> None:
        cells = []
        for backend in results["backends"].values():
            try:
                cells.append(fn(backend))
            except (KeyError, TypeError):
                cells.append("-")
        rows.append([label, *cells])

    row("Time to roll v1 (first install) to the whole fleet, s",
        lambda b: f"{b['rollout_v1']['seconds_to_all_active']:.1f}")
    row("Time to roll v2 (an upgrade) to the whole fleet, s",
        lambda b: f"{b['rollout_v2']['seconds_to_all_active']:.1f}")
    row("Bytes per light device for the v2 upgrade (metadata + bundle)",
        lambda b: f"{b['rollout_v2']['bytes_per_light_device']:,.0f}")
    row("Same, as a share of shipping the full model",
        lambda b: f"{100 * b['rollout_v2']['bytes_per_light_device'] / results['full_model_bytes']:.1f} %")
    row("Bad v3: first canary install to automatic halt, s",
        lambda b: f"{b['bad_rollout']['seconds_bad_install_to_halt']:.1f}")
    row("Bad v3: first canary install to every canary device back on v2, s",
        lambda b: f"{b['bad_rollout']['seconds_bad_install_to_all_rolled_back']:.1f}")
    row("Bad v3: canary size (real devices in it)",
        lambda b: f"{b['bad_rollout']['canary']} ({b['bad_rollout']['real_in_canary']})")
    row("Bad v3: devices outside the canary that ever ran it",
        lambda b: str(len(b["bad_rollout"]["devices_outside_canary_that_ran_it"])))
    row("Steady polls per second", lambda b: f"{b['steady']['polls_per_second']:.1f}")
    row("Server CPU per poll, ms (poll = director + image refresh + report)",
        lambda b: f"{b['steady']['server_cpu_ms_per_poll']:.2f}")
    row("Server CPU share of one core at that load", lambda b: f"{100 * b['steady']['server_cpu_share']:.0f} %")
    row("Poll (TUF refresh) latency p50 / p99, ms (device side)",
        lambda b: f"{b['steady']['poll_latency']['p50_ms']:.0f} / {b['steady']['poll_latency']['p99_ms']:.0f}")
    row("Report API latency p50 / p99, ms (device side)",
        lambda b: f"{b['steady']['report_latency']['p50_ms']:.0f} / {b['steady']['report_latency']['p99_ms']:.0f}")
    row("Server-side p99, s (its histogram's bucket bound): report / director metadata",
        lambda b: f"≤ {b['metrics_server_p99']['/v1/device/self/report']:g} / "
                  f"≤ {b['metrics_server_p99']['/tuf/director/{device_id}/metadata/{name}']:g}")
    row("Bytes per idle poll", lambda b: f"{b['steady']['bytes_per_idle_poll']:,.0f}")
    row("Poll errors (retried)", lambda b: str(b["poll_errors"]["count"]))
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", "The bad v3 is an adapter fitted on another pump's data (a third of the amplitude): on this "
              "asset's normal stream its real detector flags most rows. Health is judged per device against its "
              "own previous version (gate defaults, min_rows 200).", ""]
    for name, b in results["backends"].items():
        if "bad_rollout" in b:
            lines.append(f"- {name}: {b['bad_rollout']['outcome']}")
    lines.append("")
    return "\n".join(lines)

