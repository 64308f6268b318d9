"""Distribution through TUF (placeholder: being built)."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from edgepeft.fleet.registry import Registry
from edgepeft.fleet.server import ApiContext


class Distribution:
    def __init__(self, registry: Registry, online_keys: Path | None) -> None:
        self.registry = registry
        self.online_keys = online_keys

    def mount(self, app: FastAPI, ctx: ApiContext) -> None:
        return None
