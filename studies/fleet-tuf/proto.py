#!/usr/bin/env python3
"""Offline TUF prototype for a "fleet server" distributing signed adapter bundles.

python-tuf 7.0.1 / securesystemslib 1.6.0.  Everything lives under ./work/
(regenerated on every run).  Usage:

    .venv/bin/python proto.py            # demo + attacks + benchmark
    .venv/bin/python proto.py --no-bench # demo + attacks only

Results are printed and written to work/results.json.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import json
import logging
import os
import shutil
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib import parse

from securesystemslib.signer import CryptoSigner, Signer, SSlibKey
from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import (
    DelegatedRole,
    Delegations,
    MetaFile,
    Metadata,
    Root,
    Snapshot,
    SuccinctRoles,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer
from tuf.ngclient import Updater

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"
KEYS = WORK / "keys"
SERVE = WORK / "serve"  # document root of the HTTP server
CLIENTS = WORK / "clients"
RESULTS: dict = {"attacks": [], "demo": {}, "bench": {}}

UTC = timezone.utc
BIN_BITS = 8  # 256 hashed bins in the demo repository


def now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def in_days(d: float) -> datetime:
    return now() + timedelta(days=d)


# ---------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------
def new_key(name: str, offline: bool) -> CryptoSigner:
    """Generate an Ed25519 key, store private PEM (PKCS8) + public key JSON."""
    signer = CryptoSigner.generate_ed25519()
    d = KEYS / ("offline" if offline else "online")
    d.mkdir(parents=True, exist_ok=True)
    priv = d / f"{name}.pem"
    priv.write_bytes(signer.private_bytes)
    os.chmod(priv, 0o600)
    pub = {"keyid": signer.public_key.keyid, **signer.public_key.to_dict()}
    (d / f"{name}.pub.json").write_text(json.dumps(pub, indent=1))
    return signer


def load_key(name: str, offline: bool) -> Signer:
    """Load a signer from disk exactly like an offline signing ceremony would."""
    d = KEYS / ("offline" if offline else "online")
    pub = json.loads((d / f"{name}.pub.json").read_text())
    keyid = pub.pop("keyid")
    public_key = SSlibKey.from_dict(keyid, pub)
    return Signer.from_priv_key_uri(f"file2:{d / f'{name}.pem'}", public_key)


# ---------------------------------------------------------------------------
# Repository (static files, consistent snapshots)
# ---------------------------------------------------------------------------
class Repo:
    """Minimal TUF repository writer.

    Metadata: <meta>/N.root.json, N.<role>.json (targets + delegated),
    N.snapshot.json, timestamp.json  (consistent_snapshot=True)
    Targets:  <targets>/<dir>/<sha256>.<basename>
    """

    def __init__(self, base: Path, root_md: Metadata[Root], signers: dict):
        self.meta_dir = base / "metadata"
        self.tgt_dir = base / "targets"
        self.meta_dir.mkdir(parents=True, exist_ok=True)
        self.tgt_dir.mkdir(parents=True, exist_ok=True)
        self.root = root_md
        self.signers = signers  # role -> list[Signer]; "bins" used for bins-*
        self.roles: dict[str, Metadata[Targets]] = {}
        self.published: set[str] = set()
        self.snapshot = Metadata(Snapshot(expires=in_days(7)))
        self.timestamp = Metadata(Timestamp(expires=in_days(1)))

    # -- helpers --
    def signers_for(self, role: str) -> list:
        if role.startswith("bins-"):
            return self.signers["bins"]
        return self.signers[role]

    @staticmethod
    def sign(md: Metadata, signers: list) -> None:
        md.signatures.clear()
        for s in signers:
            md.sign(s, append=True)

    def write_meta(self, name: str, md: Metadata, versioned: bool = True) -> Path:
        fname = parse.quote(name, "")  # client URL-quotes role names
        if versioned:
            fname = f"{md.signed.version}.{fname}"
        path = self.meta_dir / f"{fname}.json"
        md.to_file(str(path))
        return path

    def write_root(self) -> None:
        self.write_meta("root", self.root)
        # convenience copy for bootstrap (clients fetch N.root.json)
        shutil.copy(self.meta_dir / f"{self.root.signed.version}.root.json",
                    self.meta_dir / "root.json")

    def add_target(self, role: str, path: str, data: bytes, custom: dict) -> TargetFile:
        tf = TargetFile.from_data(path, data, ["sha256"])
        tf.unrecognized_fields["custom"] = custom
        self.roles[role].signed.targets[path] = tf
        dirname, _, base = path.rpartition("/")
        out = self.tgt_dir / dirname / f"{tf.hashes['sha256']}.{base}"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(data)
        return tf

    def commit(self, changed: set[str], expires: dict | None = None,
               timestamp_signers: list | None = None) -> None:
        """Sign+write changed targets roles, then a new snapshot and timestamp."""
        expires = expires or {}
        for r in sorted(changed):
            md = self.roles[r]
            if r in self.published:
                md.signed.version += 1
            md.signed.expires = expires.get(r, in_days(30))
            self.sign(md, self.signers_for(r))
            self.write_meta(r, md)
            self.snapshot.signed.meta[f"{r}.json"] = MetaFile(version=md.signed.version)
            self.published.add(r)
        if "snapshot" in self.published:
            self.snapshot.signed.version += 1
        self.snapshot.signed.expires = expires.get("snapshot", in_days(7))
        self.sign(self.snapshot, self.signers["snapshot"])
        self.write_meta("snapshot", self.snapshot)
        self.published.add("snapshot")
        self.bump_timestamp(expires.get("timestamp"), timestamp_signers)

    def bump_timestamp(self, expires=None, signers=None) -> Metadata[Timestamp]:
        ts = self.timestamp
        if "timestamp" in self.published:
            ts.signed.version += 1
        ts.signed.expires = expires or in_days(1)
        ts.signed.snapshot_meta = MetaFile(version=self.snapshot.signed.version)
        self.sign(ts, signers or self.signers["timestamp"])
        self.write_meta("timestamp", ts, versioned=False)
        self.published.add("timestamp")
        return ts


def make_root(keys: dict[str, list], root_signers: list, version: int = 1,
              expires_days: float = 365) -> Metadata[Root]:
    root = Root(version=version, expires=in_days(expires_days), consistent_snapshot=True)
    for role, signers in keys.items():
        for s in signers:
            root.add_key(s.public_key, role)
    md = Metadata(root)
    Repo.sign(md, root_signers)
    return md


# ---------------------------------------------------------------------------
# HTTP server
# ---------------------------------------------------------------------------
class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, fmt, *args):  # noqa: D102
        pass


def start_server(root: Path) -> tuple[ThreadingHTTPServer, str]:
    handler = partial(QuietHandler, directory=str(root))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


# ---------------------------------------------------------------------------
# Client helpers
# ---------------------------------------------------------------------------
class TargetNotFound(Exception):
    """Raised by our client wrapper when TUF metadata does not list a path."""


class DowngradeRefused(Exception):
    """App-level anti-rollback on the custom 'release' field."""


class DirectorImageMismatch(Exception):
    """Director and image repository disagree about a target."""


def updater(cname: str, base_url: str, sub: str, bootstrap: bytes) -> Updater:
    cdir = CLIENTS / cname
    (cdir / "metadata").mkdir(parents=True, exist_ok=True)
    (cdir / "targets").mkdir(parents=True, exist_ok=True)
    return Updater(
        metadata_dir=str(cdir / "metadata"),
        metadata_base_url=f"{base_url}/{sub}/metadata/",
        target_dir=str(cdir / "targets"),
        target_base_url=f"{base_url}/{sub}/targets/",
        bootstrap=bootstrap,
    )


def fetch(u: Updater, path: str) -> tuple[TargetFile, str]:
    ti = u.get_targetinfo(path)
    if ti is None:
        raise TargetNotFound(path)
    cached = u.find_cached_target(ti)
    return ti, cached or u.download_target(ti)


def client_state(cname: str) -> dict[str, str]:
    cdir = CLIENTS / cname
    state = {}
    for p in sorted(cdir.rglob("*")):
        rel = str(p.relative_to(cdir))
        if p.is_symlink():
            state[rel] = "->" + os.readlink(p)
        elif p.is_file():
            state[rel] = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
    return state


def diff_state(a: dict, b: dict) -> list[str]:
    keys = set(a) | set(b)
    return sorted(k for k in keys if a.get(k) != b.get(k))


def legit_hashes() -> set[str]:
    """sha256[:16] of every file the legitimate repositories published (swaps undone)."""
    hs = set()
    for p in SERVE.rglob("*"):
        if p.is_file():
            data = Swap.ORIGINALS.get(p, p.read_bytes())
            hs.add(hashlib.sha256(data).hexdigest()[:16])
    return hs


def run_attack(name: str, cname: str, op, expect: tuple, note: str = "") -> None:
    before = client_state(cname)
    exc = None
    try:
        op()
        outcome = "NOT REJECTED"
    except expect as e:  # noqa: PERF203
        exc = e
        outcome = "rejected"
    except Exception as e:  # unexpected class still counts as rejection, but flag it
        exc = e
        outcome = "rejected (unexpected class)"
    after = client_state(cname)
    changed = diff_state(before, after)
    legit = legit_hashes()
    untrusted = [c for c in changed
                 if c in after and not after[c].startswith("->") and after[c] not in legit]
    row = {
        "attack": name,
        "outcome": outcome,
        "exception": type(exc).__name__ if exc else None,
        "message": str(exc)[:160] if exc else None,
        "client_state_changed": changed,
        "changed_not_byte_identical_to_legit_repo": untrusted,
        "note": note,
    }
    RESULTS["attacks"].append(row)
    ok = outcome.startswith("rejected")
    flag = ("!! " if not ok or untrusted else "OK*" if changed else "OK ")
    row["verdict"] = ("FAIL" if not ok else "rejected; stored authentic-but-attacker-signed file"
                      if untrusted else "rejected; only legit repo files stored" if changed
                      else "rejected; state unchanged")
    print(f"{flag}{name:<48} -> {row['exception']}: {row['message'][:90]}"
          f" | state changed: {changed or 'no'}"
          + (f" (not legit-repo bytes: {untrusted})" if untrusted else ""))


class Swap:
    """Temporarily replace served files (attacker controls the mirror)."""

    ORIGINALS: dict[Path, bytes] = {}

    def __init__(self, mapping: dict[Path, bytes]):
        self.mapping = mapping
        self.saved: dict[Path, bytes | None] = {}

    def __enter__(self):
        for p, data in self.mapping.items():
            self.saved[p] = p.read_bytes() if p.exists() else None
            if self.saved[p] is not None:
                Swap.ORIGINALS[p] = self.saved[p]
            p.write_bytes(data)
        return self

    def __exit__(self, *a):
        for p, data in self.saved.items():
            Swap.ORIGINALS.pop(p, None)
            if data is None:
                p.unlink()
            else:
                p.write_bytes(data)


# ---------------------------------------------------------------------------
# Demo
# ---------------------------------------------------------------------------
def bundle_bytes(asset: str, release: int, size: int = 4096) -> bytes:
    seed = f"{asset}:{release}".encode()
    out = b""
    while len(out) < size:
        seed = hashlib.sha256(seed).digest()
        out += seed
    return b"ADAPTER-BUNDLE\n" + out[:size]


def bundle_path(asset: str, release: int) -> str:
    return f"bundles/{asset}/r{release}/adapter.tar.gz"


def build_image_repo() -> tuple[Repo, dict]:
    # offline: root, targets.  online: timestamp, snapshot, bins.
    new_key("root-1", offline=True)
    new_key("targets", offline=True)
    for n in ("timestamp-1", "snapshot", "bins", "group-canary", "group-stable"):
        new_key(n, offline=False)
    k = {
        "root": load_key("root-1", True),
        "targets": load_key("targets", True),
        "timestamp": load_key("timestamp-1", False),
        "snapshot": load_key("snapshot", False),
        "bins": load_key("bins", False),
        "group-canary": load_key("group-canary", False),
        "group-stable": load_key("group-stable", False),
    }
    root_md = make_root(
        {"root": [k["root"]], "targets": [k["targets"]],
         "snapshot": [k["snapshot"]], "timestamp": [k["timestamp"]]},
        root_signers=[k["root"]],
    )
    repo = Repo(SERVE / "image", root_md, {
        "targets": [k["targets"]], "snapshot": [k["snapshot"]],
        "timestamp": [k["timestamp"]], "bins": [k["bins"]],
        "bundles": [k["targets"]],  # 'bundles' is signed by the offline targets key
        "group-canary": [k["group-canary"]], "group-stable": [k["group-stable"]],
    })
    repo.write_root()

    # top-level targets -> [group-canary, group-stable] (path-delegated, per device group)
    #                   -> bundles (paths bundles/*) -> succinct hashed bins bins-00..ff
    top = Targets(expires=in_days(30))
    top.delegations = Delegations(keys={}, roles={})
    for g in ("group-canary", "group-stable"):
        top.delegations.roles[g] = DelegatedRole(
            name=g, keyids=[], threshold=1, terminating=True,
            paths=[f"groups/{g.split('-', 1)[1]}/*/*"])  # '*' never matches '/'!
        top.add_key(k[g].public_key, g)
    top.delegations.roles["bundles"] = DelegatedRole(
        name="bundles", keyids=[], threshold=1, terminating=True, paths=["bundles/*/*/*"])
    top.add_key(k["targets"].public_key, "bundles")
    repo.roles["targets"] = Metadata(top)

    bundles = Targets(expires=in_days(30))
    bundles.delegations = Delegations(
        keys={}, succinct_roles=SuccinctRoles(keyids=[], threshold=1,
                                              bit_length=BIN_BITS, name_prefix="bins"))
    bundles.add_key(k["bins"].public_key)  # no role arg for succinct roles
    repo.roles["bundles"] = Metadata(bundles)
    sr = bundles.delegations.succinct_roles
    for b in sr.get_roles():
        repo.roles[b] = Metadata(Targets(expires=in_days(30)))

    # a few real bundles, each with custom fields
    for i, asset in enumerate(["pump-01", "pump-02", "valve-07", "chiller-3"]):
        for rel in (1, 2, 3):
            data = bundle_bytes(asset, rel)
            path = bundle_path(asset, rel)
            repo.add_target(sr.get_role_for_target(path), path, data, {
                "asset": asset, "release": rel,
                "base_sha256": hashlib.sha256(f"base-model-{asset}".encode()).hexdigest(),
            })
    # group channels: a stable name per group pointing at a concrete bundle
    for g, (asset, rel) in {"group-canary": ("pump-01", 3), "group-stable": ("pump-01", 2)}.items():
        path = f"groups/{g.split('-', 1)[1]}/pump-01/adapter.tar.gz"
        repo.roles[g] = Metadata(Targets(expires=in_days(30)))
        repo.add_target(g, path, bundle_bytes(asset, rel),
                        {"asset": asset, "release": rel, "ref": bundle_path(asset, rel)})
    repo.commit(set(repo.roles))
    return repo, k


def build_director(image_repo: Repo, devices: dict[str, list[str]]) -> tuple[dict, Metadata]:
    """Uptane-style director: a separate TUF repo with one metadata set per device."""
    new_key("director-root", offline=True)
    new_key("director-online", offline=False)
    droot = load_key("director-root", True)
    don = load_key("director-online", False)
    root_md = make_root({"root": [droot], "targets": [don], "snapshot": [don],
                         "timestamp": [don]}, root_signers=[droot])
    repos = {}
    for dev, paths in devices.items():
        r = Repo(SERVE / "director" / dev, root_md,
                 {"targets": [don], "snapshot": [don], "timestamp": [don]})
        r.write_root()
        t = Targets(expires=in_days(7))
        for p in paths:
            role = image_repo_role_for(image_repo, p)
            tf = copy.deepcopy(image_repo.roles[role].signed.targets[p])
            tf.unrecognized_fields = {"custom": {"device_id": dev, "install": True}}
            t.targets[p] = tf  # director lists length+hashes only; file served by image repo
        r.roles["targets"] = Metadata(t)
        r.commit({"targets"})
        repos[dev] = r
    return repos, root_md


def image_repo_role_for(repo: Repo, path: str) -> str:
    return repo.roles["bundles"].signed.delegations.succinct_roles.get_role_for_target(path)


def director_fetch(base: str, dev: str, img_root: bytes, dir_root: bytes) -> list[dict]:
    """Uptane-lite: director says WHAT (per device), image repo says it's GENUINE."""
    (CLIENTS / dev / "director").mkdir(parents=True, exist_ok=True)
    du = Updater(metadata_dir=str(CLIENTS / dev / "director"),
                 metadata_base_url=f"{base}/director/{dev}/metadata/",
                 bootstrap=dir_root)
    du.refresh()
    # Updater has no "list targets" API: read the targets.json that refresh() just
    # verified and persisted (it is the trusted copy).
    dtargets = Metadata[Targets].from_file(str(CLIENTS / dev / "director" / "targets.json"))
    iu = updater(dev, base, "image", img_root)
    iu.refresh()
    inst_file = CLIENTS / dev / "installed.json"
    installed = json.loads(inst_file.read_text()) if inst_file.exists() else {}
    out = []
    for path in sorted(dtargets.signed.targets):
        dti = du.get_targetinfo(path)
        iti = iu.get_targetinfo(path)
        if iti is None:
            raise TargetNotFound(f"{path} not in image repo")
        if (dti.length, dti.hashes) != (iti.length, iti.hashes):
            raise DirectorImageMismatch(f"{path}: director {dti.hashes} != image {iti.hashes}")
        asset, rel = iti.custom["asset"], iti.custom["release"]
        if rel < installed.get(asset, 0):
            raise DowngradeRefused(f"{asset}: release {rel} < installed {installed[asset]}")
        local = iu.find_cached_target(iti) or iu.download_target(iti)
        out.append({"path": path, "director_custom": dti.custom,
                    "image_custom": iti.custom, "local": os.path.basename(local)})
        installed[asset] = rel
    inst_file.write_text(json.dumps(installed))
    return out


def demo_and_attacks() -> None:
    repo, k = build_image_repo()
    httpd, base = start_server(SERVE)
    print(f"HTTP server on {base} serving {SERVE}")
    root_v1 = (repo.meta_dir / "1.root.json").read_bytes()
    C = "device-0001"
    demo_path = bundle_path("pump-01", 3)

    # ---- happy path ----
    u = updater(C, base, "image", root_v1)
    u.refresh()
    ti, local = fetch(u, demo_path)
    print(f"downloaded {demo_path} -> {local}\n  custom={ti.custom} len={ti.length}")
    u2 = updater(C, base, "image", root_v1)
    gti, glocal = fetch(u2, "groups/canary/pump-01/adapter.tar.gz")
    RESULTS["demo"]["image"] = {"path": demo_path, "custom": ti.custom, "length": ti.length,
                                "sha256": ti.hashes["sha256"],
                                "group_canary_custom": gti.custom,
                                "metadata_files": sorted(os.listdir(CLIENTS / C / "metadata"))}
    # delegation escape: group-canary may not sign bundles/* (path not delegated to it)
    repo.roles["group-canary"].signed.targets["bundles/evil/x.tar.gz"] = TargetFile.from_data(
        "bundles/evil/x.tar.gz", b"evil")
    repo.commit({"group-canary"})
    u3 = updater(C, base, "image", root_v1)
    RESULTS["demo"]["group_cannot_escape_paths"] = u3.get_targetinfo("bundles/evil/x.tar.gz") is None
    del repo.roles["group-canary"].signed.targets["bundles/evil/x.tar.gz"]
    repo.commit({"group-canary"})

    # ---- director ----
    devices = {"device-0001": [bundle_path("pump-01", 3), bundle_path("valve-07", 2)],
               "device-0002": [bundle_path("pump-01", 2)]}
    drepos, droot = build_director(repo, devices)
    droot_bytes = (drepos["device-0001"].meta_dir / "1.root.json").read_bytes()
    for dev in devices:
        RESULTS["demo"][f"director_{dev}"] = director_fetch(base, dev, root_v1, droot_bytes)
        print(f"director {dev}: {[r['path'] for r in RESULTS['demo'][f'director_{dev}']]}")

    print("\n=== attacks (client must reject, local state must not change) ===")
    md = repo.meta_dir

    def sync():
        uu = updater(C, base, "image", root_v1)
        uu.refresh()
        fetch(uu, demo_path)

    def refresh_op():
        updater(C, base, "image", root_v1).refresh()

    def fetch_op(path=demo_path):
        return lambda: fetch(updater(C, base, "image", root_v1), path)

    demo_bin = image_repo_role_for(repo, demo_path)

    # 1a rollback: replay an older timestamp.json
    sync()
    old_ts = (md / "timestamp.json").read_bytes()
    repo.bump_timestamp()
    sync()
    with Swap({md / "timestamp.json": old_ts}):
        run_attack("rollback: replay older timestamp.json", C, refresh_op,
                   (tuf_exc.BadVersionNumberError,))

    # 1b rollback: old snapshot bytes served at the current snapshot URL.
    # Client already holds the current timestamp (mirror keeps serving it).
    sv = repo.snapshot.signed.version
    old_snap = (md / f"{sv}.snapshot.json").read_bytes()
    repo.roles[demo_bin].signed.targets[bundle_path("pump-01", 3)].unrecognized_fields[
        "custom"]["note"] = "rebuilt"
    repo.commit({demo_bin})
    with Swap({md / f"{sv + 1}.snapshot.json": old_snap}):
        # first contact: legit new timestamp gets stored, snapshot rejected
        run_attack("rollback: older snapshot at new URL (1st contact)", C, refresh_op,
                   (tuf_exc.BadVersionNumberError,),
                   "only timestamp.json may change: legit, repo-signed newer timestamp")
        run_attack("rollback: older snapshot at new URL (retry)", C, refresh_op,
                   (tuf_exc.BadVersionNumberError,))
    sync()

    # 1c rollback with COMPROMISED online snapshot+timestamp keys: snapshot lists older bin
    evil = copy.deepcopy(repo.snapshot)
    evil.signed.version += 1
    evil.signed.meta[f"{demo_bin}.json"] = MetaFile(
        version=repo.roles[demo_bin].signed.version - 1)
    Repo.sign(evil, repo.signers["snapshot"])
    evil_ts = copy.deepcopy(repo.timestamp)
    evil_ts.signed.version += 1
    evil_ts.signed.snapshot_meta = MetaFile(version=evil.signed.version)
    Repo.sign(evil_ts, repo.signers["timestamp"])
    with Swap({md / f"{evil.signed.version}.snapshot.json": evil.to_bytes(),
               md / "timestamp.json": evil_ts.to_bytes()}):
        run_attack("rollback: bin version rolled back in snapshot (online keys stolen)",
                   C, refresh_op, (tuf_exc.BadVersionNumberError,),
                   "attacker-signed timestamp is authentic to TUF and gets stored")
        run_attack("  ... retry after timestamp stored", C, refresh_op,
                   (tuf_exc.BadVersionNumberError,))
    # recover: legit repo must jump its timestamp+snapshot versions past the attacker's
    repo.snapshot.signed.version = evil.signed.version
    repo.timestamp.signed.version = evil_ts.signed.version
    repo.commit(set())
    sync()

    # 2 freeze: repo (or mirror) stops updating, timestamp expires
    repo.bump_timestamp(expires=now() + timedelta(seconds=2))
    sync()
    time.sleep(3.2)
    run_attack("freeze: mirror keeps serving expired timestamp", C, refresh_op,
               (tuf_exc.ExpiredMetadataError,))
    repo.bump_timestamp()
    sync()

    # 3 mix-and-match: bin metadata from another snapshot
    bv = repo.roles[demo_bin].signed.version
    old_bin = (md / f"{bv}.{demo_bin}.json").read_bytes()
    repo.roles[demo_bin].signed.targets[bundle_path("pump-01", 3)].unrecognized_fields[
        "custom"]["note"] = "rebuilt-2"
    repo.commit({demo_bin})
    sync_partial = updater(C, base, "image", root_v1)
    sync_partial.refresh()  # client now trusts the new snapshot, bin not yet loaded
    with Swap({md / f"{bv + 1}.{demo_bin}.json": old_bin}):
        run_attack(f"mix-and-match: {demo_bin} v{bv} served as v{bv + 1}", C,
                   fetch_op(), (tuf_exc.BadVersionNumberError,))
    top_v = repo.roles["targets"].signed.version
    old_top = (md / f"{top_v}.targets.json").read_bytes()
    repo.commit({"targets"})
    with Swap({md / f"{top_v + 1}.targets.json": old_top}):
        run_attack(f"mix-and-match: targets v{top_v} served as v{top_v + 1} (1st)", C,
                   refresh_op, (tuf_exc.BadVersionNumberError,),
                   "legit timestamp+snapshot stored, targets not")
        run_attack(f"mix-and-match: targets v{top_v} served as v{top_v + 1} (retry)", C,
                   refresh_op, (tuf_exc.BadVersionNumberError,))
    sync()

    # 4 tampered target file
    tf = repo.roles[demo_bin].signed.targets[demo_path]
    served = repo.tgt_dir / "bundles/pump-01/r3" / f"{tf.hashes['sha256']}.adapter.tar.gz"
    good = served.read_bytes()
    for f in (CLIENTS / C / "targets").iterdir():
        f.unlink()  # force re-download
    flipped = bytearray(good)
    flipped[100] ^= 0xFF
    with Swap({served: bytes(flipped)}):
        run_attack("tampered target: 1 byte flipped (same length)", C, fetch_op(),
                   (tuf_exc.LengthOrHashMismatchError,))
    with Swap({served: good + b"\x00" * 64}):
        run_attack("tampered target: extra bytes appended", C, fetch_op(),
                   (tuf_exc.DownloadLengthMismatchError,))
    with Swap({served: good[:-1]}):
        run_attack("tampered target: truncated", C, fetch_op(),
                   (tuf_exc.LengthOrHashMismatchError,))
    sync()

    # 5 arbitrary target not in metadata (file exists on server, not in metadata)
    evil_path = "bundles/pump-01/r9/adapter.tar.gz"
    (repo.tgt_dir / "bundles/pump-01/r9").mkdir(parents=True, exist_ok=True)
    ev = b"backdoor"
    (repo.tgt_dir / "bundles/pump-01/r9" / f"{hashlib.sha256(ev).hexdigest()}.adapter.tar.gz"
     ).write_bytes(ev)
    run_attack("arbitrary target not in metadata", C, fetch_op(evil_path), (TargetNotFound,),
               "Updater.get_targetinfo() returns None (no exception); wrapper raises")
    # 5b ... or injected into bin metadata without a valid signature
    evil_bin_role = image_repo_role_for(repo, evil_path)
    ebv = repo.roles[evil_bin_role].signed.version
    p = md / f"{ebv}.{evil_bin_role}.json"
    j = json.loads(p.read_bytes())
    j["signed"]["targets"][evil_path] = {"length": len(ev),
                                         "hashes": {"sha256": hashlib.sha256(ev).hexdigest()}}
    # client must not have a cached copy of this bin for the download to happen
    cached_bin = CLIENTS / C / "metadata" / f"{evil_bin_role}.json"
    if cached_bin.exists():
        cached_bin.unlink()
    with Swap({p: json.dumps(j).encode()}):
        run_attack("arbitrary target injected into unsigned bin", C, fetch_op(evil_path),
                   (tuf_exc.UnsignedMetadataError,))

    # 6 expired metadata (validly signed bin whose expiry passed)
    repo.commit({demo_bin}, expires={demo_bin: now() - timedelta(hours=1)})
    sync_partial = updater(C, base, "image", root_v1)
    sync_partial.refresh()
    run_attack(f"expired metadata: {demo_bin} expired", C, fetch_op(),
               (tuf_exc.ExpiredMetadataError,))
    repo.commit({demo_bin})
    sync()

    # 7 key rotation: timestamp key compromised -> root v2 rotates it (and the root key)
    new_key("root-2", offline=True)
    new_key("timestamp-2", offline=False)
    root2_signer = load_key("root-2", True)
    ts2 = load_key("timestamp-2", False)
    old_ts_signer = repo.signers["timestamp"][0]
    r2 = copy.deepcopy(repo.root)
    r2.signed.version = 2
    r2.signed.revoke_key(old_ts_signer.public_key.keyid, "timestamp")
    r2.signed.add_key(ts2.public_key, "timestamp")
    r2.signed.revoke_key(k["root"].public_key.keyid, "root")
    r2.signed.add_key(root2_signer.public_key, "root")

    # 7a pitfall: root v2 signed only by the NEW root key
    bad_r2 = copy.deepcopy(r2)
    Repo.sign(bad_r2, [root2_signer])
    with Swap({md / "2.root.json": bad_r2.to_bytes()}):
        run_attack("root v2 signed only by new root key", C, refresh_op,
                   (tuf_exc.UnsignedMetadataError,))
    # 7b correct: signed by old (threshold of v1) AND new (threshold of v2) root keys
    Repo.sign(r2, [k["root"], root2_signer])
    repo.root = r2
    repo.write_root()
    repo.signers["timestamp"] = [ts2]
    repo.bump_timestamp()
    sync()
    RESULTS["demo"]["after_rotation_root_history"] = sorted(
        os.listdir(CLIENTS / C / "metadata" / "root_history"))
    # attacker with the OLD timestamp key signs a newer timestamp
    forged = copy.deepcopy(repo.timestamp)
    forged.signed.version += 10
    Repo.sign(forged, [old_ts_signer])
    with Swap({md / "timestamp.json": forged.to_bytes()}):
        run_attack("timestamp signed by OLD (rotated-out) key", C, refresh_op,
                   (tuf_exc.UnsignedMetadataError,))
        # a device still embedding root v1 also rejects it (walks root chain first)
        C2 = "device-fresh"
        updater(C2, base, "image", root_v1)  # creates dirs/bootstraps v1
        before = client_state(C2)
        try:
            updater(C2, base, "image", root_v1).refresh()
            res = "NOT REJECTED"
            exc = None
        except tuf_exc.RepositoryError as e:
            res, exc = "rejected", e
        RESULTS["attacks"].append({
            "attack": "old-key timestamp vs fresh device bootstrapped with root v1",
            "outcome": res, "exception": type(exc).__name__ if exc else None,
            "message": str(exc)[:160], "client_state_changed": diff_state(before, client_state(C2)),
            "note": "root v2 (legit) is fetched+stored first; timestamp then rejected"})
        print(f"OK  old-key ts vs fresh v1 device -> {type(exc).__name__}: {exc} | changed: "
              f"{diff_state(before, client_state(C2))}")
    # 8 director compromise alone cannot install a non-image bundle / downgrade
    director_fetch(base, "device-0002", root_v1, droot_bytes)  # legit sync first
    director_fetch(base, "device-0001", root_v1, droot_bytes)
    dr = drepos["device-0001"]
    p1 = bundle_path("pump-01", 1)
    dr.roles["targets"].signed.targets = {p1: copy.deepcopy(
        repo.roles[image_repo_role_for(repo, p1)].signed.targets[p1])}
    dr.commit({"targets"})
    run_attack("director compromised: older legit release (r3->r1)", "device-0001",
               lambda: director_fetch(base, "device-0001", root_v1, droot_bytes),
               (DowngradeRefused,), "director metadata is authentic (director key) so it is "
               "stored; only the app-level 'release' check stops the downgrade")
    dr = drepos["device-0002"]
    fake = bundle_bytes("pump-01", 2)[:-1] + b"X"
    t = dr.roles["targets"].signed
    p2 = bundle_path("pump-01", 2)
    t.targets[p2] = TargetFile.from_data(p2, fake)
    dr.commit({"targets"})
    run_attack("director compromised: hash not in image repo", "device-0002",
               lambda: director_fetch(base, "device-0002", root_v1, droot_bytes),
               (DirectorImageMismatch,), "director metadata authentic -> stored; image mismatch")
    httpd.shutdown()


# ---------------------------------------------------------------------------
# Benchmark: flat vs hashed bins
# ---------------------------------------------------------------------------
def synth_targets(n: int) -> dict[str, TargetFile]:
    out = {}
    for i in range(n):
        asset = f"asset-{i:07d}"
        path = f"bundles/{asset}/r{i % 7 + 1}/adapter.tar.gz"
        h = hashlib.sha256(path.encode()).hexdigest()
        out[path] = TargetFile(1_000_000 + i, {"sha256": h}, path, {"custom": {
            "asset": asset, "release": i % 7 + 1,
            "base_sha256": hashlib.sha256(asset.encode()).hexdigest()}})
    return out


def ser(md: Metadata) -> bytes:
    return md.to_bytes(JSONSerializer(compact=True))


def parse_verify_s(data: bytes, signer, reps: int) -> float:
    """Client-side cost: deserialize + canonicalize + Ed25519 verify (min of reps)."""
    best = 1e9
    for _ in range(reps):
        t0 = time.perf_counter()
        m = Metadata.from_bytes(data)
        signer.public_key.verify_signature(m.signatures[signer.public_key.keyid], m.signed_bytes)
        best = min(best, time.perf_counter() - t0)
    return best


def bench() -> None:
    signer = CryptoSigner.generate_ed25519()
    res = {}
    for n in (10_000, 100_000):
        tg = synth_targets(n)
        # flat
        t0 = time.perf_counter()
        flat = Metadata(Targets(expires=in_days(30), targets=tg))
        flat.sign(signer)
        data = ser(flat)
        t_flat = time.perf_counter() - t0
        t_flat_verify = parse_verify_s(data, signer, reps=3)
        res[f"{n}_flat"] = {"targets_json_bytes": len(data),
                            "gzip_bytes": len(gzip.compress(data, 6)),
                            "build_sign_serialize_s": round(t_flat, 2),
                            "client_parse_verify_s": round(t_flat_verify, 2)}
        print(f"n={n} flat: {len(data)/1e6:.2f} MB, {t_flat:.2f}s build+sign, "
              f"{t_flat_verify:.2f}s client parse+verify")
        for bits in (8, 10):
            t0 = time.perf_counter()
            sr = SuccinctRoles([signer.public_key.keyid], 1, bits, "bins")
            bins = {name: Targets(expires=in_days(30)) for name in sr.get_roles()}
            for path, tf in tg.items():
                bins[sr.get_role_for_target(path)].targets[path] = tf
            sizes = {}
            snap = Snapshot(expires=in_days(7))
            for name, t in bins.items():
                md = Metadata(t)
                md.sign(signer)
                b = ser(md)
                sizes[name] = len(b)
                snap.meta[f"{name}.json"] = MetaFile(version=1)
            deleg = Targets(expires=in_days(30), delegations=Delegations(
                keys={signer.public_key.keyid: signer.public_key}, succinct_roles=sr))
            dmd = Metadata(deleg)
            dmd.sign(signer)
            snap.meta["targets.json"] = MetaFile(version=1)
            smd = Metadata(snap)
            smd.sign(signer)
            sb = ser(smd)
            t_bins = time.perf_counter() - t0
            one = max(sizes.values())
            big = Metadata(bins[max(sizes, key=sizes.get)])
            big.sign(signer)
            t_bin_parse = parse_verify_s(ser(big), signer, reps=5)
            vals = sorted(sizes.values())
            res[f"{n}_bins{2**bits}"] = {
                "bins": 2**bits, "total_bytes": sum(vals), "bin_avg_bytes": sum(vals) // len(vals),
                "bin_min_bytes": vals[0], "bin_max_bytes": one,
                "targets_per_bin_avg": n / 2**bits,
                "delegating_targets_json_bytes": len(ser(dmd)),
                "snapshot_bytes": len(sb), "snapshot_gzip_bytes": len(gzip.compress(sb, 6)),
                "build_sign_serialize_s": round(t_bins, 2),
                "client_parse_verify_largest_bin_ms": round(t_bin_parse * 1000, 1)}
            print(f"n={n} bins=2^{bits}: total {sum(vals)/1e6:.2f} MB, bin avg "
                  f"{sum(vals)//len(vals)} B max {one} B, snapshot {len(sb)} B, "
                  f"{t_bins:.2f}s build+sign")
    # per-device roles in ONE repo: what snapshot/delegations would cost
    for n_dev in (10_000, 100_000):
        t0 = time.perf_counter()
        snap = Snapshot(expires=in_days(7))
        roles = {}
        for i in range(n_dev):
            name = f"device-{i:07d}"
            snap.meta[f"{name}.json"] = MetaFile(version=1)
            roles[name] = DelegatedRole(name, [signer.public_key.keyid], 1, True,
                                        paths=[f"devices/{name}/*"])
        smd = Metadata(snap)
        smd.sign(signer)
        sb = ser(smd)
        tmd = Metadata(Targets(expires=in_days(30), delegations=Delegations(
            keys={signer.public_key.keyid: signer.public_key}, roles=roles)))
        tmd.sign(signer)
        tb = ser(tmd)
        dt = time.perf_counter() - t0
        res[f"per_device_roles_{n_dev}"] = {"snapshot_bytes": len(sb),
                                            "targets_delegations_bytes": len(tb),
                                            "build_sign_s": round(dt, 2)}
        print(f"{n_dev} per-device delegated roles in one repo: snapshot {len(sb)/1e6:.2f} MB, "
              f"targets.json delegations {len(tb)/1e6:.2f} MB ({dt:.1f}s)")
    # director: cost to (re)generate one device's targets+snapshot+timestamp
    tf = next(iter(synth_targets(1).values()))
    t0 = time.perf_counter()
    reps = 2000
    for i in range(reps):
        t = Metadata(Targets(version=i + 1, expires=in_days(7),
                             targets={tf.path: tf}))
        t.sign(signer)
        s = Metadata(Snapshot(version=i + 1, expires=in_days(7),
                              meta={"targets.json": MetaFile(version=i + 1)}))
        s.sign(signer)
        ts = Metadata(Timestamp(version=i + 1, expires=in_days(1),
                                snapshot_meta=MetaFile(version=i + 1)))
        ts.sign(signer)
        sizes = (len(ser(t)), len(ser(s)), len(ser(ts)))
    dt = (time.perf_counter() - t0) / reps
    res["director_per_device"] = {"ms_per_device_update": round(dt * 1000, 3),
                                  "bytes_targets_snapshot_timestamp": sizes,
                                  "cpu_s_for_1M_devices_single_core": round(dt * 1e6, 0)}
    print(f"director per-device targets+snapshot+timestamp: {dt*1000:.2f} ms/device, "
          f"sizes {sizes}; 1M devices ~ {dt*1e6/60:.1f} CPU-min on 1 core")
    RESULTS["bench"] = res


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    if WORK.exists():
        shutil.rmtree(WORK)
    WORK.mkdir()
    demo_and_attacks()
    if "--no-bench" not in sys.argv:
        bench()
    (WORK / "results.json").write_text(json.dumps(RESULTS, indent=1, default=str))
    bad = [a for a in RESULTS["attacks"] if not a["outcome"].startswith("rejected")]
    print(f"\n{len(RESULTS['attacks'])} attack checks, {len(bad)} not rejected")


if __name__ == "__main__":
    main()
