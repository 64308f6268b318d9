"""Prove hot swap is atomic: a real client against a real server while adapters are swapped.

:func:`run_load_test` trains a few adapter versions of one asset, installs them in a fresh state directory,
starts ``python -m edgepeft.runtime serve`` in a subprocess (:class:`ServerProcess`), then sends scoring
requests at a fixed rate (open loop: requests go out on schedule whether or not earlier ones have returned)
while another task activates the versions in turn. Every answer is checked three ways:
- it is a 200 with one score per row (``errors`` counts the rest);
- its numbers equal the offline scores of the version it is tagged with (``AnomalyDetector.load`` +
  ``score_all`` in this process): a request that mixed two adapters, or was tagged with the wrong one,
  matches neither and counts in ``mismatches``;
- the version it is tagged with was active at some moment between sending and receiving it (``stale``
  counts the rest: a new request must get the new version once the swap is acknowledged).

Example:
    >>> result = run_load_test(duration_s=10, rate=100, swaps=50)     # doctest: +SKIP
    >>> result["errors"], result["mismatches"], result["stale"]        # doctest: +SKIP
    (0, 0, 0)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgepeft.core.errors import ConfigError, OutputError

TOKEN = "load-test-token-0123456789abcdef"
ASSET = "pump-1"


def free_port() -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    """``python -m edgepeft.runtime serve`` in a subprocess on a free port; a context manager.

    Attributes:
        state_dir: the server's state folder.
        token: write token (passed through a token file).
        args: extra ``serve`` options, e.g. ``["--engine", "onnx"]``.
        startup_s: how long to wait for ``/health`` to answer.
        python: the interpreter to run it with (another venv's, e.g. a device install); default: this one.
        env: extra environment variables for the server.
        poll_s: pause between ``/health`` polls while it starts.
    """

    state_dir: Path
    token: str = TOKEN
    args: Sequence[str] = ()
    startup_s: float = 90.0
    python: str = sys.executable
    env: dict[str, str] = field(default_factory=dict)
    poll_s: float = 0.1
    port: int = 0
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def start(self) -> ServerProcess:
        import httpx

        self.state_dir = Path(self.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log_path = self.state_dir.parent / f".{self.state_dir.name}.server.log"
        command = self.command()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + self.startup_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise OutputError(f"server exited with code {self.process.returncode} during start-up:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(self.poll_s)
        self.stop()
        raise OutputError(f"server did not answer /health within {self.startup_s:.0f} s:\n{self.log()}")

    def command(self) -> list[str]:
        """The server's command line (``self.port`` is chosen by then); a subclass serves another app."""
        token_file = self.state_dir.parent / f".{self.state_dir.name}.token"
        token_file.write_text(self.token + "\n")
        return [self.python, "-m", "edgepeft.runtime", "serve", "--state", str(self.state_dir),
                "--port", str(self.port), "--token-file", str(token_file), *self.args]

    def stop(self) -> None:
        """SIGTERM (uvicorn shuts down gracefully), then SIGKILL if it hangs; only our own child is touched."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path and self.log_path.exists() else ""

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def series(n_rows: int, n_channels: int = 3, seed: int = 0, period: float = 25.0) -> np.ndarray:
    """Coupled noisy sines: a stand-in asset whose channels move together."""
    rng = np.random.default_rng(seed)
    t = np.arange(n_rows)
    driver = np.sin(2 * np.pi * t / period) + 0.5 * np.sin(2 * np.pi * t / 7)
    cols = [(k + 1) * np.roll(driver, 2 * k) + 0.05 * rng.normal(size=n_rows) for k in range(n_channels)]
    return np.stack(cols, axis=1).astype(np.float32)


def train_versions(workdir: Path, n_versions: int = 3, *, method: str = "lora", steps: int = 20,
                   base: str = "tiny") -> list[Path]:
    """``n_versions`` detectors of one asset that score differently (different data periods and seeds)."""
    from edgepeft.detect.detector import AnomalyDetector

    dirs = []
    for index in range(n_versions):
        train = series(600, seed=index, period=25.0 + 4 * index)
        det = AnomalyDetector(base=base, method=method, rank=4, steps=steps, seed=index).fit(train)
        dirs.append(det.save(workdir / f"v{index + 1}"))
    return dirs


def payloads(n_payloads: int, rows: int, n_channels: int = 3) -> list[np.ndarray]:
    """Request bodies: normal stretches, some with a channel broken away from the others."""
    out = []
    for index in range(n_payloads):
        values = series(rows, n_channels, seed=100 + index)
        if index % 2:
            values[rows // 2 :, 1] = -0.5 * values[rows // 2 :, 1] + 0.8
        out.append(values)
    return out


@dataclass
class _Swap:
    version: str
    sent: float
    acked: float = float("inf")


def run_load_test(
    duration_s: float = 60.0,
    rate: float = 200.0,
    swaps: int = 500,
    *,
    engine: str = "torch",
    rows_per_request: int = 32,
    n_versions: int = 3,
    adapter_dirs: Sequence[str | Path] | None = None,
    workdir: str | Path | None = None,
    threads: int = 1,
    concurrency: int = 64,
) -> dict[str, Any]:
    """Score at ``rate`` requests/s for ``duration_s`` while activating versions ``swaps`` times; see module doc.

    Trains ``n_versions`` adapters (or takes ``adapter_dirs``: saved detectors of one asset on the tiny base,
    3 channels), installs them in a new state directory and starts a server (``engine``, ``threads``) for the run.
    Returns what :func:`drive_load` returns.
    """
    from edgepeft.runtime.service import DeviceRuntime, RuntimeConfig

    if duration_s <= 0 or rate <= 0 or swaps < 0:
        raise ConfigError("duration_s and rate must be positive and swaps >= 0")
    with _workdir(workdir) as root:
        dirs = [Path(d) for d in adapter_dirs] if adapter_dirs else train_versions(root / "adapters", n_versions)
        state_dir = root / "state"
        # Installed offline, as provisioning would; the HTTP install path has its own tests.
        with DeviceRuntime.open(RuntimeConfig(state_dir=state_dir, base="tiny", warm=False)) as runtime:
            for release, directory in enumerate(dirs, start=1):
                runtime.install_directory(directory, asset_id=ASSET, version=str(release), release=release)
        with ServerProcess(state_dir, args=["--engine", engine, "--threads", str(threads)]) as server:
            return drive_load(server, ASSET, {str(i): d for i, d in enumerate(dirs, start=1)}, duration_s=duration_s,
                              rate=rate, swaps=swaps, rows_per_request=rows_per_request, concurrency=concurrency,
                              tolerance=1e-5 if engine == "torch" else 1e-3)


def drive_load(
    server: ServerProcess,
    asset_id: str,
    versions: dict[str, Path],
    *,
    duration_s: float,
    rate: float,
    swaps: int,
    rows_per_request: int = 32,
    concurrency: int = 64,
    tolerance: float = 1e-5,
) -> dict[str, Any]:
    """Load a running server whose ``asset_id`` has ``versions`` installed (version -> its detector folder).

    Sends scoring requests at ``rate`` for ``duration_s`` while activating the versions in turn ``swaps`` times,
    and checks every answer (module docstring). Returns counts (requests, ok, errors, mismatches, stale, swaps,
    swap errors), the achieved rate, request latency p50/p99/max and swap latency p50/p99 (client round trip,
    and server-side from the swap answers), in milliseconds.
    """
    from edgepeft.detect.detector import AnomalyDetector

    bodies = payloads(8, rows_per_request)
    expected = {}
    for version, directory in versions.items():
        detector = AnomalyDetector.load(directory)
        for index, body in enumerate(bodies):
            expected[(version, index)] = detector.score_all(body)
    active = _get_json(server, f"/v1/assets/{asset_id}")["active"]
    raw = asyncio.run(_drive(server, asset_id, active, bodies, list(versions), duration_s, rate, swaps, concurrency))
    metrics_text = _get(server, "/metrics")
    return _summarise(raw, expected, tolerance, rate, metrics_text)


@contextlib.contextmanager
def _workdir(workdir: str | Path | None) -> Iterator[Path]:
    if workdir is not None:
        path = Path(workdir)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="edgepeft-load-") as tmp:
        yield Path(tmp)


def _get(server: ServerProcess, path: str) -> str:
    import httpx

    return httpx.get(server.url + path, timeout=10.0).text


def _get_json(server: ServerProcess, path: str) -> Any:
    import httpx

    return httpx.get(server.url + path, timeout=10.0).json()


async def _drive(
    server: ServerProcess, asset_id: str, active: str, bodies: list[np.ndarray], versions: list[str],
    duration_s: float, rate: float, swaps: int, concurrency: int,
) -> dict[str, Any]:
    import httpx

    # Several small connection pools rather than one big one: httpx's pool does work proportional to its
    # connections times its queued requests on every request, which at 64 connections costs the client more CPU
    # than the server spends scoring.
    per_client = 8
    n_clients = max(1, -(-concurrency // per_client))
    limits = httpx.Limits(max_connections=per_client, max_keepalive_connections=per_client)
    results: list[tuple[int, float, float, int, Any]] = []
    swap_log: list[_Swap] = []
    swap_errors: list[str] = []
    server_swap_s: list[float] = []
    json_bodies = [{"rows": body.tolist()} for body in bodies]
    gate = asyncio.Semaphore(concurrency)
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(httpx.AsyncClient(base_url=server.url, limits=limits,
                                                                     timeout=60.0)) for _ in range(n_clients)]
        admin = await stack.enter_async_context(httpx.AsyncClient(base_url=server.url, timeout=60.0))
        swap_log.append(_Swap(active, sent=-float("inf"), acked=-float("inf")))  # active before the first swap

        async def one(number: int) -> None:
            index = number % len(bodies)
            async with gate:
                sent = time.perf_counter()
                try:
                    response = await clients[number % n_clients].post(f"/v1/assets/{asset_id}/score",
                                                                      json=json_bodies[index])
                    status = response.status_code
                    payload = response.json() if status == 200 else response.text
                except httpx.HTTPError as exc:
                    status, payload = -1, repr(exc)
                results.append((index, sent, time.perf_counter(), status, payload))

        async def swapper(start: float) -> None:
            if swaps == 0:
                return
            interval = duration_s / swaps
            for number in range(swaps):
                await asyncio.sleep(max(0.0, start + (number + 0.5) * interval - time.perf_counter()))
                version = versions[number % len(versions)]
                swap = _Swap(version, sent=time.perf_counter())
                swap_log.append(swap)
                try:
                    response = await admin.post(f"/v1/assets/{asset_id}/activate", json={"version": version},
                                                headers=server.auth)
                    swap.acked = time.perf_counter()
                    if response.status_code != 200:
                        swap_errors.append(f"{response.status_code}: {response.text[:200]}")
                    else:
                        server_swap_s.append(float(response.json()["swap_seconds"]))
                except httpx.HTTPError as exc:
                    swap_errors.append(repr(exc))

        start = time.perf_counter()
        tasks = []
        swap_task = asyncio.create_task(swapper(start))
        total = int(duration_s * rate)
        for number in range(total):
            await asyncio.sleep(max(0.0, start + number / rate - time.perf_counter()))
            tasks.append(asyncio.create_task(one(number)))
        await asyncio.gather(*tasks)
        await swap_task
        elapsed = time.perf_counter() - start
    return {"results": results, "swaps": swap_log, "swap_errors": swap_errors, "server_swap_s": server_swap_s,
            "elapsed": elapsed}


def _active_during(swap_log: list[_Swap], version: str, sent: float, received: float) -> bool:
    """Was ``version`` possibly the active one at some moment in [sent, received]?

    Version i may be active from when its activation was sent until the next activation was acknowledged.
    """
    for i, swap in enumerate(swap_log):
        if swap.version != version:
            continue
        until = swap_log[i + 1].acked if i + 1 < len(swap_log) else float("inf")
        if swap.sent <= received and sent <= until:
            return True
    return False


def _summarise(raw: dict[str, Any], expected: dict[tuple[str, int], dict[str, np.ndarray]], tolerance: float,
               rate: float, metrics_text: str) -> dict[str, Any]:
    errors = mismatches = stale = 0
    worst = 0.0
    latencies = []
    seen: dict[str, int] = {}
    first_errors: list[str] = []
    for index, sent, received, status, payload in raw["results"]:
        latencies.append(received - sent)
        if status != 200:
            errors += 1
            if len(first_errors) < 5:
                first_errors.append(f"{status}: {str(payload)[:200]}")
            continue
        version = payload["version"]
        seen[version] = seen.get(version, 0) + 1
        reference = expected.get((version, index))
        if reference is None:
            mismatches += 1
            continue
        score = np.asarray(payload["score"])
        deviation = float(np.max(np.abs(score - reference["score"]) / np.maximum(np.abs(reference["score"]), 1e-6)))
        worst = max(worst, deviation)
        if (len(score) != len(reference["score"]) or deviation > tolerance
                or not np.allclose(payload["p_anomaly"], reference["p_anomaly"], rtol=tolerance, atol=tolerance)):
            mismatches += 1
        if not _active_during(raw["swaps"], version, sent, received):
            stale += 1
    lat_ms = np.asarray(latencies) * 1000 if latencies else np.zeros(1)
    swap_rtt = [(s.acked - s.sent) * 1000 for s in raw["swaps"][1:] if np.isfinite(s.acked)]
    server_swap = np.asarray(raw["server_swap_s"]) * 1000 if raw["server_swap_s"] else np.zeros(1)
    requests = len(raw["results"])
    return {
        "duration_s": round(raw["elapsed"], 2),
        "target_rate": rate,
        "requests": requests,
        "ok": requests - errors,
        "errors": errors,
        "mismatches": mismatches,
        "stale": stale,
        "achieved_rate": round(requests / raw["elapsed"], 1),
        "latency_p50_ms": round(float(np.percentile(lat_ms, 50)), 2),
        "latency_p99_ms": round(float(np.percentile(lat_ms, 99)), 2),
        "latency_max_ms": round(float(lat_ms.max()), 2),
        "swaps": len(raw["swaps"]) - 1,
        "swap_errors": len(raw["swap_errors"]),
        "swap_latency_p50_ms": round(float(np.percentile(swap_rtt, 50)), 2) if swap_rtt else None,
        "swap_latency_p99_ms": round(float(np.percentile(swap_rtt, 99)), 2) if swap_rtt else None,
        "server_swap_p50_ms": round(float(np.percentile(server_swap, 50)), 3),
        "server_swap_p99_ms": round(float(np.percentile(server_swap, 99)), 3),
        "max_relative_score_deviation": worst,
        "versions_seen": dict(sorted(seen.items())),
        "first_errors": first_errors + raw["swap_errors"][:3],
        "server_swaps_total": _metric(metrics_text, "edgepeft_swaps_total"),
    }


def _metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None
