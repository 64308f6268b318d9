"""``edgepeft agent``: the update agent beside a device runtime (a thin command over :mod:`edgepeft.agent.loop`).

The CLI registers it (``app.command("agent")(agent)``); ``python -m edgepeft.agent ...`` runs the same function
without the rest of the CLI.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Any

import typer

from edgepeft.core.errors import ConfigError, EdgePeftError


class CycleFailed(EdgePeftError):
    """``--once``: the cycle did not converge or could not report (the reason is the message)."""

    exit_code = 1


def _read_secret(path: Path, what: str, option: str) -> str:
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} from {path} ({exc.strerror or exc}); check {option}") from exc
    if not text:
        raise ConfigError(f"{path} is empty; {option} must hold the {what}")
    return text


def _read_root(path: Path, option: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path} ({exc.strerror or exc}); {option} is the trusted root metadata "
                          "(`edgepeft fleet tuf roots` writes it)") from exc
    if not data.strip():
        raise ConfigError(f"{path} is empty; {option} is the trusted root metadata (`edgepeft fleet tuf roots`)")
    return data


def agent(
    server: Annotated[str, typer.Option("--server", help="The fleet server's URL, e.g. https://fleet.example.")],
    device_id: Annotated[str, typer.Option("--device-id", help="This device's id in the fleet.")],
    credential_file: Annotated[Path, typer.Option("--credential-file", help="File holding this device's "
                                                  "credential (efd_..., given at enrolment).")],
    image_root: Annotated[Path, typer.Option("--image-root", help="Trusted root of the image repository "
                                             "(image-root.json from `edgepeft fleet tuf roots`).")],
    director_root: Annotated[Path, typer.Option("--director-root", help="Trusted root of the director "
                                                "(director-root.json from `edgepeft fleet tuf roots`).")],
    runtime: Annotated[str, typer.Option("--runtime", help="The device runtime's URL (`edgepeft serve`).")
                       ] = "http://127.0.0.1:8000",
    runtime_token_file: Annotated[Path | None, typer.Option(
        "--runtime-token-file", help="File holding the runtime's write token (its --token-file, or its "
        "STATE/token); default: $EDGEPEFT_TOKEN.")] = None,
    state: Annotated[Path, typer.Option("--state", help="The agent's own folder: pending events, TUF metadata "
                                        "cache (created if missing).")] = Path("edgepeft-agent"),
    poll_seconds: Annotated[float | None, typer.Option(
        "--poll-seconds", min=0.01, help="Poll interval in seconds (default: what the server suggests, 30 s "
        "until it does); +-20 % jitter is added.")] = None,
    max_backoff_seconds: Annotated[float, typer.Option(
        "--max-backoff-seconds", min=0.01, help="Longest wait between tries while the server or the runtime "
        "fails (exponential backoff with jitter).")] = 300.0,
    once: Annotated[bool, typer.Option("--once", help="One cycle, then exit: 0 when it converged and reported, "
                                       "1 otherwise.")] = False,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Keep this device on the adapters the fleet assigns it: fetch them through TUF, install them through the
    runtime, report state and health. Survives outages and restarts; never leaves a half-installed adapter."""
    import os

    from edgepeft.agent.loop import Agent, AgentConfig
    from edgepeft.agent.runtime_api import RuntimeApi
    from edgepeft.agent.state import AgentStateFile

    level = getattr(logging, log_level.upper(), None)
    if not isinstance(level, int):
        raise ConfigError(f"unknown log level {log_level!r}; choose debug, info, warning or error")
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    credential = _read_secret(credential_file, "device credential", "--credential-file")
    if runtime_token_file is not None:
        token = _read_secret(runtime_token_file, "runtime's write token", "--runtime-token-file")
    elif os.environ.get("EDGEPEFT_TOKEN"):
        token = os.environ["EDGEPEFT_TOKEN"].strip()
    else:
        raise ConfigError("the runtime's write token is needed: give --runtime-token-file (or set $EDGEPEFT_TOKEN)")
    roots = _read_root(image_root, "--image-root"), _read_root(director_root, "--director-root")
    config = AgentConfig(server=server, credential=credential, poll_seconds=poll_seconds,
                         max_backoff_seconds=max_backoff_seconds)
    updates = _update_client(server, device_id, credential, state / "tuf", *roots)
    with AgentStateFile.open(state) as saved:
        # The update client keeps downloads under its state folder's targets/ (edgepeft.agent.updates).
        loop = Agent(config, updates, RuntimeApi(runtime, token), saved, download_cache=state / "tuf" / "targets")
        try:
            if once:
                loop.announce(only_after_crash=True)
                result = loop.cycle()
                summary = (f"installed {len(result.installed)}, activated {len(result.activated)}, "
                           f"{len(result.errors)} error(s)")
                if not result.ok:
                    raise CycleFailed(f"{summary}: {result.errors[0] if result.errors else 'not converged'}")
                typer.echo(summary, err=True)
                return
            stop = threading.Event()
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, lambda *_: stop.set())
            logging.getLogger("edgepeft.agent").info("agent for %s: fleet %s, runtime %s", device_id, server, runtime)
            loop.run(stop)
        finally:
            loop.close()


def _update_client(server: str, device_id: str, credential: str, folder: Path, image_root: bytes,
                   director_root: bytes) -> Any:
    """The TUF update client (``edgepeft.agent.updates``); a clear error where the agent install is missing."""
    try:
        from edgepeft.agent.updates import UpdateClient
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in ("tuf", "securesystemslib", "httpx"):
            raise ConfigError(f"`edgepeft agent` needs the agent install ({exc.name} is not installed): "
                              "pip install 'edgepeft[agent]'") from None
        raise
    return UpdateClient(server, device_id, credential, folder, image_root, director_root)
