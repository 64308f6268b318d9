"""Property tests against a live fleet server.

1. Hypothesis sends arbitrary JSON documents to every endpoint that changes something (on SQLite and PostgreSQL):
   never a 5xx; a 4xx is one JSON line and writes nothing; a 2xx writes exactly its one audit entry (at most one
   where an unchanged device is a no-op). Every change appends an audit entry in the same transaction, so the
   audit log's length is the registry's write counter.
2. Schemathesis generates requests from the server's own OpenAPI document (valid and invalid ones) for every
   operation and checks the answers against it: status codes and bodies as documented, no server errors.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable

from tests.unit.fleet.conftest import BACKENDS, FleetServer

FIELDS = ["name", "scopes", "reason", "sha256", "description", "device_id", "tags", "groups", "assets", "bases"]
SCALARS = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40)
           | st.sampled_from(["read", "admin", "deploy", "ok", "pump-1", "line-1", "spare", "", " ", "a" * 129,
                              "0" * 64, "x\ny"]))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=5)
                    | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), inner, max_size=6),
                    max_leaves=25)
# Valid-looking documents too, so the 2xx branch is exercised, not only refusals.
DOCUMENTS = JSON | st.fixed_dictionaries(
    {"reason": st.sampled_from(["why not", "", "two\nlines", 3])},
    optional={"name": st.sampled_from(["fuzz-1", "line-1", "bad name"]), "scopes": st.sampled_from([["read"], []]),
              "device_id": st.sampled_from(["fuzz-dev", "pump-1", "../x"]), "tags": st.lists(st.text(max_size=5)),
              "groups": st.sampled_from([["line-1"], ["missing"]]), "sha256": st.sampled_from(["0" * 64, "ABC"]),
              "assets": st.lists(st.sampled_from(["a1", "a 2"]), max_size=2), "bases": st.just([]),
              "group": st.sampled_from(["line-1", "nope"]), "bundle": st.sampled_from(["0" * 64, "x"]),
              "strategy": st.sampled_from([{}, {"waves": [50]}, {"canary": -1}]),
              "events": st.sampled_from([[], [{"kind": "error"}]])})
ENDPOINTS = [("POST", "/v1/tokens"), ("POST", "/v1/tokens/999999/revoke"), ("POST", "/v1/bases"),
             ("POST", "/v1/groups"), ("POST", "/v1/devices"), ("PATCH", "/v1/devices/pump-1"),
             ("POST", "/v1/devices/spare/credential"), ("PUT", "/v1/device/self/inventory"),
             ("POST", "/v1/rollouts"), ("POST", "/v1/rollouts/1/pause"), ("POST", "/v1/device/self/report")]
# A device's report is telemetry, not an operator's change: it writes no audit entry.
NO_OP_ALLOWED = {"/v1/devices/pump-1", "/v1/device/self/inventory", "/v1/device/self/report"}


@pytest.fixture(scope="module", params=BACKENDS)
def fuzz_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                keys: dict[str, Any]) -> Iterator[tuple[FleetServer, str]]:
    """One server per backend for the whole module, with a group, two devices and the reporting device's
    credential."""
    root = tmp_path_factory.mktemp(f"fuzz-{request.param}")
    url = (f"sqlite:///{root / 'fleet.db'}" if request.param == "sqlite"
           else request.getfixturevalue("postgres").create_database())
    with FleetServer(state_dir=root / "fleet", db=url, trusted_keys=(keys["public"],), startup_s=60.0) as fleet:
        with fleet.client() as http:
            http.post("/v1/groups", json={"name": "line-1", "reason": "fuzz"}).raise_for_status()
            credential = http.post("/v1/devices", json={"device_id": "pump-1", "reason": "fuzz"}).json()["credential"]
            http.post("/v1/devices", json={"device_id": "spare", "reason": "fuzz"}).raise_for_status()
        yield fleet, credential


@pytest.mark.parametrize("method, path", ENDPOINTS)
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(document=DOCUMENTS)
@example(document={"\n": None})  # a field name with a newline once broke the one-line message
def test_any_json_is_answered_cleanly_and_refusals_write_nothing(
    fuzz_server: tuple[FleetServer, str], method: str, path: str, document: Any
) -> None:
    fleet, device_credential = fuzz_server
    token = device_credential if path.startswith("/v1/device/") else fleet.token
    with fleet.client() as admin, fleet.client(token) as http:
        last = admin.get("/v1/audit", params={"after_id": 0, "limit": 1000}).json()
        after_id = last[-1]["id"] if last else 0
        files = sorted(fleet.storage.rglob("*"))
        answer = http.request(method, path, content=json.dumps(document),
                              headers={"Content-Type": "application/json"})
        written = admin.get("/v1/audit", params={"after_id": after_id}).json()
    assert answer.status_code < 500, answer.text
    if answer.status_code >= 400:
        body = answer.json()
        assert set(body) == {"error", "detail"} and "\n" not in body["detail"], body
        assert written == [], f"a refused request ({answer.status_code}) wrote {written}"
        assert sorted(fleet.storage.rglob("*")) == files
    else:
        assert len(written) == 1 or (path in NO_OP_ALLOWED and written == []), written


schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed: pip install "
                                   "'edgepeft[dev]'")


@pytest.fixture(scope="module")
def openapi(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, Any]) -> Iterator[tuple[Any, FleetServer]]:
    """The schema as the live SQLite server publishes it."""
    root: Path = tmp_path_factory.mktemp("openapi")
    with FleetServer(state_dir=root / "fleet", db=f"sqlite:///{root / 'fleet.db'}", trusted_keys=(keys["public"],),
                     startup_s=60.0) as fleet:
        yield schemathesis.openapi.from_url(f"{fleet.url}/openapi.json"), fleet


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_openapi_conformance(openapi: tuple[Any, FleetServer], mode: str) -> None:
    """Every operation, with schema-valid (positive) and schema-violating (negative) requests, as the admin.

    schemathesis' own pytest plugin does not load under pytest 9 (its lazy fixture schema needs pytest internals
    that changed), so the operations are walked here and each one's strategy is run with hypothesis directly.
    """
    from schemathesis.generation.modes import GenerationMode

    schema, fleet = openapi
    auth = {"Authorization": f"Bearer {fleet.token}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20
    calls: dict[str, int] = {}
    for operation in operations:
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy(generation_mode=GenerationMode(mode)))
        def check(case: Any) -> None:
            calls[case.operation.label] = calls.get(case.operation.label, 0) + 1
            case.call_and_validate(base_url=fleet.url, headers=auth)

        try:
            check()
        except Unsatisfiable:
            # An operation with no parameters and no body (GET /health) has no schema-violating request.
            assert mode == "negative" and not operation.body and not operation.query, operation.label
    assert sum(calls.values()) >= 3 * len(operations) // (2 if mode == "negative" else 1), calls
