"""Our exception types. Every message says what went wrong and what to do next.

The CLI turns any ``EdgePeftError`` into one line on stderr and a non-zero exit code.
"""

from __future__ import annotations


class EdgePeftError(Exception):
    """Base class of every error edgepeft raises on purpose."""

    exit_code: int = 2


class DataError(EdgePeftError):
    """Input data is unusable: empty, malformed, non-numeric, too short, too many gaps, wrong channels."""


class ConfigError(EdgePeftError):
    """A setting is invalid: unknown method or base, out-of-range value."""


class ModelError(EdgePeftError):
    """A model or adapter cannot be built, loaded or matched to its base."""


class ArtifactError(EdgePeftError):
    """A saved detector, checkpoint or bundle is missing, corrupt, tampered or incompatible."""


class OutputError(EdgePeftError):
    """An output path cannot be written."""
