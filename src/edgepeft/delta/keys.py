"""Ed25519 signing keys: make, save, load, and name them.

The private key stays with whoever releases adapters (PEM, PKCS#8, file mode 0600); devices hold only
public keys (PEM, SubjectPublicKeyInfo). A key is named by its *key id*, the first 16 hex digits of the
sha256 of its raw 32 public bytes; manifests carry the signer's key id so a device can say which key
signed a bundle it refuses.

Example:
    >>> key = generate_key()
    >>> len(key_id(key.public_key()))
    16
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgepeft.core.config import atomic_write_bytes
from edgepeft.core.errors import OutputError
from edgepeft.delta.errors import BundleError

# A PEM Ed25519 key is about 120 bytes; anything much larger is not a key file.
MAX_KEY_FILE_BYTES = 16 * 1024


def generate_key() -> Ed25519PrivateKey:
    """A fresh Ed25519 private key from the operating system's random source."""
    return Ed25519PrivateKey.generate()


def key_id(public_key: Ed25519PublicKey) -> str:
    """16 hex digits naming a public key (sha256 of its raw bytes)."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_key_path(private_path: str | os.PathLike[str]) -> Path:
    """Where ``keygen`` puts the public half: ``KEY.pub`` next to ``KEY``."""
    path = Path(private_path)
    return path.with_name(path.name + ".pub")


def save_keypair(key: Ed25519PrivateKey, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write ``path`` (private, PEM, mode 0600) and ``path.pub`` (public, PEM); return the public path."""
    private_path = Path(path)
    public_path = public_key_path(private_path)
    if not overwrite:
        for existing in (private_path, public_path):
            if existing.exists():
                raise OutputError(f"{existing} already exists; choose another --out or pass --force to replace it "
                                  "(bundles signed with the old key will no longer match it)")
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    try:
        # atomic_write_bytes stages in a mkstemp file, which is created 0600: the private key is never readable
        # by others, not even for a moment; the chmod only makes that explicit.
        atomic_write_bytes(private_path, private_pem)
        os.chmod(private_path, 0o600)
        atomic_write_bytes(public_path, public_pem)
        os.chmod(public_path, 0o644)
    except OSError as exc:
        raise OutputError(f"cannot write key to {private_path} ({exc.strerror or exc}); choose another --out") from exc
    return public_path


def _read_key_file(path: str | os.PathLike[str], what: str) -> bytes:
    path = Path(path)
    try:
        if path.stat().st_size > MAX_KEY_FILE_BYTES:
            raise BundleError(f"{path} is too large to be a {what} key file; give the file `edgepeft keygen` wrote")
        return path.read_bytes()
    except FileNotFoundError:
        raise BundleError(f"{what} key {path} does not exist; create a pair with `edgepeft keygen --out KEY`") from None
    except IsADirectoryError:
        raise BundleError(f"{what} key {path} is a directory; give the key file") from None
    except OSError as exc:
        raise BundleError(f"cannot read {what} key {path} ({exc.strerror or exc})") from None


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """The Ed25519 private key in a PEM file written by ``edgepeft keygen``."""
    data = _read_key_file(path, "private")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise BundleError(f"private key {path} is password-protected; give an unencrypted key from "
                          "`edgepeft keygen`") from None
    except (ValueError, UnsupportedAlgorithm):
        hint = " (that is a public key; give the private one, without .pub)" if b"PUBLIC KEY" in data else ""
        raise BundleError(f"{path} is not a PEM private key{hint}; create one with `edgepeft keygen --out KEY`"
                          ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError(f"{path} holds a {type(key).__name__.removeprefix('_')} key; bundles are signed with "
                          "Ed25519 keys, create one with `edgepeft keygen --out KEY`")
    return key


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """The Ed25519 public key in a PEM file (``KEY.pub`` from ``edgepeft keygen``)."""
    data = _read_key_file(path, "public")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        hint = " (that is a private key; devices get only KEY.pub)" if b"PRIVATE KEY" in data else ""
        raise BundleError(f"{path} is not a PEM public key{hint}; use the KEY.pub that `edgepeft keygen` wrote"
                          ) from None
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError(f"{path} holds a {type(key).__name__.removeprefix('_')} key; bundles are verified with "
                          "Ed25519 keys from `edgepeft keygen`")
    return key
