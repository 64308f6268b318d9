"""The device HTTP API: a thin FastAPI shell over :class:`~edgepeft.runtime.service.DeviceRuntime`.

Endpoints (OpenAPI at ``/docs`` and ``/openapi.json``; writes need ``Authorization: Bearer <token>``):

=======  ==================================  ======================================================================
GET      /health                             liveness, base hash check, cache numbers
GET      /metrics                            Prometheus text: requests, errors, latency histogram, swaps, cache
GET      /v1/assets                          every asset: active version, installed versions, rollback target
GET      /v1/assets/{asset_id}               one asset
GET      /v1/assets/{asset_id}/stats         per version health in this process: rows, alerts, score quantiles
POST     /v1/assets/{asset_id}/score         score a batch of rows -> score, p_anomaly, anomaly per row + version
POST     /v1/bundles                         install a signed ``.edelta`` bundle (raw bytes body)     [token]
POST     /v1/assets/{asset_id}/activate      make an installed version active                          [token]
POST     /v1/assets/{asset_id}/rollback      re-activate the previously active version                 [token]
=======  ==================================  ======================================================================

Scoring is stateless: each request's rows are scored as one causal series (row t sees rows <= t of the
request), so send the history a row needs along with it (a window, e.g. 64 rows for the tiny base).

The token comes from ``--token-file``, else the ``EDGEPEFT_TOKEN`` variable, else ``STATE/token`` (generated,
mode 0600, on first start); it is compared in constant time. Bind to 127.0.0.1 (the default) unless a
reverse proxy with TLS sits in front: the token travels in clear over plain HTTP.
"""

from __future__ import annotations

import functools
import hmac
import json
import os
import secrets
from pathlib import Path
from typing import Annotated, Any

import anyio
import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field, ValidationError

from edgepeft.core.errors import ArtifactError, ConfigError, DataError, EdgePeftError, ModelError, OutputError
from edgepeft.runtime.metrics import MetricsMiddleware
from edgepeft.runtime.service import DeviceRuntime
from edgepeft.runtime.state import TOKEN_FILE, ConflictError, DamagedVersionError, UnknownAssetError

TOKEN_ENV = "EDGEPEFT_TOKEN"
MIN_TOKEN_CHARS = 16
# A scoring request is a window or a few of them; a million rows would be a mistake (or an attack) that
# should not take the device's memory with it.
MAX_ROWS_PER_REQUEST = 100_000


# ---------------------------------------------------------------------------------------------- schemas
class ScoreRequest(BaseModel):
    """Rows to score, oldest first."""

    rows: list[list[float]] = Field(
        ..., description="Rows x channels, oldest first, in the channel order the adapter was trained on "
        "(or name them in `columns`).", examples=[[[0.1, 1.2, 3.0], [0.2, 1.1, 2.9]]],
    )
    columns: list[str] | None = Field(
        None, description="Channel names of the row values, to reorder them to the adapter's channels.",
    )


class ScoreResponse(BaseModel):
    """One score, probability and flag per input row, and the adapter version that produced all of them."""

    asset_id: str
    version: str = Field(..., description="Adapter version that produced every number in this answer.")
    release: int
    engine: str = Field(..., description="torch or onnx")
    threshold: float = Field(..., description="A row is anomalous when its score exceeds this.")
    score: list[float] = Field(..., description="Anomaly score per row (higher = more anomalous).")
    p_anomaly: list[float] = Field(..., description="Alarm odds per row: near 0 on ordinary normal rows, 0.5 at "
                                   "the threshold, >= 0.5 where a row is flagged; rises with the score.")
    anomaly: list[int] = Field(..., description="1 where score > threshold (the first rows of a request, with "
                               "too little history, are never flagged), else 0.")
    top_channels: list[str] = Field(..., description="Per flagged row, its strongest sensors with the kind of "
                                    "evidence, e.g. 'flow:relation;vib_rms:scale'; empty on unflagged rows.")


class ActivateRequest(BaseModel):
    version: str = Field(..., description="An installed version of the asset.")


class ErrorResponse(BaseModel):
    error: str = Field(..., description="Error type, e.g. BundleError.")
    detail: str = Field(..., description="What went wrong and what to do next.")


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in ((400, "Invalid request or rejected bundle"), (401, "Missing or wrong token"),
                       (404, "Unknown asset or version"), (409, "Conflicts with the device state"),
                       (413, "Body too large"), (422, "Data or adapter unusable"))
}


# ---------------------------------------------------------------------------------------------- auth
def resolve_token(token_file: str | Path | None, state_dir: str | Path) -> tuple[str, str]:
    """The write token and where it came from: ``token_file``, else $EDGEPEFT_TOKEN, else STATE/token.

    STATE/token is created with a random token (mode 0600) when none exists, so a device is never left with
    writes open; an operator reads it from there.
    """
    if token_file is not None:
        path = Path(token_file)
        try:
            token, source = path.read_text().strip(), str(path)
        except OSError as exc:
            raise ConfigError(f"cannot read token file {path} ({exc.strerror or exc})") from exc
    elif os.environ.get(TOKEN_ENV):
        token, source = os.environ[TOKEN_ENV].strip(), f"${TOKEN_ENV}"
    else:
        path = Path(state_dir) / TOKEN_FILE
        if not path.exists():
            from edgepeft.core.config import atomic_write_bytes

            atomic_write_bytes(path, (secrets.token_urlsafe(32) + "\n").encode())  # mkstemp: created 0600
            os.chmod(path, 0o600)
        token, source = path.read_text().strip(), str(path)
    if len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(f"the token from {source} has {len(token)} characters; use at least {MIN_TOKEN_CHARS} "
                          "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
    return token, source


class Unauthorized(EdgePeftError):
    """A write request without the right token (HTTP 401)."""


def _auth_dependency(token: str) -> Any:
    bearer = HTTPBearer(auto_error=False, description="The device's write token.")
    expected = token.encode()

    # A default-value dependency, not Annotated: the annotation is a string here (postponed evaluation) and could
    # not see this closure's ``bearer``. Async, so the check runs on the event loop instead of waiting for a worker
    # thread behind the scoring requests.
    async def require_token(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        given = credentials.credentials.encode() if credentials is not None else b""
        # compare_digest: the time taken does not reveal how many leading characters were right.
        if not hmac.compare_digest(given, expected):
            raise Unauthorized("this endpoint needs `Authorization: Bearer <token>` with the device's token "
                               "(see --token-file / $EDGEPEFT_TOKEN / STATE/token)")

    return require_token


# ---------------------------------------------------------------------------------------------- errors
def _status(exc: EdgePeftError) -> int:
    from edgepeft.delta import BundleError

    if isinstance(exc, Unauthorized):
        return 401
    if isinstance(exc, UnknownAssetError):
        return 404
    if isinstance(exc, ConflictError):
        return 409
    if isinstance(exc, BundleError):
        return 400
    if isinstance(exc, DamagedVersionError):
        return 503  # this device's storage failed for that version, not the request
    if isinstance(exc, DataError | ModelError | ArtifactError):
        return 422
    if isinstance(exc, ConfigError):
        return 400
    if isinstance(exc, OutputError):
        return 500
    return 400


# ---------------------------------------------------------------------------------------------- app
def create_app(runtime: DeviceRuntime, token: str) -> FastAPI:
    """The FastAPI application serving ``runtime``; writes require ``token``."""
    from edgepeft.delta.bundle import MAX_BUNDLE_BYTES

    app = FastAPI(
        title="edgepeft device runtime",
        version="1",
        description="Per-asset anomaly scoring with hot-swappable PEFT adapters on one resident base model. "
        "Write endpoints need `Authorization: Bearer <token>`.",
    )
    app.add_middleware(MetricsMiddleware, metrics=runtime.metrics)
    authorized = [Depends(_auth_dependency(token))]
    # Writes get their own worker threads: on the shared pool an activation would queue behind dozens of scoring
    # requests under load, and the swap latency would be the queue's length, not the swap's.
    writers = anyio.CapacityLimiter(2)
    # Scoring runs on `scoring_workers` threads (default 1), not the shared pool's 40: a small model spends most of
    # a request in Python, so concurrent scoring threads mostly take turns on the interpreter lock and every
    # request slows down (see `edgepeft bench deploy`'s load test); requests beyond the workers wait in the
    # event loop.
    scorers = anyio.CapacityLimiter(runtime.config.scoring_workers)

    @app.exception_handler(EdgePeftError)
    async def edgepeft_error(request: Request, exc: EdgePeftError) -> JSONResponse:
        status = _status(exc)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return JSONResponse({"error": type(exc).__name__, "detail": str(exc)}, status_code=status, headers=headers)

    @app.get("/health", tags=["device"], summary="Liveness and base integrity", responses={503: {
        "description": "The resident base no longer hashes to what was loaded: restart the runtime"}})
    def health() -> JSONResponse:
        """`status` is `ok` while the resident base still hashes to what was loaded (checked on every call)."""
        report = runtime.health()
        return JSONResponse(report, status_code=200 if report["status"] == "ok" else 503)

    @app.get("/metrics", tags=["device"], summary="Prometheus metrics", response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        """Requests and errors by route, request latency histogram, swaps, swap latency, cache size."""
        return PlainTextResponse(runtime.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/assets", tags=["assets"], summary="List assets and their versions")
    def list_assets() -> list[dict[str, Any]]:
        return runtime.assets()

    @app.get("/v1/assets/{asset_id}", tags=["assets"], summary="One asset and its versions",
             responses={404: ERRORS[404]})
    def get_asset(asset_id: str) -> dict[str, Any]:
        runtime.state.asset(asset_id)  # 404 for an unknown asset
        return next(a for a in runtime.assets() if a["asset_id"] == asset_id)

    @app.get("/v1/assets/{asset_id}/stats", tags=["assets"], summary="Per version health since start-up",
             responses={404: ERRORS[404]})
    def asset_stats(asset_id: str) -> dict[str, Any]:
        """For each version active at some point since this process started: rows scored, rows flagged
        (`alerts`), quantiles of score/threshold over its most recent 4096 rows (1.0 = the alarm line; null
        before any row), failed score calls (`errors`) and `since` (ISO 8601, UTC). Read-only, like every read
        endpoint here: no token. The update agent reports it to the fleet server's health gates."""
        return runtime.version_stats(asset_id)

    @app.post("/v1/assets/{asset_id}/score", tags=["scoring"], response_model=ScoreResponse,
              summary="Score rows with the asset's active adapter", responses={k: ERRORS[k] for k in (404, 422)},
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": ScoreRequest.model_json_schema()}}}})
    async def score(asset_id: str, request: Request) -> Response:
        """Every number in the answer comes from one adapter version, named in `version`."""
        body = _parse_score_request(await request.body())
        # Scoring runs in a worker thread: torch releases the GIL inside its kernels, so concurrent requests
        # overlap on a multi-core device, and a large request cannot stall the event loop.
        answer = await anyio.to_thread.run_sync(_score, runtime, asset_id, body, limiter=scorers)
        return Response(answer, media_type="application/json")

    @app.post(
        "/v1/bundles", tags=["deployment"], dependencies=authorized, summary="Install a signed bundle",
        responses={k: ERRORS[k] for k in (400, 401, 409, 413, 422)},
        openapi_extra={"requestBody": {"required": True, "description": "The .edelta file, as is.",
                                       "content": {"application/octet-stream": {"schema": {
                                           "type": "string", "format": "binary"}}}}},
    )
    async def install(
        request: Request,
        activate: Annotated[bool, Query(description="Make the new version active at once.")] = True,
        allow_rollback: Annotated[bool, Query(description="Accept a release not newer than the installed one "
                                                          "(a deliberate downgrade).")] = False,
    ) -> dict[str, Any]:
        """Verify signature, base and release counter, load and smoke-test from memory, store the bundle file,
        then commit; a rejected bundle changes nothing on the device."""
        declared = int(request.headers.get("content-length") or 0)
        if declared > MAX_BUNDLE_BYTES:
            return _too_large(declared, MAX_BUNDLE_BYTES)
        data = await request.body()
        if len(data) > MAX_BUNDLE_BYTES:
            return _too_large(len(data), MAX_BUNDLE_BYTES)
        # An install takes milliseconds (more when it must build a model): off the event loop, so scoring
        # requests keep flowing while a bundle installs.
        return await anyio.to_thread.run_sync(
            functools.partial(runtime.install_bundle, data, activate=activate, allow_rollback=allow_rollback),
            limiter=writers,
        )

    @app.post("/v1/assets/{asset_id}/activate", tags=["deployment"], dependencies=authorized,
              summary="Activate an installed version", responses={k: ERRORS[k] for k in (401, 404)})
    async def activate(asset_id: str, body: ActivateRequest) -> dict[str, Any]:
        """Requests already running finish on the old version; new ones get this one."""
        return await anyio.to_thread.run_sync(runtime.activate, asset_id, body.version, limiter=writers)

    @app.post("/v1/assets/{asset_id}/rollback", tags=["deployment"], dependencies=authorized,
              summary="Re-activate the previous version", responses={k: ERRORS[k] for k in (401, 404, 409)})
    async def rollback(asset_id: str) -> dict[str, Any]:
        return await anyio.to_thread.run_sync(runtime.rollback, asset_id, limiter=writers)

    return app


def _too_large(size: int, limit: int) -> JSONResponse:
    return JSONResponse({"error": "BundleError", "detail": f"body is {size:,} bytes, over the {limit:,}-byte bundle "
                         "limit; this is not an edgepeft bundle"}, status_code=413)


def _parse_score_request(raw: bytes) -> ScoreRequest:
    try:
        return ScoreRequest.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ())) or "body"
        raise DataError(f"invalid score request at {where}: {first.get('msg')}; send "
                        '{"rows": [[v1, v2, ...], ...]} with one number per channel') from None


def _score(runtime: DeviceRuntime, asset_id: str, body: ScoreRequest) -> bytes:
    """Score one request and encode the answer (the JSON is built once, not validated twice)."""
    if len(body.rows) > MAX_ROWS_PER_REQUEST:
        raise DataError(f"{len(body.rows):,} rows in one request; send at most {MAX_ROWS_PER_REQUEST:,}")
    served, result = runtime.score(asset_id, _rows(body), explain=True)
    answer = {
        "asset_id": asset_id, "version": served.version, "release": served.release, "engine": served.engine,
        "threshold": float(served.detector.threshold_), "score": result["score"].tolist(),
        "p_anomaly": result["p_anomaly"].tolist(), "anomaly": result["anomaly"].astype(int).tolist(),
        "top_channels": result["top_channels"],
    }
    return json.dumps(answer).encode()


def _rows(body: ScoreRequest) -> Any:
    """The request rows as an array, or a DataFrame when the channels are named (so they are matched by name)."""
    if not body.rows:
        raise DataError("no rows to score; send at least one row")
    width = len(body.rows[0])
    if any(len(row) != width for row in body.rows):
        raise DataError("rows have different lengths; every row needs one value per channel")
    values = np.asarray(body.rows, dtype=np.float32)
    if body.columns is None:
        return values
    if len(body.columns) != width:
        raise DataError(f"{len(body.columns)} column names for rows of {width} values")
    import pandas as pd

    return pd.DataFrame(values, columns=body.columns)
