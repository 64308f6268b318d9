"""The device's TUF client against a real fleet server: what its errors mean to the agent (retry later, fix the
credential, never install), the trusted state surviving a crash in the middle of its swap, the download cache,
and a device whose cached metadata expired while it was offline."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from edgepeft.agent.updates import ServerUnreachable, UpdateClient, UpdateError, VerificationFailed
from edgepeft.delta import read_bundle
from edgepeft.delta.manifest import as_utc
from edgepeft.fleet import tuf_repo
from tests.unit.agent.conftest import ASSET
from tests.unit.fleet.tuf_support import Proxy, TufFleet, trusted_state, tuf_fleet


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, Any],
          make_bundle: Callable[..., bytes]) -> Iterator[TufFleet]:
    folder = tmp_path_factory.mktemp("tuf-client")
    first = make_bundle("1.0.0", 1)
    with tuf_fleet(f"sqlite:///{folder / 'f.db'}", folder, keys["public"], read_bundle(first).base_sha256
                   ) as running:
        running.bundles = {1: running.publish(first)}
        yield running


def _client(fleet: TufFleet, tmp_path: Path, name: str, url: str | None = None) -> UpdateClient:
    fleet.enrol(name)
    fleet.assign(name, ASSET, fleet.bundles[1]["sha256"])
    return fleet.client(name, tmp_path / name, url=url)


def test_errors_tell_retry_from_refuse(fleet: TufFleet, tmp_path: Path) -> None:
    client = _client(fleet, tmp_path, "er-1")
    client.assigned()
    state = trusted_state(tmp_path / "er-1")
    closed = UpdateClient("http://127.0.0.1:9", "er-1", fleet.credentials["er-1"], tmp_path / "er-1",
                          *fleet.roots(1), timeout=2.0)
    with pytest.raises(ServerUnreachable, match="cannot reach"):
        closed.assigned()
    with Proxy(fleet.server.url) as proxy:
        proxy.rules.append(lambda path, headers: (503, b'{"error":"DistributionUnavailable","detail":"no keys"}'))
        with pytest.raises(ServerUnreachable, match="503"):
            fleet.client("er-1", tmp_path / "er-1", url=proxy.url).assigned()
    wrong = UpdateClient(fleet.server.url, "er-1", "efd_" + "A" * 43, tmp_path / "er-1", *fleet.roots(1))
    with pytest.raises(UpdateError, match="credential") as info:
        wrong.assigned()
    assert not isinstance(info.value, ServerUnreachable | VerificationFailed)
    assert trusted_state(tmp_path / "er-1") == state


def test_download_is_cached_and_atomic(fleet: TufFleet, tmp_path: Path) -> None:
    client = _client(fleet, tmp_path, "dl-1")
    [target] = client.assigned()
    data = client.download(target)
    files = sorted(p.name for p in (tmp_path / "dl-1" / "targets").iterdir())
    assert files == [f"{ASSET}%2F1.0.0.edelta"]  # no .partial left behind
    with Proxy(fleet.server.url) as proxy:  # the file is not fetched again
        proxy.rules.append(lambda path, headers: (500, b"gone") if "/targets/" in path else None)
        assert fleet.client("dl-1", tmp_path / "dl-1", url=proxy.url).download(target) == data


def test_crash_during_swap_recovers(fleet: TufFleet, tmp_path: Path) -> None:
    """Killed between the two renames of the state swap: only ``tuf.old`` exists; the next call uses it."""
    client = _client(fleet, tmp_path, "cr-1")
    client.assigned()
    state = tmp_path / "cr-1"
    (state / "tuf").rename(state / "tuf.old")
    shutil.copytree(state / "tuf.old", state / "tuf.work", symlinks=True)  # a half-built working copy too
    assert [t.version for t in client.assigned()] == ["1.0.0"]
    assert sorted(p.name for p in state.iterdir()) == ["targets", "tuf"]


def test_offline_device_with_expired_metadata_catches_up(fleet: TufFleet, tmp_path: Path) -> None:
    """The device's cached timestamp expires while it is offline (here after 3 s instead of a week); back online,
    it fetches fresh metadata and carries on."""
    client = _client(fleet, tmp_path, "of-1")
    with fleet.write() as session:
        tuf_repo.refresh_image(session, fleet.keys(), force=True,
                               periods={**tuf_repo.PERIODS, "timestamp": timedelta(seconds=3)})
    expires = as_utc(fleet.row(tuf_repo.IMAGE, "timestamp").expires_at)
    with Proxy(fleet.server.url) as proxy:  # pin the short-lived timestamp for the first sync
        proxy.serve("/tuf/image/metadata/timestamp.json", fleet.row(tuf_repo.IMAGE, "timestamp").data)
        fleet.client("of-1", tmp_path / "of-1", url=proxy.url).assigned()
    time.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()) + 1.2)
    assert [t.version for t in client.assigned()] == ["1.0.0"]
