"""What a device remembers across restarts: installed versions, the active one per asset, release counters.

Layout of a state directory (all of it owned by one runtime process)::

    STATE/
      state.json                     # RuntimeState checkpoint, and how much of the journal it includes
      journal                        # install journal: each installed bundle, as received, with its state change
      bundles/<asset_id>/<version>.edelta  # a bundle kept as its own file (written by earlier versions; still read)
      assets/<asset_id>/<version>/   # a version installed from a detector directory (provisioning, tests)
      staging/                       # directories being copied in; emptied at start-up
      onnx/                          # exported graphs and ONNX Runtime adapter files (derived, rebuildable)
      token                          # write-endpoint token, generated (mode 0600) when none is configured
      lock                           # held (flock) by the one runtime process that owns the directory

The device's state is ``state.json`` plus the journal records after the point it names
(:mod:`edgepeft.runtime.journal`). An install from a bundle commits by appending one record (the bundle and the
asset's new record) and flushing it once; activations, rollbacks and directory installs replace ``state.json``
atomically (temp file, fsync, rename, fsync of the folder), which also folds the journal in, as does a clean
shutdown. Either way a crash leaves the old state or the new one: a partial last journal record is cut off at
start-up, and a file or directory that the state does not name is ignored. A bundle is kept as it arrived, not
unpacked; loading decodes it in memory after checking it against the sha256 recorded when it was installed. State
objects are immutable: every change builds a new :class:`RuntimeState` and the runtime swaps one reference.

Example:
    >>> import tempfile
    >>> store = StateStore(tempfile.mkdtemp())
    >>> state = store.load(base="tiny", base_sha256="ab" * 32)
    >>> state.assets
    {}
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgepeft.core.config import SCHEMA_VERSION, fsync_dir, read_json, stage_bytes
from edgepeft.core.errors import ArtifactError, ConfigError, OutputError
from edgepeft.runtime.journal import Journal

STATE_FILE = "state.json"
JOURNAL_FILE = "journal"
BUNDLES_DIR = "bundles"
BUNDLE_SUFFIX = ".edelta"
ASSETS_DIR = "assets"
STAGING_DIR = "staging"
ONNX_DIR = "onnx"
TOKEN_FILE = "token"
LOCK_FILE = "lock"
# Enough to walk back through a bad day of updates; older entries fall off so the file stays small.
MAX_HISTORY = 32

# Asset ids and versions become directory names: keep them to a portable, traversal-free alphabet.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _encode(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def check_name(value: str, what: str) -> str:
    """``value`` if it is a safe asset id / version string, else a ConfigError that says what is allowed."""
    if not isinstance(value, str) or not _NAME.match(value) or ".." in value:
        raise ConfigError(
            f"{what} {value!r} is not allowed: use 1-128 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit"
        )
    return value


@dataclass(frozen=True)
class VersionRecord:
    """One installed adapter version.

    Attributes:
        version: version string from the bundle manifest.
        release: the bundle's release counter (monotonic per asset).
        method: PEFT method of the adapter.
        installed_at: UTC time of installation, ISO 8601.
        bundle_sha256: hash of the installed bundle bytes (``local`` for directories installed by hand).
        manifest: the bundle manifest, kept for inspection.
        stored: ``journal`` (the bundle, kept in the install journal), ``bundle`` (kept as a bundle file, by
            older versions) or ``directory`` (an unpacked detector directory; what state files written before
            bundles were kept whole say, implicitly).
        offset, length: where a ``journal`` version's bundle lies in the journal.
    """

    version: str
    release: int
    method: str
    installed_at: str
    bundle_sha256: str
    manifest: dict[str, Any] = field(default_factory=dict)
    stored: str = "directory"
    offset: int | None = None
    length: int | None = None

    def to_dict(self) -> dict[str, Any]:
        # offset and length only where they mean something (stored in the journal): other records read as before.
        return {item.name: getattr(self, item.name) for item in dataclasses.fields(self)
                if getattr(self, item.name) is not None or item.name not in ("offset", "length")}

    @functools.cached_property
    def encoded(self) -> str:
        """This record as ``state.json`` writes it, encoded once: a record never changes, and re-encoding every
        installed version on every install made writing the state grow with the device's history."""
        return _encode(self.to_dict())


@dataclass(frozen=True)
class AssetRecord:
    """One asset: its installed versions, the active one and the activation history (for rollback).

    Attributes:
        asset_id: the asset.
        active: the version new requests are scored with (None until one is activated).
        history: versions previously active, most recent last; rollback pops from the end.
        release: the highest release ever installed; a bundle must exceed it (anti-rollback).
        versions: installed versions by version string.
    """

    asset_id: str
    active: str | None = None
    history: tuple[str, ...] = ()
    release: int = 0
    versions: dict[str, VersionRecord] = field(default_factory=dict)

    def activate(self, version: str) -> AssetRecord:
        """This asset with ``version`` active and the current one remembered for rollback."""
        if version == self.active:
            return self
        history = self.history if self.active is None else (*self.history, self.active)
        return dataclasses.replace(self, active=version, history=history[-MAX_HISTORY:])

    def rolled_back(self) -> AssetRecord:
        """This asset with the previously active version active again."""
        if not self.history:
            raise ConflictError(f"asset {self.asset_id!r} has no previous version to roll back to; activate a "
                                "version by name instead")
        return dataclasses.replace(self, active=self.history[-1], history=self.history[:-1])


@dataclass(frozen=True)
class RuntimeState:
    """Everything ``state.json`` holds. Immutable; the ``with_*`` helpers return a changed copy."""

    base: str
    base_sha256: str
    assets: dict[str, AssetRecord] = field(default_factory=dict)

    def asset(self, asset_id: str) -> AssetRecord:
        try:
            return self.assets[asset_id]
        except KeyError:
            raise UnknownAssetError(f"asset {asset_id!r} is not installed on this device; install a bundle for "
                                    "it first (POST /v1/bundles)") from None

    def with_asset(self, record: AssetRecord) -> RuntimeState:
        return dataclasses.replace(self, assets={**self.assets, record.asset_id: record})

    def to_dict(self) -> dict[str, Any]:
        return json.loads(self.to_json())

    def applied(self, change: dict[str, Any]) -> RuntimeState:
        """This state with one journal change applied (see :meth:`StateStore.append_install`)."""
        try:
            head, version = change["asset"], VersionRecord(**change["version"])
            installed = self.assets.get(head["asset_id"]) or AssetRecord(asset_id=head["asset_id"])
            versions = {**installed.versions, version.version: version}
            record = AssetRecord(asset_id=head["asset_id"], active=head["active"], history=tuple(head["history"]),
                                 release=int(head["release"]), versions=versions)
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"a journal record is malformed ({exc}); restore the state directory from a "
                                "backup") from exc
        return self.with_asset(record)

    def to_json(self, journal_end: int = 0) -> str:
        """``state.json``'s text: ``json.dumps(payload, sort_keys=True, separators=(",", ":"))`` of the state with
        its ``schema_version`` (and how much of the install journal it includes, if any), assembled from each
        version's cached encoding (:attr:`VersionRecord.encoded`), so an install encodes its own record only,
        however many versions the device keeps."""
        assets = []
        for asset_id in sorted(self.assets):
            record = self.assets[asset_id]
            versions = ",".join(f"{_encode(name)}:{record.versions[name].encoded}" for name in sorted(record.versions))
            head = _encode({"active": record.active, "asset_id": record.asset_id, "history": list(record.history),
                            "release": record.release})
            assets.append(f'{_encode(asset_id)}:{head[:-1]},"versions":{{{versions}}}}}')
        extra = {"journal_end": journal_end} if journal_end else {}
        rest = _encode({"base": self.base, "base_sha256": self.base_sha256, **extra, "schema_version": SCHEMA_VERSION})
        return f'{{"assets":{{{",".join(assets)}}},{rest[1:]}'

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RuntimeState:
        try:
            assets = {}
            for asset_id, raw in data["assets"].items():
                versions = {v: VersionRecord(**rec) for v, rec in raw["versions"].items()}
                assets[asset_id] = AssetRecord(
                    asset_id=raw["asset_id"], active=raw["active"], history=tuple(raw["history"]),
                    release=int(raw["release"]), versions=versions,
                )
            return cls(base=data["base"], base_sha256=data["base_sha256"], assets=assets)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ArtifactError(f"{STATE_FILE} is malformed ({exc}); restore it from a backup or start a new "
                                "--state directory") from exc


class DamagedVersionError(ArtifactError):
    """An installed version whose stored bundle no longer reads back as installed (HTTP 503): the device's own
    storage failed, not the request. Reinstalling that version's bundle, or rolling back, is the way out."""


class UnknownAssetError(ConfigError):
    """An asset or version that this device does not have (HTTP 404)."""


class ConflictError(ConfigError):
    """A request that the device's current state does not allow, e.g. a rollback with no history (HTTP 409)."""


class StateStore:
    """Reads and atomically writes a state directory (layout in the module docstring)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._lock_handle: Any = None
        self.journal = Journal(self.root / JOURNAL_FILE)
        self._checkpoint_end = 0  # how much of the journal the state.json on disk includes

    def acquire(self) -> None:
        """Take the directory's exclusive lock: two runtimes writing one state.json would lose installs."""
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        handle = open(self.root / LOCK_FILE, "a+")  # noqa: SIM115 - held open for the life of the runtime
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise ConflictError(f"state directory {self.root} is in use by another edgepeft runtime; stop it "
                                "first, or give this one another --state") from None
        self._lock_handle = handle

    def release(self) -> None:
        self.journal.close()
        if self._lock_handle is not None:
            self._lock_handle.close()  # closing drops the flock
            self._lock_handle = None

    @property
    def state_file(self) -> Path:
        return self.root / STATE_FILE

    def version_dir(self, asset_id: str, version: str) -> Path:
        return self.root / ASSETS_DIR / check_name(asset_id, "asset id") / check_name(version, "version")

    def bundle_path(self, asset_id: str, version: str) -> Path:
        return (self.root / BUNDLES_DIR / check_name(asset_id, "asset id")
                / f"{check_name(version, 'version')}{BUNDLE_SUFFIX}")

    def append_install(self, state: RuntimeState, asset_id: str, version: str, bundle: bytes) -> None:
        """Commit an install: one journal record holding the bundle and ``asset_id``'s record in ``state``.

        ``state`` is the state after the install; ``version``'s record must say ``stored="journal"`` with the
        offset :meth:`Journal.next_bundle_offset` gave and the bundle's length. One write and one flush: when it
        returns, the install survives a power cut. On failure (:class:`OutputError`) nothing was committed.
        """
        record = state.assets[asset_id]
        new = record.versions[version]
        if new.stored != "journal" or new.offset != self.journal.next_bundle_offset() or new.length != len(bundle):
            raise ArtifactError(f"internal: version {asset_id} {version} does not point at the next journal record")
        change = {"asset": {"asset_id": record.asset_id, "active": record.active, "history": list(record.history),
                            "release": record.release},
                  "version": new.to_dict()}
        self.journal.append(bundle, change)

    def read_bundle(self, asset_id: str, record: VersionRecord) -> bytes:
        """The stored bundle of an installed version, refused unless it hashes to what was installed."""
        where = self.bundle_location(asset_id, record)
        try:
            if record.stored == "journal":
                data = self.journal.read(int(record.offset or 0), int(record.length or 0))
            else:
                data = Path(where).read_bytes()
        except (OSError, ArtifactError) as exc:
            raise DamagedVersionError(f"{where} of installed version {asset_id} {record.version} cannot be read "
                                      f"({getattr(exc, 'strerror', None) or exc}); reinstall that version's bundle"
                                      ) from None
        if hashlib.sha256(data).hexdigest() != record.bundle_sha256:
            raise DamagedVersionError(f"{where} no longer matches the bundle installed as {asset_id} "
                                      f"{record.version} (sha256 differs): it was modified on disk; reinstall that "
                                      "version's bundle")
        return data

    def bundle_location(self, asset_id: str, record: VersionRecord) -> str:
        """Where a stored bundle lies, for messages."""
        if record.stored == "journal":
            return f"{self.journal.path} (bytes {record.offset:,}-{(record.offset or 0) + (record.length or 0):,})"
        return str(self.bundle_path(asset_id, record.version))

    def staging_dir(self) -> Path:
        return self.root / STAGING_DIR

    def onnx_dir(self) -> Path:
        return self.root / ONNX_DIR

    def load(self, *, base: str, base_sha256: str) -> RuntimeState:
        """The saved state, or an empty one for a new directory; refuses a state made for another base.

        That is ``state.json`` (the checkpoint) with the install journal's later records applied. The runtime
        that owns the directory (:meth:`acquire`) opens the journal for appending and cuts off a partial last
        record; anyone else only reads.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        owner = self._lock_handle is not None
        if owner:  # a crash mid-install (of a directory) leaves a half-copied one here; nothing refers to it
            shutil.rmtree(self.staging_dir(), ignore_errors=True)
        data = read_json(self.state_file) if self.state_file.exists() else {}
        state = RuntimeState.from_dict(data) if data else RuntimeState(base=base, base_sha256=base_sha256)
        self.journal.close()
        end = data.get("journal_end", 0)
        if not isinstance(end, int) or isinstance(end, bool) or end < 0:
            raise ArtifactError(f"{self.state_file} has journal_end {end!r}, not a byte count; restore it from a "
                                "backup or start a new --state directory")
        self._checkpoint_end = end
        for record in self.journal.open(writable=owner, start=self._checkpoint_end):
            state = state.applied(record.change)
        if not owner:
            self.journal.close()
        if state.base != base or state.base_sha256 != base_sha256:
            raise ArtifactError(
                f"state directory {self.root} holds adapters for base {state.base!r} (sha256 "
                f"{state.base_sha256[:12]}…) but this runtime loads base {base!r} (sha256 {base_sha256[:12]}…); "
                "serve that base, or use a new --state directory and reinstall the bundles"
            )
        return state

    def save(self, state: RuntimeState) -> bool:
        """Atomically replace ``state.json``: temp file, fsync, rename (the commit point), fsync of the folder.

        It records how much of the install journal it includes (all of it: the runtime's state always does).
        A failed write or rename raises :class:`OutputError` and leaves the old ``state.json``. Once the rename
        is done the new state is what every reader and a restart see, so a failing folder fsync cannot undo it:
        it returns False (the change may not survive a power cut, in which case the device restarts on the
        previous, equally consistent state) and the caller reports it. Compact JSON: ``json.dumps`` with
        ``indent`` runs the pure-Python encoder, several times slower than the C one on a state with many
        versions. Pretty-print it with ``python -m json.tool`` to read it.
        """
        end = self.journal.end
        try:
            staged = stage_bytes(self.state_file, state.to_json(journal_end=end).encode())
        except OSError as exc:
            raise self._write_error(exc) from exc
        try:
            os.replace(staged, self.state_file)
        except OSError as exc:
            staged.unlink(missing_ok=True)
            raise self._write_error(exc) from exc
        self._checkpoint_end = end
        try:
            fsync_dir(self.root)
        except OSError:
            return False
        return True

    @property
    def behind_journal(self) -> bool:
        """True when the journal holds installs that state.json does not include yet."""
        return self.journal.end > self._checkpoint_end

    def _write_error(self, exc: OSError) -> OutputError:
        return OutputError(f"cannot write {self.state_file} ({exc.strerror or exc}); the device state is "
                           "unchanged, free space on the device or fix the state directory, then retry")
