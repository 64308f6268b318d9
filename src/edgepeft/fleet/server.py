"""The fleet server's HTTP API: a thin FastAPI shell over :class:`~edgepeft.fleet.registry.Registry`.

Endpoints (OpenAPI at ``/docs`` and ``/openapi.json``). Operators send ``Authorization: Bearer efo_...`` with the
scope in brackets; devices send their own credential (``efd_...``). Every operator request that changes something
carries a ``reason`` (JSON field, or query parameter for the bundle upload) that goes to the audit log.

=======  ======================================  =========================================================  =======
GET      /health                                 liveness, database, schema revision, trusted keys          -
GET      /metrics                                Prometheus text                                            -
POST     /v1/tokens                              new operator token (shown once)                            admin
GET      /v1/tokens                              operator tokens (never their secrets)                      admin
POST     /v1/tokens/{token_id}/revoke            revoke a token                                             admin
POST     /v1/bases                               register a base by sha256                                  publish
GET      /v1/bases                               registered bases                                           read
POST     /v1/groups                              create a device group                                      deploy
GET      /v1/groups                              groups and their sizes                                     read
POST     /v1/devices                             enrol a device: its credential, shown once                 deploy
GET      /v1/devices                             devices (filter by tag, group, asset; page with after)     read
GET      /v1/devices/{device_id}                 one device                                                 read
PATCH    /v1/devices/{device_id}                 replace its tags, groups, assets or bases                  deploy
POST     /v1/devices/{device_id}/credential      issue a new credential; the old one stops working          deploy
POST     /v1/bundles?reason=...                  upload a signed .edelta (raw body); verified, then stored  publish
GET      /v1/bundles                             the catalogue (filter by asset)                            read
GET      /v1/bundles/{sha256}                    one bundle's record                                        read
GET      /v1/bundles/{sha256}/file               the .edelta file                                           read
GET      /v1/audit                               the audit log, oldest first (page with after_id)           read
GET      /v1/device/self                         the calling device's record                                device
PUT      /v1/device/self/inventory               the device reports its assets and bases                    device
=======  ======================================  =========================================================  =======

Bad input never writes anything and is answered with a 4xx and one JSON line, ``{"error": TYPE, "detail": WHAT
AND WHAT TO DO}``: malformed JSON 400, wrong types or fields 422, missing or unknown credential 401, missing scope
403, unknown resource 404, duplicate 409, body over the limit 413. Plain HTTP carries tokens in clear: bind to
127.0.0.1 (the default) unless a TLS proxy fronts the server.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import anyio
from fastapi import Depends, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

from edgepeft.core.errors import ArtifactError, ConfigError, EdgePeftError, OutputError
from edgepeft.delta.bundle import MAX_BUNDLE_BYTES
from edgepeft.delta.errors import BundleError
from edgepeft.delta.keys import key_id
from edgepeft.fleet import schemas as s
from edgepeft.fleet.errors import FleetError, InvalidRequest, Unauthenticated
from edgepeft.fleet.registry import Operator, Registry
from edgepeft.runtime.metrics import Metrics, MetricsMiddleware

log = logging.getLogger("edgepeft.fleet")

# A JSON request here is a few names and a reason; 64 KiB is generous and keeps a flood of huge bodies cheap.
DEFAULT_MAX_JSON_BYTES = 64 * 1024
BUNDLE_ROUTE = "/v1/bundles"
FLEET_COUNTERS = (
    ("changes", "edgepeft_fleet_changes_total", "Changes written (each with its audit entry)."),
    ("bundles_published", "edgepeft_fleet_bundles_published_total", "Bundles accepted into the catalogue."),
    ("bundles_rejected", "edgepeft_fleet_bundles_rejected_total", "Bundle uploads refused (signature, schema, "
     "base, duplicate, size)."),
    ("auth_failures", "edgepeft_fleet_auth_failures_total", "Requests refused for a missing, unknown or "
     "insufficient credential."),
)
_STATUS_NAMES = {400: "InvalidRequest", 401: "Unauthenticated", 403: "Forbidden", 404: "NotFound",
                 405: "MethodNotAllowed", 409: "Conflict", 413: "TooLarge", 415: "UnsupportedMediaType",
                 422: "InvalidRequest"}


def error_status(exc: EdgePeftError) -> int:
    if isinstance(exc, FleetError):
        return exc.status
    if isinstance(exc, BundleError | ConfigError):
        return 400  # a bundle the delta layer refuses, a bad scope name
    if isinstance(exc, ArtifactError | OutputError):
        return 503  # the server's own storage failed, not the request
    return 400


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` entry documenting these error statuses (one-line `ErrorOut` bodies)."""
    text = {400: "Malformed request or rejected bundle", 401: "Missing, unknown or replaced credential",
            403: "Credential lacks the scope", 404: "Unknown resource", 409: "Duplicate or conflicting change",
            413: "Body over the size limit", 422: "Wrong types or fields, or an unknown reference"}
    return {code: {"model": s.ErrorOut, "description": text[code]} for code in codes}


class BodyLimit:
    """ASGI middleware: refuse bodies over the limit with 413, by Content-Length when declared and by counting
    when streamed (chunked), before the application holds them in memory."""

    def __init__(self, app: Any, limit_for: Callable[[str, str], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["method"], scope["path"])
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await _send_json(send, 413, "TooLarge", f"body of {declared.decode(errors='replace')[:20]} bytes is "
                             f"over the {limit:,}-byte limit of this endpoint")
            return
        received = 0

        async def limited() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # HTTPException passes through FastAPI's body parsing untouched (anything else becomes a 400).
                    raise HTTPException(413, f"body is over the {limit:,}-byte limit of this endpoint")
            return message

        await self.app(scope, limited, send)


async def _send_json(send: Any, status: int, error: str, detail: str) -> None:
    response = JSONResponse({"error": error, "detail": detail}, status_code=status)
    await send({"type": "http.response.start", "status": status, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _field(part: object) -> str:
    text = str(part)
    return text if text.isprintable() and text.strip() == text and text else repr(text)[:80]


def _validation_message(exc: RequestValidationError) -> tuple[int, str]:
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return 400, f"body is not valid JSON ({_one_line(first.get('ctx', {}).get('error', 'parse error'))}); send " \
                    "a JSON object with Content-Type: application/json"
    if tuple(first.get("loc", ())) == ("body",) and first.get("type") in ("model_attributes_type", "dict_type"):
        # Also what a form-encoded body (curl -d without a Content-Type) turns into.
        return 400, "the body must be a JSON object sent with Content-Type: application/json; see /docs"
    if first.get("type") == "missing" and tuple(first.get("loc", ())) == ("body",):
        return 422, "a JSON body is required; see /docs for this endpoint's schema"
    # A field name is the client's text: escaped (a key "\n" must not break the one-line message).
    problems = [f"{'.'.join(_field(part) for part in error.get('loc', ())) or 'request'}: "
                f"{_one_line(error.get('msg', 'invalid'))[:200]}" for error in errors[:3]]
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return 422, f"invalid request: {'; '.join(problems)}{more}; see /docs for this endpoint's schema"


@dataclass(frozen=True)
class ApiContext:
    """What a feature module needs to add its routes to the app (:data:`Mount`): the registry, the metrics, and
    the authentication dependencies. ``operator(scope)`` is a ``Depends`` that yields the :class:`Operator`
    holding ``scope``; ``device`` is a dependency callable yielding the calling device's id (use
    ``Depends(ctx.device)``); ``changed(result)`` counts a change and returns ``result``."""

    registry: Registry
    metrics: Metrics
    operator: Callable[[str], Any]
    device: Callable[..., str]
    changed: Callable[[Any], Any]


# A feature (distribution, rollouts, console) adds its routes with one of these; ``create_app(mounts=...)``.
Mount = Callable[[FastAPI, ApiContext], None]


def create_app(registry: Registry, *, max_json_bytes: int = DEFAULT_MAX_JSON_BYTES,
               mounts: Sequence[Mount] = ()) -> FastAPI:
    """The FastAPI application serving ``registry``, with the routes each of ``mounts`` adds.

    Example:
        >>> import tempfile
        >>> from edgepeft.fleet.db import Database
        >>> from edgepeft.fleet.storage import BundleStore
        >>> root = tempfile.mkdtemp()
        >>> app = create_app(Registry(Database.open(f"sqlite:///{root}/f.db"), BundleStore(root), []))
        >>> "/v1/devices" in app.openapi()["paths"]
        True
    """
    app = FastAPI(
        title="edgepeft fleet server",
        version="1",
        description="Registry of devices, bases and signed adapter bundles, with an append-only audit log. "
        "Operators authenticate with `Authorization: Bearer efo_...` (scopes read, publish, deploy, admin); "
        "devices with their own credential.",
    )
    metrics = Metrics(FLEET_COUNTERS, swap_histogram=False)
    _register_gauges(metrics, registry)

    def limit_for(method: str, path: str) -> int:
        return MAX_BUNDLE_BYTES if method == "POST" and path == BUNDLE_ROUTE else max_json_bytes

    # Added last = outermost: the size limit applies before anything reads the body, and metrics see every answer.
    app.add_middleware(BodyLimit, limit_for=limit_for)
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    @app.exception_handler(EdgePeftError)
    async def edgepeft_error(request: Request, exc: EdgePeftError) -> JSONResponse:
        status = error_status(exc)
        if status in (401, 403):
            metrics.count("auth_failures")
        if request.url.path == BUNDLE_ROUTE and request.method == "POST" and status < 500:
            metrics.count("bundles_rejected")
        if status >= 500:
            log.error("storage failure on %s %s: %s", request.method, request.url.path, exc)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return JSONResponse({"error": type(exc).__name__, "detail": _one_line(str(exc))}, status_code=status,
                            headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        status, detail = _validation_message(exc)
        return JSONResponse({"error": "InvalidRequest", "detail": detail}, status_code=status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 413 and request.url.path == BUNDLE_ROUTE:
            metrics.count("bundles_rejected")
        detail = exc.detail if isinstance(exc.detail, str) else "request refused"
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no endpoint {request.method} {request.url.path}; see /docs"
        elif exc.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path}; see /docs"
        return JSONResponse({"error": _STATUS_NAMES.get(exc.status_code, "HTTPError"), "detail": _one_line(detail)},
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse({"error": "InternalError", "detail": f"unexpected {type(exc).__name__}; the server log "
                             "has the details"}, status_code=500)

    bearer = HTTPBearer(auto_error=False, description="An operator token (efo_...) or a device credential (efd_...).")

    def _secret(credentials: HTTPAuthorizationCredentials | None) -> str:
        if credentials is None:
            raise Unauthenticated("this endpoint needs `Authorization: Bearer <token>`")
        return credentials.credentials

    def operator(scope: str) -> Any:
        def require(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Operator:
            who = registry.authenticate_operator(_secret(credentials))
            who.require(scope)
            return who

        return Depends(require)

    def device(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> str:
        return registry.authenticate_device(_secret(credentials))

    def changed(result: Any) -> Any:
        metrics.count("changes")
        return result

    # ------------------------------------------------------------------------------------------- service
    @app.get("/health", tags=["service"], summary="Liveness, database and schema revision")
    def health() -> JSONResponse:
        try:
            report = {"status": "ok", "database": registry.db.dialect, "schema_revision": registry.db.revision(),
                      "trusted_keys": sorted(key_id(k) for k in registry.trusted_keys), **registry.counts()}
            return JSONResponse(report)
        except Exception as exc:  # noqa: BLE001 - a health check reports, it does not crash
            return JSONResponse({"status": "unavailable", "detail": _one_line(f"{type(exc).__name__}: {exc}")[:300]},
                                status_code=503)

    @app.get("/metrics", tags=["service"], summary="Prometheus metrics", response_class=PlainTextResponse)
    def prometheus() -> PlainTextResponse:
        """Requests, errors and latency by route; changes, bundles published and refused, auth failures; rows."""
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    # ------------------------------------------------------------------------------------------- tokens
    @app.post("/v1/tokens", tags=["tokens"], status_code=201, response_model=s.NewToken,
              summary="Create an operator token (shown once)", responses=error_responses(400, 401, 403, 413, 422))
    def create_token(body: s.TokenRequest, who: Operator = operator("admin")) -> dict[str, Any]:
        record, token = registry.create_token(body.name, body.scopes, actor=who.actor, reason=body.reason)
        return changed({"token": token, "record": record})

    @app.get("/v1/tokens", tags=["tokens"], response_model=list[s.TokenOut], summary="Operator tokens",
             responses=error_responses(401, 403))
    def list_tokens(who: Operator = operator("admin")) -> list[dict[str, Any]]:
        return registry.list_tokens()

    @app.post("/v1/tokens/{token_id}/revoke", tags=["tokens"], response_model=s.TokenOut, summary="Revoke a token",
              responses=error_responses(400, 401, 403, 404, 409, 413, 422))
    def revoke_token(token_id: Annotated[int, PathParam(ge=1, le=2**62)], body: s.ReasonRequest,
                     who: Operator = operator("admin")) -> dict[str, Any]:
        return changed(registry.revoke_token(token_id, actor=who.actor, reason=body.reason))

    # ------------------------------------------------------------------------------------------- bases, groups
    @app.post("/v1/bases", tags=["registry"], status_code=201, response_model=s.BaseOut,
              summary="Register a base model by sha256", responses=error_responses(400, 401, 403, 409, 413, 422))
    def register_base(body: s.BaseRequest, who: Operator = operator("publish")) -> dict[str, Any]:
        return changed(registry.register_base(body.name, body.sha256, actor=who.actor, reason=body.reason))

    @app.get("/v1/bases", tags=["registry"], response_model=list[s.BaseOut], summary="Registered bases",
             responses=error_responses(401, 403))
    def list_bases(who: Operator = operator("read")) -> list[dict[str, Any]]:
        return registry.list_bases()

    @app.post("/v1/groups", tags=["registry"], status_code=201, response_model=s.GroupOut,
              summary="Create a device group", responses=error_responses(400, 401, 403, 409, 413, 422))
    def create_group(body: s.GroupRequest, who: Operator = operator("deploy")) -> dict[str, Any]:
        return changed(registry.create_group(body.name, body.description, actor=who.actor, reason=body.reason))

    @app.get("/v1/groups", tags=["registry"], response_model=list[s.GroupOut], summary="Groups and their sizes",
             responses=error_responses(401, 403))
    def list_groups(who: Operator = operator("read")) -> list[dict[str, Any]]:
        return registry.list_groups()

    # ------------------------------------------------------------------------------------------- devices
    @app.post("/v1/devices", tags=["devices"], status_code=201, response_model=s.Enrolled,
              summary="Enrol a device; its credential is shown once",
              responses=error_responses(400, 401, 403, 409, 413, 422))
    def enrol(body: s.EnrolRequest, who: Operator = operator("deploy")) -> dict[str, Any]:
        record, credential = registry.enrol_device(body.device_id, tags=body.tags, groups=body.groups,
                                                   assets=body.assets, bases=body.bases, actor=who.actor,
                                                   reason=body.reason)
        return changed({"credential": credential, "device": record})

    @app.get("/v1/devices", tags=["devices"], response_model=list[s.DeviceOut], summary="Devices",
             responses=error_responses(401, 403, 422))
    def list_devices(
        who: Operator = operator("read"),
        tag: Annotated[str | None, Query(max_length=128)] = None,
        group: Annotated[str | None, Query(max_length=128)] = None,
        asset: Annotated[str | None, Query(max_length=128)] = None,
        after: Annotated[str | None, Query(max_length=128, description="Last device id of the previous page.")
                         ] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> list[dict[str, Any]]:
        return registry.list_devices(tag=tag, group=group, asset=asset, after=after, limit=limit)

    @app.get("/v1/devices/{device_id}", tags=["devices"], response_model=s.DeviceOut, summary="One device",
             responses=error_responses(401, 403, 404))
    def get_device(device_id: str, who: Operator = operator("read")) -> dict[str, Any]:
        return registry.get_device(device_id)

    @app.patch("/v1/devices/{device_id}", tags=["devices"], response_model=s.DeviceOut,
               summary="Replace a device's tags, groups, assets or bases",
               responses=error_responses(400, 401, 403, 404, 409, 413, 422))
    def update_device(device_id: str, body: s.DeviceUpdate, who: Operator = operator("deploy")) -> dict[str, Any]:
        return changed(registry.update_device(device_id, tags=body.tags, groups=body.groups, assets=body.assets,
                                              bases=body.bases, actor=who.actor, reason=body.reason))

    @app.post("/v1/devices/{device_id}/credential", tags=["devices"], response_model=s.Enrolled,
              summary="Issue a new device credential; the old one stops working",
              responses=error_responses(400, 401, 403, 404, 409, 413, 422))
    def rotate(device_id: str, body: s.ReasonRequest, who: Operator = operator("deploy")) -> dict[str, Any]:
        record, credential = registry.rotate_credential(device_id, actor=who.actor, reason=body.reason)
        return changed({"credential": credential, "device": record})

    # ------------------------------------------------------------------------------------------- bundles
    @app.post(
        BUNDLE_ROUTE, tags=["bundles"], status_code=201, response_model=s.BundleOut,
        summary="Upload a signed .edelta bundle", responses=error_responses(400, 401, 403, 409, 413, 422),
        openapi_extra={"requestBody": {"required": True, "description": "The .edelta file, as is.",
                                       "content": {"application/octet-stream": {"schema": {
                                           "type": "string", "format": "binary"}}}}},
    )
    async def publish(
        request: Request,
        reason: Annotated[str, Query(min_length=1, max_length=1000, pattern="^[^\\x00-\\x1f\\x7f]+$",
                                     description="Why: one line, written to the audit log.")],
        who: Operator = operator("publish"),
    ) -> dict[str, Any]:
        """Verified as a device would (a trusted key's signature, structure, manifest schema, payload hash, expiry)
        and against the registry (its base registered, no other bundle of the asset with its version or
        release); then stored under its sha256 and catalogued. A refused upload stores nothing."""
        if not reason.strip():  # the same rule as a JSON reason
            raise InvalidRequest("invalid request at query.reason: must say something, not only spaces")
        data = await request.body()
        # Verification hashes and checks a signature over up to 64 MiB: off the event loop.
        record = await anyio.to_thread.run_sync(lambda: registry.publish_bundle(data, actor=who.actor,
                                                                                reason=reason))
        metrics.count("bundles_published")
        return changed(record)

    @app.get(BUNDLE_ROUTE, tags=["bundles"], response_model=list[s.BundleOut], summary="The bundle catalogue",
             responses=error_responses(401, 403, 422))
    def list_bundles(
        who: Operator = operator("read"),
        asset_id: Annotated[str | None, Query(max_length=128)] = None,
        offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> list[dict[str, Any]]:
        return registry.list_bundles(asset_id=asset_id, offset=offset, limit=limit)

    @app.get(BUNDLE_ROUTE + "/{sha256}", tags=["bundles"], response_model=s.BundleOut, summary="One bundle",
             responses=error_responses(401, 403, 404, 422))
    def get_bundle(sha256: Annotated[str, PathParam(pattern=s.SHA256_PATTERN)],
                   who: Operator = operator("read")) -> dict[str, Any]:
        return registry.get_bundle(sha256)

    @app.get(BUNDLE_ROUTE + "/{sha256}/file", tags=["bundles"], summary="Download a bundle file",
             responses={200: {"content": {"application/octet-stream": {}}}, **error_responses(401, 403, 404, 422)})
    def bundle_file(sha256: Annotated[str, PathParam(pattern=s.SHA256_PATTERN)],
                    who: Operator = operator("read")) -> Response:
        return Response(registry.bundle_file(sha256), media_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="{sha256}.edelta"'})

    # ------------------------------------------------------------------------------------------- audit
    @app.get("/v1/audit", tags=["audit"], response_model=list[s.AuditOut], summary="The audit log, oldest first",
             responses=error_responses(401, 403, 422))
    def audit(
        who: Operator = operator("read"),
        after_id: Annotated[int, Query(ge=0, le=2**62, description="Last id of the previous page.")] = 0,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        target: Annotated[str | None, Query(max_length=256, description="e.g. device:pump-7")] = None,
    ) -> list[dict[str, Any]]:
        return registry.audit(after_id=after_id, limit=limit, target=target)

    # ------------------------------------------------------------------------------------------- devices' own
    @app.get("/v1/device/self", tags=["device"], response_model=s.DeviceOut, summary="The calling device",
             responses=error_responses(401))
    def device_self(device_id: str = Depends(device)) -> dict[str, Any]:
        return registry.get_device(device_id)

    @app.put("/v1/device/self/inventory", tags=["device"], response_model=s.DeviceOut,
             summary="Report the assets and bases this device runs", responses=error_responses(400, 401, 413, 422))
    def report(body: s.InventoryReport, device_id: str = Depends(device)) -> dict[str, Any]:
        """Replaces the device's assets and bases in the registry (bases must be registered); a report that
        changes nothing writes nothing."""
        return registry.update_device(device_id, assets=body.assets, bases=body.bases, actor=f"device:{device_id}",
                                      reason="reported by the device", action="device.report")

    context = ApiContext(registry=registry, metrics=metrics, operator=operator, device=device, changed=changed)
    for mount in mounts:
        mount(app, context)
    return app


def _register_gauges(metrics: Metrics, registry: Registry) -> None:
    """Row counts as gauges, read from the database at most once a second whatever the scrape rate."""
    cache: dict[str, Any] = {"at": -1.0, "counts": {}}

    def read(kind: str) -> Callable[[], float]:
        def value() -> float:
            if time.monotonic() - cache["at"] > 1.0:
                cache["counts"], cache["at"] = registry.counts(), time.monotonic()
            return float(cache["counts"].get(kind, 0))

        return value

    for kind, text in (("devices", "Enrolled devices."), ("bundles", "Bundles in the catalogue."),
                       ("bases", "Registered bases."), ("groups", "Device groups."),
                       ("audit_entries", "Entries in the audit log.")):
        metrics.gauge(f"edgepeft_fleet_{kind}", text, read(kind))
