"""Fuzzing the device-side parser: whatever the bytes, read_bundle / verify_bundle raise BundleError or
return a bundle; they never raise anything else, and a modified bundle never verifies."""

from __future__ import annotations

import contextlib
import copy
import tempfile
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgepeft.core.errors import OutputError
from edgepeft.delta import BundleError, read_bundle, unpack_bundle, verify_bundle
from edgepeft.delta.bundle import HEADER, MAGIC, seal_bundle

FUZZ = settings(max_examples=75, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def _parse_or_refuse(data: bytes, key: Ed25519PrivateKey) -> None:
    with contextlib.suppress(BundleError):
        read_bundle(data)
    with pytest.raises(BundleError):
        verify_bundle(data, [key.public_key()])


@FUZZ
@given(data=st.binary(max_size=2048))
def test_random_bytes_are_refused(key: Ed25519PrivateKey, data: bytes) -> None:
    _parse_or_refuse(data, key)


@FUZZ
@given(manifest=st.binary(max_size=512), payload=st.binary(max_size=128), signature=st.binary(min_size=64, max_size=64))
def test_well_framed_junk_is_refused(key: Ed25519PrivateKey, manifest: bytes, payload: bytes, signature: bytes) -> None:
    header = HEADER.pack(MAGIC, 1, 0, len(manifest), len(payload))
    _parse_or_refuse(header + manifest + payload + signature, key)


@FUZZ
@given(st.data())
def test_any_modified_bundle_is_refused(key: Ed25519PrivateKey, bundle_bytes: bytes, data: st.DataObject) -> None:
    size = len(bundle_bytes)
    op = data.draw(st.sampled_from(["flip", "truncate", "insert", "delete", "overwrite"]))
    at = data.draw(st.integers(0, size - 1))
    if op == "flip":
        mutated = bytearray(bundle_bytes)
        mutated[at] ^= data.draw(st.integers(1, 255))
    elif op == "truncate":
        mutated = bytearray(bundle_bytes[:at])
    elif op == "insert":
        mutated = bytearray(bundle_bytes[:at] + data.draw(st.binary(min_size=1, max_size=16)) + bundle_bytes[at:])
    elif op == "delete":
        mutated = bytearray(bundle_bytes[:at] + bundle_bytes[at + data.draw(st.integers(1, 16)):])
    else:
        chunk = data.draw(st.binary(min_size=1, max_size=16))
        mutated = bytearray(bundle_bytes[:at] + chunk + bundle_bytes[at + len(chunk):])
    if bytes(mutated) == bundle_bytes:
        return  # an overwrite with the same bytes is no modification
    _parse_or_refuse(bytes(mutated), key)


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:3]):
            out += _paths(v, (*prefix, i))
    return out


@FUZZ
@given(st.data())
def test_signed_manifests_with_random_fields_parse_or_are_refused(
    key: Ed25519PrivateKey, bundle_bytes: bytes, data: st.DataObject
) -> None:
    """A trusted signer with a buggy packer: any field replaced by any JSON value. Verification and unpacking
    either work or raise BundleError; they never crash with another exception."""
    bundle = read_bundle(bundle_bytes)
    manifest = copy.deepcopy(bundle.manifest)
    path = data.draw(st.sampled_from(_paths(manifest)))
    parent = manifest
    for step in path[:-1]:
        parent = parent[step]
    parent[path[-1]] = data.draw(json_values)
    try:
        sealed = seal_bundle(manifest, bundle.payload, key)
    except (ValueError, BundleError):
        return  # not encodable (e.g. a float too large): the packer refuses before signing
    try:
        verified = verify_bundle(sealed, [key.public_key()])
    except BundleError:
        return
    with tempfile.TemporaryDirectory() as tmp, contextlib.suppress(BundleError, OutputError):
        unpack_bundle(verified, Path(tmp) / "out", durable=False)
