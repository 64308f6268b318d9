"""The device runtime: one resident base, many assets' adapters, atomic hot swap, persistent state.

:class:`DeviceRuntime` is what the HTTP server (:mod:`edgepeft.runtime.server`) is a thin shell around; tests
and benchmarks drive it directly too.

How a swap stays atomic without stopping requests:
- every installed version is an immutable :class:`~edgepeft.runtime.resident.ServingModel` (its weights are
  never written after load);
- the set of active versions lives in one immutable :class:`~edgepeft.runtime.state.RuntimeState`, replaced as a
  whole by a single reference assignment (atomic in CPython) after ``state.json`` is safely on disk;
- a request reads that reference once, resolves its asset's version and model, and uses only those objects to
  the end, so it finishes on the version it started with and is tagged with it; the next request sees the
  new state. Nothing is ever half-swapped, so no request can mix two adapters.
Writes (install, activate, rollback) are serialised by one lock; scoring takes no lock on the hot path.

Example:
    >>> runtime = DeviceRuntime.open(RuntimeConfig(state_dir="STATE", base="tiny"))   # doctest: +SKIP
    >>> runtime.install_bundle(open("pump-1_v2.edelta", "rb").read())                  # doctest: +SKIP
    >>> served, result = runtime.score("pump-1", rows)                                   # doctest: +SKIP
    >>> served.version, result["score"].shape                                            # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import gc
import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgepeft.core.config import fsync_dir
from edgepeft.core.errors import ArtifactError, ConfigError, ModelError, OutputError
from edgepeft.runtime.cache import AdapterCache
from edgepeft.runtime.metrics import Metrics, ScoreStats
from edgepeft.runtime.serving import SavedDetector, ServingModel
from edgepeft.runtime.state import (
    AssetRecord,
    DamagedVersionError,
    RuntimeState,
    StateStore,
    UnknownAssetError,
    VersionRecord,
    check_name,
)

ENGINES = ("torch", "onnx")
# The largest forecast (in the asset's standard deviations) a new version may produce on its smoke-test input.
# Real forecasts stay within tens; a squared error only overflows float32 near 1e19. Far from both.
MAX_FORECAST = 1e6


@dataclass
class RuntimeConfig:
    """How this device runs (runtime settings; none of this is written into state or bundles).

    Attributes:
        state_dir: folder holding state.json and the installed versions (created if missing).
        base: the resident base model every adapter must have been trained on.
        engine: ``torch``, or ``onnx`` to run LoRA adapters through one ONNX Runtime graph (other methods
            fall back to torch where it is installed, noted in the asset listing).
        graph: with the onnx engine, the scoring graph to serve (``edgepeft export-onnx``); required on a device
            install without torch, where it is the resident base (else exported from the torch base).
        cache_mb: RAM budget of loaded adapters; least recently used ones are dropped and reloaded on demand.
        trusted_keys: public key files (PEM) whose signatures this device accepts on bundles.
        onnx_int8: with the onnx engine, run the int8 dynamically quantised base graph.
        threads: torch / ONNX Runtime threads per request (None: leave the libraries' defaults).
        scoring_workers: scoring requests run at once (the HTTP server queues the rest in its event loop).
        warm: load the active version of every asset at start-up (within the cache budget).
    """

    state_dir: str | Path
    base: str = "tiny"
    engine: str = "torch"
    cache_mb: float = 256.0
    trusted_keys: Sequence[str | Path] = field(default_factory=list)
    onnx_int8: bool = False
    graph: str | Path | None = None
    threads: int | None = None
    scoring_workers: int = 1
    warm: bool = True

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ConfigError(f"unknown engine {self.engine!r}; choose one of {', '.join(ENGINES)}")
        if not self.cache_mb > 0:
            raise ConfigError(f"cache_mb must be positive, got {self.cache_mb}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")
        if self.scoring_workers < 1:
            raise ConfigError(f"scoring_workers must be >= 1, got {self.scoring_workers}")
        if self.graph is not None and self.engine != "onnx":
            raise ConfigError("a graph is served by the onnx engine; pass engine='onnx' (--engine onnx) with it")


logger = logging.getLogger("edgepeft.runtime")

class Engine(Protocol):
    """Turns an installed version's saved detector into a ServingModel."""

    name: str

    def load(self, source: SavedDetector, *, asset_id: str, version: str, release: int) -> ServingModel: ...

    def smoke(self, served: ServingModel) -> np.ndarray:
        """(1, L, C) forecast of a flat window whose last patch is forecast: what an install's smoke test checks."""
        ...

    def idle(self) -> None:
        """Work that is best done off the request path (called once each write is done)."""
        ...

    def close(self) -> None:
        """Finish background work; called when the runtime closes."""
        ...


class TorchEngine:
    """Serve adapters as torch models on the resident base (every PEFT method)."""

    name = "torch"

    def __init__(self, resident: Any) -> None:
        from edgepeft.runtime.resident import SkeletonPool

        self.resident = resident
        # Spare skeletons make an install or a reload of an evicted version a weight load, not a model build.
        self.pool = SkeletonPool(resident)

    def load(self, source: SavedDetector, *, asset_id: str, version: str, release: int) -> ServingModel:
        from edgepeft.runtime.resident import load_torch_version

        return load_torch_version(self.resident, source, asset_id=asset_id, version=version, release=release,
                                  pool=self.pool)

    def smoke(self, served: ServingModel) -> np.ndarray:
        from edgepeft.runtime.resident import smoke_forecast

        return smoke_forecast(self.resident, served).numpy()

    def idle(self) -> None:
        self.pool.refill()

    def close(self) -> None:
        self.pool.close()


def _then_idle(method: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """Run the engine's background preparation once a write is done, so it never delays the write itself."""

    @functools.wraps(method)
    def wrapper(self: DeviceRuntime, *args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            return method(self, *args, **kwargs)
        finally:
            self._idle()

    return wrapper


class DeviceRuntime:
    """Installed adapters for many assets on one resident base; see the module docstring."""

    def __init__(
        self,
        config: RuntimeConfig,
        resident: Any,
        store: StateStore,
        state: RuntimeState,
        engine: Engine,
        trusted_keys: list[Any],
    ) -> None:
        self.config = config
        self.resident = resident
        self.store = store
        self._state = state
        self.engine = engine
        self.trusted_keys = trusted_keys
        self.cache = AdapterCache(int(config.cache_mb * 1024 * 1024))
        self.metrics = Metrics()
        # Per version health since it became active in this process: what the update agent reports to the fleet.
        self.score_stats = ScoreStats()
        self.metrics.add_renderer(self.score_stats.render)
        for record in state.assets.values():
            if record.active is not None:
                self.score_stats.activated(record.asset_id, record.active)
        self.started_at = time.time()
        self._write_lock = threading.Lock()
        self.metrics.gauge("edgepeft_cache_adapters", "Adapter versions loaded in memory.",
                           lambda: self.cache.stats()["entries"])
        self.metrics.gauge("edgepeft_cache_bytes", "Estimated bytes of loaded adapter versions.",
                           lambda: self.cache.stats()["bytes"])
        self.metrics.gauge("edgepeft_cache_budget_bytes", "RAM budget of loaded adapter versions.",
                           lambda: self.cache.budget_bytes)
        self.metrics.gauge("edgepeft_cache_evictions", "Versions dropped from memory to stay in budget (total).",
                           lambda: self.cache.stats()["evictions"])
        self.metrics.gauge("edgepeft_cache_loads", "Versions loaded from disk into memory (total).",
                           lambda: self.cache.stats()["loads"])
        self.metrics.gauge("edgepeft_assets", "Assets installed.", lambda: len(self._state.assets))

    # ------------------------------------------------------------------ start-up
    @classmethod
    def open(cls, config: RuntimeConfig, *, resident: Any = None) -> DeviceRuntime:
        """Load the base, read the state directory and (optionally) warm the active versions.

        The resident base is the torch base (``ResidentBase``), or with ``config.graph`` the ONNX scoring graph
        (:class:`~edgepeft.runtime.ort.GraphBase`): then nothing here imports torch.
        """
        if config.graph is not None:
            from edgepeft.runtime.ort import GraphBase

            resident = resident or GraphBase.load(config.graph, config.threads)
        else:
            if config.threads is not None:
                _torch().set_num_threads(config.threads)
            if resident is None:
                _torch()
                from edgepeft.runtime.resident import ResidentBase

                resident = ResidentBase.load(config.base)
        if resident.name != config.base:
            raise ConfigError(f"resident base is {resident.name!r} but the config asks for {config.base!r}")
        keys = load_trusted_keys(config.trusted_keys)
        store = StateStore(config.state_dir)
        store.acquire()
        try:
            state = store.load(base=resident.name, base_sha256=resident.sha256)
            engine = make_engine(config, resident, store)
            runtime = cls(config, resident, store, state, engine, keys)
            if config.warm:
                runtime.warm()
        except BaseException:
            store.release()
            raise
        return runtime

    def close(self) -> None:
        """Finish the engine's background work and release the state directory (another runtime may open it)."""
        try:
            self.engine.close()
            self._checkpoint()
        finally:
            self.store.release()

    def _idle(self) -> None:
        # Background preparation is an optimisation: its failure must never turn a committed write into an error.
        try:
            self.engine.idle()
        except Exception as exc:  # noqa: BLE001 - logged, and the write's own result stands
            logger.warning("background preparation failed: %s", exc)

    def settle(self) -> None:
        """Tell the garbage collector that everything loaded so far lives as long as the process.

        A serving process calls it once, when ready. Python's full collection walks every tracked object: some
        400,000 here (torch, peft, pandas, the base and the warmed models), about 250 ms on this machine, and
        it runs in whichever thread allocates at the wrong moment, an install or a scoring request included.
        Frozen objects are skipped by later collections, so pauses stay proportional to what changed since
        start-up. Nothing leaks: served models are freed by reference counting alone (they hold no cycles; a
        test checks it), and the collection just before catches the start-up garbage that does.
        """
        gc.collect()
        gc.freeze()

    def __enter__(self) -> DeviceRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def warm(self) -> None:
        """Load every asset's active version until the cache budget is used, so first requests do not wait.

        A version that fails to load (its file damaged on disk) is logged and skipped: one bad asset must not
        keep the device from serving the others. Its requests get the load error until it is reinstalled.
        """
        for record in self._state.assets.values():
            if record.active is None:
                continue
            if self.cache.stats()["bytes"] >= self.cache.budget_bytes:
                break
            try:
                self.model(record.asset_id, record.active)
            except (ArtifactError, ModelError) as exc:
                self.metrics.count("load_failures")
                logger.error("asset %s version %s does not load: %s", record.asset_id, record.active, exc)

    # ------------------------------------------------------------------ reading
    @property
    def state(self) -> RuntimeState:
        """The current state (an immutable snapshot)."""
        return self._state

    def model(self, asset_id: str, version: str) -> ServingModel:
        """The serving model of an installed version, from the cache or loaded from disk."""
        return self._model(self._state.asset(asset_id), version)

    def active_model(self, asset_id: str) -> ServingModel:
        """The model new requests for ``asset_id`` are scored with, resolved from one state snapshot."""
        record = self._state.asset(asset_id)  # one read of the reference: the swap point
        if record.active is None:
            raise UnknownAssetError(f"asset {asset_id!r} has no active version; activate one of "
                                    f"{', '.join(record.versions) or 'its versions'}")
        return self._model(record, record.active)

    def _model(self, record: AssetRecord, version: str) -> ServingModel:
        if version not in record.versions:
            raise UnknownAssetError(f"asset {record.asset_id!r} has no version {version!r}; installed: "
                                    f"{', '.join(record.versions) or 'none'}")
        asset_id, stored = record.asset_id, record.versions[version]

        loaded = False

        def load() -> ServingModel:
            nonlocal loaded
            loaded = True
            return self.engine.load(self._saved(asset_id, stored), asset_id=asset_id, version=version,
                                    release=stored.release)

        served = self.cache.get((asset_id, version), load)
        if loaded:
            self._idle()  # a reload from disk took a spare skeleton: replace it (rare: only after an eviction)
        return served

    def score(self, asset_id: str, rows: Any, explain: bool = False) -> tuple[ServingModel, dict[str, Any]]:
        """Score ``rows`` (rows x channels, array or DataFrame) with the asset's active version.

        Returns the model that produced the scores (its ``version`` tags the answer) and the scores; ``explain``
        adds ``top_channels`` (the sensors and evidence kinds behind each flagged row).
        """
        served = self.active_model(asset_id)
        try:
            result = served.score_all(rows, explain=explain)
        except Exception:
            self.score_stats.failed(asset_id, served.version)
            raise
        self.metrics.count("rows_scored", len(result["score"]))
        self.score_stats.record(asset_id, served.version, result["score"], threshold=float(served.detector.threshold_),
                                alerts=int(np.count_nonzero(result["anomaly"])),
                                skip=int(getattr(served.detector, "warmup_rows_", 0)))
        return served, result

    def version_stats(self, asset_id: str) -> dict[str, Any]:
        """The asset's per version health in this process (see :class:`~edgepeft.runtime.metrics.ScoreStats`)."""
        self._state.asset(asset_id)  # unknown asset: UnknownAssetError (404)
        return {"asset_id": asset_id, "versions": self.score_stats.versions(asset_id)}

    def assets(self) -> list[dict[str, Any]]:
        """Every asset: active version, installed versions (with release), rollback target, what is loaded."""
        state = self._state
        loaded = self.cache.snapshot()
        out = []
        for asset_id, record in sorted(state.assets.items()):
            versions = []
            for version, rec in record.versions.items():
                served = loaded.get((asset_id, version))
                versions.append({
                    "version": version,
                    "release": rec.release,
                    "method": rec.method,
                    "installed_at": rec.installed_at,
                    "loaded": served is not None,
                    **({"engine": served.engine} if served is not None else {}),
                    **({"note": served.note} if served is not None and served.note else {}),
                })
            out.append({
                "asset_id": asset_id,
                "active": record.active,
                "previous": record.history[-1] if record.history else None,
                "release": record.release,
                "versions": versions,
            })
        return out

    def health(self, *, check_base: bool = True) -> dict[str, Any]:
        """Liveness plus the one invariant that must never break: the resident base is unchanged."""
        stats = self.cache.stats()
        out: dict[str, Any] = {
            "status": "ok",
            "base": self.resident.name,
            "base_sha256": self.resident.sha256,
            "engine": self.engine.name,
            "assets": len(self._state.assets),
            "cache": stats,
            **({"skeleton_pool": self.engine.pool.stats()} if isinstance(self.engine, TorchEngine) else {}),
            "uptime_seconds": time.time() - self.started_at,
        }
        if check_base:
            intact = self.resident.current_sha256() == self.resident.sha256
            out["base_intact"] = intact
            if not intact:
                out["status"] = "base-modified"
        return out

    # ------------------------------------------------------------------ writing
    @_then_idle
    def install_bundle(self, data: bytes, *, activate: bool = True, allow_rollback: bool = False) -> dict[str, Any]:
        """Verify a signed ``.edelta`` bundle, load and smoke-test it from memory, store it, then commit it.

        Nothing changes unless every step succeeds: a rejected bundle leaves ``state.json``, the installed
        versions and the active ones exactly as they were.
        """
        from edgepeft.delta import BundleError, bundle_files, read_bundle, verify_bundle

        started = time.perf_counter()
        with self._write_lock:
            state = self._state
            try:
                parsed = read_bundle(data)  # signature not checked yet: only to learn whose release counter applies
                check_name(parsed.asset_id, "asset id")
                check_name(parsed.version, "version")
                installed = state.assets.get(parsed.asset_id)
                bundle = verify_bundle(
                    parsed, self.trusted_keys, resident_base_sha256=self.resident.sha256,
                    installed_release=installed.release if installed else 0, allow_rollback=allow_rollback,
                )
            except (BundleError, ConfigError) as exc:
                self.metrics.count("rejected_bundles")
                raise BundleError(f"bundle rejected: {exc}") from exc
            asset_id, version = bundle.asset_id, bundle.version
            digest = hashlib.sha256(data).hexdigest()
            if installed is not None and version in installed.versions:
                if installed.versions[version].bundle_sha256 != digest:
                    self.metrics.count("rejected_bundles")
                    raise BundleError(
                        f"bundle rejected: asset {asset_id!r} already has a different version {version!r}; a version "
                        "is immutable once installed, publish this adapter under a new version"
                    )
                # The very same bundle again (an explicitly allowed re-install): nothing to write.
                result = {"asset_id": asset_id, "version": version, "release": bundle.release,
                          "already_installed": True}
                if activate:
                    result.update(self._activate_locked(asset_id, version, started))
                return result
            try:
                # Loaded and smoke-tested from memory first: a bundle that fails never touches the disk.
                saved = SavedDetector.from_bundle(bundle_files(bundle, validated=True), f"bundle {asset_id} {version}")
                served = self._load_checked(saved, asset_id, version, bundle.release)
                new_state, record = self._installed_state(
                    asset_id=asset_id, version=version, release=bundle.release, method=served.method,
                    digest=digest, manifest=_manifest_summary(bundle.manifest), stored="journal", activate=activate,
                    offset=self.store.journal.next_bundle_offset(), length=len(data))
                # The commit point: one record (the bundle and this asset's new record) appended to the install
                # journal and flushed. state.json is rewritten at the next activation, rollback or shutdown.
                self.store.append_install(new_state, asset_id, version, bytes(data))
            except BaseException:
                self.metrics.count("rejected_bundles")
                raise
            return self._swap_in(served, new_state, record, activate=activate, started=started)

    @_then_idle
    def install_directory(
        self, directory: str | Path, *, asset_id: str, version: str, release: int, activate: bool = True
    ) -> dict[str, Any]:
        """Install a detector directory without a bundle (provisioning, tests, benchmarks).

        Not reachable over HTTP: only someone who can already write the state directory can use it. Version
        immutability and release counters are enforced as for bundles.
        """
        started = time.perf_counter()
        check_name(asset_id, "asset id")
        check_name(version, "version")
        with self._write_lock:
            installed = self._state.assets.get(asset_id)
            if installed is not None and version in installed.versions:
                raise ArtifactError(f"asset {asset_id!r} already has version {version!r}; versions are immutable, "
                                    "install it under a new version")
            if installed is not None and release <= installed.release:
                raise ArtifactError(f"release {release} of {asset_id!r} is not newer than the installed release "
                                    f"{installed.release}; give a higher release")

            return self._install_directory_locked(Path(directory), asset_id=asset_id, version=version,
                                                  release=release, activate=activate, started=started)

    @_then_idle
    def activate(self, asset_id: str, version: str) -> dict[str, Any]:
        """Make ``version`` the one new requests for ``asset_id`` use (loaded first, so the swap is instant)."""
        started = time.perf_counter()
        with self._write_lock:
            return self._activate_locked(asset_id, version, started)

    @_then_idle
    def rollback(self, asset_id: str) -> dict[str, Any]:
        """Re-activate the version that was active before the current one."""
        started = time.perf_counter()
        with self._write_lock:
            state = self._state
            record = state.asset(asset_id)
            rolled = record.rolled_back()
            self._model(rolled, rolled.active)  # load before the swap: requests must not wait on disk
            new_state = state.with_asset(rolled)
            self._save(new_state)
            self._state = new_state
            self.score_stats.activated(asset_id, rolled.active)
            seconds = time.perf_counter() - started
            self.metrics.observe_swap(seconds)
            return {"asset_id": asset_id, "active": rolled.active, "rolled_back_from": record.active,
                    "swap_seconds": seconds}

    # ------------------------------------------------------------------ internals
    def _install_directory_locked(
        self, directory: Path, *, asset_id: str, version: str, release: int, activate: bool, started: float
    ) -> dict[str, Any]:
        """Copy a detector directory into place, load and smoke-test it, then commit state.json.

        The caller holds the write lock and has checked policy. ``state.json`` is the commit point: until it is
        replaced, a failure removes what was written and the device state is exactly as before.
        """
        staging = Path(tempfile.mkdtemp(prefix=f"{asset_id}-{version}-", dir=self._staging_root()))
        target = self.store.version_dir(asset_id, version)
        moved = False
        try:
            prepared = Path(shutil.copytree(directory, staging / "detector"))
            # A directory state.json does not name is debris of an interrupted install: replace it.
            shutil.rmtree(target, ignore_errors=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(prepared, target)
            moved = True
            fsync_dir(target.parent)  # the rename must be on disk before state.json names the version
            served = self._load_checked(SavedDetector.from_directory(target), asset_id, version, release)
            new_state, record = self._installed_state(
                asset_id=asset_id, version=version, release=release, method=served.method, digest="local",
                manifest={}, stored="directory", activate=activate)
            self._save(new_state)  # the commit point
            return self._swap_in(served, new_state, record, activate=activate, started=started)
        except BaseException:
            if moved:
                shutil.rmtree(target, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _installed_state(
        self, *, asset_id: str, version: str, release: int, method: str, digest: str, manifest: dict[str, Any],
        stored: str, activate: bool, offset: int | None = None, length: int | None = None,
    ) -> tuple[RuntimeState, AssetRecord]:
        """The state once ``version`` is installed (and activated): what the install will commit."""
        state = self._state
        installed = state.assets.get(asset_id) or AssetRecord(asset_id=asset_id)
        version_record = VersionRecord(
            version=version, release=release, method=method,
            installed_at=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            bundle_sha256=digest, manifest=manifest, stored=stored, offset=offset, length=length,
        )
        record = dataclasses.replace(
            installed, release=max(installed.release, release),
            versions={**installed.versions, version: version_record},
        )
        if activate:
            record = record.activate(version)
        return state.with_asset(record), record

    def _swap_in(
        self, served: ServingModel, new_state: RuntimeState, record: AssetRecord, *, activate: bool, started: float
    ) -> dict[str, Any]:
        """After the commit: keep the loaded version and switch requests to the new state."""
        self.cache.put((record.asset_id, served.version), served)
        self._state = new_state  # the swap: one reference assignment
        seconds = time.perf_counter() - started
        self.metrics.count("installs")
        if activate:
            self.metrics.observe_swap(seconds)
            self.score_stats.activated(record.asset_id, served.version)
        return {"asset_id": record.asset_id, "version": served.version, "release": served.release,
                "method": served.method, "engine": served.engine, "active": record.active,
                "install_seconds": seconds}

    def _activate_locked(self, asset_id: str, version: str, started: float) -> dict[str, Any]:
        state = self._state
        record = state.asset(asset_id)
        previous = record.active
        served = self._model(record, version)  # validates the version and loads it before the swap
        if version != previous:
            new_state = state.with_asset(record.activate(version))
            self._save(new_state)  # durable first: a restart must serve what requests were told
            self._state = new_state  # the swap
            self.score_stats.activated(asset_id, version)
        seconds = time.perf_counter() - started
        if version != previous:
            self.metrics.observe_swap(seconds)
        return {"asset_id": asset_id, "active": version, "previous": previous, "engine": served.engine,
                "swap_seconds": seconds}

    def _save(self, state: RuntimeState) -> None:
        """Write state.json; a folder fsync that failed after the rename (the change is live) is logged and counted."""
        if not self.store.save(state):
            self.metrics.count("unconfirmed_commits")
            logger.warning("state.json was replaced but its folder could not be flushed to disk: the change is "
                           "live but may not survive a power cut; check the device's storage")

    def _checkpoint(self) -> None:
        """Rewrite state.json to include every journal record, so it reads as the device's state again (and
        start-up replays nothing). Best effort: the journal already holds everything."""
        with self._write_lock:
            if not self.store.behind_journal:
                return
            try:
                self._save(self._state)
            except OutputError as exc:
                logger.warning("state.json was not brought up to date at shutdown (%s); the journal has it all", exc)

    def _staging_root(self) -> Path:
        root = self.store.staging_dir()
        root.mkdir(parents=True, exist_ok=True)
        return root

    def _saved(self, asset_id: str, record: VersionRecord) -> SavedDetector:
        """An installed version's saved detector, read from its stored bundle or its directory."""
        if record.stored in ("journal", "bundle"):
            from edgepeft.delta import BundleError, bundle_files, read_bundle

            data = self.store.read_bundle(asset_id, record)
            where = self.store.bundle_location(asset_id, record)
            try:
                # Verified (signature, base, release) when installed and unchanged since (the sha256 just
                # checked against state.json), so parsing and decoding is all that is left.
                files = bundle_files(read_bundle(data), validated=True)
            except BundleError as exc:
                raise DamagedVersionError(f"{where}: {exc}") from None
            return SavedDetector.from_bundle(files, str(where))
        return SavedDetector.from_directory(self.store.version_dir(asset_id, record.version))

    def _load_checked(self, saved: SavedDetector, asset_id: str, version: str, release: int) -> ServingModel:
        """Load a new version and run its model once, so a broken adapter never goes live.

        What a new version brings is checked where it enters: the detector's numbers (scaler, channel errors,
        evidence weights, threshold, calibrator) when they are read, the adapter's weights for NaN/inf when they
        are loaded, and here the one thing that cannot be checked by looking: what the adapted model computes.
        One forward pass over a window whose last patch is forecast from the rest runs every module the adapter
        changed (:func:`smoke_forecast`: a temporal half that is the resident base's starts from the base's
        cached features); its forecast must be finite and within ``MAX_FORECAST`` standard deviations, else the
        squared errors would overflow into infinite scores.
        """
        if saved.base != self.resident.name:
            raise ModelError(f"adapter is for base {saved.base!r}; this device serves {self.resident.name!r}")
        served = self.engine.load(saved, asset_id=asset_id, version=version, release=release)
        window, channels = self.resident.window_len, served.n_channels
        forecast = self.engine.smoke(served)
        if tuple(forecast.shape) != (1, window, channels):
            raise ModelError(f"adapter {asset_id} {version} computes a {tuple(forecast.shape)} output, expected "
                             f"{(1, window, channels)}; it was not installed")
        peak = float(np.abs(forecast).max())
        if not peak <= MAX_FORECAST:  # NaN fails this too
            raise ModelError(f"adapter {asset_id} {version} forecasts {peak:.3g} standard deviations on a flat "
                             "input (non-finite or absurd); it was not installed")
        return served



def _manifest_summary(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest fields worth keeping in state.json (not the scaler or channel statistics)."""
    keys = ("asset_id", "adapter_version", "release", "parent_version", "created_at", "expires_at", "signer")
    summary = {key: manifest.get(key) for key in keys if key in manifest}
    peft = manifest.get("peft")
    if isinstance(peft, dict):
        summary["method"] = peft.get("method")
    return summary


def load_trusted_keys(paths: Sequence[str | Path]) -> list[Any]:
    """Public keys from PEM files; an empty list means no bundle can be installed (scoring still works)."""
    if not paths:
        return []
    from edgepeft.delta import load_public_key

    return [load_public_key(path) for path in paths]


def make_engine(config: RuntimeConfig, resident: Any, store: StateStore) -> Engine:
    if config.graph is not None:  # the resident is the graph itself; torch only as a fallback, where installed
        from edgepeft.runtime.ort import OnnxEngine

        return OnnxEngine(resident, store.onnx_dir())
    if config.engine == "onnx":
        from edgepeft.runtime.onnx import open_onnx_engine

        return open_onnx_engine(resident, store.onnx_dir(), int8=config.onnx_int8, threads=config.threads)
    return TorchEngine(resident)


def _torch() -> Any:
    """torch, or a clear error on a device install without it."""
    try:
        import torch
    except ImportError:
        raise ConfigError("this install has no torch: serve an ONNX scoring graph instead (--engine onnx --graph "
                          "FILE, written by `edgepeft export-onnx` on a machine with the training install)") from None
    return torch
