"""fleet layer: the server side of a fleet of devices (``edgepeft fleet serve``).

This first slice is the registry: devices (with a per-device credential, tags, groups, the assets they monitor and
the bases they hold), registered bases, a catalogue of signed bundles verified with the delta layer's own checks,
operator tokens with scopes, and an append-only audit log; over SQLAlchemy 2 with Alembic migrations (SQLite by
default, PostgreSQL by URL) and served by FastAPI. See docs/fleet.md.

Nothing below this layer imports it: a device install never carries the server. Importing this package imports
nothing heavy; :mod:`edgepeft.fleet.registry` and :mod:`edgepeft.fleet.server` need the ``fleet`` extra.
"""
