"""The device runtime as the agent sees it: its HTTP API (``edgepeft serve``), nothing of its internals.

Example (against a running ``edgepeft serve``):
    >>> runtime = RuntimeApi("http://127.0.0.1:8000", token="...")   # doctest: +SKIP
    >>> [a["asset_id"] for a in runtime.assets()]                     # doctest: +SKIP
    ['pump-1']
"""

from __future__ import annotations

from typing import Any

import httpx

from edgepeft.core.errors import EdgePeftError

# An install loads and smoke-tests a model: seconds on a slow device, more when it must build one first.
INSTALL_TIMEOUT_S = 300.0


class RuntimeUnavailable(EdgePeftError):
    """The runtime did not answer (not started yet, restarting, overloaded): try again later."""


class RuntimeRefused(EdgePeftError):
    """The runtime answered with an error: ``status`` and its one-line ``detail``."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(f"runtime answered {status} {error}: {detail}")
        self.status = status
        self.error = error
        self.detail = detail


class RuntimeApi:
    """Calls to one device runtime; ``token`` is its write token (installs and activations need it).

    Attributes:
        url: the runtime's base URL, e.g. ``http://127.0.0.1:8000``.
        token: the runtime's write token.
        timeout: seconds for a read or an activation (installs get ``INSTALL_TIMEOUT_S``).

    Example (nothing listens on port 9: the error says so, in one line):
        >>> try:
        ...     RuntimeApi("http://127.0.0.1:9", token="t", timeout=0.5).assets()
        ... except RuntimeUnavailable as exc:
        ...     str(exc).startswith("device runtime at http://127.0.0.1:9 did not answer GET /v1/assets")
        True
    """

    def __init__(self, url: str, token: str, *, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self._http = httpx.Client(base_url=self.url, timeout=timeout,
                                  headers={"Authorization": f"Bearer {token}"})

    def _call(self, method: str, path: str, *, timeout: float | None = None, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, timeout=timeout or self.timeout, **kwargs)
        except httpx.HTTPError as exc:
            raise RuntimeUnavailable(f"device runtime at {self.url} did not answer {method} {path} "
                                     f"({type(exc).__name__}: {exc})") from exc
        if response.status_code >= 400:
            try:
                body = response.json()
                error, detail = str(body.get("error", "")), str(body.get("detail", response.text))
            except ValueError:
                error, detail = "", response.text[:300]
            raise RuntimeRefused(response.status_code, error or "error", " ".join(detail.split()))
        return response.json()

    def assets(self) -> list[dict[str, Any]]:
        """Every asset: ``asset_id``, ``active``, ``release`` and ``versions`` (each with version, release)."""
        return list(self._call("GET", "/v1/assets"))

    def health(self) -> dict[str, Any]:
        """Liveness and the resident base (``base``, ``base_sha256``); a 503 (base modified) raises."""
        return dict(self._call("GET", "/health"))

    def stats(self, asset_id: str) -> list[dict[str, Any]]:
        """The asset's per version health in this runtime process (``GET /v1/assets/{id}/stats``)."""
        return list(self._call("GET", f"/v1/assets/{asset_id}/stats")["versions"])

    def install(self, bundle: bytes) -> dict[str, Any]:
        """Install and activate a signed bundle; the runtime verifies it again and commits atomically."""
        return dict(self._call("POST", "/v1/bundles", content=bundle, params={"activate": "true"},
                               headers={"Content-Type": "application/octet-stream"}, timeout=INSTALL_TIMEOUT_S))

    def activate(self, asset_id: str, version: str) -> dict[str, Any]:
        """Make an installed version the active one."""
        return dict(self._call("POST", f"/v1/assets/{asset_id}/activate", json={"version": version},
                               timeout=INSTALL_TIMEOUT_S))

    def close(self) -> None:
        self._http.close()
