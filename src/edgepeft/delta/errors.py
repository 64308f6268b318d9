"""The one error the delta layer raises on purpose.

Example:
    >>> from edgepeft.core.errors import ArtifactError
    >>> issubclass(BundleError, ArtifactError)
    True
"""

from __future__ import annotations

from edgepeft.core.errors import ArtifactError


class BundleError(ArtifactError):
    """A bundle or key is malformed, tampered, untrusted, expired, stale or for another base.

    Every message is one line that says what was wrong and what to do; nothing has been written when
    it is raised.

    >>> str(BundleError("bundle is truncated; download it again"))
    'bundle is truncated; download it again'
    """
