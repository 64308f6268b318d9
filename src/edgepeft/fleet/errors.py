"""The fleet server's errors: each carries the HTTP status it is answered with.

Every message is one line that says what was wrong and what to do next; nothing has been written when one is
raised from a request.

Example:
    >>> from edgepeft.core.errors import EdgePeftError
    >>> exc = NotFound("no device 'pump-9' in the registry; enrol it with POST /v1/devices")
    >>> isinstance(exc, EdgePeftError), exc.status
    (True, 404)
"""

from __future__ import annotations

from edgepeft.core.errors import EdgePeftError


class FleetError(EdgePeftError):
    """Base class of the fleet server's errors; ``status`` is the HTTP status code."""

    status: int = 400


class InvalidRequest(FleetError):
    """The request is malformed: not JSON, wrong types, unknown or missing fields, a bad query parameter."""

    status = 400


class BundleRejected(FleetError):
    """An uploaded bundle is refused by the registry (its base is not registered); the file is not kept."""

    status = 400


class Unauthenticated(FleetError):
    """No credential, or one the registry does not know (wrong, revoked, rotated away)."""

    status = 401


class Forbidden(FleetError):
    """A valid credential without the scope the endpoint needs."""

    status = 403


class NotFound(FleetError):
    """The resource named in the path does not exist."""

    status = 404


class Conflict(FleetError):
    """The change clashes with what the registry holds (a duplicate device, bundle, version or release)."""

    status = 409


class TooLarge(FleetError):
    """The request body is over the size limit."""

    status = 413


class UnknownReference(FleetError):
    """A well-formed request names something the registry does not hold (a base, a group)."""

    status = 422
