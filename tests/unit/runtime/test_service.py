"""DeviceRuntime in-process: shared resident base, every method, cache eviction, bundles, persistence."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from edgepeft.bench.loadtest import payloads
from edgepeft.core.errors import ArtifactError, ConfigError, ModelError, OutputError
from edgepeft.delta import BundleError
from edgepeft.detect.detector import AnomalyDetector
from edgepeft.models.registry import state_sha256
from edgepeft.peft import get_method
from edgepeft.runtime.resident import ResidentBase, SkeletonPool, load_torch_version
from edgepeft.runtime.service import DeviceRuntime, RuntimeConfig
from edgepeft.runtime.state import ConflictError, StateStore, UnknownAssetError, VersionRecord
from tests.unit.runtime.conftest import ASSET, bundle

ROWS = payloads(2, 96)[1]  # a stretch with one channel broken away from the others


@pytest.fixture(scope="module")
def resident() -> ResidentBase:
    return ResidentBase.load("tiny")


def _open(state: Path, resident: ResidentBase, **kwargs: object) -> DeviceRuntime:
    return DeviceRuntime.open(RuntimeConfig(state_dir=state, base="tiny", **kwargs), resident=resident)


def test_resident_base_stays_bit_identical_under_every_method(
    tmp_path: Path, resident: ResidentBase, every_method: dict[str, Path]
) -> None:
    """Install and score every method many times, with evictions and reloads: the shared base never changes,
    and every served version scores exactly as the detector does offline."""
    before = state_sha256(resident.module)
    with _open(tmp_path / "state", resident, cache_mb=1.0) as runtime:  # ~1 MB: forces evictions
        for release, (method, directory) in enumerate(every_method.items(), start=1):
            runtime.install_directory(directory, asset_id=f"a-{method}", version="1", release=release)
        offline = {m: AnomalyDetector.load(d).score_all(ROWS)["score"] for m, d in every_method.items()}
        for _ in range(3):
            for method in every_method:
                served, result = runtime.score(f"a-{method}", ROWS)
                assert served.method == method
                np.testing.assert_allclose(result["score"], offline[method], rtol=1e-5, err_msg=method)
        assert runtime.cache.stats()["evictions"] > 0, "the budget should have forced evictions"
        assert runtime.health()["base_intact"]
    assert state_sha256(resident.module) == before == resident.sha256


def test_frozen_tensors_alias_the_resident_base(
    tmp_path: Path, resident: ResidentBase, every_method: dict[str, Path]
) -> None:
    with _open(tmp_path / "state", resident) as runtime:
        for release, (method, directory) in enumerate(every_method.items(), start=1):
            runtime.install_directory(directory, asset_id=f"a-{method}", version="1", release=release)
            model = runtime.active_model(f"a-{method}").detector.model_.model
            params = dict(model.named_parameters())
            shared = [n for n, p in params.items() if resident.aliases(p)]
            if get_method(method).trains_base:
                assert not shared, f"{method} rewrites the base: it must own every tensor"
                continue
            # Everything but the method's own tensors (and the per-asset tags) is the resident storage itself.
            assert len(shared) > len(params) // 2, method
            base_bytes = sum(t.numel() * 4 for t in resident.module.state_dict().values())
            assert resident.private_bytes(model) < 0.5 * base_bytes, method
            if method == "bitfit":
                # The biases BitFit trained (its saved delta) are private copies; the untrained ones stay shared.
                trained = [n for n in load_file(str(directory / "adapter" / "adapter_model.safetensors"))
                           if n.endswith("bias")]
                assert trained and not any(resident.aliases(params[n]) for n in trained), "trained biases are private"


def test_bundle_install_activate_rollback_and_persistence(
    tmp_path: Path, resident: ResidentBase, versions: list[Path], keys: dict[str, object]
) -> None:
    offline = [AnomalyDetector.load(d).score_all(ROWS)["score"] for d in versions]
    state = tmp_path / "state"
    config = {"trusted_keys": [keys["public"]]}
    with _open(state, resident, **config) as runtime:
        for index, directory in enumerate(versions[:2]):
            answer = runtime.install_bundle(bundle(directory, keys["trusted"], f"{index + 1}", index + 1))
            assert answer["active"] == f"{index + 1}"
        served, result = runtime.score(ASSET, ROWS)
        assert served.version == "2"
        np.testing.assert_array_equal(result["score"], offline[1])
        assert runtime.rollback(ASSET)["active"] == "1"
        assert np.array_equal(runtime.score(ASSET, ROWS)[1]["score"], offline[0]), "rollback restores exact scores"
        with pytest.raises(ConflictError, match="no previous version"):
            runtime.rollback(ASSET)
        runtime.install_bundle(bundle(versions[2], keys["trusted"], "3", 3), activate=False)
        assert runtime.state.asset(ASSET).active == "1"
        runtime.activate(ASSET, "3")
        with pytest.raises(UnknownAssetError):
            runtime.activate(ASSET, "9")
        with pytest.raises(UnknownAssetError):
            runtime.score("nope", ROWS)
        saved = runtime.state
    # A new process on the same directory: same versions, same active one, same history, same release counter.
    with _open(state, resident, **config) as runtime:
        assert runtime.state == saved
        served, result = runtime.score(ASSET, ROWS)
        assert served.version == "3"
        np.testing.assert_array_equal(result["score"], offline[2])
        assert runtime.rollback(ASSET)["active"] == "1"
        with pytest.raises(BundleError, match="not newer"):
            runtime.install_bundle(bundle(versions[0], keys["trusted"], "4", 2))


def test_rejected_bundles_change_nothing(
    tmp_path: Path, resident: ResidentBase, versions: list[Path], keys: dict[str, object]
) -> None:
    state = tmp_path / "state"
    with _open(state, resident, trusted_keys=[keys["public"]]) as runtime:
        first = bundle(versions[0], keys["trusted"], "1", 1)
        runtime.install_bundle(first)
        snapshot = _tree(state)
        other_base = tmp_path / "other-base"
        shutil.copytree(versions[1], other_base)
        det_json = other_base / "detector.json"
        det_json.write_text(det_json.read_text().replace(resident.sha256, "0" * 64))
        tampered = bytearray(bundle(versions[1], keys["trusted"], "2", 2))
        tampered[-100] ^= 0xFF
        rejected = {
            "garbage": b"not a bundle",
            "tampered": bytes(tampered),
            "untrusted signer": bundle(versions[1], keys["untrusted"], "2", 2),
            "replayed release": bundle(versions[1], keys["trusted"], "2", 1),
            "same version, other content": bundle(versions[1], keys["trusted"], "1", 5),
            "other base": bundle(other_base, keys["trusted"], "2", 2),
            "truncated": first[: len(first) // 2],
        }
        for case, data in rejected.items():
            with pytest.raises(BundleError):
                runtime.install_bundle(data)
            assert _tree(state) == snapshot, f"{case}: a rejected bundle changed the state directory"
        assert runtime.state.asset(ASSET).active == "1"
        assert runtime.metrics.rejected_bundles == len(rejected)


def test_install_needs_trusted_keys_and_local_install_checks(
    tmp_path: Path, resident: ResidentBase, versions: list[Path], keys: dict[str, object]
) -> None:
    with _open(tmp_path / "state", resident) as runtime:
        with pytest.raises(BundleError, match="no trusted public keys"):
            runtime.install_bundle(bundle(versions[0], keys["trusted"], "1", 1))
        runtime.install_directory(versions[0], asset_id=ASSET, version="1", release=1)
        with pytest.raises(ArtifactError, match="immutable"):
            runtime.install_directory(versions[1], asset_id=ASSET, version="1", release=2)
        with pytest.raises(ConfigError, match="not allowed"):
            runtime.install_directory(versions[1], asset_id="../evil", version="2", release=2)


def test_state_directory_has_one_owner(tmp_path: Path, resident: ResidentBase) -> None:
    with _open(tmp_path / "state", resident), pytest.raises(ConflictError, match="in use"):
        _open(tmp_path / "state", resident)
    _open(tmp_path / "state", resident).close()  # released on close


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (except the lock) with its content."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "lock"}


def _wait_for_spare(pool: SkeletonPool) -> None:
    deadline = time.monotonic() + 30
    while len(pool) == 0 and time.monotonic() < deadline:  # the refill the install itself started
        time.sleep(0.02)


def test_pooled_skeletons_score_exactly_like_freshly_built_models(
    tmp_path: Path, resident: ResidentBase, versions: list[Path]
) -> None:
    """Installs after the first take a spare skeleton built in the background; the scores must not change."""
    with _open(tmp_path / "state", resident) as runtime:
        pool = runtime.engine.pool
        for release, directory in enumerate(versions, start=1):
            runtime.install_directory(directory, asset_id=ASSET, version=str(release), release=release)
            _wait_for_spare(pool)
            served, result = runtime.score(ASSET, ROWS)
            offline = AnomalyDetector.load(directory).score_all(ROWS)["score"]
            np.testing.assert_array_equal(result["score"], offline)
        assert pool.hits == len(versions) - 1 and pool.misses == 1, (pool.hits, pool.misses)
        assert runtime.health()["skeleton_pool"]["failures"] == 0


def test_every_method_scores_the_same_from_a_pooled_skeleton(
    tmp_path: Path, resident: ResidentBase, every_method: dict[str, Path]
) -> None:
    """The second version of each method loads into a spare (methods sharing the base) or is built fresh
    (full, scratch: never pooled); it scores bit-identically to the first, freshly built one."""
    with _open(tmp_path / "state", resident) as runtime:
        pool = runtime.engine.pool
        for method, directory in every_method.items():
            asset = f"a-{method}"
            scores = []
            for version in ("1", "2"):
                hits = pool.hits
                runtime.install_directory(directory, asset_id=asset, version=version, release=int(version))
                pooled = pool.hits > hits
                assert pooled == (version == "2" and not get_method(method).trains_base), (method, version)
                scores.append(runtime.score(asset, ROWS)[1]["score"])
                if not get_method(method).trains_base:
                    _wait_for_spare(pool)
            np.testing.assert_array_equal(scores[1], scores[0], err_msg=method)
            offline = AnomalyDetector.load(directory).score_all(ROWS)["score"]
            np.testing.assert_allclose(scores[1], offline, rtol=1e-5, err_msg=method)
        assert pool.stats()["failures"] == 0


def test_a_rejected_adapter_leaves_no_spare_behind(
    tmp_path: Path, resident: ResidentBase, versions: list[Path]
) -> None:
    broken = Path(shutil.copytree(versions[0], tmp_path / "broken"))
    weights = broken / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    tensors[next(n for n in tensors if "lora_B" in n)][0, 0] = float("inf")
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with _open(tmp_path / "state", resident) as runtime:
        with pytest.raises(ModelError, match="non-finite weights"):
            runtime.install_directory(broken, asset_id=ASSET, version="1", release=1)
        runtime.engine.pool.close()
        assert len(runtime.engine.pool) == 0 and runtime.engine.pool.stats()["failures"] == 0


@pytest.mark.parametrize("engine", ["torch", "onnx"])
def test_adapter_with_non_finite_weights_is_refused_and_nothing_changes(
    tmp_path: Path, resident: ResidentBase, versions: list[Path], engine: str
) -> None:
    broken = Path(shutil.copytree(versions[1], tmp_path / "broken"))
    weights = broken / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    name = next(n for n in tensors if "lora_B" in n)
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with _open(tmp_path / "state", resident, engine=engine) as runtime:
        runtime.install_directory(versions[0], asset_id=ASSET, version="1", release=1)
        before = (tmp_path / "state" / "state.json").read_bytes()
        with pytest.raises(ModelError, match="non-finite weights"):
            runtime.install_directory(broken, asset_id=ASSET, version="2", release=2)
        assert (tmp_path / "state" / "state.json").read_bytes() == before
        assert not (tmp_path / "state" / "assets" / ASSET / "2").exists()
        assert runtime.active_model(ASSET).version == "1"


def _stored(state: Path, resident: ResidentBase, version: str, asset_id: str = ASSET) -> VersionRecord:
    """How the state directory records one installed version (read as an onlooker, without taking the lock)."""
    loaded = StateStore(state).load(base=resident.name, base_sha256=resident.sha256)
    return loaded.asset(asset_id).versions[version]


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_bundle_versions_are_kept_in_the_journal_as_received(
    tmp_path: Path, resident: ResidentBase, versions: list[Path], keys: dict[str, object]
) -> None:
    """A bundle install appends the bundle itself to the journal (no unpacked folder, no file per version);
    reloading it checks its hash, and a copy damaged on disk fails that one asset with a clear error while the
    device starts and serves the others."""
    state = tmp_path / "state"
    data = [bundle(directory, keys["trusted"], str(i), i) for i, directory in enumerate(versions[:2], start=1)]
    other = bundle(versions[2], keys["trusted"], "1", 1, asset_id="pump-2")
    offline = [AnomalyDetector.load(d).score_all(ROWS)["score"] for d in versions]
    config = {"trusted_keys": [keys["public"]]}
    with _open(state, resident, **config) as runtime:
        for blob in [*data, other]:
            runtime.install_bundle(blob)
        records = runtime.state.asset(ASSET).versions
        assert {record.stored for record in records.values()} == {"journal"}
    journal = (state / "journal").read_bytes()
    for number, blob in enumerate(data, start=1):
        record = _stored(state, resident, str(number))
        assert journal[record.offset : record.offset + record.length] == blob
    assert not (state / "assets").exists() and not (state / "bundles").exists(), "bundle installs unpack nothing"
    # Every version loads back from the journal after a restart, scoring exactly as offline.
    with _open(state, resident, **config) as runtime:
        np.testing.assert_array_equal(runtime.score(ASSET, ROWS)[1]["score"], offline[1])
        np.testing.assert_array_equal(runtime.model(ASSET, "1").score_all(ROWS)["score"], offline[0])
    damaged = _stored(state, resident, "2")
    _flip(state / "journal", damaged.offset + damaged.length // 2)
    with _open(state, resident, **config) as runtime:  # starts although the active version of pump-1 is damaged
        assert runtime.metrics.load_failures == 1
        with pytest.raises(ArtifactError, match="modified on disk"):
            runtime.score(ASSET, ROWS)
        np.testing.assert_array_equal(runtime.score("pump-2", ROWS)[1]["score"], offline[2])
        assert runtime.rollback(ASSET)["active"] == "1"  # the operator's way out: the previous version
        np.testing.assert_array_equal(runtime.score(ASSET, ROWS)[1]["score"], offline[0])
        assert "edgepeft_load_failures_total 1" in runtime.metrics.render()


def test_installs_survive_a_crash_before_state_json_catches_up(
    tmp_path: Path, resident: ResidentBase, versions: list[Path], keys: dict[str, object]
) -> None:
    """An install is committed by its journal record alone: a crash (no clean shutdown, so no checkpoint) loses
    nothing, a restart serves exactly what was acknowledged, and a clean shutdown folds the journal into
    state.json."""
    import json

    state = tmp_path / "state"
    config = {"trusted_keys": [keys["public"]]}
    runtime = _open(state, resident, **config)
    runtime.install_bundle(bundle(versions[0], keys["trusted"], "1", 1))
    runtime.install_bundle(bundle(versions[1], keys["trusted"], "2", 2))
    runtime.rollback(ASSET)  # writes state.json: the installs so far are folded in
    runtime.install_bundle(bundle(versions[2], keys["trusted"], "3", 3), activate=False)
    expected = runtime.state
    runtime.engine.close()
    runtime.store.release()  # the process dies here: no checkpoint
    saved = json.loads((state / "state.json").read_text())
    assert "3" not in saved["assets"][ASSET]["versions"]
    assert saved["journal_end"] < (state / "journal").stat().st_size
    with _open(state, resident, **config) as again:
        assert again.state == expected and again.state.asset(ASSET).active == "1"
        offline = AnomalyDetector.load(versions[2]).score_all(ROWS)["score"]
        np.testing.assert_array_equal(again.model(ASSET, "3").score_all(ROWS)["score"], offline)
    saved = json.loads((state / "state.json").read_text())  # the clean shutdown wrote the checkpoint
    assert saved["journal_end"] == (state / "journal").stat().st_size and "3" in saved["assets"][ASSET]["versions"]
    with _open(state, resident, **config) as third:
        assert third.state == expected


def test_a_partial_last_journal_record_is_set_aside(
    tmp_path: Path, resident: ResidentBase, versions: list[Path], keys: dict[str, object]
) -> None:
    """A crash in the middle of an append leaves a partial record, never acknowledged: start-up moves it to a
    side file (nothing is deleted), serves the installs before it, and the next install goes where it was."""
    state = tmp_path / "state"
    config = {"trusted_keys": [keys["public"]]}
    data = [bundle(directory, keys["trusted"], str(i), i) for i, directory in enumerate(versions, start=1)]
    with _open(state, resident, **config) as runtime:
        runtime.install_bundle(data[0])
    journal = state / "journal"
    whole = journal.read_bytes()
    # Install 2's record as a crash would leave it, cut inside its header, its bundle or its change.
    with _open(tmp_path / "scratch", resident, **config) as other:
        other.install_bundle(data[0])
        start = other.store.journal.end
        other.install_bundle(data[1])
    record = (tmp_path / "scratch" / "journal").read_bytes()[start:]
    for cut in (10, len(record) // 2, len(record) - 1):
        journal.write_bytes(whole + record[:cut])
        with _open(state, resident, **config) as runtime:
            assert runtime.state.asset(ASSET).active == "1" and list(runtime.state.asset(ASSET).versions) == ["1"]
        assert journal.read_bytes() == whole
        side = sorted(state.glob("journal.partial-*"))
        assert len(side) == 1 and side[0].read_bytes() == record[:cut]
        side[0].unlink()
    with _open(state, resident, **config) as runtime:
        runtime.install_bundle(data[1])
        runtime.install_bundle(data[2])
    with _open(state, resident, **config) as runtime:
        assert runtime.state.asset(ASSET).active == "3" and runtime.state.asset(ASSET).release == 3


def test_a_damaged_or_cut_journal_is_a_clear_error(
    tmp_path: Path, resident: ResidentBase, versions: list[Path], keys: dict[str, object]
) -> None:
    """Damage that is not an interrupted append (a record's change altered with records after it, a journal
    shorter than state.json says) refuses to start with the reason, rather than guessing which installs count."""
    state = tmp_path / "state"
    config = {"trusted_keys": [keys["public"]]}
    runtime = _open(state, resident, **config)
    runtime.install_bundle(bundle(versions[0], keys["trusted"], "1", 1))
    runtime.install_bundle(bundle(versions[1], keys["trusted"], "2", 2))
    runtime.engine.close()
    runtime.store.release()  # crash: both installs are in the journal only
    first = _stored(state, resident, "1")
    journal = state / "journal"
    whole = journal.read_bytes()
    _flip(journal, first.offset + first.length + 5)  # inside record 1's change; record 2 follows
    with pytest.raises(ArtifactError, match="damaged at byte 0"):
        _open(state, resident, **config)
    journal.write_bytes(whole)
    with _open(state, resident, **config) as runtime:  # intact again; the clean shutdown writes a checkpoint
        assert runtime.state.asset(ASSET).active == "2"
    journal.write_bytes(whole[:100])
    with pytest.raises(ArtifactError, match="journal was replaced or cut"):
        _open(state, resident, **config)


def test_state_with_bundle_files_still_loads(
    tmp_path: Path, resident: ResidentBase, versions: list[Path], keys: dict[str, object]
) -> None:
    """Versions stored as one bundle file each (the layout before the journal) load, are hash-checked, and a
    missing file is a clear error."""
    import json

    state = tmp_path / "state"
    config = {"trusted_keys": [keys["public"]]}
    data = bundle(versions[0], keys["trusted"], "1", 1)
    with _open(state, resident, **config) as runtime:
        runtime.install_bundle(data)
    saved = json.loads((state / "state.json").read_text())
    record = saved["assets"][ASSET]["versions"]["1"]
    record.update(stored="bundle")
    del record["offset"], record["length"], saved["journal_end"]
    (state / "journal").unlink()
    (state / "bundles" / ASSET).mkdir(parents=True)
    (state / "bundles" / ASSET / "1.edelta").write_bytes(data)
    (state / "state.json").write_text(json.dumps(saved))
    offline = AnomalyDetector.load(versions[0]).score_all(ROWS)["score"]
    with _open(state, resident, **config) as runtime:
        np.testing.assert_array_equal(runtime.score(ASSET, ROWS)[1]["score"], offline)
        runtime.install_bundle(bundle(versions[1], keys["trusted"], "2", 2))  # new installs go to the journal
        assert runtime.state.asset(ASSET).versions["2"].stored == "journal"
        assert runtime.rollback(ASSET)["active"] == "1"
        (state / "bundles" / ASSET / "1.edelta").unlink()
        runtime.cache.discard((ASSET, "1"))
        with pytest.raises(ArtifactError, match="cannot be read"):
            runtime.score(ASSET, ROWS)


def test_a_bundle_that_fails_its_load_leaves_no_file(
    tmp_path: Path, resident: ResidentBase, versions: list[Path], keys: dict[str, object]
) -> None:
    broken = Path(shutil.copytree(versions[0], tmp_path / "broken"))
    weights = broken / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    del tensors[next(n for n in tensors if "lora_B" in n)]  # signed and well formed, but not a whole adapter
    save_file(tensors, str(weights), metadata={"format": "pt"})
    state = tmp_path / "state"
    with _open(state, resident, trusted_keys=[keys["public"]]) as runtime:
        runtime.install_bundle(bundle(versions[1], keys["trusted"], "1", 1))
        snapshot = _tree(state)
        with pytest.raises(ArtifactError, match="lacks tensors"):
            runtime.install_bundle(bundle(broken, keys["trusted"], "2", 2))
        assert _tree(state) == snapshot
        assert runtime.metrics.rejected_bundles == 1


def test_state_written_before_bundle_files_still_loads(
    tmp_path: Path, resident: ResidentBase, versions: list[Path]
) -> None:
    """Older state.json files name unpacked directories and have no ``stored`` field: they read as directories."""
    import json

    state = tmp_path / "state"
    with _open(state, resident) as runtime:
        runtime.install_directory(versions[0], asset_id=ASSET, version="1", release=1)
    saved = json.loads((state / "state.json").read_text())
    for record in saved["assets"][ASSET]["versions"].values():
        assert record.pop("stored") == "directory"
    (state / "state.json").write_text(json.dumps(saved, indent=2))
    with _open(state, resident) as runtime:
        offline = AnomalyDetector.load(versions[0]).score_all(ROWS)["score"]
        np.testing.assert_array_equal(runtime.score(ASSET, ROWS)[1]["score"], offline)


def test_every_method_installs_from_a_bundle_and_scores_as_offline(
    tmp_path: Path, resident: ResidentBase, every_method: dict[str, Path], keys: dict[str, object]
) -> None:
    """Bundle tensors go straight from the payload into the model (no folder, a prepared loader): for every
    method, the first version (built fresh) and the second (a pooled skeleton where pooled) score alike, and as
    offline (to float rounding: a served model always takes the cached-features path, which full fine-tuning's
    offline model, trainable everywhere, does not)."""
    with _open(tmp_path / "state", resident, trusted_keys=[keys["public"]]) as runtime:
        for method, directory in every_method.items():
            offline = AnomalyDetector.load(directory).score_all(ROWS)["score"]
            scores = []
            for release in (1, 2):
                runtime.install_bundle(bundle(directory, keys["trusted"], str(release), release, asset_id=method))
                scores.append(runtime.score(method, ROWS)[1]["score"])
                if not get_method(method).trains_base:
                    _wait_for_spare(runtime.engine.pool)
            np.testing.assert_array_equal(scores[1], scores[0], err_msg=method)
            np.testing.assert_allclose(scores[0], offline, rtol=1e-6, err_msg=method)
        assert runtime.engine.pool.stats()["failures"] == 0


def test_an_adapter_that_forecasts_absurd_values_is_refused(
    tmp_path: Path, resident: ResidentBase, every_method: dict[str, Path], keys: dict[str, object]
) -> None:
    """Finite weights can still make a broken model: a head scaled to 1e30 forecasts ~1e30, which would square
    into infinite scores. The smoke-test forward pass refuses it before anything is written."""
    broken = Path(shutil.copytree(every_method["full"], tmp_path / "broken"))
    weights = broken / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    tensors["head.weight"] *= 1e30
    save_file(tensors, str(weights), metadata={"format": "pt"})
    state = tmp_path / "state"
    with _open(state, resident, trusted_keys=[keys["public"]]) as runtime:
        with pytest.raises(ModelError, match="standard deviations on a flat input"):
            runtime.install_bundle(bundle(broken, keys["trusted"], "1", 1))
        assert not (state / "bundles").exists() and runtime.state.assets == {}
        assert runtime.metrics.rejected_bundles == 1


@pytest.mark.parametrize("method", ["lora", "ia3", "adapter", "bitfit"])
def test_served_models_hold_no_reference_cycles(
    resident: ResidentBase, every_method: dict[str, Path], method: str
) -> None:
    """DeviceRuntime.settle freezes what is loaded at start-up out of the garbage collector's sight; that leaks
    nothing only while a served model, once dropped (evicted), is freed by reference counting alone."""
    import gc
    import weakref

    pool = SkeletonPool(resident)
    served = load_torch_version(resident, every_method[method], asset_id="a", version="1", pool=pool)
    served.score_all(ROWS)  # scoring caches things on the model: they must not form cycles either
    model = weakref.ref(served.detector.model_.model)
    gc.disable()
    try:
        del served
        assert model() is None, f"a {method} served model survived its last reference: it holds a cycle"
    finally:
        gc.enable()


def test_the_onnx_engine_serves_lora_straight_from_a_stored_bundle(
    tmp_path: Path, resident: ResidentBase, versions: list[Path], keys: dict[str, object]
) -> None:
    """The ONNX engine reads the adapter's config and tensors from the decoded bundle too, before and after a
    restart (when they come back from the stored file)."""
    state = tmp_path / "state"
    offline = AnomalyDetector.load(versions[0]).score_all(ROWS)["score"]
    config = {"engine": "onnx", "trusted_keys": [keys["public"]]}
    with _open(state, resident, **config) as runtime:
        answer = runtime.install_bundle(bundle(versions[0], keys["trusted"], "1", 1))
        assert answer["engine"] == "onnx"
        np.testing.assert_allclose(runtime.score(ASSET, ROWS)[1]["score"], offline, rtol=1e-4, atol=1e-5)
    with _open(state, resident, **config) as runtime:
        served, result = runtime.score(ASSET, ROWS)
        assert served.engine == "onnx"
        np.testing.assert_allclose(result["score"], offline, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("failing", ["journal write", "journal flush"])
def test_a_full_disk_fails_the_install_cleanly(
    tmp_path: Path, resident: ResidentBase, versions: list[Path], keys: dict[str, object], monkeypatch,
    failing: str,
) -> None:
    """An install that cannot write (disk full) is a clear OutputError, and the device is exactly as before: the
    journal is cut back to where it was, byte for byte. With space again, the install goes through."""
    import errno
    import os

    state = tmp_path / "state"
    with _open(state, resident, trusted_keys=[keys["public"]]) as runtime:
        runtime.install_bundle(bundle(versions[0], keys["trusted"], "1", 1))
        snapshot = _tree(state)
        name = {"journal write": "pwrite", "journal flush": "fdatasync"}[failing]
        real = getattr(os, name)

        def full(*args: object) -> object:
            if name == "pwrite":
                real(args[0], bytes(args[1])[:100], args[2])  # a partial write, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, name, full)
        with pytest.raises(OutputError, match="No space left on device"):
            runtime.install_bundle(bundle(versions[1], keys["trusted"], "2", 2))
        monkeypatch.setattr(os, name, real)
        assert _tree(state) == snapshot and runtime.state.asset(ASSET).active == "1"
        runtime.install_bundle(bundle(versions[1], keys["trusted"], "2", 2))  # space again: it installs
        assert runtime.state.asset(ASSET).active == "2"
    with _open(state, resident, trusted_keys=[keys["public"]]) as runtime:  # a restart serves what was committed
        assert runtime.state.asset(ASSET).active == "2"
        runtime.score(ASSET, ROWS)


def test_a_state_json_flush_failing_after_its_rename_is_reported(
    tmp_path: Path, resident: ResidentBase, versions: list[Path], keys: dict[str, object], monkeypatch
) -> None:
    """A rollback whose state.json rename is done but whose folder fsync fails stands (every reader sees it);
    the failed flush is logged and counted, not reported as a failed rollback."""
    import errno
    import os

    state = tmp_path / "state"
    with _open(state, resident, trusted_keys=[keys["public"]]) as runtime:
        runtime.install_bundle(bundle(versions[0], keys["trusted"], "1", 1))
        runtime.install_bundle(bundle(versions[1], keys["trusted"], "2", 2))
        real_fsync = os.fsync

        def fsync(fd: int) -> None:
            if Path(os.readlink(f"/proc/self/fd/{fd}")) == state:
                raise OSError(errno.EIO, "Input/output error")
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fsync)
        assert runtime.rollback(ASSET)["active"] == "1"
        monkeypatch.setattr(os, "fsync", real_fsync)
        assert runtime.metrics.unconfirmed_commits == 1
        assert "edgepeft_unconfirmed_commits_total 1" in runtime.metrics.render()
    with _open(state, resident, trusted_keys=[keys["public"]]) as runtime:
        assert runtime.state.asset(ASSET).active == "1"


def test_alarm_persistence_travels_in_the_bundle_and_applies_on_the_device(
    tmp_path: Path, resident: ResidentBase, versions: list[Path], keys: dict[str, object]
) -> None:
    import json

    from edgepeft.detect.threshold import persist_alarms

    held = tmp_path / "held"
    shutil.copytree(versions[0], held)
    state = json.loads((held / "detector.json").read_text())
    state["params"].update(raise_after=3, clear_after=2)
    (held / "detector.json").write_text(json.dumps(state))
    offline = AnomalyDetector.load(held)
    expected = persist_alarms(offline.score(ROWS) > offline.threshold_, 3, 2).astype(np.int8)
    expected[: offline.warmup_rows_] = 0
    assert np.array_equal(offline.predict(ROWS), expected)
    with _open(tmp_path / "state", resident, trusted_keys=[keys["public"]]) as runtime:
        runtime.install_bundle(bundle(held, keys["trusted"], "1", 1))
        served = runtime.score(ASSET, ROWS)[1]
    assert np.array_equal(served["anomaly"], expected)
