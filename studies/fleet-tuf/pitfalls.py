#!/usr/bin/env python3
"""Reproduce API pitfalls of tuf 7.0.1 / securesystemslib 1.6.0 and print the real errors.
Run after proto.py (reuses its helpers; writes under work/pitfalls/)."""

from __future__ import annotations

import json
import shutil
from datetime import timedelta, timezone, datetime

import proto
from proto import (CryptoSigner, DelegatedRole, Delegations, MetaFile, Metadata, Repo,
                   SuccinctRoles, TargetFile, Targets, Updater, in_days, make_root, start_server)

OUT = proto.WORK / "pitfalls"
rows = []


def check(name, fn):
    try:
        r = fn()
        rows.append((name, "no exception", repr(r)[:150]))
    except Exception as e:  # noqa: BLE001
        rows.append((name, type(e).__name__, str(e)[:200]))
    print(f"- {name}: {rows[-1][1]}: {rows[-1][2]}")


def small_repo(sub, n_targets=0, big=False, snapshot_lengths=False, targets_expiry=None,
               unversioned=False):
    s = CryptoSigner.generate_ed25519()
    root = make_root({r: [s] for r in ("root", "targets", "snapshot", "timestamp")}, [s])
    repo = Repo(OUT / sub, root, {r: [s] for r in ("targets", "snapshot", "timestamp")})
    repo.write_root()
    t = Targets(expires=in_days(30))
    repo.roles["targets"] = Metadata(t)
    for i in range(n_targets):
        p = f"bundles/a{i:06d}/r1/adapter.tar.gz"
        t.targets[p] = TargetFile(1000, {"sha256": "ab" * 32}, p,
                                  {"custom": {"asset": f"a{i}", "release": 1,
                                              "base_sha256": "cd" * 32}})
    repo.add_target("targets", "hello.txt", b"hello", {"release": 1})
    repo.commit({"targets"}, expires={"targets": targets_expiry} if targets_expiry else None)
    if snapshot_lengths:  # put length (+hash) of targets.json into snapshot meta
        data = (repo.meta_dir / f"{t.version}.targets.json").read_bytes()
        repo.snapshot.signed.meta["targets.json"] = MetaFile.from_data(t.version, data, ["sha256"])
        repo.commit(set())
    if unversioned:
        for f in repo.meta_dir.glob("[0-9]*.*.json"):
            if not f.name.endswith(".root.json"):
                f.rename(f.with_name(f.name.split(".", 1)[1]))
    return repo


def client(sub, root_bytes):
    d = OUT / "clients" / sub
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    return Updater(str(d), f"{base}/{sub}/metadata/", str(d), f"{base}/{sub}/targets/",
                   bootstrap=root_bytes)


if __name__ == "__main__":
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    httpd, base = start_server(OUT)

    r = small_repo("ok")
    rb = (r.meta_dir / "1.root.json").read_bytes()
    check("Updater(...) without bootstrap=", lambda: Updater(
        str(OUT), f"{base}/ok/metadata/", str(OUT), f"{base}/ok/targets/"))
    u = client("ok", rb)
    u.refresh()
    check("refresh() called twice on one Updater", u.refresh)
    check("get_targetinfo() of unknown path", lambda: client("ok", rb).get_targetinfo("nope"))

    r = small_repo("flat_big", n_targets=25_000)
    size = (r.meta_dir / "1.targets.json").stat().st_size
    check(f"flat targets.json {size/1e6:.1f} MB, snapshot meta has version only "
          f"(targets_max_length=5 MB default)",
          lambda: client("flat_big", (r.meta_dir / "1.root.json").read_bytes()).refresh())
    r = small_repo("flat_big_len", n_targets=25_000, snapshot_lengths=True)
    check("same, but snapshot MetaFile.from_data(...) carries length+hash",
          lambda: client("flat_big_len", (r.meta_dir / "1.root.json").read_bytes()).refresh())

    r = small_repo("unversioned", unversioned=True)
    check("consistent_snapshot=True (Root default) but files written without N. prefix",
          lambda: client("unversioned", (r.meta_dir / "1.root.json").read_bytes()).refresh())

    r = small_repo("default_expiry", targets_expiry=datetime.now(timezone.utc))
    check("Targets() without expires= (defaults to 'now')",
          lambda: client("default_expiry", (r.meta_dir / "1.root.json").read_bytes()).refresh())

    s1, s2 = CryptoSigner.generate_ed25519(), CryptoSigner.generate_ed25519()
    check("Delegations(roles=..., succinct_roles=...) together", lambda: Delegations(
        keys={}, roles={"x": DelegatedRole("x", [], 1, True, paths=["*"])},
        succinct_roles=SuccinctRoles([], 1, 8, "bins")))
    check("Root.add_key(role, key) (old argument order)",
          lambda: proto.Root().add_key("root", s1.public_key))
    check("expires with non-UTC tz", lambda: Targets(
        expires=datetime.now(timezone(timedelta(hours=2)))))
    dr = DelegatedRole("b", [], 1, True, paths=["bundles/*"])
    check("paths=['bundles/*'] matches 'bundles/a/r1/x.tgz'?",
          lambda: dr.is_delegated_path("bundles/a/r1/x.tgz"))

    def sign_without_append():
        md = Metadata(proto.Root(expires=in_days(1)))
        md.signed.add_key(s1.public_key, "root")
        md.signed.add_key(s2.public_key, "root")
        md.signed.roles["root"].threshold = 2
        md.sign(s1)
        md.sign(s2)  # append=False (default) drops s1's signature
        md.signed.verify_delegate("root", md.signed_bytes, md.signatures)
    check("Metadata.sign() twice without append=True, threshold 2", sign_without_append)

    check("import securesystemslib.interface (legacy key API)",
          lambda: __import__("securesystemslib.interface"))
    check("CryptoSigner.from_priv_key_uri('file:...') (old scheme)",
          lambda: CryptoSigner.from_priv_key_uri(
              f"file:{proto.KEYS / 'online/bins.pem'}?encrypted=false", s1.public_key))

    def wrong_pub():
        return proto.Signer.from_priv_key_uri(f"file2:{proto.KEYS / 'online/bins.pem'}",
                                              s1.public_key)
    check("file2: private key with a non-matching public key", wrong_pub)
    httpd.shutdown()
    (OUT / "pitfalls.json").write_text(json.dumps(rows, indent=1))
