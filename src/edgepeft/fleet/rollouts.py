"""Rollouts (placeholder: being built by the lead)."""

from __future__ import annotations

from fastapi import FastAPI

from edgepeft.fleet.registry import Registry
from edgepeft.fleet.server import ApiContext


class RolloutEngine:
    def __init__(self, registry: Registry, *, tick_seconds: float = 1.0) -> None:
        self.registry = registry
        self.tick_seconds = tick_seconds

    def mount(self, app: FastAPI, ctx: ApiContext) -> None:
        @app.get("/v1/rollouts", tags=["rollouts"])
        def list_rollouts() -> list[dict[str, object]]:
            return []
