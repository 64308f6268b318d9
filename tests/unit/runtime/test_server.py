"""The HTTP API against a real uvicorn server in a subprocess: every endpoint, auth, rejection, restart."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from edgepeft.bench.loadtest import ServerProcess, drive_load, payloads
from edgepeft.detect.detector import AnomalyDetector
from edgepeft.runtime.journal import Journal
from tests.unit.runtime.conftest import ASSET, bundle

ROWS = payloads(2, 64)[1]
TOKEN = "server-test-token-0123456789abcdef"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, object]) -> Iterator[ServerProcess]:
    state = tmp_path_factory.mktemp("server") / "state"
    process = ServerProcess(state, token=TOKEN, args=["--trusted-key", str(keys["public"]), "--threads", "1"])
    with process:
        yield process


@pytest.fixture(scope="module")
def offline(versions: list[Path]) -> list[dict[str, np.ndarray]]:
    return [AnomalyDetector.load(d).score_all(ROWS) for d in versions]


def _install(server: ServerProcess, data: bytes, **params: str) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/bundles", content=data, params=params, headers=server.auth, timeout=60)


def _score(server: ServerProcess, asset: str = ASSET, rows: np.ndarray = ROWS) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/assets/{asset}/score", json={"rows": rows.tolist()}, timeout=60)


def test_health_and_openapi(server: ServerProcess) -> None:
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["base_intact"] and health["base"] == "tiny"
    spec = httpx.get(f"{server.url}/openapi.json").json()
    assert {"/health", "/metrics", "/v1/assets", "/v1/bundles", "/v1/assets/{asset_id}/score",
            "/v1/assets/{asset_id}/activate", "/v1/assets/{asset_id}/rollback"} <= set(spec["paths"])
    assert "application/octet-stream" in spec["paths"]["/v1/bundles"]["post"]["requestBody"]["content"]


def test_writes_need_the_token(server: ServerProcess, versions: list[Path], keys: dict[str, object]) -> None:
    data = bundle(versions[0], keys["trusted"], "1", 1, asset_id="locked")
    for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": TOKEN}):
        for path, kwargs in (("/v1/bundles", {"content": data}),
                             ("/v1/assets/locked/activate", {"json": {"version": "1"}}),
                             ("/v1/assets/locked/rollback", {})):
            response = httpx.post(server.url + path, headers=headers, timeout=30, **kwargs)
            assert response.status_code == 401, (path, headers, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
    assert all(a["asset_id"] != "locked" for a in httpx.get(f"{server.url}/v1/assets").json())


def test_install_score_list_activate_rollback(
    server: ServerProcess, versions: list[Path], keys: dict[str, object], offline: list[dict[str, np.ndarray]]
) -> None:
    for index, directory in enumerate(versions[:2]):
        answer = _install(server, bundle(directory, keys["trusted"], f"{index + 1}", index + 1))
        assert answer.status_code == 200, answer.text
        assert answer.json()["active"] == f"{index + 1}"

    scored = _score(server).json()
    assert scored["version"] == "2" and scored["asset_id"] == ASSET
    np.testing.assert_allclose(scored["score"], offline[1]["score"], rtol=1e-6)
    np.testing.assert_allclose(scored["p_anomaly"], offline[1]["p_anomaly"], rtol=1e-6, atol=1e-9)
    assert scored["anomaly"] == offline[1]["anomaly"].tolist()

    listing = {a["asset_id"]: a for a in httpx.get(f"{server.url}/v1/assets").json()}[ASSET]
    assert listing["active"] == "2" and listing["previous"] == "1" and listing["release"] == 2
    assert [v["version"] for v in listing["versions"]] == ["1", "2"]

    rolled = httpx.post(f"{server.url}/v1/assets/{ASSET}/rollback", headers=server.auth).json()
    assert rolled["active"] == "1" and rolled["rolled_back_from"] == "2"
    back = _score(server).json()
    assert back["version"] == "1"
    np.testing.assert_allclose(back["score"], offline[0]["score"], rtol=1e-6)

    answer = _install(server, bundle(versions[2], keys["trusted"], "3", 3), activate="false")
    assert answer.json()["active"] == "1"
    activated = httpx.post(f"{server.url}/v1/assets/{ASSET}/activate", json={"version": "3"}, headers=server.auth)
    assert activated.status_code == 200 and activated.json()["previous"] == "1"
    assert _score(server).json()["version"] == "3"

    assert httpx.post(f"{server.url}/v1/assets/{ASSET}/activate", json={"version": "9"},
                      headers=server.auth).status_code == 404
    assert _score(server, asset="nope").status_code == 404
    wrong = _score(server, rows=ROWS[:, :2])
    assert wrong.status_code == 422 and "channels" in wrong.json()["detail"]
    bad = httpx.post(f"{server.url}/v1/assets/{ASSET}/score", json={"rows": [[1, "x", 2]]})
    assert bad.status_code == 422 and bad.json()["error"] == "DataError"


def test_rejected_bundles_leave_state_unchanged(
    server: ServerProcess, versions: list[Path], keys: dict[str, object]
) -> None:
    before = httpx.get(f"{server.url}/v1/assets").json()
    files = _files(server.state_dir)
    good = bundle(versions[0], keys["trusted"], "7", 7)
    tampered = bytearray(good)
    tampered[len(tampered) // 2] ^= 0x01
    for data in (b"junk", bytes(tampered), bundle(versions[0], keys["untrusted"], "7", 7),
                 bundle(versions[0], keys["trusted"], "7", 1)):
        answer = _install(server, data)
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"] == "BundleError"
    assert httpx.get(f"{server.url}/v1/assets").json() == before
    assert _files(server.state_dir) == files


def test_metrics(server: ServerProcess) -> None:
    _score(server)
    text = httpx.get(f"{server.url}/metrics").text
    assert 'edgepeft_requests_total{route="/v1/assets/{asset_id}/score",status="200"}' in text
    assert 'edgepeft_request_duration_seconds_bucket{route="/v1/assets/{asset_id}/score",le="+Inf"}' in text
    assert "edgepeft_request_errors_total" in text and 'status="401"' in text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values["edgepeft_swaps_total"] >= 4
    assert values["edgepeft_cache_adapters"] >= 1 and values["edgepeft_cache_bytes"] > 0
    assert values["edgepeft_rejected_bundles_total"] >= 4


def test_swaps_under_load_never_fail_or_mix_versions(
    server: ServerProcess, versions: list[Path], keys: dict[str, object]
) -> None:
    """Shortened for CI: a real client at a fixed rate while versions are swapped every ~170 ms. The full run
    (>= 200 requests/s, >= 60 s, >= 500 swaps) is ``edgepeft.bench.runtime_bench.load_test``."""
    for release, directory in enumerate(versions, start=1):
        data = bundle(directory, keys["trusted"], str(release), release, asset_id="pump-load")
        assert _install(server, data).status_code == 200
    result = drive_load(server, "pump-load", {str(i): d for i, d in enumerate(versions, start=1)},
                        duration_s=10, rate=40, swaps=60, rows_per_request=16)
    assert result["requests"] == 400
    assert result["errors"] == 0 and result["swap_errors"] == 0, result["first_errors"]
    assert result["swaps"] == 60
    # Every answer carries the version that produced it and equals that version's offline scores ...
    assert result["mismatches"] == 0
    # ... and that version was active at some moment while the request was in flight.
    assert result["stale"] == 0
    assert set(result["versions_seen"]) == {"1", "2", "3"}, "the swaps should have been visible to the client"


def test_restart_serves_the_same_versions(
    server: ServerProcess, versions: list[Path], keys: dict[str, object], offline: list[dict[str, np.ndarray]]
) -> None:
    before = httpx.get(f"{server.url}/v1/assets").json()
    score_before = _score(server).json()
    server.stop()
    with ServerProcess(server.state_dir, token=TOKEN, args=server.args) as again:
        after = httpx.get(f"{again.url}/v1/assets").json()
        assert [(a["asset_id"], a["active"], a["previous"], a["release"]) for a in after] == \
            [(a["asset_id"], a["active"], a["previous"], a["release"]) for a in before]
        assert len(after) == 2  # pump-1 and pump-load
        scored = _score(again).json()
        assert scored["version"] == score_before["version"] == "3"
        assert scored["score"] == score_before["score"], "a restart must serve bit-identical scores"
        # The release counter survived: an old release is still refused.
        assert _install(again, bundle(versions[0], keys["trusted"], "8", 2)).status_code == 400
        rolled = httpx.post(f"{again.url}/v1/assets/{ASSET}/rollback", headers=again.auth).json()
        assert rolled["active"] == "1"
        np.testing.assert_allclose(_score(again).json()["score"], offline[0]["score"], rtol=1e-6)
    # The active version's stored bundle damaged on disk: the device still starts and serves its other assets;
    # this one answers 503 (the device's storage failed, not the request) with the reason.
    journal = Journal(server.state_dir / "journal")
    record = next(r for r in journal.open(writable=False)
                  if r.change["asset"]["asset_id"] == ASSET and r.change["version"]["version"] == "1")
    journal.close()
    damaged = bytearray(journal.path.read_bytes())
    damaged[record.bundle_offset + record.bundle_length // 2] ^= 0x01
    journal.path.write_bytes(bytes(damaged))
    with ServerProcess(server.state_dir, token=TOKEN, args=server.args) as third:
        answer = _score(third)
        assert answer.status_code == 503, answer.text
        assert "modified on disk" in answer.json()["detail"]
        assert httpx.get(f"{third.url}/health").json()["status"] == "ok"
        assert _score(third, asset="pump-load").status_code == 200


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "lock"}
