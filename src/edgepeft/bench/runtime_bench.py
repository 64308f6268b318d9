"""Device-runtime benchmarks, as plain functions returning dicts of numbers (the bench harness calls them).

- :func:`install_activate_times`: verify + store + load + commit a signed bundle (installs spaced as on a device,
  and back to back), and activation alone (cached and cold from disk), p50/p99;
- :func:`load_test`: hot swap under load over HTTP (:func:`edgepeft.bench.loadtest.run_load_test`), with
  request and swap latency;
- :func:`scoring_throughput`: rows/s and request latency, torch vs ONNX Runtime (fp32 and int8), and the score
  change int8 causes;
- :func:`adapter_memory`: RSS per resident adapter, measured in a fresh process while loading 50 of them, for
  the torch engine, the ONNX engine, and (the baseline the resident base avoids) detectors each with its own base.

Every function trains its own small adapters on synthetic data (tiny base), so each runs standalone.

Example:
    >>> numbers = install_activate_times(n_bundles=5)   # doctest: +SKIP
    >>> sorted(numbers)[:2]                              # doctest: +SKIP
    ['activate_cached_p50_ms', 'activate_cached_p99_ms']
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import gc
import multiprocessing
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edgepeft.bench.loadtest import payloads, run_load_test, train_versions

__all__ = ["adapter_memory", "install_activate_times", "load_test", "run_all", "run_load_test",
           "scoring_throughput"]


def _percentiles(seconds: list[float], prefix: str) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    return {f"{prefix}_p50_ms": round(float(np.percentile(ms, 50)), 3),
            f"{prefix}_p99_ms": round(float(np.percentile(ms, 99)), 3)}


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Serve-like settings: one torch thread (the runtime's default)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def install_activate_times(
    n_bundles: int = 100, n_swaps: int = 200, gap_s: float = 0.1, n_burst: int = 30
) -> dict[str, Any]:
    """Install+activate of signed bundles (in-process, the HTTP layer adds about a millisecond), then activation.

    Returns p50/p99 of: install+activate (verify signature, decode in memory, load on the resident base and
    smoke-test, commit: one install-journal record appended and flushed) with installs ``gap_s`` apart, as
    updates arrive on a device (each finds the spare skeleton its predecessor's refill built); the same back to
    back (``burst``: the refill of one install competes with the next); activate of a loaded version; activate
    of a version evicted from memory. The runtime is settled (:meth:`DeviceRuntime.settle`) as a server is.
    """
    from edgepeft.delta import generate_key, pack_bundle, save_keypair
    from edgepeft.runtime.service import DeviceRuntime, RuntimeConfig

    with tempfile.TemporaryDirectory(prefix="edgepeft-bench-") as tmp, _one_thread():
        root = Path(tmp)
        directory = train_versions(root / "adapters", 1, steps=5)[0]
        key = generate_key()
        public = save_keypair(key, root / "key")
        total = 1 + n_bundles + n_burst
        bundles = [pack_bundle(directory, key, asset_id="pump-1", version=f"{i}", release=i)
                   for i in range(1, total + 1)]
        with DeviceRuntime.open(RuntimeConfig(state_dir=root / "state", trusted_keys=[public])) as runtime:
            runtime.install_bundle(bundles[0])  # imports and first-load costs are not what this measures
            runtime.settle()  # as `edgepeft serve` does once it is ready
            pool = getattr(runtime.engine, "pool", None)
            hits_before = pool.hits if pool is not None else 0
            install, burst = [], []
            for number, data in enumerate(bundles[1:], start=1):
                if number <= n_bundles:
                    time.sleep(gap_s)
                elif number == n_bundles + 1:
                    spaced_hits = (pool.hits if pool is not None else 0) - hits_before
                started = time.perf_counter()
                runtime.install_bundle(data)
                (install if number <= n_bundles else burst).append(time.perf_counter() - started)
            if n_burst == 0:
                spaced_hits = (pool.hits if pool is not None else 0) - hits_before
            cached = []
            for number in range(n_swaps):
                started = time.perf_counter()
                runtime.activate("pump-1", str(2 + number % 2))
                cached.append(time.perf_counter() - started)
            cold = []
            for number in range(min(n_swaps, 50)):
                runtime.cache.discard(("pump-1", str(3 + number % 2)))
                time.sleep(gap_s / 10)
                started = time.perf_counter()
                runtime.activate("pump-1", str(3 + number % 2))
                cold.append(time.perf_counter() - started)
        bundle_bytes = len(bundles[0])
        floor = _durable_write_times(root / "floor", bundle_bytes, n=n_bundles)
    return {"bundles": len(install), "burst_bundles": len(burst), "gap_ms": gap_s * 1000,
            **_percentiles(floor, "durable_write_floor"),
            "bundle_bytes": bundle_bytes,
            "spaced_installs_with_pooled_skeleton": spaced_hits,
            **_percentiles(install, "install_activate"), **_percentiles(burst, "install_activate_burst"),
            **_percentiles(cached, "activate_cached"), **_percentiles(cold, "activate_cold")}


def _durable_write_times(folder: Path, nbytes: int, n: int) -> list[float]:
    """Seconds to write one ``nbytes`` file durably (write, fsync, fsync its folder): the disk's own floor under any
    install that must survive a power cut, measured beside the installs (virtual disks vary a lot)."""
    import os

    folder.mkdir(parents=True, exist_ok=True)
    blob = os.urandom(nbytes)
    times = []
    for number in range(n):
        started = time.perf_counter()
        with open(folder / f"{number}.bin", "wb") as handle:
            handle.write(blob)
            handle.flush()
            os.fsync(handle.fileno())
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        times.append(time.perf_counter() - started)
    return times


def load_test(duration_s: float = 60.0, rate: float = 200.0, swaps: int = 500, engine: str = "torch") -> dict[str, Any]:
    """Hot swap under load: see :func:`edgepeft.bench.loadtest.run_load_test` (the swap latency is in it)."""
    return run_load_test(duration_s=duration_s, rate=rate, swaps=swaps, engine=engine)


def scoring_throughput(rows_per_request: tuple[int, ...] = (32, 256, 4096), seconds: float = 3.0) -> dict[str, Any]:
    """Rows/s and per-request latency of one adapter, torch vs ONNX Runtime fp32 vs int8 (one thread each).

    Also the score change int8 causes on a 2,000-row stream with a fault: max and median relative change,
    and the share of rows whose anomaly flag changes.
    """
    from edgepeft.runtime.onnx import open_onnx_engine
    from edgepeft.runtime.resident import ResidentBase, load_torch_version

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="edgepeft-bench-") as tmp, _one_thread():
        root = Path(tmp)
        directory = train_versions(root / "adapters", 1, steps=20)[0]
        resident = ResidentBase.load("tiny")
        engines: dict[str, Callable[[], Any]] = {
            "torch": lambda: load_torch_version(resident, directory, asset_id="a", version="1"),
            "onnx": lambda: open_onnx_engine(resident, root / "onnx", threads=1).load(
                directory, asset_id="a", version="1", release=1),
            "onnx_int8": lambda: open_onnx_engine(resident, root / "onnx", int8=True, threads=1).load(
                directory, asset_id="a", version="1", release=1),
        }
        served = {name: make() for name, make in engines.items()}
        for rows in rows_per_request:
            body = payloads(2, rows)[1]
            for name, model in served.items():
                model.score_all(body)  # warm-up
                latencies = []
                deadline = time.perf_counter() + seconds
                while time.perf_counter() < deadline or len(latencies) < 3:
                    started = time.perf_counter()
                    model.score_all(body)
                    latencies.append(time.perf_counter() - started)
                out[f"{name}_rows{rows}_rows_per_s"] = round(rows * len(latencies) / sum(latencies), 1)
                out.update(_percentiles(latencies, f"{name}_rows{rows}_latency"))
        stream = payloads(2, 2000)[1]
        reference = served["onnx"].score_all(stream)
        quantised = served["onnx_int8"].score_all(stream)
        torch_scores = served["torch"].score_all(stream)["score"]
        change = np.abs(quantised["score"] - reference["score"]) / np.maximum(np.abs(reference["score"]), 1e-12)
        out.update({
            "onnx_vs_torch_max_relative_score_diff": float(np.max(
                np.abs(reference["score"] - torch_scores) / np.maximum(np.abs(torch_scores), 1e-12))),
            "int8_max_relative_score_change": float(change.max()),
            "int8_median_relative_score_change": float(np.median(change)),
            "int8_flag_changes_share": float(np.mean(quantised["anomaly"] != reference["anomaly"])),
            "int8_graph_bytes": (root / "onnx").glob("*.int8.onnx").__next__().stat().st_size,
            "fp32_graph_bytes": next(p for p in (root / "onnx").glob("*.onnx")
                                     if not p.name.endswith(".int8.onnx")).stat().st_size,
        })
    return out


def adapter_memory(n_adapters: int = 50) -> dict[str, Any]:
    """RSS increase per resident adapter while loading ``n_adapters`` LoRA versions, each engine in a fresh
    process (so allocator reuse from earlier work does not hide the cost)."""
    with tempfile.TemporaryDirectory(prefix="edgepeft-bench-") as tmp:
        directory = train_versions(Path(tmp) / "adapters", 1, steps=5)[0]
        out: dict[str, Any] = {"adapters": n_adapters}
        context = multiprocessing.get_context("spawn")
        for mode in ("torch", "onnx", "own_base"):
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
                result = pool.submit(_memory_child, str(directory), mode, n_adapters, tmp).result()
            out.update({f"{mode}_{key}": value for key, value in result.items()})
    return out


def _memory_child(directory: str, mode: str, n_adapters: int, workdir: str) -> dict[str, Any]:
    import psutil
    import torch

    from edgepeft.detect.detector import AnomalyDetector
    from edgepeft.runtime.onnx import open_onnx_engine
    from edgepeft.runtime.resident import ResidentBase, load_torch_version

    torch.set_num_threads(1)
    resident = ResidentBase.load("tiny")
    engine = open_onnx_engine(resident, Path(workdir) / f"onnx-{mode}", threads=1)

    def load(index: int) -> Any:
        if mode == "torch":
            return load_torch_version(resident, Path(directory), asset_id=f"a{index}", version="1")
        if mode == "onnx":
            return engine.load(Path(directory), asset_id=f"a{index}", version="1", release=1)
        return AnomalyDetector.load(directory)  # each with its own copy of the base: what sharing avoids

    rows = payloads(1, 64)[0]
    keep = [load(-1)]
    for _ in range(20):  # one-time costs (imports, graph export) and the scoring heap's high-water mark
        keep[0].score_all(rows)
    gc.collect()
    process = psutil.Process()
    before = process.memory_info().rss
    keep += [load(index) for index in range(n_adapters)]
    gc.collect()
    loaded = process.memory_info().rss
    for model in keep[1:]:
        model.score_all(rows)
    gc.collect()
    scored = process.memory_info().rss
    private = [getattr(m, "private_bytes", 0) for m in keep[1:]]
    return {"rss_per_adapter_bytes": int((loaded - before) / n_adapters),
            "rss_per_adapter_after_scoring_bytes": int((scored - before) / n_adapters),
            "estimated_private_bytes": int(np.mean(private)) if any(private) else None}


def run_all(quick: bool = False) -> dict[str, Any]:
    """Every runtime benchmark; ``quick`` shortens the load test (10 s, 100 requests/s, 50 swaps)."""
    return {
        "install_activate": install_activate_times(),
        "scoring": scoring_throughput(),
        "memory": adapter_memory(),
        "load_test": load_test(10, 100, 50) if quick else load_test(),
    }
