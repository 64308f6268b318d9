"""JSON artifacts with a schema version (so saved files say which format they are), atomic writes, fsync."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from edgepeft.core.errors import ArtifactError

SCHEMA_VERSION = 1


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a directory's entries to disk: a new or renamed file survives power loss only after this."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], payload: bytes) -> None:
    """Write-to-temp, fsync, rename: a reader sees the old file or the new one, never half of one."""
    staged = stage_bytes(path, payload)
    try:
        os.replace(staged, path)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    fsync_dir(Path(path).parent)  # so the rename itself survives power loss


def stage_bytes(path: str | os.PathLike[str], payload: bytes) -> Path:
    """The first half of :func:`atomic_write_bytes`: ``payload`` in a durable temp file beside ``path``, for a
    caller that renames it over ``path`` itself (and treats a failed rename and a failed flush differently)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return Path(tmp)


def _json_default(value: Any) -> Any:
    # Settings often arrive as numpy scalars (a value read from an array, a grid search): write them as the
    # numbers they are instead of failing the save.
    if hasattr(value, "item") and getattr(value, "shape", None) == ():
        return value.item()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def write_json(path: str | os.PathLike[str], data: dict[str, Any], version: int = SCHEMA_VERSION) -> None:
    """Atomically write ``data`` as indented JSON with ``schema_version`` added (numpy scalars as numbers)."""
    payload = {"schema_version": version, **data}
    text = json.dumps(payload, indent=2, sort_keys=True, default=_json_default)
    atomic_write_bytes(path, (text + "\n").encode())


def read_json(path: str | os.PathLike[str], versions: tuple[int, ...] = (SCHEMA_VERSION,)) -> dict[str, Any]:
    """Read JSON written by :func:`write_json`, checking the schema version is one of ``versions``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ArtifactError(f"{path} is missing") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}); the artifact is corrupt") from exc
    if not isinstance(data, dict):
        raise ArtifactError(f"{path} does not hold a JSON object; the artifact is corrupt")
    version = data.pop("schema_version", None)
    if version not in versions:
        readable = " or ".join(str(v) for v in versions)
        raise ArtifactError(f"{path} has schema_version {version!r}; this edgepeft reads {readable}")
    return data
