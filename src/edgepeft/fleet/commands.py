"""``edgepeft fleet serve`` and ``edgepeft fleet token``: thin commands over the fleet server.

The CLI mounts :data:`fleet_app` as ``edgepeft fleet``; ``python -m edgepeft.fleet ...`` runs the same commands
without the rest of the CLI (the tests start servers that way). SQLAlchemy, Alembic and FastAPI are imported
inside the commands, so ``edgepeft --help`` stays fast and a device install without the ``fleet`` extra still runs.
"""

from __future__ import annotations

import getpass
from pathlib import Path
from typing import Annotated, Any

import typer

from edgepeft.core.errors import ConfigError

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
    poll_seconds: Annotated[float, typer.Option(min=1, max=86400, help="Poll interval suggested to device agents "
                                                "(they add jitter and back off on errors).")] = 30.0,
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
    if online_keys is not None:
        from edgepeft.fleet.tuf_repo import ONLINE_KEYS, load_keys

        load_keys(online_keys, ONLINE_KEYS)  # a wrong folder fails here, not at the first device poll
    database = Database.open(db)
    registry = Registry(database, store, keys)
    app = build_app(registry, online_keys=online_keys, max_json_bytes=max_json_kb * 1024,
                    poll_seconds=poll_seconds).app
    counts = registry.counts()
    signers = ", ".join(key_id(key) for key in keys) if keys else "none: uploads refused"
    admin_hint = "" if counts["operator_tokens"] else "; no operator token yet: create one with `edgepeft fleet token`"
    Console(stderr=True, soft_wrap=True).print(
        f"[green]serving[/] http://{host}:{port} (docs at /docs, console at /console): {database.dialect} "
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


# ---------------------------------------------------------------------------------------------- TUF keys
tuf_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                      help="TUF keys and roots of the fleet's distribution (image repository and director).")
fleet_app.add_typer(tuf_app, name="tuf")

OfflineKeys = Annotated[Path, typer.Option(
    "--offline-keys", help="Folder of the offline keys (root, targets, director-root): keep it off the server.")]
OnlineKeys = Annotated[Path, typer.Option(
    "--online-keys", help="Folder of the online keys (timestamp, snapshot, bins, director): the server's "
    "`serve --online-keys`.")]


def _tuf_database(db: str) -> Any:
    from edgepeft.fleet.db import Database

    return Database.open(db)


@tuf_app.command("init")
def tuf_init(
    db: DbOption = DEFAULT_DB,
    offline_keys: OfflineKeys = Path("edgepeft-fleet/keys/offline"),
    online_keys: OnlineKeys = Path("edgepeft-fleet/keys/online"),
    bin_bits: Annotated[int, typer.Option("--bin-bits", min=1, max=14, help="Hashed bins: 2**N of them; 8 suits "
                                          "~10^4 bundles, 10 ~10^5.")] = 8,
) -> None:
    """Create the TUF keys (those missing from the folders) and sign the image and director repositories into the
    database, with every catalogued bundle as a target. Run once per registry; then `serve --online-keys`."""
    from rich.console import Console

    from edgepeft.fleet import tuf_repo

    if offline_keys.resolve() == online_keys.resolve():
        raise ConfigError("--offline-keys and --online-keys must be different folders: the offline keys must not "
                          "sit on the server")
    database = _tuf_database(db)
    try:
        with database.read() as session:
            if tuf_repo.initialised(session):
                raise ConfigError("the TUF repositories are already initialised in this database; rotate keys with "
                                  "`edgepeft fleet tuf rotate`")
        offline = tuf_repo.create_keys(offline_keys, tuf_repo.OFFLINE_KEYS)
        online = tuf_repo.create_keys(online_keys, tuf_repo.ONLINE_KEYS)
        with database.write() as session:
            targets = tuf_repo.init_repositories(session, offline, online, bin_bits=bin_bits)
    finally:
        database.close()
    Console(stderr=True, soft_wrap=True).print(
        f"[green]TUF repositories initialised[/]: {2 ** bin_bits} bins, {targets} bundle target(s); offline keys "
        f"in {offline_keys} (move them off this machine), online keys in {online_keys}; give devices the roots "
        "from `edgepeft fleet tuf roots`", highlight=False)


@tuf_app.command("rotate")
def tuf_rotate(
    db: DbOption = DEFAULT_DB,
    offline_keys: OfflineKeys = Path("edgepeft-fleet/keys/offline"),
    online_keys: OnlineKeys = Path("edgepeft-fleet/keys/online"),
    role: Annotated[str, typer.Option("--role", help="Comma-separated keys to replace: root, targets, timestamp, "
                                      "snapshot, bins, director-root, director.")
                    ] = "timestamp,snapshot,bins,director",
) -> None:
    """Replace keys: new keys in the folders, a new root (signed by the old and the new root key) and re-signed
    metadata in the database. A running server picks up the new online keys from its --online-keys folder."""
    from rich.console import Console

    from edgepeft.fleet import tuf_repo

    roles = [part.strip() for part in role.split(",") if part.strip()]
    unknown = [name for name in roles if name not in tuf_repo.ROLES]
    if unknown or not roles:
        raise ConfigError(f"--role {','.join(unknown) or '(none)'} not known; give one or more of "
                          f"{','.join(tuf_repo.ROLES)}")
    database = _tuf_database(db)
    try:
        with database.write() as session:
            versions = tuf_repo.rotate(session, offline_keys, online_keys, roles)
    finally:
        database.close()
    Console(stderr=True, soft_wrap=True).print(
        f"[green]rotated[/] {', '.join(sorted(set(roles)))}: image root v{versions['image']}, director root "
        f"v{versions['director']}; devices follow the new roots on their next poll", highlight=False)


@tuf_app.command("roots")
def tuf_roots(
    db: DbOption = DEFAULT_DB,
    out: Annotated[Path, typer.Option("--out", help="Folder to write image-root.json and director-root.json to.")
                   ] = Path("."),
) -> None:
    """Write the current image and director roots: what a device is provisioned with (`edgepeft agent
    --image-root --director-root`)."""
    from rich.console import Console

    from edgepeft.fleet import tuf_repo

    database = _tuf_database(db)
    try:
        with database.read() as session:
            rows = {name: tuf_repo.latest_row(session, repo, "root")
                    for name, repo in (("image", tuf_repo.IMAGE), ("director", tuf_repo.DIRECTOR))}
    finally:
        database.close()
    if any(row is None for row in rows.values()):
        raise ConfigError("the TUF repositories are not initialised in this database; run `edgepeft fleet tuf init`")
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, row in rows.items():
            (out / f"{name}-root.json").write_bytes(row.data)
    except OSError as exc:
        raise ConfigError(f"cannot write the roots to {out} ({exc.strerror or exc})") from None
    Console(stderr=True, soft_wrap=True).print(
        f"[green]wrote[/] {out / 'image-root.json'} (v{rows['image'].version}) and {out / 'director-root.json'} "
        f"(v{rows['director'].version})", highlight=False)
