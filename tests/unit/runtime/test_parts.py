"""The small parts: LRU cache, Prometheus text, state records and names, token resolution."""

from __future__ import annotations

import dataclasses
import stat
import threading
from pathlib import Path

import pytest
import torch

from edgepeft.core.errors import ArtifactError, ConfigError
from edgepeft.runtime.cache import AdapterCache
from edgepeft.runtime.metrics import Metrics
from edgepeft.runtime.server import TOKEN_ENV, resolve_token
from edgepeft.runtime.state import AssetRecord, ConflictError, RuntimeState, StateStore, check_name


class _Entry:
    def __init__(self, nbytes: int) -> None:
        self.private_bytes = nbytes


def test_cache_evicts_least_recently_used_and_loads_once() -> None:
    cache = AdapterCache(budget_bytes=250)
    for version in "abc":
        cache.get(("x", version), lambda: _Entry(100))
    assert cache.keys() == [("x", "b"), ("x", "c")]
    cache.get(("x", "b"), lambda: pytest.fail("a hit must not load"))
    cache.get(("x", "d"), lambda: _Entry(100))
    assert cache.keys() == [("x", "b"), ("x", "d")], "c was the least recently used"
    loads = []
    barrier = threading.Barrier(4)

    def load() -> _Entry:
        loads.append(1)
        return _Entry(10)

    def worker() -> None:
        barrier.wait()
        cache.get(("y", "1"), load)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(loads) == 1, "concurrent misses on one key load once"
    big = AdapterCache(budget_bytes=10)
    big.get(("z", "1"), lambda: _Entry(100))
    assert big.keys() == [("z", "1")], "an entry larger than the budget is still served"


def test_prometheus_text() -> None:
    metrics = Metrics()
    metrics.observe_request("/v1/assets/{asset_id}/score", 200, 0.003)
    metrics.observe_request("/v1/assets/{asset_id}/score", 404, 0.2)
    metrics.observe_swap(0.002)
    metrics.gauge("edgepeft_cache_bytes", "bytes", lambda: 1234)
    text = metrics.render()
    assert text.endswith("\n")
    assert '# TYPE edgepeft_request_duration_seconds histogram' in text
    assert 'edgepeft_request_duration_seconds_bucket{route="/v1/assets/{asset_id}/score",le="0.005"} 1' in text
    assert 'edgepeft_request_duration_seconds_bucket{route="/v1/assets/{asset_id}/score",le="+Inf"} 2' in text
    assert 'edgepeft_request_errors_total{route="/v1/assets/{asset_id}/score",kind="client"} 1' in text
    assert "edgepeft_swaps_total 1" in text and "edgepeft_cache_bytes 1234" in text
    assert 'edgepeft_swap_duration_seconds_count 1' in text


def test_state_records_round_trip_and_refuse_another_base(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    state = store.load(base="tiny", base_sha256="a" * 64)
    record = AssetRecord(asset_id="pump-1").activate("1").activate("2").activate("3")
    assert record.history == ("1", "2") and record.rolled_back().active == "2"
    with pytest.raises(ConflictError):
        AssetRecord(asset_id="pump-1").rolled_back()
    state = state.with_asset(record)
    store.save(state)
    assert StateStore(tmp_path).load(base="tiny", base_sha256="a" * 64) == state
    with pytest.raises(ArtifactError, match="new --state directory"):
        StateStore(tmp_path).load(base="tiny", base_sha256="b" * 64)
    assert RuntimeState.from_dict(state.to_dict()) == state
    for bad in ("", "../x", "a/b", ".hidden", "x" * 129, "a..b"):
        with pytest.raises(ConfigError):
            check_name(bad, "version")
    assert check_name("1.0.0-rc_1", "version") == "1.0.0-rc_1"


def test_state_json_is_the_plain_json_encoding_of_the_state(tmp_path: Path) -> None:
    """state.json is assembled from cached per-version encodings; it must be byte-identical to encoding the whole
    state at once (sorted keys, compact), whatever the names, manifests and order of installation."""
    import json

    from edgepeft.runtime.state import SCHEMA_VERSION, VersionRecord

    def plain(state: RuntimeState) -> str:
        assets = {
            asset_id: {"asset_id": r.asset_id, "active": r.active, "history": list(r.history), "release": r.release,
                       "versions": {name: {k: x for k, x in dataclasses.asdict(v).items()
                                           if x is not None or k not in ("offset", "length")}
                                    for name, v in r.versions.items()}}
            for asset_id, r in state.assets.items()
        }
        payload = {"schema_version": SCHEMA_VERSION, "base": state.base, "base_sha256": state.base_sha256,
                   "assets": assets}
        return json.dumps(payload, sort_keys=True, separators=(",", ":"))

    state = RuntimeState(base="tiny", base_sha256="a" * 64)
    assert state.to_json() == plain(state)
    for number, asset_id in enumerate(["pump-2", "pump-10", "motör\"1", "a"]):
        record = AssetRecord(asset_id=asset_id)
        for version in ["10", "9", "1.0.0", "b"][: number + 1]:
            manifest = {"z": [1, 2.5, None], "a": {"é": "\n", "b": True}, "signer": version}
            stored = {"stored": "journal", "offset": 44 * number, "length": 7} if number % 2 else {"stored": "bundle"}
            record = dataclasses.replace(record, release=record.release + 1, versions={
                **record.versions, version: VersionRecord(version, record.release + 1, "lora", "2026-01-01T00:00:00Z",
                                                          "f" * 64, manifest, **stored)})
            record = record.activate(version)
            state = state.with_asset(record)
            assert state.to_json() == plain(state)
    store = StateStore(tmp_path)
    store.save(state)
    assert (tmp_path / "state.json").read_text() == plain(state)
    assert store.load(base="tiny", base_sha256="a" * 64) == state


def test_token_from_file_env_or_generated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    token, source = resolve_token(None, tmp_path / "state")
    generated = tmp_path / "state" / "token"
    assert source == str(generated) and len(token) >= 32
    assert stat.S_IMODE(generated.stat().st_mode) == 0o600
    assert resolve_token(None, tmp_path / "state")[0] == token, "generated once, then reused"
    monkeypatch.setenv(TOKEN_ENV, "from-the-environment-123")
    assert resolve_token(None, tmp_path / "state") == ("from-the-environment-123", f"${TOKEN_ENV}")
    (tmp_path / "t").write_text("from-a-file-0123456789\n")
    assert resolve_token(tmp_path / "t", tmp_path / "state")[0] == "from-a-file-0123456789"
    (tmp_path / "short").write_text("abc")
    with pytest.raises(ConfigError, match="at least 16"):
        resolve_token(tmp_path / "short", tmp_path / "state")


def test_install_benchmark_reports_both_install_patterns() -> None:
    """The deploy benchmark's install timing runs end to end; spaced installs take the pooled skeletons."""
    from edgepeft.bench.runtime_bench import install_activate_times

    numbers = install_activate_times(n_bundles=4, n_swaps=4, gap_s=0.2, n_burst=2)
    assert numbers["bundles"] == 4 and numbers["burst_bundles"] == 2
    for key in ("install_activate", "install_activate_burst", "activate_cached", "activate_cold",
                "durable_write_floor"):
        assert 0 < numbers[f"{key}_p50_ms"] <= numbers[f"{key}_p99_ms"], key
    assert numbers["spaced_installs_with_pooled_skeleton"] == 4, numbers


@pytest.mark.parametrize("field", ["scoring_workers", "threads"])
def test_runtime_config_refuses_non_positive_worker_counts(tmp_path: Path, field: str) -> None:
    from edgepeft.runtime.service import RuntimeConfig

    with pytest.raises(ConfigError, match=field):
        RuntimeConfig(state_dir=tmp_path, **{field: 0})


def test_smoke_forecast_equals_the_full_forward_pass_for_every_method(every_method: dict[str, Path]) -> None:
    """The install smoke test's shortcut (the base's cached temporal features) computes what the model computes."""
    from edgepeft.peft import get_method
    from edgepeft.runtime.resident import ResidentBase, load_torch_version, smoke_forecast

    resident = ResidentBase.load("tiny")
    for method, directory in every_method.items():
        served = load_torch_version(resident, directory, asset_id="a", version="1")
        model = served.detector.model_
        # The default adapts the last (channel) block only; full fine-tuning and scratch own every tensor.
        assert model.temporal_is_base is (not get_method(method).trains_base), method
        x, hidden = resident.smoke_input(served.n_channels)
        torch.testing.assert_close(smoke_forecast(resident, served), model(x, hidden), rtol=1e-5, atol=1e-6)


def test_smoke_forecast_runs_an_adapted_temporal_half(tmp_path: Path) -> None:
    """An adapter in the temporal blocks is seen as such, so its smoke test runs them (the shortcut would not)."""
    from edgepeft.bench.loadtest import series
    from edgepeft.detect.detector import AnomalyDetector
    from edgepeft.runtime.resident import ResidentBase, load_torch_version, smoke_forecast

    det = AnomalyDetector(base="tiny", method="lora", rank=4, steps=2, peft_options={"adapt_last": None})
    det.fit(series(400, seed=0, period=25.0))
    with torch.no_grad():
        for name, param in det.model_.named_parameters():
            if "lora_B" in name and name.split("base_model.model.")[-1].startswith("blocks."):
                param.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(0))
    resident = ResidentBase.load("tiny")
    served = load_torch_version(resident, det.save(tmp_path / "temporal"), asset_id="a", version="1")
    model = served.detector.model_
    assert model.temporal_is_base is False
    x, hidden = resident.smoke_input(served.n_channels)
    full = model(x, hidden)
    torch.testing.assert_close(smoke_forecast(resident, served), full)
    model.temporal_is_base = True  # what a wrong check would do: the base's features, not the adapter's
    assert not torch.allclose(smoke_forecast(resident, served), full, atol=1e-4)


@pytest.mark.parametrize("end", ["12", -1, True, 1.5])
def test_a_malformed_journal_end_in_state_json_is_a_clear_error(tmp_path: Path, end: object) -> None:
    import json

    store = StateStore(tmp_path)
    store.save(RuntimeState(base="tiny", base_sha256="a" * 64))
    saved = json.loads((tmp_path / "state.json").read_text())
    saved["journal_end"] = end
    (tmp_path / "state.json").write_text(json.dumps(saved))
    with pytest.raises(ArtifactError, match="journal_end"):
        StateStore(tmp_path).load(base="tiny", base_sha256="a" * 64)
