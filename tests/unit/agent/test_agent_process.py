"""The whole chain in real processes: a fleet server with TUF (``python -m edgepeft.fleet serve``), a device
runtime (``python -m edgepeft.runtime serve``) and ``python -m edgepeft.agent`` between them, with real TCP
proxies (:mod:`tests.unit.agent.netproxy`) for the network dropping and for cutting a download or an install
mid-way, SIGKILL for the agent, a small tmpfs for a full disk, and metadata that expired while the device was
away. Each time the device keeps serving its previous adapter and converges once things recover."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgepeft.bench.loadtest import ServerProcess, payloads
from edgepeft.delta import read_bundle
from tests.unit.agent.conftest import ASSET, RUNTIME_TOKEN, fill, mount_tmpfs
from tests.unit.agent.netproxy import NetProxy
from tests.unit.fleet import tuf_support
from tests.unit.fleet.conftest import FleetServer, fleet_cli

ROWS = payloads(2, 96)[1]
DEVICE = "edge-1"


@dataclass
class Device:
    """One device: its runtime, the files the agent is started with, and a way to run the agent."""

    fleet: Any  # tuf_support.TufFleet
    runtime: ServerProcess
    root: Path
    server_url: str
    runtime_url: str
    state: Path
    process: subprocess.Popen[bytes] | None = None
    logs: list[Path] = field(default_factory=list)

    def args(self) -> list[str]:
        image_root, director_root = self.fleet.roots(1)
        files = {"credential": self.fleet.credentials[DEVICE], "token": RUNTIME_TOKEN}
        for name, text in files.items():
            (self.root / name).write_text(text + "\n")
        (self.root / "image-root.json").write_bytes(image_root)
        (self.root / "director-root.json").write_bytes(director_root)
        return [sys.executable, "-m", "edgepeft.agent", "--server", self.server_url, "--device-id", DEVICE,
                "--credential-file", str(self.root / "credential"), "--runtime", self.runtime_url,
                "--runtime-token-file", str(self.root / "token"), "--state", str(self.state),
                "--image-root", str(self.root / "image-root.json"),
                "--director-root", str(self.root / "director-root.json"),
                "--poll-seconds", "0.3", "--max-backoff-seconds", "1", "--log-level", "debug"]

    def once(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.args(), "--once"], capture_output=True, text=True, timeout=120)

    def start(self) -> None:
        log = self.root / f"agent-{len(self.logs)}.log"
        self.logs.append(log)
        with open(log, "wb") as out:
            self.process = subprocess.Popen(self.args(), stdout=out, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        assert self.process is not None and self.process.poll() is None, self.log()
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=30)
            assert self.process.returncode == 0, self.log()

    def log(self) -> str:
        return self.logs[-1].read_text(errors="replace")[-3000:] if self.logs else ""

    def active(self) -> str | None:
        assets = {a["asset_id"]: a for a in httpx.get(f"{self.runtime.url}/v1/assets", timeout=30).json()}
        return assets[ASSET]["active"] if ASSET in assets else None

    def versions(self) -> list[str]:
        assets = {a["asset_id"]: a for a in httpx.get(f"{self.runtime.url}/v1/assets", timeout=30).json()}
        return sorted(v["version"] for v in assets[ASSET]["versions"]) if ASSET in assets else []

    def serving(self) -> str:
        """Score a window; the version that answered (the device must keep serving throughout)."""
        answer = httpx.post(f"{self.runtime.url}/v1/assets/{ASSET}/score", json={"rows": ROWS.tolist()}, timeout=60)
        assert answer.status_code == 200, answer.text
        return str(answer.json()["version"])

    def converges(self, version: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.active() == version:
                assert self.serving() == version
                return
            assert self.process is None or self.process.poll() is None, self.log()
            time.sleep(0.2)
        raise AssertionError(f"the device did not converge to {version} (active {self.active()}):\n{self.log()}")

    def history(self) -> dict[str, Any]:
        with self.fleet.server.client() as http:
            answer = http.get(f"/v1/devices/{DEVICE}/history")
        assert answer.status_code == 200, answer.text
        return dict(answer.json())


@pytest.fixture
def published(make_bundle: Callable[..., bytes]) -> dict[str, bytes]:
    return {f"v{release}": make_bundle(f"v{release}", release) for release in range(1, 7)}


@pytest.fixture
def tuf_device(tmp_path: Path, keys: dict[str, Any], published: dict[str, bytes]
               ) -> Iterator[tuple[Any, dict[str, str], ServerProcess, Path]]:
    base = read_bundle(published["v1"]).base_sha256
    with tuf_support.tuf_fleet(f"sqlite:///{tmp_path / 'fleet.db'}", tmp_path, keys["public"], base) as fleet:
        shas = {version: fleet.publish(data)["sha256"] for version, data in published.items()}
        fleet.enrol(DEVICE)
        with ServerProcess(tmp_path / "runtime", token=RUNTIME_TOKEN,
                           args=["--trusted-key", str(keys["public"]), "--threads", "1"]) as runtime:
            yield fleet, shas, runtime, tmp_path


def test_outages_and_kills_mid_download_and_mid_install(
    tuf_device: tuple[Any, dict[str, str], ServerProcess, Path], published: dict[str, bytes]
) -> None:
    fleet, shas, runtime, root = tuf_device
    with NetProxy(fleet.server.port) as network, NetProxy(runtime.port) as local:
        device = Device(fleet, runtime, root, network.url, local.url, root / "agent")
        fleet.assign(DEVICE, ASSET, shas["v1"])
        first = device.once()
        assert first.returncode == 0, first.stderr
        assert device.active() == "v1" and device.serving() == "v1"

        device.start()
        fleet.assign(DEVICE, ASSET, shas["v2"])
        device.converges("v2")

        # The network drops: the agent backs off, the device keeps serving v2, and converges once it is back.
        network.down()
        fleet.assign(DEVICE, ASSET, shas["v3"])
        time.sleep(3)
        assert device.active() == "v2" and device.serving() == "v2"
        network.up()
        device.converges("v3")

        # Killed mid-download (the bundle's bytes stall half-way): v3 keeps serving; a restart converges.
        network.hold(b"/tuf/image/targets/", response_bytes=len(published["v4"]) // 2)
        fleet.assign(DEVICE, ASSET, shas["v4"])
        assert network.held.wait(30), device.log()
        device.kill()
        network.release()
        assert device.active() == "v3" and device.versions() == ["v1", "v2", "v3"] and device.serving() == "v3"
        kept = {hashlib.sha256(p.read_bytes()).hexdigest() for p in (root / "agent").rglob("*.edelta")}
        assert kept <= set(shas.values()), "no half-written bundle under its final name"
        device.start()
        device.converges("v4")

        # Killed mid-install, with the bundle half sent to the runtime: nothing installed, v4 keeps serving.
        local.hold(b"POST /v1/bundles", request_bytes=4000)
        fleet.assign(DEVICE, ASSET, shas["v5"])
        assert local.held.wait(30), device.log()
        device.kill()
        local.release()
        time.sleep(0.5)
        assert device.active() == "v4" and "v5" not in device.versions() and device.serving() == "v4"
        device.start()
        device.converges("v5")

        # Killed after the runtime got the whole bundle but before its answer: the runtime committed it; the
        # restarted agent finds it installed and active, and installs nothing twice.
        local.hold(b"POST /v1/bundles", response_bytes=0)
        fleet.assign(DEVICE, ASSET, shas["v6"])
        assert local.held.wait(30), device.log()
        deadline = time.monotonic() + 30
        while device.active() != "v6" and time.monotonic() < deadline:
            time.sleep(0.1)
        device.kill()
        local.release()
        device.start()
        device.converges("v6")

        # The fleet rolls the device back to v5 (installed): activated, not downloaded again.
        fleet.assign(DEVICE, ASSET, shas["v5"])
        device.converges("v5")
        assert not any((root / "agent" / "tuf" / "targets").iterdir()), "converged: no bundle left in the cache"
        time.sleep(1.5)  # a report or two
        device.stop()
    history = device.history()
    kinds = [(e["kind"], e["version"]) for e in history["events"]]
    assert ("rolled_back", "v5") in kinds and ("installed", "v6") in kinds
    assert sum(1 for kind in kinds if kind == ("installed", "v5")) == 1
    assert history["installed"][ASSET]["active_version"] == "v5"
    assert any("unclean stop (3 so far)" in e["detail"] for e in history["events"]), kinds
    health = {h["version"]: h for h in history["health"]}
    assert health["v5"]["crashes"] == 3


def test_disk_full_on_the_device(tmp_path: Path, keys: dict[str, Any], published: dict[str, bytes]) -> None:
    """The runtime's disk full (its install fails), then the agent's (the download cannot be kept): the previous
    adapter serves throughout; once space is back, the device converges."""
    runtime_disk, agent_disk = tmp_path / "runtime-disk", tmp_path / "agent-disk"
    if not (mount_tmpfs(runtime_disk, "16m") and mount_tmpfs(agent_disk, "4m")):
        pytest.skip("a small tmpfs cannot be mounted here (needs root)")
    base = read_bundle(published["v1"]).base_sha256
    try:
        with tuf_support.tuf_fleet(f"sqlite:///{tmp_path / 'fleet.db'}", tmp_path, keys["public"], base) as fleet:
            shas = {version: fleet.publish(data)["sha256"] for version, data in published.items()}
            fleet.enrol(DEVICE)
            with ServerProcess(runtime_disk / "state", token=RUNTIME_TOKEN,
                               args=["--trusted-key", str(keys["public"]), "--threads", "1"]) as runtime:
                device = Device(fleet, runtime, tmp_path, fleet.server.url, runtime.url, agent_disk / "agent")
                fleet.assign(DEVICE, ASSET, shas["v1"])
                assert device.once().returncode == 0 and device.serving() == "v1"

                fleet.assign(DEVICE, ASSET, shas["v2"])
                fill(runtime_disk / "filler")
                failed = device.once()
                assert failed.returncode == 1 and "install of pump-1 v2 failed" in failed.stderr, failed.stderr
                assert device.active() == "v1" and device.versions() == ["v1"] and device.serving() == "v1"
                (runtime_disk / "filler").unlink()
                converged = device.once()
                assert converged.returncode == 0, converged.stderr
                assert device.serving() == "v2"

                fleet.assign(DEVICE, ASSET, shas["v3"])
                fill(agent_disk / "filler")
                failed = device.once()
                assert failed.returncode == 1, failed.stderr
                assert device.active() == "v2" and device.serving() == "v2"
                (agent_disk / "filler").unlink()
                converged = device.once()
                assert converged.returncode == 0, converged.stderr
                assert device.serving() == "v3"
            kinds = [(e["kind"], e["version"]) for e in device.history()["events"]]
            assert ("error", "v2") in kinds and ("installed", "v2") in kinds and ("installed", "v3") in kinds
    finally:
        for folder in (runtime_disk, agent_disk):
            subprocess.run(["umount", "-l", str(folder)], check=False)


# The fleet server, unchanged but for how long its online metadata is valid: a week compressed to seconds.
SHORT_LIVED = {"timestamp": 8, "snapshot": 10, "director-timestamp": 8, "director-snapshot": 10,
               "director-targets": 10}


@dataclass
class ShortLivedFleet(FleetServer):
    """``edgepeft fleet serve`` with ``tuf_repo.PERIODS`` shortened (seconds) before it starts."""

    def command(self) -> list[str]:
        serve = super().command()
        script = ("import sys; from datetime import timedelta; from edgepeft.fleet import tuf_repo; "
                  f"tuf_repo.PERIODS.update({{k: timedelta(seconds=v) for k, v in {SHORT_LIVED!r}.items()}}); "
                  "from edgepeft.fleet.__main__ import main; sys.argv[1:] = " + repr(serve[3:]) + "; main()")
        return [self.python, "-c", script]


def test_back_after_its_metadata_expired(tmp_path: Path, keys: dict[str, Any], published: dict[str, bytes]) -> None:
    """A device away longer than its metadata lives (a week: the timestamp lives a day, snapshots and director
    targets a week; here seconds) comes back with everything it trusts expired, fetches fresh metadata (the
    server re-signs what expired when asked) and converges."""
    from tuf.api.metadata import Metadata

    from edgepeft.fleet.db import Database

    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    offline, online = tmp_path / "keys-offline", tmp_path / "keys-online"
    done = fleet_cli("tuf", "init", "--db", db, "--offline-keys", str(offline), "--online-keys", str(online),
                     "--bin-bits", "4")
    assert done.returncode == 0, done.stderr
    base = read_bundle(published["v1"]).base_sha256
    with ShortLivedFleet(state_dir=tmp_path / "fleet", db=db, trusted_keys=(keys["public"],), startup_s=60.0,
                         args=["--online-keys", str(online)]) as server, \
            ServerProcess(tmp_path / "runtime", token=RUNTIME_TOKEN,
                          args=["--trusted-key", str(keys["public"]), "--threads", "1"]) as runtime:
        with server.client() as http:
            assert http.post("/v1/bases", json={"name": "tiny", "sha256": base, "reason": "base"}).status_code == 201
        database = Database.open(db, migrate=False)
        try:
            fleet = tuf_support.TufFleet(server, database, offline, online, base)
            shas = {version: fleet.publish(data)["sha256"] for version, data in published.items()}
            fleet.enrol(DEVICE)
            device = Device(fleet, runtime, tmp_path, server.url, runtime.url, tmp_path / "agent")
            fleet.assign(DEVICE, ASSET, shas["v1"])
            assert device.once().returncode == 0 and device.serving() == "v1"
            trusted = [Metadata.from_file(str(p)).signed for p in (tmp_path / "agent").rglob("timestamp.json")]
            assert len(trusted) == 2 and not any(t.is_expired() for t in trusted)
            time.sleep(11)  # away
            assert all(t.is_expired() for t in trusted), "everything the device trusts should have expired"
            fleet.assign(DEVICE, ASSET, shas["v2"])
            back = device.once()
            assert back.returncode == 0, back.stderr
            assert device.serving() == "v2"
        finally:
            database.close()
