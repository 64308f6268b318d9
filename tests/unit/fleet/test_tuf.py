"""TUF distribution over a real fleet server: publish → assign → a device sees it and downloads verified bytes (on
SQLite and PostgreSQL), key ceremony and rotation with a device following root v1 → v2, the routes' refusals,
and the server without online keys."""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from edgepeft.agent.updates import AssignedTarget
from edgepeft.fleet import tuf_repo
from edgepeft.fleet.__main__ import main
from edgepeft.fleet.db import Database
from edgepeft.fleet.models import TufMetadata
from tests.unit.fleet.conftest import ASSET, FleetServer, assert_refused, fleet_cli, snapshot
from tests.unit.fleet.tuf_support import TufFleet, tuf_fleet


def test_publish_assign_download(db_url: str, tmp_path: Path, keys: dict[str, Any],
                                 make_bundle: Callable[..., bytes], base_sha256: str) -> None:
    with tuf_fleet(db_url, tmp_path, keys["public"], base_sha256) as fleet:
        first = make_bundle(version="1.0.0", release=1)
        record = fleet.publish(first)
        fleet.enrol("pump-a")
        fleet.enrol("pump-b")
        client = fleet.client("pump-a", tmp_path / "device-a")
        assert client.assigned() == []  # enrolled, nothing assigned yet
        fleet.assign("pump-a", ASSET, record["sha256"])
        [target] = client.assigned(base_sha256=base_sha256)
        assert target == AssignedTarget(asset_id=ASSET, version="1.0.0", release=1, base_sha256=base_sha256,
                                        sha256=record["sha256"], length=len(first), path=f"{ASSET}/1.0.0.edelta")
        assert client.download(target) == first
        assert (tmp_path / "device-a" / "targets").is_dir()
        # A new release published and assigned: the device sees it (new director and image versions).
        second = make_bundle(version="1.1.0", release=2)
        fleet.assign("pump-a", ASSET, fleet.publish(second)["sha256"])
        [target] = client.assigned()
        assert (target.version, target.release) == ("1.1.0", 2)
        assert hashlib.sha256(client.download(target)).hexdigest() == target.sha256
        # The other device has no assignment, and may not read pump-a's director metadata.
        assert fleet.client("pump-b", tmp_path / "device-b").assigned() == []
        with fleet.server.client(fleet.credentials["pump-b"]) as http:
            assert_refused(http.get("/tuf/director/pump-a/metadata/timestamp.json"), 403, "own")


@pytest.fixture(scope="module")
def sqlite_fleet(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, Any], base_sha256: str
                 ) -> Iterator[TufFleet]:
    """One server for the tests that only read (routes, OpenAPI conformance)."""
    folder = tmp_path_factory.mktemp("tuf-routes")
    with tuf_fleet(f"sqlite:///{folder / 'f.db'}", folder, keys["public"], base_sha256) as fleet:
        yield fleet


def test_routes_refuse(sqlite_fleet: TufFleet, make_bundle: Callable[..., bytes]) -> None:
    fleet = sqlite_fleet
    record = fleet.publish(make_bundle())
    fleet.enrol("pump-a")
    with fleet.server.client("") as http:
        assert_refused(http.get("/tuf/image/metadata/timestamp.json"), 401)
        assert_refused(http.get("/tuf/director/pump-a/metadata/1.root.json"), 401)
    with fleet.server.client(fleet.credentials["pump-a"]) as http:
        assert http.get("/tuf/image/metadata/1.root.json").status_code == 200
        assert http.get("/tuf/director/pump-a/metadata/1.root.json").json()["signed"]["_type"] == "root"
        assert_refused(http.get("/tuf/image/metadata/2.root.json"), 404)  # how a client knows it is current
        assert_refused(http.get("/tuf/image/metadata/..%2Fetc.json"), 404)
        assert_refused(http.get("/tuf/image/metadata/1.timestamp.json"), 404)
        assert_refused(http.get("/tuf/director/pump-a/metadata/1.bins-0.json"), 404)
        good = f"/tuf/image/targets/{ASSET}/{record['sha256']}.1.0.0.edelta"
        assert http.get(good).content == make_bundle()
        assert_refused(http.get(good.replace("1.0.0.edelta", "9.9.9.edelta")), 404)
        assert_refused(http.get(f"/tuf/image/targets/other/{record['sha256']}.1.0.0.edelta"), 404)
    with fleet.server.client() as http:  # an operator token with read may read the image repository
        timestamp = http.get("/tuf/image/metadata/timestamp.json")
        assert timestamp.status_code == 200 and timestamp.headers["cache-control"] == "no-store"
        assert_refused(http.get("/tuf/director/pump-a/metadata/timestamp.json"), 401)


def test_no_online_keys(tmp_path: Path, keys: dict[str, Any], make_bundle: Callable[..., bytes],
                        base_sha256: str) -> None:
    db = f"sqlite:///{tmp_path / 'f.db'}"
    with FleetServer(state_dir=tmp_path / "fleet", db=db, trusted_keys=(keys["public"],), startup_s=60.0
                     ) as fleet, fleet.client() as http:
        assert_refused(http.get("/tuf/image/metadata/timestamp.json"), 503, "--online-keys")
        assert http.post("/v1/bases", json={"name": "tiny", "sha256": base_sha256, "reason": "r"}).status_code == 201
        # Before `tuf init`, publishing works (init adds the catalogue's bundles as targets).
        assert http.post("/v1/bundles", params={"reason": "r"}, content=make_bundle()).status_code == 201
        done = fleet_cli("tuf", "init", "--db", db, "--offline-keys", str(tmp_path / "off"), "--online-keys",
                         str(tmp_path / "on"), "--bin-bits", "2")
        assert done.returncode == 0, done.stderr
        assert "1 bundle target" in done.stderr
        # Initialised, but this server cannot sign: a publish is refused, and nothing is written.
        before = snapshot(fleet)
        assert_refused(http.post("/v1/bundles", params={"reason": "r"}, content=make_bundle(version="2", release=2)),
                       503, "not published")
        assert snapshot(fleet) == before


def _fleet_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """``python -m edgepeft.fleet ARGS`` in this process (its ``main``, error handling included): exit code, stderr."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["edgepeft fleet", *args])
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, capsys.readouterr().err


def test_cli_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = f"sqlite:///{tmp_path / 'f.db'}"
    cases = [
        (["tuf", "roots", "--db", db, "--out", str(tmp_path / "r")], "not initialised"),
        (["tuf", "rotate", "--db", db, "--offline-keys", str(tmp_path / "o"), "--online-keys", str(tmp_path / "n")],
         "not initialised"),
        (["tuf", "init", "--db", db, "--offline-keys", str(tmp_path / "k"), "--online-keys", str(tmp_path / "k")],
         "different folders"),
        (["tuf", "rotate", "--db", db, "--role", "timestamp,bogus"], "bogus"),
        (["serve", "--db", db, "--storage", str(tmp_path / "s"), "--online-keys", str(tmp_path / "none")],
         "not found"),
    ]
    for args, words in cases:
        code, err = _fleet_main(capsys, *args)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], (args, err)
    code, err = _fleet_main(capsys, "tuf", "init", "--db", db, "--offline-keys", str(tmp_path / "o"),
                            "--online-keys", str(tmp_path / "n"), "--bin-bits", "2")
    assert code == 0, err
    assert (tmp_path / "o" / "root.pem").stat().st_mode & 0o077 == 0  # private keys are private
    code, err = _fleet_main(capsys, "tuf", "init", "--db", db, "--offline-keys", str(tmp_path / "o"),
                            "--online-keys", str(tmp_path / "n"))
    assert code == 2 and "already initialised" in err
    # rotate needs the keys the database trusts: a folder of other keys is refused before anything is written
    tuf_repo.create_keys(tmp_path / "other", tuf_repo.OFFLINE_KEYS)
    code, err = _fleet_main(capsys, "tuf", "rotate", "--db", db, "--offline-keys", str(tmp_path / "other"),
                            "--online-keys", str(tmp_path / "n"), "--role", "timestamp")
    assert code == 2 and "not the one root v1 trusts" in err, err
    code, err = _fleet_main(capsys, "tuf", "roots", "--db", db, "--out", str(tmp_path / "roots"))
    assert code == 0, err
    assert json.loads((tmp_path / "roots" / "image-root.json").read_bytes())["signed"]["version"] == 1
    # The real command line, once: `edgepeft fleet tuf` is a subprocess like an operator's shell.
    done = fleet_cli("tuf", "rotate", "--db", db, "--offline-keys", str(tmp_path / "o"), "--online-keys",
                     str(tmp_path / "n"), "--role", "timestamp")
    assert done.returncode == 0 and "image root v2" in done.stderr, done.stderr


def test_rotation_device_follows_root(tmp_path: Path, keys: dict[str, Any], make_bundle: Callable[..., bytes],
                                      base_sha256: str) -> None:
    """Every key replaced while the server runs; a device provisioned with root v1 follows to v2 (image and
    director) and keeps getting verified updates; the server picks up the new online keys from its folder."""
    with tuf_fleet(f"sqlite:///{tmp_path / 'f.db'}", tmp_path, keys["public"], base_sha256) as fleet:
        record = fleet.publish(make_bundle())
        fleet.enrol("pump-a")
        fleet.assign("pump-a", ASSET, record["sha256"])
        client = fleet.client("pump-a", tmp_path / "device")
        assert [t.version for t in client.assigned()] == ["1.0.0"]
        old_online = {name: (fleet.online / f"{name}.pem").read_bytes() for name in tuf_repo.ONLINE_KEYS}
        done = fleet_cli("tuf", "rotate", "--db", fleet.server.db, "--offline-keys", str(fleet.offline),
                         "--online-keys", str(fleet.online), "--role", ",".join(tuf_repo.ROLES))
        assert done.returncode == 0, done.stderr
        assert all((fleet.online / f"{name}.pem").read_bytes() != old for name, old in old_online.items())
        out = fleet_cli("tuf", "roots", "--db", fleet.server.db, "--out", str(tmp_path / "roots"))
        assert out.returncode == 0, out.stderr
        for name in ("image", "director"):
            root = json.loads((tmp_path / "roots" / f"{name}-root.json").read_bytes())
            assert root["signed"]["version"] == 2 and len(root["signatures"]) == 2  # old and new root key
        # The server signs a new bundle with the new keys; the device (root v1 bootstrap) follows.
        second = make_bundle(version="1.1.0", release=2)
        fleet.assign("pump-a", ASSET, fleet.publish(second)["sha256"])
        [target] = client.assigned()
        assert target.version == "1.1.0" and client.download(target) == second
        for repo in ("image", "director"):
            assert (tmp_path / "device" / "tuf" / repo / "root_history" / "2.root.json").exists()
        # A brand-new device provisioned with the v1 roots gets there too.
        fleet.enrol("pump-b")
        fleet.assign("pump-b", ASSET, target.sha256)
        assert fleet.client("pump-b", tmp_path / "device-b").assigned() == [target]


def test_metadata_sizes() -> None:
    sizes = tuf_repo.metadata_sizes(2000, bin_bits=4)
    assert sizes["bins"] == 16 and sizes["targets"] == 2000
    assert sizes["largest_bin_bytes"] < sizes["total_bins_bytes"] / 8  # what a device fetches is one bin
    assert sizes["device_fetch_bytes"] < sizes["total_bins_bytes"]



def test_old_versions_pruned_roots_kept(tmp_path: Path) -> None:
    db = Database.open(f"sqlite:///{tmp_path / 'f.db'}")
    offline = tuf_repo.create_keys(tmp_path / "off", tuf_repo.OFFLINE_KEYS)
    online = tuf_repo.create_keys(tmp_path / "on", tuf_repo.ONLINE_KEYS)
    with db.write() as session:
        tuf_repo.init_repositories(session, offline, online, bin_bits=1)
    for _ in range(5):
        with db.write() as session:
            assert tuf_repo.refresh_image(session, online, force=True)
        with db.write() as session:
            tuf_repo.rotate(session, tmp_path / "off", tmp_path / "on", ["timestamp"])
            online = tuf_repo.load_keys(tmp_path / "on", tuf_repo.ONLINE_KEYS)
    with db.read() as session:
        versions = {role: sorted(session.scalars(select(TufMetadata.version).where(
            TufMetadata.repo == tuf_repo.IMAGE, TufMetadata.role == role))) for role in ("timestamp", "root")}
    db.close()
    assert versions["root"] == [1, 2, 3, 4, 5, 6]  # every root: a device provisioned with v1 walks them all
    assert len(versions["timestamp"]) == tuf_repo.KEEP_VERSIONS


def test_openapi_conformance_of_tuf_routes(sqlite_fleet: TufFleet) -> None:
    """Schemathesis on the /tuf operations, as a device, with schema-valid and schema-violating requests: answers
    as documented, never a server error."""
    schemathesis = pytest.importorskip("schemathesis", reason="pip install 'edgepeft[dev]'")
    from hypothesis import HealthCheck, given, settings
    from schemathesis.generation.modes import GenerationMode

    fleet = sqlite_fleet
    auth = {"Authorization": f"Bearer {fleet.enrol('pump-z')}"}
    schema = schemathesis.openapi.from_url(f"{fleet.server.url}/openapi.json")
    operations = [r.ok() for r in schema.get_all_operations() if r.ok().path.startswith("/tuf/")]
    assert len(operations) == 3
    for mode in ("positive", "negative"):
        for operation in operations:
            @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            @given(case=operation.as_strategy(generation_mode=GenerationMode(mode)))
            def check(case: Any) -> None:
                case.call_and_validate(base_url=fleet.server.url, headers=auth)

            check()
