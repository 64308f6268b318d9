"""The web console (placeholder: being built)."""

from __future__ import annotations

from fastapi import FastAPI

from edgepeft.fleet.server import ApiContext


def mount(app: FastAPI, ctx: ApiContext) -> None:
    return None
