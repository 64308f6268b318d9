"""``edgepeft fleet serve`` and ``edgepeft fleet token``: thin commands over the fleet server.

The CLI mounts :data:`fleet_app` as ``edgepeft fleet``; ``python -m edgepeft.fleet ...`` runs the same commands
without the rest of the CLI (the tests start servers that way). SQLAlchemy, Alembic and FastAPI are imported
inside the commands, so ``edgepeft --help`` stays fast and a device install without the ``fleet`` extra still runs.
"""

from __future__ import annotations

import getpass
from pathlib import Path
from typing import Annotated

import typer

DEFAULT_DB = "sqlite:///edgepeft-fleet/fleet.db"
DEFAULT_STORAGE = Path("edgepeft-fleet/storage")

fleet_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                        help="The fleet server: registry of devices, bases and signed bundles, with an audit log.")

DbOption = Annotated[str, typer.Option("--db", help="Database URL: sqlite:///PATH (default, created if missing) or "
                                       "postgresql://USER:PASSWORD@HOST:PORT/DB.")]


def cli_actor() -> str:
    """How the audit log names a change made from this command line."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no user name for this uid (e.g. a bare container)
        return "cli:unknown"


@fleet_app.command()
def serve(
    db: DbOption = DEFAULT_DB,
    storage: Annotated[Path, typer.Option("--storage", help="Folder for the bundle files (content-addressed).")
                       ] = DEFAULT_STORAGE,
    trusted_key: Annotated[list[Path] | None, typer.Option(
        "--trusted-key", help="Public key (KEY.pub from `edgepeft keygen`) whose bundles are accepted; repeatable. "
        "Without one, every upload is refused.")] = None,
    host: Annotated[str, typer.Option(help="Interface to bind; keep 127.0.0.1 unless a TLS proxy fronts it.")
                    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port.")] = 8080,
    max_json_kb: Annotated[int, typer.Option(min=1, max=16384, help="Size limit of a JSON request body (bundle "
                                             "uploads have the bundle format's own limit).")] = 64,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "warning",
    online_keys: Annotated[Path | None, typer.Option(
        "--online-keys", help="Folder of the online TUF keys (timestamp, snapshot, bins, director) written by "
        "`edgepeft fleet tuf init`; without it, devices cannot fetch updates.")] = None,
) -> None:
    """Serve the fleet registry over HTTP (OpenAPI at /docs, Prometheus at /metrics); migrates the database first."""
    import uvicorn
    from rich.console import Console

    from edgepeft.delta.keys import key_id, load_public_key
    from edgepeft.fleet.app import build_app
    from edgepeft.fleet.db import Database
    from edgepeft.fleet.registry import Registry
    from edgepeft.fleet.storage import BundleStore

    keys = [load_public_key(path) for path in trusted_key or []]
    store = BundleStore(storage)
    store.check_writable()
    database = Database.open(db)
    registry = Registry(database, store, keys)
    app = build_app(registry, online_keys=online_keys, max_json_bytes=max_json_kb * 1024).app
    counts = registry.counts()
    signers = ", ".join(key_id(key) for key in keys) if keys else "none: uploads refused"
    admin_hint = "" if counts["operator_tokens"] else "; no operator token yet: create one with `edgepeft fleet token`"
    Console(stderr=True, soft_wrap=True).print(
        f"[green]serving[/] http://{host}:{port} (docs at /docs): {database.dialect} "
        f"{database.engine.url.render_as_string(hide_password=True)} at schema {database.revision()}, "
        f"{counts['devices']} device(s), {counts['bundles']} bundle(s), trusted keys: {signers}{admin_hint}",
        highlight=False,
    )
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False, timeout_keep_alive=75)


@fleet_app.command()
def token(
    db: DbOption = DEFAULT_DB,
    scopes: Annotated[str, typer.Option(help="Comma-separated: read, publish, deploy, admin.")] = "admin",
    name: Annotated[str, typer.Option(help="Who or what will use it (shown in the audit log).")] = "admin",
    reason: Annotated[str, typer.Option(help="Why (written to the audit log).")] = "bootstrap from the command line",
) -> None:
    """Create an operator token and print it once on stdout (only its hash is stored). Migrates the database first,
    so this is also how a new registry is bootstrapped: `TOKEN=$(edgepeft fleet token --db URL)`."""
    from rich.console import Console

    from edgepeft.core.errors import ConfigError
    from edgepeft.delta.errors import BundleError
    from edgepeft.delta.manifest import check_name
    from edgepeft.fleet.db import Database
    from edgepeft.fleet.registry import Registry
    from edgepeft.fleet.storage import BundleStore

    try:
        check_name(name, "token name")
    except BundleError as exc:
        raise ConfigError(str(exc)) from None
    if not reason.strip() or any(ord(ch) < 32 or ord(ch) == 127 for ch in reason):
        raise ConfigError("--reason must be one line of text")
    database = Database.open(db)
    try:
        # The bundle store is not touched by token creation; any folder will do.
        record, secret = Registry(database, BundleStore(DEFAULT_STORAGE), []).create_token(
            name, scopes, actor=cli_actor(), reason=reason)
    finally:
        database.close()
    Console(stderr=True, soft_wrap=True).print(
        f"[green]token {record['id']}[/] ({name}, scopes {','.join(record['scopes'])}) created; it is printed once, "
        "below: store it now", highlight=False)
    print(secret)
