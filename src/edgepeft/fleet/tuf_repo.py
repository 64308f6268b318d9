"""The fleet's TUF repositories, kept in the ``tuf_metadata`` table: an image repository and an Uptane-style director.

Image repository (one for the fleet; it says "this bundle is genuine"): ``root`` and ``targets`` are signed by
offline keys; ``targets`` delegates every path ``<asset>/<file>`` to ``bundles`` (also the offline targets key),
which delegates to succinct hashed bins ``bins-00`` ... (TAP 15) signed by the online ``bins`` key; ``snapshot`` and
``timestamp`` are online. A published bundle is the target ``<asset_id>/<version>.edelta`` with its length, sha256
and ``custom`` ``{asset, version, release, base_sha256}``.

Director (it says "this device should run exactly these bundles"): one root (``director-root``, offline) shared by
every device; per device a ``targets``/``snapshot``/``timestamp`` signed by the online ``director`` key, built from
the device's rows in ``device_assignments`` when the device asks and they changed (or expire soon). The director's
targets carry ``device_id`` in their signed part so that one device's metadata cannot be served to another.

Every file is stored with consistent snapshots (``N.role.json``), length and sha256 in snapshot and timestamp
meta. Functions here take a SQLAlchemy session (the caller's transaction) and the signers; they never commit.

Example (a throw-away SQLite registry, keys in temporary folders):
    >>> import tempfile
    >>> from pathlib import Path
    >>> from edgepeft.fleet.db import Database
    >>> folder = Path(tempfile.mkdtemp())
    >>> db = Database.open(f"sqlite:///{folder}/fleet.db")
    >>> offline, online = create_keys(folder / "offline", OFFLINE_KEYS), create_keys(folder / "online", ONLINE_KEYS)
    >>> with db.write() as session:
    ...     init_repositories(session, offline, online, bin_bits=4)  # no bundles catalogued yet
    0
    >>> with db.read() as session:
    ...     latest_row(session, IMAGE, "timestamp").version, latest_row(session, DIRECTOR, "root").version
    (1, 1)
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from securesystemslib.signer import CryptoSigner, Signer, SSlibKey
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session
from tuf.api.metadata import (
    DelegatedRole,
    Delegations,
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    SuccinctRoles,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from edgepeft.core.errors import ConfigError
from edgepeft.delta.manifest import as_utc
from edgepeft.fleet.models import BundleRecord, DeviceAssignment, TufMetadata

IMAGE = "image"
DIRECTOR = "director"
# Offline keys sign rarely (init, rotation) and live on a laptop in a safe or an HSM; online keys sign on the server.
OFFLINE_KEYS = ("root", "targets", "director-root")
ONLINE_KEYS = ("timestamp", "snapshot", "bins", "director")
ROLES = (*OFFLINE_KEYS, *ONLINE_KEYS)
DEFAULT_BIN_BITS = 8  # 256 bins: ~11 KB each at 10^4 bundles (studies/fleet-tuf); 10 for ~10^5
BUNDLES_PATHS = ["*/*"]  # <asset>/<version>.edelta ('*' never matches '/': one segment each)
TARGET_SUFFIX = ".edelta"
DEVICE_FIELD = "device_id"  # in the director's signed targets: whose metadata this is
# Versions kept of each non-root role: a device between its timestamp and snapshot (or bin) fetch still finds
# the files; older ones are deleted (a director timestamp is re-signed twice a day per device).
KEEP_VERSIONS = 3

# How long each role's metadata is valid (studies/fleet-tuf key table). The timestamp's period is the freeze window;
# the server re-signs online roles lazily once less than half of their period is left.
PERIODS: dict[str, timedelta] = {
    "root": timedelta(days=365), "targets": timedelta(days=365), "bundles": timedelta(days=365),
    "bins": timedelta(days=30), "snapshot": timedelta(days=7), "timestamp": timedelta(days=1),
    "director-root": timedelta(days=365), "director-targets": timedelta(days=7),
    "director-snapshot": timedelta(days=7), "director-timestamp": timedelta(days=1),
}


class RepositoryNotReady(ConfigError):
    """The repository is not initialised, or the online keys at hand are not the ones its root trusts."""


class StaleKey(RepositoryNotReady):
    """An online key at hand is not the one the repository trusts (rotated since it was loaded)."""


def now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def device_repo(device_id: str) -> str:
    """The ``tuf_metadata.repo`` of one device's director metadata."""
    return f"{DIRECTOR}:{device_id}"


def target_path(asset_id: str, version: str) -> str:
    """A bundle's TUF target path; the consistent-snapshot file is ``<asset>/<sha256>.<version>.edelta``."""
    return f"{asset_id}/{version}{TARGET_SUFFIX}"


# ---------------------------------------------------------------------------------------------- keys on disk
def create_keys(folder: Path, names: Iterable[str], *, replace: bool = False) -> dict[str, Signer]:
    """Ed25519 keys ``folder/NAME.pem`` (PKCS8, mode 0600) with ``NAME.pub.json``; existing ones are loaded, not
    replaced, unless ``replace``."""
    folder.mkdir(parents=True, exist_ok=True)
    signers: dict[str, Signer] = {}
    for name in names:
        if (folder / f"{name}.pem").exists() and not replace:
            signers[name] = load_key(folder, name)
            continue
        signer = CryptoSigner.generate_ed25519()
        public = {"keyid": signer.public_key.keyid, **signer.public_key.to_dict()}
        for path, data, mode in ((folder / f"{name}.pem", signer.private_bytes, 0o600),
                                 (folder / f"{name}.pub.json", json.dumps(public, indent=1).encode(), 0o644)):
            temporary = path.with_name(path.name + ".tmp")
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        signers[name] = signer
    return signers


def load_key(folder: Path, name: str) -> Signer:
    """The signer stored as ``folder/NAME.pem`` + ``NAME.pub.json``."""
    try:
        public = json.loads((folder / f"{name}.pub.json").read_text())
        keyid = public.pop("keyid")
        return Signer.from_priv_key_uri(f"file2:{folder / f'{name}.pem'}", SSlibKey.from_dict(keyid, public))
    except FileNotFoundError:
        raise ConfigError(f"TUF key {name!r} not found in {folder} ({name}.pem and {name}.pub.json); give the folder "
                          "that `edgepeft fleet tuf init` wrote") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"TUF key {name!r} in {folder} is unreadable ({' '.join(str(exc).split())[:120]})"
                          ) from None


def load_keys(folder: Path, names: Iterable[str]) -> dict[str, Signer]:
    return {name: load_key(folder, name) for name in names}


# ---------------------------------------------------------------------------------------------- rows
def serialise(md: Metadata[Any]) -> bytes:
    return md.to_bytes(JSONSerializer(compact=True))


def latest_row(session: Session, repo: str, role: str) -> TufMetadata | None:
    newest = select(func.max(TufMetadata.version)).where(TufMetadata.repo == repo, TufMetadata.role == role)
    version = session.scalar(newest)
    return None if version is None else session.get(TufMetadata, (repo, role, version))


def latest(session: Session, repo: str, role: str) -> Metadata[Any] | None:
    row = latest_row(session, repo, role)
    return None if row is None else Metadata.from_bytes(row.data)


def _store(session: Session, repo: str, role: str, md: Metadata[Any], digest: str = "") -> MetaFile:
    data = serialise(md)
    version = md.signed.version
    session.add(TufMetadata(repo=repo, role=role, version=version, data=data, digest=digest,
                            expires_at=md.signed.expires, created_at=now()))
    if role != "root" and version > KEEP_VERSIONS:
        # Devices walk every root version, but only ever ask for the files the newest few timestamps lead to.
        session.execute(delete(TufMetadata).where(TufMetadata.repo == repo, TufMetadata.role == role,
                                                  TufMetadata.version <= version - KEEP_VERSIONS))
    return MetaFile(version=md.signed.version, length=len(data), hashes={"sha256": hashlib.sha256(data).hexdigest()})


def _sign(md: Metadata[Any], signers: Iterable[Signer]) -> Metadata[Any]:
    md.signatures.clear()
    for signer in signers:
        md.sign(signer, append=True)  # append=False would drop the previous signature (pitfall 11)
    return md


def _next_version(session: Session, repo: str, role: str) -> int:
    row = latest_row(session, repo, role)
    return 1 if row is None else row.version + 1


def commit(session: Session, repo: str, changed: Mapping[str, tuple[Metadata[Any], list[Signer]]], *,
            snapshot_signer: Signer, timestamp_signer: Signer, moment: datetime, periods: Mapping[str, timedelta],
            prefix: str = "", digest: str = "") -> None:
    """Sign and store ``changed`` targets roles (each at its next version), then a new snapshot and timestamp."""
    metas: dict[str, MetaFile] = {}
    for role, (md, signers) in changed.items():
        md.signed.version = _next_version(session, repo, role)
        metas[f"{role}.json"] = _store(session, repo, role, _sign(md, signers), digest if role == "targets" else "")
    snapshot = latest(session, repo, "snapshot")
    snapshot = Metadata(Snapshot(expires=moment)) if snapshot is None else snapshot
    snapshot.signed.meta.update(metas)
    snapshot.signed.version = _next_version(session, repo, "snapshot")
    snapshot.signed.expires = moment + periods[prefix + "snapshot"]
    snapshot_meta = _store(session, repo, "snapshot", _sign(snapshot, [snapshot_signer]))
    _new_timestamp(session, repo, snapshot_meta, timestamp_signer, moment, periods[prefix + "timestamp"])


def _new_timestamp(session: Session, repo: str, snapshot_meta: MetaFile, signer: Signer, moment: datetime,
                   period: timedelta) -> None:
    timestamp = Metadata(Timestamp(version=_next_version(session, repo, "timestamp"), expires=moment + period,
                                   snapshot_meta=snapshot_meta))
    _store(session, repo, "timestamp", _sign(timestamp, [signer]))


def _snapshot_meta(row: TufMetadata) -> MetaFile:
    return MetaFile(version=row.version, length=len(row.data), hashes={"sha256": hashlib.sha256(row.data).hexdigest()})


def check_key(root: Root, role: str, signer: Signer) -> None:
    """Refuse to sign ``role`` with a key the root does not trust for it (the server's keys are stale)."""
    if signer.public_key.keyid not in root.roles[role].keyids:
        raise StaleKey(f"the online {role} key {signer.public_key.keyid[:12]}… is not the one root "
                                 f"v{root.version} trusts; serve with the --online-keys folder of the latest "
                                 "`edgepeft fleet tuf init` or `tuf rotate`")


# ---------------------------------------------------------------------------------------------- image
def image_target(record: BundleRecord) -> TargetFile:
    """The TUF target of a catalogued bundle (no need to read the file: length and sha256 are in the row)."""
    custom = {"asset": record.asset_id, "version": record.version, "release": int(record.release),
              "base_sha256": record.base_sha256}
    return TargetFile(length=int(record.size_bytes), hashes={"sha256": record.sha256},
                      path=target_path(record.asset_id, record.version), unrecognized_fields={"custom": custom})


def _root(keys: Mapping[str, list[Signer]], moment: datetime, period: timedelta, version: int = 1) -> Root:
    root = Root(version=version, expires=moment + period, consistent_snapshot=True)
    for role, signers in keys.items():
        for signer in signers:
            root.add_key(signer.public_key, role)  # (key, role): the 7.x order (pitfall 10)
    return root


def initialised(session: Session) -> bool:
    return latest_row(session, IMAGE, "root") is not None


def init_repositories(session: Session, offline: Mapping[str, Signer], online: Mapping[str, Signer], *,
                      bin_bits: int = DEFAULT_BIN_BITS, moment: datetime | None = None,
                      periods: Mapping[str, timedelta] = PERIODS) -> int:
    """The signing ceremony's database part: image root, targets, bundles, every bin (with the bundles already in
    the catalogue), snapshot, timestamp; the director's root. Returns the number of targets."""
    if initialised(session):
        raise ConfigError("the TUF repositories are already initialised in this database; rotate keys with "
                          "`edgepeft fleet tuf rotate`")
    if not 1 <= bin_bits <= 14:
        raise ConfigError(f"--bin-bits {bin_bits} is out of range; use 1-14 (8: 256 bins, fine up to ~10^4 bundles)")
    moment = moment or now()
    root = _root({"root": [offline["root"]], "targets": [offline["targets"]], "snapshot": [online["snapshot"]],
                  "timestamp": [online["timestamp"]]}, moment, periods["root"])
    _store(session, IMAGE, "root", _sign(Metadata(root), [offline["root"]]))
    top = Targets(expires=moment + periods["targets"])
    top.delegations = Delegations(keys={}, roles={})
    top.delegations.roles["bundles"] = DelegatedRole(name="bundles", keyids=[], threshold=1, terminating=True,
                                                     paths=list(BUNDLES_PATHS))
    top.add_key(offline["targets"].public_key, "bundles")
    bundles = Targets(expires=moment + periods["bundles"])
    bundles.delegations = Delegations(keys={}, succinct_roles=SuccinctRoles(
        keyids=[], threshold=1, bit_length=bin_bits, name_prefix="bins"))
    bundles.add_key(online["bins"].public_key)  # succinct roles: no role argument
    succinct = bundles.delegations.succinct_roles
    bins = {name: Targets(expires=moment + periods["bins"]) for name in succinct.get_roles()}
    records = list(session.scalars(select(BundleRecord).order_by(BundleRecord.asset_id, BundleRecord.release)))
    for record in records:
        target = image_target(record)
        bins[succinct.get_role_for_target(target.path)].targets[target.path] = target
    changed: dict[str, tuple[Metadata[Any], list[Signer]]] = {
        "targets": (Metadata(top), [offline["targets"]]), "bundles": (Metadata(bundles), [offline["targets"]])}
    changed.update({name: (Metadata(signed), [online["bins"]]) for name, signed in bins.items()})
    commit(session, IMAGE, changed, snapshot_signer=online["snapshot"], timestamp_signer=online["timestamp"],
            moment=moment, periods=periods)
    director_root = _root({"root": [offline["director-root"]], "targets": [online["director"]],
                           "snapshot": [online["director"]], "timestamp": [online["director"]]},
                          moment, periods["director-root"])
    _store(session, DIRECTOR, "root", _sign(Metadata(director_root), [offline["director-root"]]))
    return len(records)


def _bundles(session: Session) -> Metadata[Targets]:
    bundles = latest(session, IMAGE, "bundles")
    if bundles is None:
        raise RepositoryNotReady("the image repository has no 'bundles' role; run `edgepeft fleet tuf init`")
    return bundles


def add_image_targets(session: Session, online: Mapping[str, Signer], records: Iterable[BundleRecord], *,
                      moment: datetime | None = None, periods: Mapping[str, timedelta] = PERIODS) -> list[str]:
    """Add bundles to their bins (re-signed), then a new snapshot and timestamp; returns the changed bins."""
    moment = moment or now()
    root = latest(session, IMAGE, "root").signed
    check_key(root, "snapshot", online["snapshot"])
    check_key(root, "timestamp", online["timestamp"])
    succinct = _bundles(session).signed.delegations.succinct_roles
    if online["bins"].public_key.keyid not in succinct.keyids:
        raise StaleKey("the online bins key is not the one the image repository delegates to; serve with "
                                 "the --online-keys folder of the latest `edgepeft fleet tuf rotate`")
    changed: dict[str, tuple[Metadata[Any], list[Signer]]] = {}
    for record in records:
        target = image_target(record)
        name = succinct.get_role_for_target(target.path)
        if name not in changed:
            changed[name] = (latest(session, IMAGE, name), [online["bins"]])
        md = changed[name][0]
        md.signed.targets[target.path] = target
        md.signed.expires = moment + periods["bins"]
    if changed:
        commit(session, IMAGE, changed, snapshot_signer=online["snapshot"], timestamp_signer=online["timestamp"],
                moment=moment, periods=periods)
    return sorted(changed)


def needs_resign(expires_at: datetime, period: timedelta, moment: datetime) -> bool:
    """Whether less than half of ``period`` is left before ``expires_at``: time to re-sign."""
    return as_utc(expires_at) - moment < period / 2


def refresh_image(session: Session, online: Mapping[str, Signer], *, moment: datetime | None = None,
                  periods: Mapping[str, timedelta] = PERIODS, force: bool = False) -> bool:
    """Re-sign what is close to expiry: bins, then snapshot, then timestamp (each only when needed, or ``force``
    for the timestamp). Returns whether anything was written."""
    moment = moment or now()
    timestamp = latest_row(session, IMAGE, "timestamp")
    if timestamp is None:
        raise RepositoryNotReady("the image repository is not initialised; run `edgepeft fleet tuf init`")
    if not force and not needs_resign(timestamp.expires_at, periods["timestamp"], moment):
        return False
    root = latest(session, IMAGE, "root").signed
    check_key(root, "timestamp", online["timestamp"])
    snapshot_row = latest_row(session, IMAGE, "snapshot")
    snapshot = Metadata.from_bytes(snapshot_row.data)
    stale = [name[:-len(".json")] for name, meta in snapshot.signed.meta.items() if name.startswith("bins-")]
    changed: dict[str, tuple[Metadata[Any], list[Signer]]] = {}
    rows = session.execute(select(TufMetadata.role, func.max(TufMetadata.expires_at)).where(
        TufMetadata.repo == IMAGE, TufMetadata.role.in_(stale)).group_by(TufMetadata.role)).all()
    for role, expires_at in rows:
        if needs_resign(expires_at, periods["bins"], moment):
            md = latest(session, IMAGE, role)
            md.signed.expires = moment + periods["bins"]
            changed[role] = (md, [online["bins"]])
    if changed or needs_resign(snapshot_row.expires_at, periods["snapshot"], moment):
        check_key(root, "snapshot", online["snapshot"])
        commit(session, IMAGE, changed, snapshot_signer=online["snapshot"], timestamp_signer=online["timestamp"],
                moment=moment, periods=periods)
    else:
        _new_timestamp(session, IMAGE, _snapshot_meta(snapshot_row), online["timestamp"], moment,
                       periods["timestamp"])
    return True


# ---------------------------------------------------------------------------------------------- director
def assignments(session: Session, device_id: str) -> list[BundleRecord]:
    """The bundles assigned to ``device_id``, one per asset."""
    query = (select(BundleRecord).join(DeviceAssignment, DeviceAssignment.bundle_sha256 == BundleRecord.sha256)
             .where(DeviceAssignment.device_id == device_id).order_by(DeviceAssignment.asset_id))
    return list(session.scalars(query))


def assignment_digest(records: Iterable[BundleRecord], director_root_version: int) -> str:
    """What a device's director targets are built from; a new root (key rotation) rebuilds them too."""
    listed = [[r.asset_id, r.sha256] for r in records]
    text = json.dumps({"root": director_root_version, "bundles": listed}, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def refresh_director(session: Session, device_id: str, signer: Signer, *, moment: datetime | None = None,
                     periods: Mapping[str, timedelta] = PERIODS, check_only: bool = False) -> bool:
    """Bring one device's director metadata up to date with its assignments and expiry; returns whether something
    was (or, with ``check_only``, would be) written."""
    moment = moment or now()
    root_row = latest_row(session, DIRECTOR, "root")
    if root_row is None:
        raise RepositoryNotReady("the director repository is not initialised; run `edgepeft fleet tuf init`")
    records = assignments(session, device_id)
    digest = assignment_digest(records, root_row.version)
    repo = device_repo(device_id)
    targets_row = latest_row(session, repo, "targets")
    rebuild = (targets_row is None or targets_row.digest != digest
               or needs_resign(targets_row.expires_at, periods["director-targets"], moment))
    timestamp_row = latest_row(session, repo, "timestamp")
    resign = rebuild or timestamp_row is None or needs_resign(timestamp_row.expires_at, periods["director-timestamp"],
                                                            moment)
    if check_only or not resign:
        return resign
    root = Metadata.from_bytes(root_row.data).signed
    for role in ("targets", "snapshot", "timestamp"):
        check_key(root, role, signer)
    snapshot_row = latest_row(session, repo, "snapshot")
    if rebuild or snapshot_row is None or needs_resign(snapshot_row.expires_at, periods["director-snapshot"], moment):
        targets = Targets(expires=moment + periods["director-targets"],
                          unrecognized_fields={DEVICE_FIELD: device_id})
        for record in records:
            target = image_target(record)
            targets.targets[target.path] = target
        changed: dict[str, tuple[Metadata[Any], list[Signer]]] = {}
        if rebuild:
            changed["targets"] = (Metadata(targets), [signer])
        commit(session, repo, changed, snapshot_signer=signer, timestamp_signer=signer, moment=moment,
                periods=periods, prefix="director-", digest=digest)
    else:
        _new_timestamp(session, repo, _snapshot_meta(snapshot_row), signer, moment, periods["director-timestamp"])
    return True


# ---------------------------------------------------------------------------------------------- rotation
def rotate(session: Session, offline_dir: Path, online_dir: Path, roles: Iterable[str], *,
           moment: datetime | None = None, periods: Mapping[str, timedelta] = PERIODS) -> dict[str, int]:
    """New keys for ``roles`` (written over the old ones in their folders) and the metadata that trusts them: a new
    root signed by the old and the new root keys, re-signed delegations, snapshot and timestamp. Returns the new
    root versions ``{"image": N, "director": M}`` (unchanged repos keep theirs)."""
    roles = sorted(set(roles))
    unknown = [role for role in roles if role not in ROLES]
    if unknown or not roles:
        raise ConfigError(f"--role {','.join(unknown) or '(none)'} not known; give one or more of {','.join(ROLES)}")
    if not initialised(session):
        raise ConfigError("the TUF repositories are not initialised in this database; run `edgepeft fleet tuf init`")
    moment = moment or now()
    old = {**load_keys(offline_dir, OFFLINE_KEYS), **load_keys(online_dir, ONLINE_KEYS)}
    image_root = latest(session, IMAGE, "root")
    director_root = latest(session, DIRECTOR, "root")
    # The folders must hold the keys the database trusts, or the new root could not be signed by the old one.
    check_key(image_root.signed, "root", old["root"])
    check_key(director_root.signed, "root", old["director-root"])
    new = dict(old)
    new.update(create_keys(offline_dir, [r for r in roles if r in OFFLINE_KEYS], replace=True))
    new.update(create_keys(online_dir, [r for r in roles if r in ONLINE_KEYS], replace=True))
    versions = {IMAGE: image_root.signed.version, DIRECTOR: director_root.signed.version}

    image_roles = {"root": "root", "targets": "targets", "snapshot": "snapshot", "timestamp": "timestamp"}
    if any(r in roles for r in image_roles):
        versions[IMAGE] = _new_root(session, IMAGE, image_root, image_roles, old, new, roles, moment,
                                    periods["root"])
    changed: dict[str, tuple[Metadata[Any], list[Signer]]] = {}
    if "targets" in roles or "bins" in roles:
        top = latest(session, IMAGE, "targets")
        if "targets" in roles:
            top.signed.revoke_key(old["targets"].public_key.keyid, "bundles")
            top.signed.add_key(new["targets"].public_key, "bundles")
            top.signed.expires = moment + periods["targets"]
            changed["targets"] = (top, [new["targets"]])
        bundles = _bundles(session)
        if "bins" in roles:
            bundles.signed.revoke_key(old["bins"].public_key.keyid)
            bundles.signed.add_key(new["bins"].public_key)
            # Every bin signed by the old key stops verifying under the new delegation: re-sign them all.
            for name in bundles.signed.delegations.succinct_roles.get_roles():
                md = latest(session, IMAGE, name)
                md.signed.expires = moment + periods["bins"]
                changed[name] = (md, [new["bins"]])
        bundles.signed.expires = moment + periods["bundles"]
        changed["bundles"] = (bundles, [new["targets"]])
    if versions[IMAGE] != image_root.signed.version or changed:
        commit(session, IMAGE, changed, snapshot_signer=new["snapshot"], timestamp_signer=new["timestamp"],
                moment=moment, periods=periods)
    director_roles = {"root": "director-root", "targets": "director", "snapshot": "director",
                      "timestamp": "director"}
    if "director-root" in roles or "director" in roles:
        # Devices' director metadata is rebuilt lazily: its digest includes the director root's version.
        versions[DIRECTOR] = _new_root(session, DIRECTOR, director_root, director_roles, old, new, roles, moment,
                                       periods["director-root"])
    return versions


def _new_root(session: Session, repo: str, current: Metadata[Root], key_of_role: Mapping[str, str],
              old: Mapping[str, Signer], new: Mapping[str, Signer], rotated: list[str], moment: datetime,
              period: timedelta) -> int:
    root = Metadata.from_bytes(serialise(current))
    for role, key_name in key_of_role.items():
        if key_name in rotated:
            root.signed.revoke_key(old[key_name].public_key.keyid, role)
            root.signed.add_key(new[key_name].public_key, role)
    root.signed.version += 1
    root.signed.expires = moment + period
    root_key = key_of_role["root"]
    # N+1 must meet the threshold of root N (old key) and of itself (new key): pitfall 12.
    signers = [old[root_key]] + ([new[root_key]] if root_key in rotated else [])
    _store(session, repo, "root", _sign(root, signers))
    return root.signed.version


# ---------------------------------------------------------------------------------------------- sizes
def metadata_sizes(n_targets: int, bin_bits: int = DEFAULT_BIN_BITS) -> dict[str, Any]:
    """Bytes of the image metadata for ``n_targets`` synthetic bundles in ``2**bin_bits`` bins, signed with fresh
    keys as the server signs them (compact JSON, Ed25519, length+sha256 in snapshot meta). What a device fetches
    for one target is root + timestamp + snapshot + targets + bundles + one bin.

    Example:
        >>> sizes = metadata_sizes(100, bin_bits=2)
        >>> sizes["bins"], sizes["largest_bin_bytes"] > sizes["smallest_bin_bytes"] > 0
        (4, True)
    """
    moment = now()
    offline = {name: CryptoSigner.generate_ed25519() for name in ("root", "targets")}
    online = {name: CryptoSigner.generate_ed25519() for name in ("timestamp", "snapshot", "bins")}
    root = _sign(Metadata(_root({"root": [offline["root"]], "targets": [offline["targets"]],
                                 "snapshot": [online["snapshot"]], "timestamp": [online["timestamp"]]},
                                moment, PERIODS["root"])), [offline["root"]])
    top = Targets(expires=moment + PERIODS["targets"])
    top.delegations = Delegations(keys={}, roles={"bundles": DelegatedRole(
        name="bundles", keyids=[], threshold=1, terminating=True, paths=list(BUNDLES_PATHS))})
    top.add_key(offline["targets"].public_key, "bundles")
    bundles = Targets(expires=moment + PERIODS["bundles"])
    bundles.delegations = Delegations(keys={}, succinct_roles=SuccinctRoles(
        keyids=[], threshold=1, bit_length=bin_bits, name_prefix="bins"))
    bundles.add_key(online["bins"].public_key)
    succinct = bundles.delegations.succinct_roles
    bins = {name: Targets(expires=moment + PERIODS["bins"]) for name in succinct.get_roles()}
    for i in range(n_targets):
        asset, version = f"asset-{i // 10:06d}", f"1.{i % 10}.0"
        sha256 = hashlib.sha256(f"{asset}/{version}".encode()).hexdigest()
        target = TargetFile(length=250_000 + i, hashes={"sha256": sha256}, path=target_path(asset, version),
                            unrecognized_fields={"custom": {"asset": asset, "version": version, "release": i % 10 + 1,
                                                            "base_sha256": "0" * 64}})
        bins[succinct.get_role_for_target(target.path)].targets[target.path] = target
    snapshot = Snapshot(expires=moment + PERIODS["snapshot"])
    sizes: dict[str, int] = {}

    def add(name: str, md: Metadata[Any], signer: Signer) -> None:
        data = serialise(_sign(md, [signer]))
        sizes[name] = len(data)
        snapshot.meta[f"{name}.json"] = MetaFile(version=1, length=len(data),
                                                 hashes={"sha256": hashlib.sha256(data).hexdigest()})

    add("targets", Metadata(top), offline["targets"])
    add("bundles", Metadata(bundles), offline["targets"])
    for name, signed in bins.items():
        add(name, Metadata(signed), online["bins"])
    snapshot_bytes = serialise(_sign(Metadata(snapshot), [online["snapshot"]]))
    timestamp = Metadata(Timestamp(expires=moment + PERIODS["timestamp"], snapshot_meta=MetaFile(
        version=1, length=len(snapshot_bytes), hashes={"sha256": hashlib.sha256(snapshot_bytes).hexdigest()})))
    timestamp_bytes = serialise(_sign(timestamp, [online["timestamp"]]))
    bin_sizes = [sizes[name] for name in bins]
    return {
        "targets": n_targets, "bins": len(bins), "root_bytes": len(serialise(root)),
        "timestamp_bytes": len(timestamp_bytes), "snapshot_bytes": len(snapshot_bytes),
        "targets_bytes": sizes["targets"], "bundles_bytes": sizes["bundles"],
        "total_bins_bytes": sum(bin_sizes), "largest_bin_bytes": max(bin_sizes),
        "smallest_bin_bytes": min(bin_sizes), "mean_bin_bytes": round(sum(bin_sizes) / len(bin_sizes)),
        "device_fetch_bytes": (len(serialise(root)) + len(timestamp_bytes) + len(snapshot_bytes) + sizes["targets"]
                               + sizes["bundles"] + max(bin_sizes)),
    }
