"""Per version score statistics: the ring and its quantiles, the runtime's bookkeeping on swaps, and the HTTP
endpoint on a real ``edgepeft serve`` process."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import numpy as np
import pytest

from edgepeft.bench.loadtest import ServerProcess, payloads
from edgepeft.detect.detector import AnomalyDetector
from edgepeft.runtime.metrics import STATS_RING, ScoreStats
from edgepeft.runtime.resident import ResidentBase
from edgepeft.runtime.service import DeviceRuntime, RuntimeConfig
from edgepeft.runtime.state import UnknownAssetError
from tests.unit.runtime.conftest import ASSET, bundle

ROWS = payloads(2, 96)[1]
TOKEN = "stats-test-token-0123456789abcdef"


def test_ring_keeps_the_most_recent_rows_and_quantiles_use_the_threshold_scale() -> None:
    stats = ScoreStats()
    stats.record("a", "v1", np.full(STATS_RING, 100.0), threshold=10.0, alerts=STATS_RING)
    # Newer rows wrap around the ring in pieces of every size, then replace all of it.
    for chunk in (1, 7, STATS_RING - 1, 3):
        stats.record("a", "v1", np.full(chunk, 5.0), threshold=10.0, alerts=0)
    row = stats.versions("a")[0]
    assert row["rows"] == 2 * STATS_RING + 10 and row["alerts"] == STATS_RING
    assert row["score_q50"] == row["score_q99"] == pytest.approx(0.5), "the old rows must have left the ring"
    # One request larger than the ring keeps its own last rows.
    stats.record("a", "v1", np.r_[np.full(10, 1e6), np.arange(STATS_RING, dtype=float)], threshold=1.0, alerts=0)
    row = stats.versions("a")[0]
    assert row["score_q50"] == pytest.approx(np.quantile(np.arange(STATS_RING, dtype=np.float32), 0.5))
    assert row["score_q99"] < STATS_RING


def test_warm_up_rows_and_non_finite_scores_stay_out_of_the_quantiles() -> None:
    stats = ScoreStats()
    stats.record("a", "v1", np.array([50.0, 50.0, 1.0, np.nan, np.inf, 2.0]), threshold=2.0, alerts=0, skip=2)
    row = stats.versions("a")[0]
    assert row["rows"] == 6
    assert row["score_q50"] == pytest.approx(0.75) and row["score_q99"] == pytest.approx(0.995)


def test_versions_are_separate_and_listed_in_the_order_they_became_active() -> None:
    stats = ScoreStats()
    stats.activated("a", "v1")
    stats.activated("b", "v9")
    stats.activated("a", "v2")
    stats.failed("a", "v2")
    stats.activated("a", "v1")  # re-activated: its counts and since are kept
    rows = stats.versions("a")
    assert [r["version"] for r in rows] == ["v1", "v2"]
    assert rows[0] == {"version": "v1", "rows": 0, "alerts": 0, "score_q50": None, "score_q95": None,
                       "score_q99": None, "errors": 0, "since": rows[0]["since"]}
    assert rows[1]["errors"] == 1 and rows[0]["since"] <= rows[1]["since"] and rows[0]["since"].endswith("Z")
    assert stats.versions("nobody") == []


def test_concurrent_records_lose_nothing() -> None:
    stats = ScoreStats()

    def work() -> None:
        for _ in range(500):
            stats.record("a", "v1", np.ones(3), threshold=1.0, alerts=1)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    row = stats.versions("a")[0]
    assert row["rows"] == 4 * 500 * 3 and row["alerts"] == 4 * 500


def test_runtime_counts_per_active_version(tmp_path: Path, versions: list[Path]) -> None:
    resident = ResidentBase.load("tiny")
    config = RuntimeConfig(state_dir=tmp_path / "state", base="tiny")
    offline = AnomalyDetector.load(versions[0]).score_all(ROWS)
    with DeviceRuntime.open(config, resident=resident) as runtime:
        runtime.install_directory(versions[0], asset_id=ASSET, version="1", release=1)
        runtime.score(ASSET, ROWS)
        runtime.score(ASSET, ROWS)
        with pytest.raises(Exception, match="channels"):
            runtime.score(ASSET, ROWS[:, :2])
        runtime.install_directory(versions[1], asset_id=ASSET, version="2", release=2)
        runtime.score(ASSET, ROWS)
        stats = runtime.version_stats(ASSET)
        by_version = {row["version"]: row for row in stats["versions"]}
        assert list(by_version) == ["1", "2"]
        one = by_version["1"]
        assert one["rows"] == 2 * len(ROWS) and one["errors"] == 1
        assert one["alerts"] == 2 * int(offline["anomaly"].sum())
        threshold = AnomalyDetector.load(versions[0]).threshold_
        skip = AnomalyDetector.load(versions[0]).warmup_rows_
        assert one["score_q50"] == pytest.approx(float(np.quantile(
            np.tile(offline["score"][skip:] / threshold, 2).astype(np.float32), 0.5)), rel=1e-4)
        assert by_version["2"]["rows"] == len(ROWS) and by_version["2"]["errors"] == 0
        runtime.rollback(ASSET)
        runtime.activate(ASSET, "2")
        assert [r["version"] for r in runtime.version_stats(ASSET)["versions"]] == ["1", "2"]
        with pytest.raises(UnknownAssetError):
            runtime.version_stats("nobody")
    # A new process counts from zero, starting with the versions active when it opens.
    with DeviceRuntime.open(config, resident=resident) as again:
        assert [(r["version"], r["rows"]) for r in again.version_stats(ASSET)["versions"]] == [("2", 0)]


def test_stats_endpoint_on_a_real_server(tmp_path: Path, versions: list[Path], keys: dict[str, object]) -> None:
    with ServerProcess(tmp_path / "state", token=TOKEN,
                       args=["--trusted-key", str(keys["public"]), "--threads", "1"]) as server:
        installed = httpx.post(f"{server.url}/v1/bundles", content=bundle(versions[0], keys["trusted"], "1", 1),
                               headers=server.auth, timeout=60)
        assert installed.status_code == 200, installed.text
        for _ in range(2):
            assert httpx.post(f"{server.url}/v1/assets/{ASSET}/score", json={"rows": ROWS.tolist()},
                              timeout=60).status_code == 200
        assert httpx.post(f"{server.url}/v1/assets/{ASSET}/score", json={"rows": ROWS[:, :2].tolist()},
                          timeout=60).status_code == 422
        answer = httpx.get(f"{server.url}/v1/assets/{ASSET}/stats", timeout=30)  # no token needed to read
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["asset_id"] == ASSET and [v["version"] for v in body["versions"]] == ["1"]
        row = body["versions"][0]
        assert row["rows"] == 2 * len(ROWS) and row["errors"] == 1
        assert 0 < row["score_q50"] <= row["score_q95"] <= row["score_q99"]
        missing = httpx.get(f"{server.url}/v1/assets/nobody/stats", timeout=30)
        assert missing.status_code == 404 and set(missing.json()) == {"error", "detail"}
        assert "/v1/assets/{asset_id}/stats" in httpx.get(f"{server.url}/openapi.json").json()["paths"]
        metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
        assert f'edgepeft_version_rows_total{{asset="{ASSET}",version="1"}} {2 * len(ROWS)}' in metrics
        assert f'edgepeft_version_score_errors_total{{asset="{ASSET}",version="1"}} 1' in metrics
