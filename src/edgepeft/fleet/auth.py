"""Credentials: operator tokens with scopes, and per-device credentials. Only their sha256 is stored.

An operator token reads ``efo_<random>``, a device credential ``efd_<random>`` (256 random bits each): the prefix
tells a person which one they hold (and secret scanners can look for it), and the two can never be confused by
the server, which looks each up in its own table.

Scopes: ``read`` (list and fetch), ``publish`` (upload bundles, register bases), ``deploy`` (enrol and edit
devices, groups), ``admin`` (everything, and operator tokens). ``publish`` and ``deploy`` include ``read``.

Example:
    >>> allows(frozenset({"publish"}), "read"), allows(frozenset({"publish"}), "deploy")
    (True, False)
    >>> token = new_secret(OPERATOR_PREFIX)
    >>> token.startswith("efo_") and len(hash_secret(token)) == 64
    True
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable

from edgepeft.core.errors import ConfigError

SCOPES = ("read", "publish", "deploy", "admin")
OPERATOR_PREFIX = "efo_"
DEVICE_PREFIX = "efd_"
# What each scope grants besides itself.
_IMPLIES = {"admin": frozenset(SCOPES), "publish": frozenset({"read"}), "deploy": frozenset({"read"})}
MAX_SECRET_CHARS = 256


def new_secret(prefix: str) -> str:
    """A fresh credential: ``prefix`` + 43 URL-safe characters (32 random bytes)."""
    return prefix + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    """What the registry stores of a credential: its sha256 (hex). The credential is random, so a slow password
    hash would buy nothing and cost every request."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def parse_scopes(scopes: Iterable[str] | str) -> frozenset[str]:
    """``"read,publish"`` or ``["read", "publish"]`` -> the set, refusing unknown names."""
    names = [part.strip() for part in (scopes.split(",") if isinstance(scopes, str) else scopes)]
    names = [name for name in names if name]
    unknown = sorted(set(names) - set(SCOPES))
    if unknown or not names:
        raise ConfigError(f"scopes {', '.join(unknown) or '(none)'} not known; give one or more of "
                          f"{', '.join(SCOPES)}")
    return frozenset(names)


def allows(granted: frozenset[str], needed: str) -> bool:
    """Whether a token holding ``granted`` may do what needs ``needed``."""
    return needed in granted or any(needed in _IMPLIES.get(scope, ()) for scope in granted)
