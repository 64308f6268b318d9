"""The fleet server over real HTTP, on SQLite and on PostgreSQL (each test runs once per backend).

Main paths: tokens and scopes, enrolment and device credentials, groups, bases, the bundle catalogue, the audit
log, /health, /docs and /metrics. Refusals: each is a 4xx with one JSON line, and :func:`snapshot` shows that
nothing was written.
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError

from tests.unit.fleet.conftest import ASSET, FleetServer, assert_refused, expired, snapshot


def _token(fleet: FleetServer, *scopes: str, name: str = "worker") -> tuple[int, str]:
    with fleet.client() as http:
        answer = http.post("/v1/tokens", json={"name": name, "scopes": list(scopes), "reason": "test"})
    assert answer.status_code == 201, answer.text
    return answer.json()["record"]["id"], answer.json()["token"]


def _setup_registry(fleet: FleetServer, base_sha256: str) -> None:
    with fleet.client() as http:
        assert http.post("/v1/groups", json={"name": "line-1", "description": "line one", "reason": "new line"}
                         ).status_code == 201
        assert http.post("/v1/groups", json={"name": "canary", "reason": "canary devices"}).status_code == 201
        assert http.post("/v1/bases", json={"name": "tiny", "sha256": base_sha256, "reason": "the fleet's base"}
                         ).status_code == 201


def test_health_docs_metrics(server: FleetServer, db_url: str) -> None:
    with server.client("") as http:
        health = http.get("/health").json()
        assert health["status"] == "ok" and health["schema_revision"] == "0002"
        assert health["database"] == ("sqlite" if db_url.startswith("sqlite") else "postgresql")
        assert len(health["trusted_keys"]) == 1 and health["operator_tokens"] == 1
        assert "swagger" in http.get("/docs").text.lower()
        paths = http.get("/openapi.json").json()["paths"]
        assert {"/v1/devices", "/v1/bundles", "/v1/audit", "/v1/tokens"} <= set(paths)
        http.get("/v1/devices")  # a 401, counted
        metrics = http.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    assert "# TYPE edgepeft_fleet_devices gauge" in metrics.text
    assert "edgepeft_fleet_auth_failures_total 1" in metrics.text
    assert 'edgepeft_requests_total{route="/v1/devices",status="401"} 1' in metrics.text
    assert "edgepeft_swap" not in metrics.text  # the device's metrics are not the server's


def test_scopes_and_revoked_tokens(server: FleetServer, base_sha256: str) -> None:
    _, reader = _token(server, "read", name="reader")
    _, publisher = _token(server, "publish", name="publisher")
    deployer_id, deployer = _token(server, "deploy", name="deployer")
    before = snapshot(server)
    with server.client(reader) as http:
        assert http.get("/v1/devices").status_code == 200 and http.get("/v1/audit").status_code == 200
        assert_refused(http.post("/v1/groups", json={"name": "g", "reason": "r"}), 403, "deploy")
        assert_refused(http.post("/v1/bases", json={"name": "tiny", "sha256": base_sha256, "reason": "r"}), 403,
                       "publish")
        assert_refused(http.get("/v1/tokens"), 403, "admin")
    with server.client(publisher) as http:
        assert_refused(http.post("/v1/devices", json={"device_id": "d", "reason": "r"}), 403, "deploy")
        assert_refused(http.post("/v1/tokens", json={"name": "x", "scopes": ["admin"], "reason": "r"}), 403)
    with server.client(deployer) as http:
        assert_refused(http.post("/v1/bundles", params={"reason": "r"}, content=b"x"), 403, "publish")
    for bad in ("efo_" + "A" * 43, "not-a-token", "efd_" + "A" * 43, "efo_" + "x" * 5000):
        with server.client(bad) as http:
            answer = assert_refused(http.get("/v1/devices"), 401)
            assert answer["error"] == "Unauthenticated"
    with server.client("") as http:
        assert_refused(http.get("/v1/devices"), 401, "Authorization")
        assert_refused(http.get("/v1/devices", headers={"Authorization": "Basic dXNlcjpwYXNz"}), 401)
    assert snapshot(server) == before

    with server.client() as http:
        revoked = http.post(f"/v1/tokens/{deployer_id}/revoke", json={"reason": "left the team"})
        assert revoked.status_code == 200 and revoked.json()["revoked_at"]
        assert_refused(http.post(f"/v1/tokens/{deployer_id}/revoke", json={"reason": "again"}), 409, "already")
        assert_refused(http.post("/v1/tokens/999999/revoke", json={"reason": "r"}), 404)
        listed = http.get("/v1/tokens").json()
    assert all("token" not in t and "token_hash" not in t for t in listed)  # never the secret, nor its hash
    with server.client(deployer) as http:  # the revoked token, replayed
        assert_refused(http.get("/v1/devices"), 401, "revoked")


def test_enrol_device_credential_and_inventory(server: FleetServer, base_sha256: str, db_url: str) -> None:
    _setup_registry(server, base_sha256)
    with server.client() as http:
        enrolled = http.post("/v1/devices", json={
            "device_id": "pump-7", "tags": ["site=berlin", "hw:rev2"], "groups": ["line-1"], "assets": [ASSET],
            "bases": [base_sha256], "reason": "installed on line 1"})
        assert enrolled.status_code == 201, enrolled.text
        credential = enrolled.json()["credential"]
        device = enrolled.json()["device"]
        assert credential.startswith("efd_") and device["groups"] == ["line-1"]
        assert device["tags"] == ["hw:rev2", "site=berlin"] and device["bases"] == [base_sha256]
        assert "credential" not in http.get("/v1/devices/pump-7").json()

        before = snapshot(server)
        assert_refused(http.post("/v1/devices", json={"device_id": "pump-7", "reason": "again"}), 409, "already")
        assert_refused(http.post("/v1/devices", json={"device_id": "pump-8", "groups": ["nope"], "reason": "r"}),
                       422, "nope", "POST /v1/groups")
        assert_refused(http.post("/v1/devices", json={"device_id": "pump-8", "bases": ["0" * 64], "reason": "r"}),
                       422, "POST /v1/bases")
        assert_refused(http.get("/v1/devices/pump-99"), 404, "pump-99")
        assert_refused(http.patch("/v1/devices/pump-99", json={"tags": [], "reason": "r"}), 404)
        assert_refused(http.post("/v1/devices/pump-99/credential", json={"reason": "r"}), 404)
        assert snapshot(server) == before

        assert http.post("/v1/devices", json={"device_id": "pump-8", "groups": ["canary", "line-1"],
                                              "reason": "spare"}).status_code == 201
        assert [d["device_id"] for d in http.get("/v1/devices", params={"group": "canary"}).json()] == ["pump-8"]
        assert [d["device_id"] for d in http.get("/v1/devices", params={"tag": "site=berlin"}).json()] == ["pump-7"]
        assert [d["device_id"] for d in http.get("/v1/devices", params={"asset": ASSET}).json()] == ["pump-7"]
        page = http.get("/v1/devices", params={"limit": 1}).json()
        assert [d["device_id"] for d in page] == ["pump-7"]
        assert [d["device_id"] for d in http.get("/v1/devices", params={"after": "pump-7"}).json()] == ["pump-8"]
        groups = {g["name"]: g["devices"] for g in http.get("/v1/groups").json()}
        assert groups == {"canary": 1, "line-1": 2}

        updated = http.patch("/v1/devices/pump-7", json={"tags": ["site=paris"], "reason": "moved"})
        assert updated.json()["tags"] == ["site=paris"] and updated.json()["groups"] == ["line-1"]
        entries = http.get("/v1/audit", params={"target": "device:pump-7"}).json()
        assert entries[-1]["details"] == {"tags": {"before": ["hw:rev2", "site=berlin"], "after": ["site=paris"]}}

    # Only the credential's hash is stored.
    engine = create_engine(db_url)
    with engine.connect() as connection:
        stored = connection.execute(text("SELECT credential_hash FROM devices WHERE id = 'pump-7'")).scalar_one()
        dump = " ".join(str(row) for table in ("devices", "audit_log", "operator_tokens")
                        for row in connection.execute(text(f"SELECT * FROM {table}")))
    engine.dispose()
    assert stored == hashlib.sha256(credential.encode()).hexdigest()
    assert credential not in dump and server.token not in dump

    # The device's own endpoints, with its credential.
    with server.client(credential) as device_http:
        assert device_http.get("/v1/device/self").json()["device_id"] == "pump-7"
        assert_refused(device_http.get("/v1/devices"), 401)  # a device credential is not an operator token
        report = {"assets": [ASSET, "pump-2"], "bases": [base_sha256]}
        assert device_http.put("/v1/device/self/inventory", json=report).json()["assets"] == [ASSET, "pump-2"]
        count = len(snapshot(server)["/v1/audit"])
        assert device_http.put("/v1/device/self/inventory", json=report).status_code == 200
        assert len(snapshot(server)["/v1/audit"]) == count, "a report that changes nothing writes nothing"
        assert_refused(device_http.put("/v1/device/self/inventory", json={"assets": [], "bases": ["f" * 64]}), 422)
    with server.client() as http:
        assert_refused(http.get("/v1/device/self"), 401, "efd_")  # an operator token is not a device credential
        last = http.get("/v1/audit", params={"target": "device:pump-7"}).json()[-1]
        assert last["actor"] == "device:pump-7" and last["action"] == "device.report"
        rotated = http.post("/v1/devices/pump-7/credential", json={"reason": "lost the SD card"})
        assert rotated.status_code == 200
    with server.client(credential) as device_http:  # the old credential, replayed after rotation
        assert_refused(device_http.get("/v1/device/self"), 401, "replaced")
    with server.client(rotated.json()["credential"]) as device_http:
        assert device_http.get("/v1/device/self").status_code == 200


def test_bundle_catalogue(server: FleetServer, base_sha256: str, make_bundle: Callable[..., bytes],
                          keys: dict[str, Any]) -> None:
    good = make_bundle(version="1.0.0", release=1)
    with server.client() as http:
        def upload(data: bytes, reason: str | None = "release 1") -> Any:
            params = {} if reason is None else {"reason": reason}
            return http.post("/v1/bundles", params=params, content=data,
                             headers={"Content-Type": "application/octet-stream"})

        before = snapshot(server)
        assert_refused(upload(good), 400, "not registered", "POST /v1/bases")
        assert snapshot(server) == before
        assert http.post("/v1/bases", json={"name": "tiny", "sha256": base_sha256, "reason": "base"}
                         ).status_code == 201

        before = snapshot(server)
        tampered = bytearray(good)
        tampered[len(good) // 2] ^= 0x01
        refusals = {
            "untrusted signer": (make_bundle(version="9.0.0", release=9, key=keys["untrusted"]), "not trusted"),
            "tampered": (bytes(tampered), ""),
            "truncated": (good[:-10], "truncated"),
            "not a bundle": (b"PK\x03\x04" + b"\x00" * 200, "magic"),
            "unknown schema": (make_bundle(version="9.0.1", release=9, edit=lambda m: m.update(schema_version=2)),
                               "schema_version"),
            "expired": (make_bundle(version="9.0.2", release=9, edit=expired), "expired"),
        }
        for name, (data, words) in refusals.items():
            body = assert_refused(upload(data), 400, words)
            assert body["error"] == "BundleError", name
        assert_refused(upload(good, reason=None), 422, "reason")
        assert_refused(upload(good, reason="   "), 400, "reason")
        assert_refused(upload(good, reason="two\nlines"), 422, "reason")
        assert_refused(upload(b""), 400)
        assert snapshot(server) == before

        published = upload(good)
        assert published.status_code == 201, published.text
        record = published.json()
        sha = hashlib.sha256(good).hexdigest()
        assert record["sha256"] == sha and record["asset_id"] == ASSET and record["release"] == 1
        assert record["base_sha256"] == base_sha256 and record["uploaded_by"].startswith("operator:test-admin#")
        stored = server.storage / "bundles" / sha[:2] / f"{sha}.edelta"
        assert stored.read_bytes() == good
        assert http.get(f"/v1/bundles/{sha}/file").content == good
        assert http.get(f"/v1/bundles/{sha}").json() == record

        before = snapshot(server)
        assert_refused(upload(good), 409, "already in the catalogue")
        assert_refused(upload(make_bundle(version="1.0.0", release=2)), 409, "version 1.0.0")
        assert_refused(upload(make_bundle(version="1.1.0", release=1)), 409, "release 1")
        assert_refused(http.get(f"/v1/bundles/{'a' * 64}"), 404)
        assert_refused(http.get("/v1/bundles/not-a-hash"), 422)
        assert snapshot(server) == before

        assert upload(make_bundle(version="1.1.0", release=2), reason="release 2").status_code == 201
        assert upload(make_bundle(asset="pump-2", version="1.0.0", release=1)).status_code == 201
        assert [b["version"] for b in http.get("/v1/bundles", params={"asset_id": ASSET}).json()] == ["1.0.0", "1.1.0"]
        assert len(http.get("/v1/bundles").json()) == 3
        entry = http.get("/v1/audit", params={"target": f"bundle:{sha}"}).json()[0]
        assert entry["action"] == "bundle.publish" and entry["reason"] == "release 1"
        metrics = http.get("/metrics").text
    assert "edgepeft_fleet_bundles_published_total 3" in metrics and "edgepeft_fleet_bundles 3" in metrics


def test_audit_log_records_every_change_and_is_append_only(server: FleetServer, base_sha256: str,
                                                           db_url: str) -> None:
    _setup_registry(server, base_sha256)
    with server.client() as http:
        http.post("/v1/devices", json={"device_id": "pump-1", "reason": "first device"})
        entries = http.get("/v1/audit").json()
    actions = [e["action"] for e in entries]
    assert actions == ["token.create", "group.create", "group.create", "base.register", "device.enrol"]
    assert entries[0]["actor"].startswith("cli:") and entries[0]["reason"] == "bootstrap from the command line"
    assert all(e["actor"].startswith("operator:test-admin#") for e in entries[1:])
    assert entries[-1]["reason"] == "first device" and entries[-1]["target"] == "device:pump-1"
    assert [e["id"] for e in entries] == sorted(e["id"] for e in entries)
    with server.client() as http:
        assert [e["id"] for e in http.get("/v1/audit", params={"after_id": entries[2]["id"], "limit": 1}).json()
                ] == [entries[3]["id"]]

    engine = create_engine(db_url)
    try:
        for statement in ("UPDATE audit_log SET reason = 'nothing happened'", "DELETE FROM audit_log"):
            with pytest.raises(DBAPIError, match="append-only"), engine.begin() as connection:
                connection.execute(text(statement))
        with engine.connect() as connection:
            assert connection.execute(text("SELECT count(*) FROM audit_log")).scalar_one() == len(entries)
    finally:
        engine.dispose()


def test_bad_json_on_every_mutating_endpoint(server: FleetServer, base_sha256: str) -> None:
    _setup_registry(server, base_sha256)
    with server.client() as http:
        http.post("/v1/devices", json={"device_id": "pump-1", "reason": "r"})
    endpoints = [("POST", "/v1/tokens"), ("POST", "/v1/tokens/1/revoke"), ("POST", "/v1/bases"),
                 ("POST", "/v1/groups"), ("POST", "/v1/devices"), ("PATCH", "/v1/devices/pump-1"),
                 ("POST", "/v1/devices/pump-1/credential")]
    bodies: list[tuple[bytes, int, str]] = [
        (b'{"name": ', 400, "not valid JSON"),
        (b"[1, 2, 3]", 400, "JSON object"),
        (b'"just a string"', 400, "JSON object"),
        (b"", 422, "body is required"),
        (b"[" * 5000 + b"]" * 5000, 400, ""),
        (b'{"reason": 5}', 422, "reason"),
        (b'{"reason": "ok", "unexpected": 1}', 422, ""),
        (b'{"reason": "ok", "tags": "not-a-list", "name": 1, "scopes": 7, "sha256": 1, "device_id": []}', 422, ""),
        (b'{"reason": "ok\\u0000"}', 422, "reason"),
        (b'{"reason": "' + b"x" * 70_000 + b'"}', 413, "limit"),
    ]
    before = snapshot(server)
    with server.client() as http:
        for method, path in endpoints:
            for body, status, words in bodies:
                answer = http.request(method, path, content=body, headers={"Content-Type": "application/json"})
                assert_refused(answer, status, *([words] if words else []))
        # Wrong types and bad names per endpoint.
        assert_refused(http.post("/v1/devices", json={"device_id": "../etc", "reason": "r"}), 422, "device_id")
        assert_refused(http.post("/v1/devices", json={"device_id": "a" * 129, "reason": "r"}), 422)
        assert_refused(http.post("/v1/devices", json={"device_id": "d", "tags": ["ok", 3], "reason": "r"}), 422)
        assert_refused(http.post("/v1/devices", json={"device_id": "d", "tags": ["t"] * 101, "reason": "r"}), 422)
        assert_refused(http.post("/v1/bases", json={"name": "tiny", "sha256": "ABC", "reason": "r"}), 422, "sha256")
        assert_refused(http.post("/v1/tokens", json={"name": "n", "scopes": ["root"], "reason": "r"}), 422, "scopes")
        assert_refused(http.post("/v1/tokens", json={"name": "n", "scopes": [], "reason": "r"}), 422)
        assert_refused(http.patch("/v1/devices/pump-1", json={"reason": "r"}), 422, "nothing to change")
        assert_refused(http.post("/v1/groups", json={"name": "g", "reason": ""}), 422, "reason")
        assert_refused(http.post("/v1/groups", json={"name": "line-1", "reason": "again"}), 409, "exists")
        assert_refused(http.post("/v1/bases", json={"name": "t", "sha256": base_sha256, "reason": "x"}), 409)
        assert_refused(http.get("/v1/audit", params={"limit": 0}), 422, "limit")
        assert_refused(http.get("/v1/audit", params={"after_id": "x"}), 422, "after_id")
        assert_refused(http.post("/v1/tokens/abc/revoke", json={"reason": "r"}), 422)
        assert_refused(http.delete("/v1/devices/pump-1"), 405)
        assert_refused(http.get("/v1/nowhere"), 404)
        # A streamed (chunked) body over the limit is cut off as it arrives.
        chunks = (b'{"reason": "' + b"y" * 10_000 for _ in range(10))
        assert_refused(http.post("/v1/groups", content=chunks, headers={"Content-Type": "application/json"}), 413)
    assert snapshot(server) == before


def test_huge_declared_bundle_is_refused_before_it_is_read(server: FleetServer) -> None:
    """A Content-Length over the bundle limit gets its 413 at once: the server reads none of the body."""
    before = snapshot(server)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall((f"POST /v1/bundles?reason=big HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {server.token}\r\n"
                      "Content-Type: application/octet-stream\r\nContent-Length: 999999999999\r\n\r\n").encode())
        answer = b""
        while b"}" not in answer:  # headers and body may come in separate packets
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    text = answer.decode(errors="replace")
    assert text.startswith("HTTP/1.1 413") and "over the" in text
    assert snapshot(server) == before
