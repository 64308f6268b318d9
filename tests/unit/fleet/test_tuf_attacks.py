"""The TUF attack matrix of issue 13, over a real fleet server (SQLite) with a real attacking proxy in front of it or
direct edits of ``tuf_metadata`` (an attacker holding an online key). Each attack must be refused by the device's
:class:`~edgepeft.agent.updates.UpdateClient` with its trusted state (every file under its state folder: metadata
and downloaded bundles) unchanged."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import Metadata, MetaFile, TargetFile, Timestamp

from edgepeft.agent.updates import UpdateClient, VerificationFailed
from edgepeft.delta.manifest import as_utc
from edgepeft.fleet import tuf_repo
from edgepeft.fleet.models import BundleRecord
from tests.unit.fleet.conftest import ASSET
from tests.unit.fleet.tuf_support import Proxy, TufFleet, trusted_state, tuf_fleet

PATH_V1, PATH_V2 = f"{ASSET}/1.0.0.edelta", f"{ASSET}/2.0.0.edelta"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, Any], base_sha256: str,
          make_bundle: Callable[..., bytes]) -> Iterator[TufFleet]:
    folder = tmp_path_factory.mktemp("tuf-attacks")
    with tuf_fleet(f"sqlite:///{folder / 'f.db'}", folder, keys["public"], base_sha256) as running:
        running.bundles = {1: running.publish(make_bundle(version="1.0.0", release=1)),
                           2: running.publish(make_bundle(version="2.0.0", release=2))}
        yield running


@pytest.fixture
def proxy(fleet: TufFleet) -> Iterator[Proxy]:
    with Proxy(fleet.server.url) as running:
        yield running


def _device(fleet: TufFleet, proxy: Proxy, tmp_path: Path, name: str, release: int | None = 1,
            sync: bool = True) -> UpdateClient:
    fleet.enrol(name)
    if release is not None:
        fleet.assign(name, ASSET, fleet.bundles[release]["sha256"])
    client = fleet.client(name, tmp_path / name, url=proxy.url)
    if sync:
        client.assigned()
    return client


def refused(call: Callable[[], object], state: Path,
            cause: type[BaseException] | tuple[type[BaseException], ...] | None = None) -> VerificationFailed:
    """``call`` raises VerificationFailed (caused by ``cause``, a TUF error) and the device's state is unchanged."""
    before = trusted_state(state)
    with pytest.raises(VerificationFailed) as info:
        call()
    assert trusted_state(state) == before
    if cause is not None:
        assert isinstance(info.value.__cause__, cause), repr(info.value.__cause__)
    assert "\n" not in str(info.value)
    return info.value


def _bin_of(fleet: TufFleet, path: str) -> str:
    with fleet.db.read() as session:
        return tuf_repo.latest(session, tuf_repo.IMAGE, "bundles").signed.delegations.succinct_roles \
            .get_role_for_target(path)


def _resign_bin(fleet: TufFleet, release: int, periods: dict[str, timedelta] = tuf_repo.PERIODS) -> None:
    """What a publish touching this bin does: a new version of the bin, snapshot and timestamp."""
    with fleet.write() as session:
        record = session.get(BundleRecord, fleet.bundles[release]["sha256"])
        tuf_repo.add_image_targets(session, fleet.keys(), [record], periods=periods)


# ---------------------------------------------------------------------------------------------- rollback
def test_rollback_replayed_director_metadata(fleet: TufFleet, proxy: Proxy, tmp_path: Path) -> None:
    """The device was told to run 1.0.0, then 2.0.0; replaying the old director timestamp (which leads to the
    snapshot and targets that list 1.0.0) is refused."""
    client = _device(fleet, proxy, tmp_path, "rb-1")
    repo = tuf_repo.device_repo("rb-1")
    old = {role: fleet.row(repo, role) for role in ("timestamp", "snapshot", "targets")}
    fleet.assign("rb-1", ASSET, fleet.bundles[2]["sha256"])
    assert [t.version for t in client.assigned()] == ["2.0.0"]
    proxy.serve("/tuf/director/rb-1/metadata/timestamp.json", old["timestamp"].data)
    refused(client.assigned, tmp_path / "rb-1", tuf_errors.BadVersionNumberError)


def test_rollback_replayed_image_timestamp(fleet: TufFleet, proxy: Proxy, tmp_path: Path) -> None:
    client = _device(fleet, proxy, tmp_path, "rb-2")
    old = fleet.row(tuf_repo.IMAGE, "timestamp").data
    with fleet.write() as session:
        tuf_repo.refresh_image(session, fleet.keys(), force=True)
    client.assigned()
    proxy.serve("/tuf/image/metadata/timestamp.json", old)
    refused(client.assigned, tmp_path / "rb-2", tuf_errors.BadVersionNumberError)


# ---------------------------------------------------------------------------------------------- freeze, expiry
def test_freeze_stale_timestamp(fleet: TufFleet, proxy: Proxy, tmp_path: Path) -> None:
    """The mirror keeps serving the last timestamp it saw after it expired (here signed to expire in 4 s)."""
    client = _device(fleet, proxy, tmp_path, "fz-1", sync=False)
    with fleet.write() as session:
        tuf_repo.refresh_image(session, fleet.keys(), force=True,
                               periods={**tuf_repo.PERIODS, "timestamp": timedelta(seconds=4)})
    frozen = fleet.row(tuf_repo.IMAGE, "timestamp")
    proxy.serve("/tuf/image/metadata/timestamp.json", frozen.data)
    assert [t.version for t in client.assigned()] == ["1.0.0"]  # fresh: accepted
    time.sleep(max(0.0, (as_utc(frozen.expires_at) - datetime.now(UTC)).total_seconds()) + 1.2)
    refused(client.assigned, tmp_path / "fz-1", tuf_errors.ExpiredMetadataError)
    # The real server re-signs the short-lived timestamp on the next request: the device recovers.
    proxy.rules.clear()
    assert [t.version for t in client.assigned()] == ["1.0.0"]


def test_expired_metadata(fleet: TufFleet, proxy: Proxy, tmp_path: Path) -> None:
    """A validly signed snapshot past its expiry (a stale mirror or a server that stopped re-signing)."""
    client = _device(fleet, proxy, tmp_path, "ex-1")
    _resign_bin(fleet, 1, periods={**tuf_repo.PERIODS, "snapshot": timedelta(hours=-1)})
    error = refused(client.assigned, tmp_path / "ex-1", tuf_errors.ExpiredMetadataError)
    assert "snapshot" in str(error)
    with fleet.write() as session:  # the server's lazy re-signing repairs it (the snapshot is due)
        tuf_repo.refresh_image(session, fleet.keys(), force=True)
    client.assigned()


# ---------------------------------------------------------------------------------------------- mix-and-match
def test_mix_and_match_metadata(fleet: TufFleet, proxy: Proxy, tmp_path: Path) -> None:
    """An older bin served under the new bin's version, and another version's director targets: each file must be
    the one the snapshot names (version, length and sha256)."""
    client = _device(fleet, proxy, tmp_path, "mm-1")
    role = _bin_of(fleet, PATH_V1)
    old_bin = fleet.row(tuf_repo.IMAGE, role)
    _resign_bin(fleet, 1)
    proxy.serve(f"/tuf/image/metadata/{old_bin.version + 1}.{role}.json", old_bin.data)
    refused(client.assigned, tmp_path / "mm-1", tuf_errors.LengthOrHashMismatchError)
    proxy.rules.clear()
    client.assigned()
    repo = tuf_repo.device_repo("mm-1")
    old_targets = fleet.row(repo, "targets")
    fleet.assign("mm-1", ASSET, fleet.bundles[2]["sha256"])
    proxy.serve(f"/tuf/director/mm-1/metadata/{old_targets.version + 1}.targets.json", old_targets.data)
    refused(client.assigned, tmp_path / "mm-1", tuf_errors.LengthOrHashMismatchError)


# ---------------------------------------------------------------------------------------------- targets
def test_tampered_target(fleet: TufFleet, proxy: Proxy, tmp_path: Path) -> None:
    client = _device(fleet, proxy, tmp_path, "tt-1", sync=False)
    [target] = client.assigned()
    url = f"/tuf/image/targets/{ASSET}/{target.sha256}.1.0.0.edelta"
    cases = ((lambda body: body[:100] + bytes([body[100] ^ 0xFF]) + body[101:], tuf_errors.LengthOrHashMismatchError),
             (lambda body: body + b"\0" * 64, tuf_errors.DownloadLengthMismatchError),
             (lambda body: body[:-1], tuf_errors.LengthOrHashMismatchError))
    for change, cause in cases:
        proxy.rules.clear()
        proxy.rewrite(url, change)
        refused(lambda: client.download(target), tmp_path / "tt-1", cause)
        assert not any((tmp_path / "tt-1" / "targets").iterdir())  # nothing kept, not even a partial file
    proxy.rules.clear()
    assert len(client.download(target)) == target.length


def test_arbitrary_target(fleet: TufFleet, proxy: Proxy, tmp_path: Path) -> None:
    """An attacker holding the online director key lists a bundle the image repository does not have, then a
    genuine bundle with forged custom fields (release 99): both refused by the image cross-check. A bundle
    injected into a bin without the bins key is refused by TUF."""
    client = _device(fleet, proxy, tmp_path, "ar-1")
    repo = tuf_repo.device_repo("ar-1")
    key = fleet.keys()["director"]
    for forge in ("arbitrary", "forged-custom"):
        with fleet.write() as session:
            current = tuf_repo.latest_row(session, repo, "targets")
            md = Metadata.from_bytes(current.data)
            if forge == "arbitrary":
                evil = b"backdoor"
                md.signed.targets[f"{ASSET}/6.6.6.edelta"] = TargetFile.from_data(f"{ASSET}/6.6.6.edelta", evil)
                md.signed.targets[f"{ASSET}/6.6.6.edelta"].unrecognized_fields["custom"] = {
                    "asset": ASSET, "version": "6.6.6", "release": 6, "base_sha256": fleet.base_sha256}
            else:
                md.signed.targets.pop(f"{ASSET}/6.6.6.edelta")
                md.signed.targets[PATH_V1].unrecognized_fields["custom"]["release"] = 99
            tuf_repo.commit(session, repo, {"targets": (md, [key])}, snapshot_signer=key, timestamp_signer=key,
                            moment=tuf_repo.now(), periods=tuf_repo.PERIODS, prefix="director-",
                            digest=current.digest)  # the server takes it as current and serves it
        error = refused(client.assigned, tmp_path / "ar-1")
        assert ("does not list" if forge == "arbitrary" else "disagree") in str(error)

    def inject(body: bytes) -> bytes:
        signed = json.loads(body)
        signed["signed"]["targets"][f"{ASSET}/7.7.7.edelta"] = {"length": 8, "hashes": {"sha256": "0" * 64}}
        return json.dumps(signed).encode()

    fresh = _device(fleet, proxy, tmp_path, "ar-2", sync=False)
    role = _bin_of(fleet, PATH_V1)
    proxy.rewrite(f"/tuf/image/metadata/{fleet.row(tuf_repo.IMAGE, role).version}.{role}.json", inject)
    # The snapshot pins the bin's length and sha256: the longer file is cut off before its signature is checked.
    refused(fresh.assigned, tmp_path / "ar-2", tuf_errors.DownloadLengthMismatchError)


def test_target_for_another_device(fleet: TufFleet, proxy: Proxy, tmp_path: Path) -> None:
    """Device od-b's (genuine, validly signed) director metadata served to od-a, and od-a asking for od-b's."""
    _device(fleet, proxy, tmp_path, "od-b", release=2)
    victim = _device(fleet, proxy, tmp_path, "od-a", release=None, sync=False)
    other = fleet.credentials["od-b"]

    def swap(asked: str, headers: dict[str, str]) -> tuple[int, bytes] | None:
        if not asked.startswith("/tuf/director/od-a/"):
            return None
        return proxy.forward(asked.replace("/od-a/", "/od-b/"), {"Authorization": f"Bearer {other}"})

    proxy.rules.append(swap)
    error = refused(victim.assigned, tmp_path / "od-a")
    assert "od-b" in str(error)
    with fleet.server.client(fleet.credentials["od-a"]) as http:
        assert http.get("/tuf/director/od-b/metadata/timestamp.json").status_code == 403


def test_target_for_another_base(fleet: TufFleet, proxy: Proxy, tmp_path: Path,
                                 make_bundle: Callable[..., bytes]) -> None:
    other_base = "ab" * 32
    with fleet.server.client() as http:
        assert http.post("/v1/bases", json={"name": "big", "sha256": other_base, "reason": "r"}).status_code == 201

    def rebase(manifest: dict[str, Any]) -> None:
        manifest["base"]["sha256"] = other_base

    record = fleet.publish(make_bundle(version="3.0.0", release=3, edit=rebase))
    client = _device(fleet, proxy, tmp_path, "ob-1", release=None, sync=False)
    fleet.assign("ob-1", ASSET, record["sha256"])
    error = refused(lambda: client.assigned(base_sha256=fleet.base_sha256), tmp_path / "ob-1")
    assert "base" in str(error)


# ---------------------------------------------------------------------------------------------- keys
def test_compromised_online_key_after_rotation(fleet: TufFleet, proxy: Proxy, tmp_path: Path) -> None:
    """The timestamp and snapshot keys leak; the operator rotates them. A timestamp signed with the old key is
    refused, by a device that synced before the rotation and by one still provisioned with root v1."""
    synced = _device(fleet, proxy, tmp_path, "ck-1")
    leaked = fleet.keys()
    with fleet.write() as session:
        versions = tuf_repo.rotate(session, fleet.offline, fleet.online, ["timestamp", "snapshot"])
    assert versions["image"] >= 2
    snapshot = fleet.row(tuf_repo.IMAGE, "snapshot")
    forged = Metadata(Timestamp(version=fleet.row(tuf_repo.IMAGE, "timestamp").version + 1,
                                expires=tuf_repo.now() + timedelta(days=1),
                                snapshot_meta=MetaFile(version=snapshot.version)))
    forged.sign(leaked["timestamp"])
    proxy.serve("/tuf/image/metadata/timestamp.json", tuf_repo.serialise(forged))
    refused(synced.assigned, tmp_path / "ck-1", tuf_errors.UnsignedMetadataError)
    fresh = _device(fleet, proxy, tmp_path, "ck-2", sync=False)
    refused(fresh.assigned, tmp_path / "ck-2", tuf_errors.UnsignedMetadataError)
    proxy.rules.clear()
    assert [t.version for t in synced.assigned()] == ["1.0.0"]  # the genuine server, with the new keys
