"""The registry below HTTP: migrations against the ORM models, concurrent writers, and the CLI's refusals.

Each database test runs on SQLite and on PostgreSQL (see conftest.py).
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from edgepeft.core.errors import ConfigError
from edgepeft.fleet.db import Database
from edgepeft.fleet.errors import Conflict
from edgepeft.fleet.models import Model
from edgepeft.fleet.registry import Registry
from edgepeft.fleet.storage import BundleStore


def test_migrations_build_exactly_the_models(db_url: str) -> None:
    db = Database.open(db_url)
    try:
        assert db.revision() == "0002"
        with db.engine.connect() as connection:
            assert compare_metadata(MigrationContext.configure(connection), Model.metadata) == []
        assert Database.open(db_url).revision() == "0002", "migrating an up-to-date database changes nothing"
    finally:
        db.close()


def test_concurrent_writers_get_one_success_and_clear_conflicts(db_url: str, tmp_path: Path) -> None:
    """Eight threads enrol the same device at once: one gets the credential, the rest a 409, one audit entry."""
    registry = Registry(Database.open(db_url), BundleStore(tmp_path), [])
    outcomes: list[str] = []
    barrier = threading.Barrier(8)

    def enrol() -> None:
        barrier.wait()
        try:
            registry.enrol_device("pump-1", tags=["a"], actor="test", reason="race")
            outcomes.append("enrolled")
        except Conflict as exc:
            assert "\n" not in str(exc)
            outcomes.append("conflict")

    threads = [threading.Thread(target=enrol) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["conflict"] * 7 + ["enrolled"]
    assert [e["action"] for e in registry.audit()] == ["device.enrol"]
    registry.db.close()


@pytest.mark.parametrize("url, words", [
    ("mysql://u:p@localhost/db", "not supported"),
    ("sqlite://", "in-memory"),
    ("not a url", "not a database URL"),
])
def test_bad_database_urls_are_refused_clearly(url: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        Database.open(url)


def _edgepeft(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "from edgepeft.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=120)


def test_cli_bootstraps_a_token_and_refuses_bad_input_in_one_line(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    done = _edgepeft("fleet", "token", "--db", db, "--scopes", "read,publish", "--name", "ci")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith("efo_") and len(done.stdout.strip().splitlines()) == 1
    registry = Registry(Database.open(db), BundleStore(tmp_path), [])
    operator = registry.authenticate_operator(done.stdout.strip())
    assert operator.scopes == {"read", "publish"} and operator.name == "ci"
    registry.db.close()
    for args, words in [
        (("fleet", "token", "--db", db, "--scopes", "root"), "scopes root not known"),
        (("fleet", "token", "--db", db, "--name", "../x"), "token name"),
        (("fleet", "token", "--db", "postgresql://u:secret@127.0.0.1:1/db"), "cannot open"),
        (("fleet", "serve", "--db", db, "--trusted-key", str(tmp_path / "missing.pub")), "does not exist"),
        (("fleet", "serve", "--db", "mysql://x"), "not supported"),
        (("fleet", "serve", "--port", "-3"), "--port"),
    ]:
        done = _edgepeft(*args)
        assert done.returncode == 2, (args, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], (args, done.stderr)
        assert "secret" not in done.stderr  # a password in --db is never echoed
