"""Metadata sizes of the product's image repository (edgepeft.fleet.tuf_repo.metadata_sizes) at 10^4 and 10^5
targets, and the cost of one device's director metadata, for docs/fleet-distribution.md.

    .venv/bin/python studies/fleet-tuf/sizes.py        # ~1 min on the 2-core sandbox; writes sizes.json beside it
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from edgepeft.fleet import tuf_repo
from edgepeft.fleet.db import Database
from edgepeft.fleet.models import BundleRecord, Device, DeviceAssignment, KnownBase


def image_sizes() -> list[dict]:
    rows = []
    for n_targets, bits in ((10_000, 8), (10_000, 10), (100_000, 8), (100_000, 10)):
        started = time.perf_counter()
        sizes = tuf_repo.metadata_sizes(n_targets, bits)
        sizes["build_sign_seconds"] = round(time.perf_counter() - started, 2)
        rows.append(sizes)
        print(json.dumps(sizes))
    return rows


def director_cost(devices: int = 200) -> dict:
    """Regenerate targets+snapshot+timestamp for ``devices`` devices with one assignment each (SQLite)."""
    folder = Path(tempfile.mkdtemp())
    db = Database.open(f"sqlite:///{folder / 'f.db'}")
    offline = tuf_repo.create_keys(folder / "off", tuf_repo.OFFLINE_KEYS)
    online = tuf_repo.create_keys(folder / "on", tuf_repo.ONLINE_KEYS)
    now = datetime.now(UTC)
    with db.write() as session:
        session.add(KnownBase(sha256="0" * 64, name="tiny", registered_at=now))
        session.flush()
        session.add(BundleRecord(sha256="1" * 64, asset_id="pump-1", version="1.0.0", release=1, parent_version=None,
                                 base_sha256="0" * 64, method="lora", signer="x", size_bytes=250_000, created_at=now,
                                 expires_at=None, uploaded_at=now, uploaded_by="study"))
        for i in range(devices):
            session.add(Device(id=f"d{i:05d}", credential_hash=f"{i:064d}", enrolled_at=now, enrolled_by="study",
                               updated_at=now))
        session.flush()
        for i in range(devices):
            session.add(DeviceAssignment(device_id=f"d{i:05d}", asset_id="pump-1", bundle_sha256="1" * 64,
                                         assigned_at=now))
        tuf_repo.init_repositories(session, offline, online)
    started = time.perf_counter()
    for i in range(devices):
        with db.write() as session:
            tuf_repo.refresh_director(session, f"d{i:05d}", online["director"])
    seconds = time.perf_counter() - started
    with db.read() as session:
        repo = tuf_repo.device_repo("d00000")
        sizes = {role: len(tuf_repo.latest_row(session, repo, role).data) for role in ("targets", "snapshot",
                                                                                        "timestamp")}
    db.close()
    result = {"devices": devices, "ms_per_device_with_db": round(1000 * seconds / devices, 2),
              "bytes": sizes}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    out = {"measured_at": datetime.now(UTC).strftime("%Y-%m-%d"),
           "machine": f"2-core sandbox, Python {platform.python_version()}",
           "image": image_sizes(), "director": director_cost()}
    (Path(__file__).parent / "sizes.json").write_text(json.dumps(out, indent=1) + "\n")
