"""The ``.edelta`` file: one adapter version, its manifest and its signature in a single file.

Layout (all integers big-endian)::

    offset  size  field
    0       8     magic  b"\\x89EPD\\r\\n\\x1a\\n"  (PNG-style: catches text-mode transfers and truncation to 7 bits)
    8       2     format version (1)
    10      2     flags (0; any other value is refused)
    12      4     manifest length M (<= 256 KiB)
    16      4     payload length P (<= 64 MiB)
    20      M     manifest: canonical JSON (see :mod:`edgepeft.delta.manifest`)
    20+M    P     payload: one safetensors blob with every adapter tensor, maybe int8, maybe zstd
    20+M+P  64    Ed25519 signature

The file must be exactly ``20 + M + P + 64`` bytes, and the sizes are checked before any JSON is parsed.
The signature is over ``sha256(b"edgepeft-delta-v1\\x00" || header || manifest || payload)``: everything before
it, domain-separated so no other signed message of ours can be replayed as a bundle.

Device side, in order: :func:`read_bundle` (structure, limits, schema, payload hash) then
:func:`verify_bundle` (signer, then base, release and expiry policy), then
:func:`edgepeft.delta.pack.unpack_bundle`.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgepeft.delta.errors import BundleError
from edgepeft.delta.keys import key_id
from edgepeft.delta.manifest import (
    as_utc,
    canonical_json,
    format_time,
    parse_manifest,
    parse_time,
    validate_manifest,
)

MAGIC = b"\x89EPD\r\n\x1a\n"
FORMAT_VERSION = 1
HEADER = struct.Struct(">8sHHII")
SIGNATURE_BYTES = 64
DOMAIN = b"edgepeft-delta-v1\x00"
MAX_MANIFEST_BYTES = 256 * 1024
MAX_PAYLOAD_BYTES = 64 * 1024 * 1024
MAX_BUNDLE_BYTES = HEADER.size + MAX_MANIFEST_BYTES + MAX_PAYLOAD_BYTES + SIGNATURE_BYTES
SUFFIX = ".edelta"


@dataclass(frozen=True)
class Bundle:
    """A parsed bundle: the manifest (a dict), the payload bytes and the 64-byte signature.

    Getting one from :func:`read_bundle` means only that it is well formed; from :func:`verify_bundle`,
    that a trusted key signed it and it suits this device.

    Example (a real detector on synthetic data):
        >>> import tempfile
        >>> import numpy as np
        >>> from edgepeft.delta import generate_key, pack_bundle, unpack_bundle
        >>> from edgepeft.detect.detector import AnomalyDetector
        >>> t = np.arange(300)
        >>> X = np.c_[np.sin(t / 5), np.cos(t / 5), np.sin(t / 7)]
        >>> folder = AnomalyDetector(base="tiny", method="lora", rank=4, steps=3).fit(X).save(tempfile.mkdtemp())
        >>> key = generate_key()
        >>> data = pack_bundle(folder, key, asset_id="pump-7", version="1.0.0", release=1)
        >>> bundle = verify_bundle(data, [key.public_key()], installed_release=0)
        >>> bundle.asset_id, bundle.version, bundle.release
        ('pump-7', '1.0.0', 1)
        >>> AnomalyDetector.load(unpack_bundle(bundle, folder.parent / "unpacked")).score(X).shape
        (300,)
    """

    manifest: dict[str, Any]
    payload: bytes
    signature: bytes

    @property
    def asset_id(self) -> str:
        return str(self.manifest["asset_id"])

    @property
    def version(self) -> str:
        return str(self.manifest["adapter_version"])

    @property
    def release(self) -> int:
        return int(self.manifest["release"])

    @property
    def parent_version(self) -> str | None:
        return self.manifest["parent_version"]

    @property
    def base_name(self) -> str:
        return str(self.manifest["base"]["name"])

    @property
    def base_sha256(self) -> str:
        return str(self.manifest["base"]["sha256"])

    @property
    def signer(self) -> str:
        """Key id of the key that (claims to have) signed it; verified only by :func:`verify_bundle`."""
        return str(self.manifest["signer"])

    @property
    def created_at(self) -> datetime:
        return parse_time(self.manifest["created_at"], "created_at")

    @property
    def expires_at(self) -> datetime | None:
        value = self.manifest["expires_at"]
        return None if value is None else parse_time(value, "expires_at")

    def to_bytes(self) -> bytes:
        """The file bytes (identical to what :func:`read_bundle` parsed: the manifest encoding is canonical)."""
        return _frame(canonical_json(self.manifest), self.payload) + self.signature


def _frame(manifest_bytes: bytes, payload: bytes) -> bytes:
    header = HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(manifest_bytes), len(payload))
    return header + manifest_bytes + payload


def signed_digest(manifest_bytes: bytes, payload: bytes) -> bytes:
    """The 32 bytes the Ed25519 signature covers: everything before the signature, domain-separated."""
    return hashlib.sha256(DOMAIN + _frame(manifest_bytes, payload)).digest()


def seal_bundle(manifest: dict[str, Any], payload: bytes, private_key: Ed25519PrivateKey) -> bytes:
    """Frame and sign a manifest and payload (the manifest's ``signer`` must name ``private_key``)."""
    manifest_bytes = canonical_json(manifest)
    if len(manifest_bytes) > MAX_MANIFEST_BYTES:
        raise BundleError(f"manifest is {len(manifest_bytes):,} bytes, over the {MAX_MANIFEST_BYTES:,}-byte limit; "
                          "the detector has too many channels to ship as one bundle")
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise BundleError(f"payload is {len(payload):,} bytes, over the {MAX_PAYLOAD_BYTES:,}-byte limit; "
                          "ship a smaller adapter (lower rank, or --int8 --zstd)")
    signature = private_key.sign(signed_digest(manifest_bytes, payload))
    return _frame(manifest_bytes, payload) + signature


def read_bundle(data: bytes) -> Bundle:
    """Parse a bundle: sizes, header, canonical JSON, manifest schema, payload length and sha256.

    Raises :class:`BundleError` on anything malformed; checks no signature (see :func:`verify_bundle`).
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise BundleError(f"a bundle is bytes, not {type(data).__name__}")
    data = bytes(data)
    size = len(data)
    if size > MAX_BUNDLE_BYTES:
        raise BundleError(f"bundle is {size:,} bytes, over the {MAX_BUNDLE_BYTES:,}-byte limit; refusing to parse it")
    if size < HEADER.size + SIGNATURE_BYTES:
        raise BundleError(f"bundle is truncated ({size} bytes, a header and signature alone take "
                          f"{HEADER.size + SIGNATURE_BYTES}); download it again")
    magic, version, flags, manifest_len, payload_len = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise BundleError("not an edgepeft bundle (wrong magic bytes); give a .edelta file from `edgepeft pack`")
    if version != FORMAT_VERSION:
        raise BundleError(f"bundle format version {version} is not one this edgepeft reads ({FORMAT_VERSION}); "
                          "upgrade edgepeft on this device")
    if flags != 0:
        raise BundleError(f"bundle header flags are {flags:#06x}, expected 0; the file is corrupt or from a newer "
                          "edgepeft")
    if manifest_len > MAX_MANIFEST_BYTES or payload_len > MAX_PAYLOAD_BYTES:
        raise BundleError(f"bundle declares a {manifest_len:,}-byte manifest and a {payload_len:,}-byte payload, "
                          f"over the limits ({MAX_MANIFEST_BYTES:,} / {MAX_PAYLOAD_BYTES:,}); refusing to parse it")
    expected = HEADER.size + manifest_len + payload_len + SIGNATURE_BYTES
    if size < expected:
        raise BundleError(f"bundle is truncated ({size:,} of {expected:,} bytes); download it again")
    if size > expected:
        raise BundleError(f"bundle has {size - expected:,} unexpected bytes after its signature; the file is "
                          "corrupt, download it again")
    manifest_end = HEADER.size + manifest_len
    manifest = validate_manifest(parse_manifest(data[HEADER.size:manifest_end]))
    payload = data[manifest_end : manifest_end + payload_len]
    check_payload(manifest, payload)
    return Bundle(manifest=manifest, payload=payload, signature=data[manifest_end + payload_len :])


def check_payload(manifest: dict[str, Any], payload: bytes) -> None:
    """The payload is exactly the length and sha256 the manifest declares."""
    declared = manifest["payload"]
    if len(payload) != declared["length"]:
        raise BundleError(f"payload is {len(payload):,} bytes but the manifest says {declared['length']:,}; "
                          "the bundle is corrupt or tampered, do not install it")
    if hashlib.sha256(payload).hexdigest() != declared["sha256"]:
        raise BundleError("payload sha256 does not match the manifest; the bundle is corrupt or tampered, "
                          "do not install it")


def verify_bundle(
    data: bytes | Bundle,
    trusted_keys: Sequence[Ed25519PublicKey],
    *,
    resident_base_sha256: str | None = None,
    installed_release: int | None = None,
    allow_rollback: bool = False,
    now: datetime | None = None,
) -> Bundle:
    """Parse ``data`` and accept it only if a trusted key signed it and it suits this device.

    ``data`` is the file's bytes, or a :class:`Bundle` that :func:`read_bundle` already parsed from them (a device
    parses once to learn which asset's release counter applies, then verifies without parsing again). The
    signature is checked over the parsed manifest and payload, so a Bundle changed after parsing fails.
    Checks, in order: structure (:func:`read_bundle`); signer among ``trusted_keys`` and signature valid;
    not expired at ``now`` (default: the current time; a naive datetime is taken as UTC); base hash equal to
    ``resident_base_sha256`` when given; release counter above ``installed_release`` when given, unless
    ``allow_rollback`` (an explicit operator rollback; an equal release is refused too, as a replay).
    Nothing about the manifest is trusted until the signature has been checked.
    """
    bundle = data if isinstance(data, Bundle) else read_bundle(data)
    keys = list(trusted_keys)
    if not keys:
        raise BundleError("no trusted public keys given; pass the fleet's KEY.pub from `edgepeft keygen`")
    if not all(isinstance(key, Ed25519PublicKey) for key in keys):
        raise BundleError("trusted keys must be Ed25519 public keys; load them with load_public_key(path)")
    candidates = [key for key in keys if key_id(key) == bundle.signer]
    if not candidates:
        trusted = ", ".join(sorted(key_id(key) for key in keys))
        raise BundleError(f"bundle is signed by key {bundle.signer}, which is not trusted here (trusted: {trusted}); "
                          "do not install it, or add that signer's public key")
    # Re-encoded from the parsed manifest, not taken from the file: what is checked is what will be used.
    digest = signed_digest(canonical_json(bundle.manifest), bundle.payload)
    if not any(_valid(key, bundle.signature, digest) for key in candidates):
        raise BundleError(f"bundle signature does not verify with key {bundle.signer}: the bundle was modified "
                          "after signing; do not install it, fetch it again from the release server")

    moment = as_utc(now)
    expires = bundle.expires_at
    if expires is not None and moment >= expires:
        raise BundleError(f"bundle {bundle.asset_id} {bundle.version} expired at {format_time(expires)} (now "
                          f"{format_time(moment)}); ask for a freshly signed bundle, or check this device's clock")
    if resident_base_sha256 is not None and bundle.base_sha256 != resident_base_sha256.strip().lower():
        raise BundleError(f"bundle needs base {bundle.base_name!r} with sha256 {bundle.base_sha256[:16]}… but the "
                          f"resident base is {resident_base_sha256[:16]}…; install that base or re-adapt on this one")
    if installed_release is not None and bundle.release <= installed_release and not allow_rollback:
        raise BundleError(f"bundle release {bundle.release} is not newer than the installed release "
                          f"{installed_release}: refusing a replayed or rolled-back bundle; to roll back on purpose, "
                          "allow rollback explicitly")
    return bundle


def _valid(key: Ed25519PublicKey, signature: bytes, digest: bytes) -> bool:
    try:
        key.verify(signature, digest)
    except InvalidSignature:
        return False
    return True

