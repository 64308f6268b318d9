"""The whole fleet server in one call: the registry's API plus distribution (TUF), rollouts and the console.

``edgepeft fleet serve``, the tests and ``edgepeft bench rollout`` all build the app here, so they run the same
thing.

Example:
    >>> import tempfile
    >>> from edgepeft.fleet.db import Database
    >>> from edgepeft.fleet.registry import Registry
    >>> from edgepeft.fleet.storage import BundleStore
    >>> root = tempfile.mkdtemp()
    >>> fleet = build_app(Registry(Database.open(f"sqlite:///{root}/f.db"), BundleStore(root), []))
    >>> "/v1/rollouts" in fleet.app.openapi()["paths"]
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI

from edgepeft.fleet import console
from edgepeft.fleet.distribution import Distribution
from edgepeft.fleet.registry import Registry
from edgepeft.fleet.rollouts import RolloutEngine
from edgepeft.fleet.server import DEFAULT_MAX_JSON_BYTES, create_app


@dataclass
class FleetApp:
    """The app and the services behind it (the rollout engine's ticker is started by the app's lifespan)."""

    app: FastAPI
    registry: Registry
    distribution: Distribution
    rollouts: RolloutEngine


def build_app(registry: Registry, *, online_keys: Path | None = None,
              max_json_bytes: int = DEFAULT_MAX_JSON_BYTES, tick_seconds: float = 1.0,
              poll_seconds: float = 30.0) -> FleetApp:
    """The fleet server's app over ``registry``. ``online_keys`` is the folder of the online TUF keys
    (``edgepeft fleet tuf init`` writes it); without it, distribution answers 503 until one is configured.
    ``poll_seconds`` is the poll interval the server suggests to agents; ``tick_seconds`` how often rollouts are
    advanced by time (soak, rate limits)."""
    distribution = Distribution(registry, online_keys)
    rollouts = RolloutEngine(registry, tick_seconds=tick_seconds, poll_seconds=poll_seconds)
    app = create_app(registry, max_json_bytes=max_json_bytes,
                     mounts=[distribution.mount, rollouts.mount, console.mount])
    return FleetApp(app=app, registry=registry, distribution=distribution, rollouts=rollouts)
