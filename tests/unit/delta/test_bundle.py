"""Bundles end to end: pack -> verify -> unpack -> load, and every way a device must refuse one."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgepeft.bench.deploy_bench import quantisation_effect
from edgepeft.core.config import read_json, write_json
from edgepeft.core.errors import ArtifactError, OutputError
from edgepeft.delta import (
    Bundle,
    BundleError,
    bundle_files,
    load_private_key,
    load_public_key,
    pack_bundle,
    read_bundle,
    read_bundle_file,
    save_keypair,
    unpack_bundle,
    verify_bundle,
    write_bundle,
)
from edgepeft.delta import pack as pack_module
from edgepeft.delta.bundle import HEADER, MAGIC, MAX_BUNDLE_BYTES, SIGNATURE_BYTES, signed_digest
from edgepeft.delta.manifest import canonical_json
from edgepeft.detect import detector as detector_module
from edgepeft.detect.core import SCHEMA_VERSIONS, detector_schema
from edgepeft.detect.detector import AnomalyDetector
from edgepeft.models.registry import load_card
from tests.conftest import sine_series

Resign = Callable[..., bytes]


def frame(manifest_bytes: bytes, payload: bytes, key: Ed25519PrivateKey) -> bytes:
    """A correctly framed and signed file around arbitrary manifest bytes."""
    body = HEADER.pack(MAGIC, 1, 0, len(manifest_bytes), len(payload)) + manifest_bytes + payload
    return body + key.sign(signed_digest(manifest_bytes, payload))


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_bundle_is_a_subclass_of_artifact_error_and_names_match_the_detector() -> None:
    assert issubclass(BundleError, ArtifactError)
    assert (pack_module.DETECTOR_FILE, pack_module.ADAPTER_DIR) == (
        detector_module.DETECTOR_FILE, detector_module.ADAPTER_DIR)


# ---------------------------------------------------------------------------------------------- round trips
def test_fp32_round_trip_recreates_the_files_and_scores_bitwise(
    detector_dir: Path, bundle_bytes: bytes, key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    bundle = verify_bundle(bundle_bytes, [key.public_key()], resident_base_sha256=load_card("tiny")["state_sha256"],
                           installed_release=4)
    assert (bundle.asset_id, bundle.version, bundle.release, bundle.parent_version) == ("pump-7", "1.4.0", 5, "1.3.0")
    assert bundle.to_bytes() == bundle_bytes
    out = unpack_bundle(bundle, tmp_path / "device" / "pump-7")
    original = tree_bytes(detector_dir)
    listed = {"detector.json", *(f"adapter/{name}" for name in bundle.manifest["detector"]["adapter_files"])}
    assert tree_bytes(out) == {name: blob for name, blob in original.items() if name in listed}
    X = sine_series(240, 3, seed=3)
    assert np.array_equal(AnomalyDetector.load(out).score(X), AnomalyDetector.load(detector_dir).score(X))


def test_bundle_files_are_the_folder_in_memory_and_a_parsed_bundle_verifies_once(
    detector_dir: Path, bundle_bytes: bytes, key: Ed25519PrivateKey
) -> None:
    """What a device loads from (no folder written) equals what unpacking writes; a Bundle parsed once can be
    verified without parsing again, and one whose manifest changed after parsing does not verify."""
    from safetensors.numpy import load_file

    parsed = read_bundle(bundle_bytes)
    bundle = verify_bundle(parsed, [key.public_key()], installed_release=4)
    files = bundle_files(bundle)
    assert files.state == read_json(detector_dir / "detector.json", versions=SCHEMA_VERSIONS)
    for name, tensors in files.tensors.items():
        on_disk = load_file(str(detector_dir / "adapter" / name))
        assert tensors.keys() == on_disk.keys()
        assert all(np.array_equal(tensors[k], on_disk[k]) for k in tensors), name
    assert files.texts["adapter_config.json"] == (detector_dir / "adapter" / "adapter_config.json").read_text()
    parsed.manifest["release"] = 99  # e.g. a caller "fixing" the counter after parsing
    with pytest.raises(BundleError, match="signature does not verify"):
        verify_bundle(parsed, [key.public_key()])


def test_per_channel_scoring_weights_travel_in_the_bundle(key: Ed25519PrivateKey, tmp_path: Path) -> None:
    """A detector with a slow channel (its blind weight 0) scores the same after pack -> verify -> unpack."""
    from tests.unit.detect.test_detector import _drifting_asset

    train, test = _drifting_asset()
    det = AnomalyDetector(base="tiny", method="lora", rank=4, steps=5, seed=0).fit(train)
    assert det.evidence_weights_[3, 1] == 0.0 and det.evidence_weights_[0, 1] > 0, det.evidence_weights_
    data = pack_bundle(det.save(tmp_path / "det"), key, asset_id="pump-9", version="1", release=1)
    bundle = verify_bundle(data, [key.public_key()], resident_base_sha256=load_card("tiny")["state_sha256"],
                           installed_release=0)
    loaded = AnomalyDetector.load(unpack_bundle(bundle, tmp_path / "device"))
    np.testing.assert_array_equal(loaded.evidence_weights_, det.evidence_weights_)
    assert loaded.channel_agg == det.channel_agg == "max"
    np.testing.assert_array_equal(loaded.score(test), det.score(test))


def test_zstd_is_lossless(detector_dir: Path, key: Ed25519PrivateKey, tmp_path: Path) -> None:
    data = pack_bundle(detector_dir, key, asset_id="pump-7", version="2", release=1, zstd=True)
    bundle = verify_bundle(data, [key.public_key()])
    assert bundle.manifest["payload"]["compression"] == "zstd"
    assert bundle.manifest["payload"]["length"] < bundle.manifest["payload"]["raw_length"]
    out = unpack_bundle(bundle, tmp_path / "zstd")
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == (
        detector_dir / "adapter" / "adapter_model.safetensors").read_bytes()


def test_int8_bundle_is_smaller_and_scores_close(detector_dir: Path) -> None:
    effect = quantisation_effect(detector_dir, sine_series(240, 3, seed=5))
    # Tensor bytes shrink 4x; per-tensor safetensors headers (long peft names, one scale each) do not, and
    # zstd is what removes their repetition. Measured here: 18.9 KB -> 8.8 KB -> 4.6 KB.
    assert effect["payload_bytes_int8"] < 0.5 * effect["payload_bytes_fp32"]
    assert effect["payload_bytes_int8_zstd"] < 0.3 * effect["payload_bytes_fp32"]
    # Measured: max change 2.5e-4 in score units, 0.02 % of the threshold; every alarm the same.
    assert effect["max_abs_score_change"] > 0 and effect["max_change_over_threshold"] < 0.01
    assert effect["alarm_agreement"] >= 0.99


def test_unpack_replaces_a_detector_but_refuses_other_folders(
    bundle_bytes: bytes, tmp_path: Path
) -> None:
    bundle = read_bundle(bundle_bytes)
    target = unpack_bundle(bundle, tmp_path / "slot")
    unpack_bundle(bundle, target)  # replace a detector with a complete one
    assert (target / "detector.json").is_file()
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(OutputError, match="holds no detector"):
        unpack_bundle(bundle, other)
    assert tree_bytes(other) == {"cat.jpg": b"meow"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos", "slot"]  # no staging left behind


def test_read_bundle_accepts_bytearray_and_memoryview(bundle_bytes: bytes) -> None:
    assert read_bundle(bytearray(bundle_bytes)).release == read_bundle(memoryview(bundle_bytes)).release == 5


# ---------------------------------------------------------------------------------------------- rejections
def test_tampered_payload_is_rejected(bundle_bytes: bytes, key: Ed25519PrivateKey) -> None:
    data = bytearray(bundle_bytes)
    data[-SIGNATURE_BYTES - 10] ^= 0x01
    with pytest.raises(BundleError, match="sha256 does not match"):
        verify_bundle(bytes(data), [key.public_key()])


def test_tampered_payload_with_a_matching_manifest_hash_fails_the_signature(
    bundle_bytes: bytes, key: Ed25519PrivateKey
) -> None:
    bundle = read_bundle(bundle_bytes)
    payload = bytearray(bundle.payload)
    payload[-5] ^= 0x40
    manifest = {**bundle.manifest, "payload": {**bundle.manifest["payload"],
                                               "sha256": hashlib.sha256(payload).hexdigest()}}
    forged = Bundle(manifest=manifest, payload=bytes(payload), signature=bundle.signature).to_bytes()
    with pytest.raises(BundleError, match="signature does not verify"):
        verify_bundle(forged, [key.public_key()])


def test_tampered_manifest_is_rejected(bundle_bytes: bytes, key: Ed25519PrivateKey) -> None:
    assert bundle_bytes.count(b'"release":5') == 1
    forged = bundle_bytes.replace(b'"release":5', b'"release":9')
    assert read_bundle(forged).release == 9  # well formed: only the signature can tell
    with pytest.raises(BundleError, match="signature does not verify"):
        verify_bundle(forged, [key.public_key()])


def test_tampered_signature_is_rejected(bundle_bytes: bytes, key: Ed25519PrivateKey) -> None:
    forged = bundle_bytes[:-SIGNATURE_BYTES] + bytes(SIGNATURE_BYTES)
    with pytest.raises(BundleError, match="signature does not verify"):
        verify_bundle(forged, [key.public_key()])


def test_unknown_signer_is_rejected(detector_dir: Path, key: Ed25519PrivateKey, other_key: Ed25519PrivateKey) -> None:
    data = pack_bundle(detector_dir, other_key, asset_id="pump-7", version="1", release=9)
    with pytest.raises(BundleError, match="not trusted here"):
        verify_bundle(data, [key.public_key()])
    assert verify_bundle(data, [key.public_key(), other_key.public_key()]).release == 9


def test_wrong_key_claiming_a_trusted_id_is_rejected(resign: Resign, key: Ed25519PrivateKey,
                                                     other_key: Ed25519PrivateKey) -> None:
    data = resign(lambda m: None, signing_key=other_key)  # manifest still names the trusted key
    with pytest.raises(BundleError, match="signature does not verify"):
        verify_bundle(data, [key.public_key()])


def test_no_trusted_keys_is_an_error(bundle_bytes: bytes) -> None:
    with pytest.raises(BundleError, match="no trusted public keys"):
        verify_bundle(bundle_bytes, [])


def test_other_base_is_rejected(bundle_bytes: bytes, key: Ed25519PrivateKey) -> None:
    with pytest.raises(BundleError, match="resident base"):
        verify_bundle(bundle_bytes, [key.public_key()], resident_base_sha256="ab" * 32)


@pytest.mark.parametrize("installed", [5, 6, 100])
def test_replay_and_rollback_are_rejected(bundle_bytes: bytes, key: Ed25519PrivateKey, installed: int) -> None:
    with pytest.raises(BundleError, match="not newer than the installed release"):
        verify_bundle(bundle_bytes, [key.public_key()], installed_release=installed)
    # an operator's explicit rollback goes through
    assert verify_bundle(bundle_bytes, [key.public_key()], installed_release=installed, allow_rollback=True)


def test_expired_bundle_is_rejected(bundle_bytes: bytes, key: Ed25519PrivateKey) -> None:
    bundle = read_bundle(bundle_bytes)
    assert bundle.expires_at == bundle.created_at + timedelta(days=30)
    with pytest.raises(BundleError, match="expired at"):
        verify_bundle(bundle_bytes, [key.public_key()], now=bundle.created_at + timedelta(days=31))
    naive = (bundle.created_at + timedelta(days=29)).replace(tzinfo=None)  # naive is taken as UTC
    assert verify_bundle(bundle_bytes, [key.public_key()], now=naive).release == 5


@pytest.mark.parametrize("keep", [0, 10, HEADER.size, HEADER.size + SIGNATURE_BYTES, 500, -SIGNATURE_BYTES, -1])
def test_truncated_file_is_rejected(bundle_bytes: bytes, keep: int) -> None:
    with pytest.raises(BundleError, match="truncated"):
        read_bundle(bundle_bytes[:keep])


def test_oversized_file_is_rejected_before_parsing(bundle_bytes: bytes, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="over the"):
        read_bundle(bundle_bytes + bytes(MAX_BUNDLE_BYTES))
    huge = tmp_path / "huge.edelta"
    with open(huge, "wb") as handle:
        handle.truncate(MAX_BUNDLE_BYTES + 1)  # sparse: no disk used, never read into memory
    with pytest.raises(BundleError, match="over the"):
        read_bundle_file(huge)
    header = HEADER.pack(MAGIC, 1, 0, 2**31, 10)  # lies about the manifest length
    with pytest.raises(BundleError, match="over the limits"):
        read_bundle(header + bytes(100))
    with pytest.raises(BundleError, match="unexpected bytes after its signature"):
        read_bundle(bundle_bytes + b"\0")


@pytest.mark.parametrize(
    ("prefix", "message"),
    [(b"PK\x03\x04" + bytes(4), "wrong magic"), (MAGIC + b"\x00\x02\x00\x00", "format version 2"),
     (MAGIC + b"\x00\x01\x00\x01", "flags")],
)
def test_wrong_magic_version_or_flags_are_rejected(bundle_bytes: bytes, prefix: bytes, message: str) -> None:
    with pytest.raises(BundleError, match=message):
        read_bundle(prefix + bundle_bytes[len(prefix):])


@pytest.mark.parametrize(
    ("manifest_bytes", "message"),
    [
        (b"not json", "not valid JSON"),
        (b'{"a": 1}', "canonical"),
        (b'{"a":1,"a":2}', "duplicate key"),
        (b'{"a":NaN}', "not valid JSON"),
        (b'{"a":"\xc3\xa9"}', "not valid JSON"),
        (b"[1]", "not a JSON object"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
        (b'{"a":' + b"[" * 20 + b"]" * 20 + b"}", "nests deeper"),
        (b"{}", "schema_version None"),
    ],
)
def test_malformed_manifest_is_rejected(key: Ed25519PrivateKey, manifest_bytes: bytes, message: str) -> None:
    with pytest.raises(BundleError, match=message):
        verify_bundle(frame(manifest_bytes, b"", key), [key.public_key()])


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(manifest: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        for part in parents:
            manifest = manifest[part]
        manifest[last] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_set("schema_version", 2), "schema_version 2; this edgepeft reads 1"),
        (lambda m: m.pop("asset_id"), "lacks \\['asset_id'\\]"),
        (_set("extra", 1), "unexpected fields \\['extra'\\]"),
        (_set("release", "5"), "release has the wrong type"),
        (_set("release", True), "release has the wrong type"),
        (_set("release", -1), "outside"),
        (_set("asset_id", "../../etc"), "asset id '../../etc' is not allowed"),
        (_set("adapter_version", ""), "adapter version '' is not allowed"),
        (_set("signer", "xyz"), "not a lower-case hex digest"),
        (_set("created_at", "yesterday"), "not a UTC time"),
        (_set("expires_at", "2000-01-01T00:00:00Z"), "not after created_at"),
        (_set("base.sha256", "ABC"), "not a lower-case hex digest"),
        (_set("peft.method", "dora"), "disagrees with peft.config"),
        (_set("preprocessing.channel_error", [1.0]), "one entry of numbers per channel"),
        (_set("threshold.value", 123.0), "disagrees with threshold.state"),
        (_set("metrics", {"auc": "high"}), "metrics must map names to numbers"),
        (_set("detector.base", "small"), "repeats \\['base'\\]"),
        (_set("detector.schema_version", 2), "repeats \\['schema_version'\\]"),
        (_set("adapter.files", [{"name": "../x.safetensors", "metadata": None}]), "adapter file name"),
        (_set("adapter.files", [{"name": "a.json", "text": "\ud800"}]), "not UTF-8 text"),
        (_set("detector.adapter_files", ["ghost.safetensors"]), "does not carry"),
        (_set("payload.compression", "lzma"), "compression 'lzma' is unknown"),
        (_set("payload.tensors", "fp4"), "tensor encoding 'fp4' is unknown"),
        (lambda m: m["payload"].update(length=7, raw_length=7), "bytes but the manifest says 7"),
        (_set("payload.raw_length", 7), "raw_length differs from length"),
        (_set("payload.sha256", "0" * 64), "sha256 does not match"),
    ],
)
def test_signed_but_malformed_manifest_is_rejected(
    resign: Resign, key: Ed25519PrivateKey, edit: Callable[[dict[str, Any]], Any], message: str
) -> None:
    with pytest.raises(BundleError, match=message):
        verify_bundle(resign(edit), [key.public_key()])


def _payload_edit(payload: bytes, raw_length: int | None = None, compression: str = "raw") -> Callable[..., None]:
    def edit(manifest: dict[str, Any]) -> None:
        manifest["payload"].update(sha256=hashlib.sha256(payload).hexdigest(), length=len(payload),
                                   raw_length=len(payload) if raw_length is None else raw_length,
                                   compression=compression)

    return edit


def _zstd(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor().compress(data)


@pytest.mark.parametrize(
    ("payload", "raw_length", "compression", "message"),
    [
        (b"garbage!" * 4, None, "raw", "not a readable safetensors"),
        (b"", None, "raw", "not a readable safetensors"),
        (_zstd(bytes(10_000_000)), 100, "zstd", "decompresses to more than"),
        (b"\x28\xb5\x2f\xfd garbage", 100, "zstd", "not valid zstd"),
        (_zstd(b"short"), 100, "zstd", "decodes to 5 bytes"),
    ],
)
def test_signed_bundle_with_a_broken_payload_changes_nothing(
    resign: Resign, key: Ed25519PrivateKey, bundle_bytes: bytes, tmp_path: Path,
    payload: bytes, raw_length: int | None, compression: str, message: str,
) -> None:
    slot = unpack_bundle(read_bundle(bundle_bytes), tmp_path / "slot")
    before = tree_bytes(slot)
    data = resign(_payload_edit(payload, raw_length, compression), payload=payload)
    bundle = verify_bundle(data, [key.public_key()])  # signed by a trusted key: only unpacking can tell
    with pytest.raises(BundleError, match=message):
        unpack_bundle(bundle, slot)
    assert tree_bytes(slot) == before
    assert [p.name for p in tmp_path.iterdir()] == ["slot"]


def test_payload_tensors_must_belong_to_a_listed_file(resign: Resign, key: Ed25519PrivateKey, tmp_path: Path) -> None:
    from safetensors.numpy import save

    payload = save({"other.safetensors/w": np.zeros(2, dtype=np.float32)})
    bundle = verify_bundle(resign(_payload_edit(payload), payload=payload), [key.public_key()])
    with pytest.raises(BundleError, match="belongs to no adapter file"):
        unpack_bundle(bundle, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- packing
def test_pack_refuses_bad_arguments_and_folders(detector_dir: Path, key: Ed25519PrivateKey, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="asset id 'a/b' is not allowed"):
        pack_bundle(detector_dir, key, asset_id="a/b", version="1", release=1)
    with pytest.raises(BundleError, match="release must be a whole number"):
        pack_bundle(detector_dir, key, asset_id="a", version="1", release=-3)
    with pytest.raises(BundleError, match="expires-days"):
        pack_bundle(detector_dir, key, asset_id="a", version="1", release=1, expires_days=0)
    with pytest.raises(BundleError, match="not a detector directory"):
        pack_bundle(tmp_path, key, asset_id="a", version="1", release=1)
    with pytest.raises(OutputError, match="end in .edelta"):
        write_bundle(b"x", tmp_path / "bundle.zip")


def test_pack_turns_nan_metrics_into_null_and_refuses_other_nans(
    detector_dir: Path, key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    copy = tmp_path / "det"
    shutil.copytree(detector_dir, copy)
    state = read_json(copy / "detector.json", versions=SCHEMA_VERSIONS)
    state["report"]["train_loss"] = float("nan")  # what a zero-step fit reports
    write_json(copy / "detector.json", state, version=detector_schema(state))
    bundle = read_bundle(pack_bundle(copy, key, asset_id="a", version="1", release=1))
    assert bundle.manifest["metrics"]["train_loss"] is None
    assert AnomalyDetector.load(unpack_bundle(bundle, tmp_path / "out")).report_["train_loss"] is None
    state["threshold"]["gamma"] = float("inf")
    write_json(copy / "detector.json", state, version=detector_schema(state))
    with pytest.raises(BundleError, match="threshold.state.gamma is inf; re-fit"):
        pack_bundle(copy, key, asset_id="a", version="1", release=1)


def test_pack_sets_times_from_now(detector_dir: Path, key: Ed25519PrivateKey) -> None:
    now = datetime(2026, 11, 22, 4, 30, 15, 123456, tzinfo=UTC)
    bundle = read_bundle(pack_bundle(detector_dir, key, asset_id="a", version="1", release=1, expires_days=1.5,
                                     now=now))
    assert bundle.manifest["created_at"] == "2026-11-22T04:30:15Z"
    assert bundle.manifest["expires_at"] == "2026-11-23T16:30:15Z"
    assert canonical_json(bundle.manifest) in bundle.to_bytes()


# ---------------------------------------------------------------------------------------------- keys
def test_key_files(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    public_path = save_keypair(key, tmp_path / "fleet.key")
    assert public_path.name == "fleet.key.pub"
    assert os.stat(tmp_path / "fleet.key").st_mode & 0o777 == 0o600
    assert load_public_key(public_path) == key.public_key()
    assert load_private_key(tmp_path / "fleet.key").public_key() == key.public_key()
    with pytest.raises(OutputError, match="already exists"):
        save_keypair(key, tmp_path / "fleet.key")

    with pytest.raises(BundleError, match="that is a public key"):
        load_private_key(public_path)
    with pytest.raises(BundleError, match="that is a private key"):
        load_public_key(tmp_path / "fleet.key")
    with pytest.raises(BundleError, match="does not exist; create a pair"):
        load_public_key(tmp_path / "missing.pub")
    (tmp_path / "junk").write_bytes(os.urandom(100))
    with pytest.raises(BundleError, match="not a PEM private key"):
        load_private_key(tmp_path / "junk")

    ec_key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "ec.key").write_bytes(ec_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with pytest.raises(BundleError, match="Ed25519"):
        load_private_key(tmp_path / "ec.key")
    (tmp_path / "locked.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    with pytest.raises(BundleError, match="password-protected"):
        load_private_key(tmp_path / "locked.key")


@pytest.mark.parametrize("value", [
    "2026-13-22T04:30:00Z", "2026-02-30T00:00:00Z", "2026-11-22 04:30:00Z", "2026-11-22T04:30:00+",
    "\u0662\u0660\u0662\u0666-11-22T04:30:00Z", "+026-11-22T04:30:00Z", "2026-11-22T04:30:0Z", "2026-11-22t04:30:00z",
])
def test_manifest_times_are_exactly_the_utc_format(value: str) -> None:
    from edgepeft.delta.manifest import parse_time

    assert parse_time("2026-11-22T04:30:00Z", "created_at").isoformat() == "2026-11-22T04:30:00+00:00"
    with pytest.raises(BundleError, match="not a UTC time"):
        parse_time(value, "created_at")
