"""A throw-away PostgreSQL cluster from Debian's server programs (``initdb`` + ``pg_ctl``), for the fleet's tests and
``edgepeft bench rollout``: started in a temporary folder on a free port with ``fsync=off`` (nothing to keep).

Example (skipped where PostgreSQL is not installed):
    >>> postgres_bindir() is None or (postgres_bindir() / "initdb").exists()
    True
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from edgepeft.bench.loadtest import free_port


def postgres_bindir() -> Path | None:
    """Where initdb and pg_ctl are: pg_config's bindir, Debian's versioned folder, or the PATH."""
    pg_config = shutil.which("pg_config")
    if pg_config:
        bindir = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True).stdout.strip()
        if (Path(bindir) / "initdb").exists():
            return Path(bindir)
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name),
                            reverse=True):
        if (Path(candidate) / "initdb").exists():
            return Path(candidate)
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@dataclass
class PostgresServer:
    """A throw-away PostgreSQL cluster: ``url(db)`` names a database on it, ``create_database()`` makes one."""

    bindir: Path
    root: Path
    port: int = 0
    user: str = "edgepeft"
    as_user: list[str] = field(default_factory=list)

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.as_user, *args], capture_output=True, text=True, timeout=120)

    def start(self) -> PostgresServer:
        # PostgreSQL refuses to run as root; as root (CI, this sandbox) it runs as the postgres user that Debian's
        # package creates, in a folder that user owns.
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.port = free_port()
        data = self.root / "data"
        done = self._run(str(self.bindir / "initdb"), "-D", str(data), "-U", self.user, "-A", "trust",
                         "--no-sync", "-E", "UTF8")
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed: {done.stderr.strip()[-500:]}")
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off")
        done = self._run(str(self.bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(self.root / "log"),
                         "-w", "-t", "60", "start")
        if done.returncode != 0:
            log = (self.root / "log").read_text(errors="replace")[-500:] if (self.root / "log").exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {done.stderr.strip()[-300:]} {log}")
        return self

    def stop(self) -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.root / "data"), "-m", "fast", "-w", "stop")

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        import psycopg

        name = f"fleet_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(host="127.0.0.1", port=self.port, user=self.user, dbname="postgres",
                             autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)
