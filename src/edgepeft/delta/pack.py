"""Detector directory -> signed bundle (server side) and verified bundle -> detector directory (device side).

``pack_bundle`` reads what ``AnomalyDetector.save`` wrote (detector.json and the adapter files it lists)
without importing torch; ``unpack_bundle`` writes a directory that ``AnomalyDetector.load`` accepts and,
for an fp32 bundle, whose files are byte-identical to the packed ones, so it scores bitwise identically.
Files in the adapter folder that detector.json does not list (peft's README.md model card) stay behind:
they are boilerplate that loading never reads, and every byte is paid for on every download.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgepeft.core.config import atomic_write_bytes, fsync_dir, read_json, write_json
from edgepeft.core.errors import OutputError
from edgepeft.delta.bundle import SUFFIX, Bundle, check_payload, read_bundle, seal_bundle
from edgepeft.delta.errors import BundleError
from edgepeft.delta.keys import key_id
from edgepeft.delta.manifest import (
    MANIFEST_SCHEMA_VERSION,
    MAX_RELEASE,
    MAX_TEXT_FILE_BYTES,
    PAYLOAD_FORMAT,
    as_utc,
    check_name,
    detector_state_to_sections,
    format_time,
    sections_to_detector_state,
    validate_manifest,
)
from edgepeft.delta.payload import decode_payload, encode_payload, file_tensors
from edgepeft.detect.core import SCHEMA_VERSIONS, detector_schema

# The names AnomalyDetector.save uses; repeated here (not imported) so that packing and unpacking never pull
# in torch and peft through edgepeft.detect. tests/unit/delta checks they agree.
DETECTOR_FILE = "detector.json"
ADAPTER_DIR = "adapter"


def pack_bundle(
    detector_dir: str | os.PathLike[str],
    private_key: Ed25519PrivateKey,
    *,
    asset_id: str,
    version: str,
    release: int,
    parent_version: str | None = None,
    expires_days: float | None = None,
    int8: bool = False,
    zstd: bool = False,
    now: datetime | None = None,
) -> bytes:
    """Sign a saved detector into ``.edelta`` bytes (write them with :func:`write_bundle`)."""
    check_name(asset_id, "asset id")
    check_name(version, "adapter version")
    if parent_version is not None:
        check_name(parent_version, "parent version")
        if parent_version == version:
            raise BundleError(f"parent version {parent_version!r} is the version itself; give the previous version")
    if isinstance(release, bool) or not isinstance(release, int) or not 0 <= release <= MAX_RELEASE:
        raise BundleError(f"release must be a whole number from 0 to {MAX_RELEASE}, got {release!r}; "
                          "use a counter that grows with every release of this asset")
    if expires_days is not None and not (0 < expires_days <= 36500):
        raise BundleError(f"expires-days must be in (0, 36500], got {expires_days}")
    created = as_utc(now).replace(microsecond=0)
    expires = None if expires_days is None else created + timedelta(days=expires_days)

    directory = Path(detector_dir)
    if not (directory / DETECTOR_FILE).is_file():
        raise BundleError(f"{directory} is not a detector directory (no {DETECTOR_FILE}); "
                          "give the folder `edgepeft adapt --out` wrote")
    state = read_json(directory / DETECTOR_FILE, versions=SCHEMA_VERSIONS)
    sections = detector_state_to_sections(state)
    listed = state.get("adapter_files")
    if not isinstance(listed, list) or not listed or not all(isinstance(name, str) for name in listed):
        raise BundleError(f"{directory / DETECTOR_FILE} lists no adapter files; re-save the detector")
    entries, tensors = _read_adapter(directory / ADAPTER_DIR, listed)
    payload, raw_length = encode_payload(tensors, int8=int8, zstd=zstd)
    manifest = {
        "schema_version": MANIFEST_SCHEMA_VERSION,
        "asset_id": asset_id,
        "adapter_version": version,
        "release": release,
        "parent_version": parent_version,
        "created_at": format_time(created),
        "expires_at": None if expires is None else format_time(expires),
        "signer": key_id(private_key.public_key()),
        **sections,
        "adapter": {"files": entries},
        "payload": {
            "format": PAYLOAD_FORMAT,
            "sha256": _sha256(payload),
            "length": len(payload),
            "raw_length": raw_length,
            "compression": "zstd" if zstd else "raw",
            "tensors": "int8" if int8 else "fp32",
        },
    }
    _check_finite(manifest)
    validate_manifest(manifest)
    data = seal_bundle(manifest, payload, private_key)
    read_bundle(data)  # what we sign, a device must be able to parse: fail here, not in the field
    return data


# peft LoRA settings the device's adapter-as-input ONNX scoring graph computes exactly.
PLAIN_LORA = {"use_dora": False, "fan_in_fan_out": False, "bias": "none", "lora_bias": False}


def graph_refusal(method: str, adapter_config: dict[str, Any] | None) -> str | None:
    """Why a torch-free device (one ONNX scoring graph, `edgepeft serve --graph`) cannot serve an adapter, or None
    when it can: plain LoRA only (the graph takes LoRA A/B as inputs; other methods change the model itself).

    >>> graph_refusal("lora", {"peft_type": "LORA", "r": 8}) is None
    True
    >>> graph_refusal("ia3", {"peft_type": "IA3"})
    "method 'ia3' has no adapter-as-input ONNX graph (LoRA only)"
    """
    if method != "lora":
        return f"method {method!r} has no adapter-as-input ONNX graph (LoRA only)"
    config = adapter_config or {}
    if config.get("peft_type") != "LORA":
        return f"peft type {config.get('peft_type')!r} has no adapter-as-input ONNX graph"
    for key, plain in PLAIN_LORA.items():
        if config.get(key, plain) != plain:
            return f"LoRA with {key}={config.get(key)!r} has no adapter-as-input ONNX graph"
    if config.get("rank_pattern") or config.get("alpha_pattern") or config.get("modules_to_save"):
        return "LoRA with per-module ranks or extra trained modules has no adapter-as-input ONNX graph"
    return None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_finite(obj: Any, where: str = "manifest") -> None:
    # Canonical JSON has no NaN/Infinity; name the field so the user knows what to re-fit.
    if isinstance(obj, float) and not np.isfinite(obj):
        raise BundleError(f"detector state {where} is {obj}; re-fit the detector (bundles carry finite numbers only)")
    if isinstance(obj, dict):
        for key, value in obj.items():
            _check_finite(value, f"{where}.{key}")
    elif isinstance(obj, list):
        for index, value in enumerate(obj):
            _check_finite(value, f"{where}[{index}]")


def _read_adapter(
    adapter_dir: Path, listed: list[str]
) -> tuple[list[dict[str, Any]], dict[str, dict[str, np.ndarray]]]:
    entries: list[dict[str, Any]] = []
    tensors: dict[str, dict[str, np.ndarray]] = {}
    for name in listed:
        check_name(name, "adapter file name")
        path = adapter_dir / name
        if not path.is_file() or path.is_symlink():
            raise BundleError(f"adapter file {path} is missing or not a regular file; re-save the detector")
        if name.endswith(".safetensors"):
            file_tensor_map, metadata = file_tensors(path)
            tensors[name] = file_tensor_map
            entries.append({"name": name, "metadata": metadata})
        else:
            raw = path.read_bytes()
            if len(raw) > MAX_TEXT_FILE_BYTES:
                raise BundleError(f"adapter file {path} is over {MAX_TEXT_FILE_BYTES:,} bytes; only tensors "
                                  "(*.safetensors) and small text files can travel in a bundle")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise BundleError(f"adapter file {path} is not UTF-8 text; only tensors (*.safetensors) and text "
                                  "files can travel in a bundle") from None
            entries.append({"name": name, "text": text})
    return entries, tensors


def write_bundle(data: bytes, path: str | os.PathLike[str]) -> Path:
    """Write bundle bytes atomically (a reader sees the old file or the new one, never half of one)."""
    target = Path(path)
    if target.suffix != SUFFIX:
        raise OutputError(f"bundle file names end in {SUFFIX}; got {target.name}")
    try:
        atomic_write_bytes(target, data)
    except OSError as exc:
        raise OutputError(f"cannot write {target} ({exc.strerror or exc}); choose another --out") from exc
    return target


def read_bundle_file(path: str | os.PathLike[str]) -> bytes:
    """The bytes of a bundle file, refusing an oversized one before reading it into memory."""
    from edgepeft.delta.bundle import MAX_BUNDLE_BYTES

    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_BUNDLE_BYTES:
            raise BundleError(f"{path} is {size:,} bytes, over the {MAX_BUNDLE_BYTES:,}-byte bundle limit; "
                              "it is not a bundle from `edgepeft pack`")
        return path.read_bytes()
    except FileNotFoundError:
        raise BundleError(f"bundle {path} does not exist; give a .edelta file from `edgepeft pack`") from None
    except IsADirectoryError:
        raise BundleError(f"{path} is a directory; give a .edelta file from `edgepeft pack`") from None
    except OSError as exc:
        raise BundleError(f"cannot read bundle {path} ({exc.strerror or exc})") from None


@dataclass(frozen=True)
class BundleFiles:
    """What a verified bundle holds, decoded in memory: the detector folder without touching a disk.

    Attributes:
        state: the contents of ``detector.json``.
        tensors: the adapter folder's safetensors files by file name, each ``{tensor name: float array}``
            (int8 tensors are already dequantised).
        texts: the adapter folder's text files by file name (peft's ``adapter_config.json``).
    """

    state: dict[str, Any]
    tensors: dict[str, dict[str, np.ndarray]]
    texts: dict[str, str]


def bundle_files(bundle: Bundle, *, validated: bool = False) -> BundleFiles:
    """Decode a (verified) bundle into the detector folder's contents; BundleError if they do not decode.

    A device loads an adapter straight from these; :func:`unpack_bundle` writes them out as a folder. The
    manifest's schema and the payload's hash are checked again unless ``validated``: the caller got the bundle
    from :func:`read_bundle` (which checks both) and has not changed it since.
    """
    if not validated:
        validate_manifest(bundle.manifest)
        check_payload(bundle.manifest, bundle.payload)
    entries = bundle.manifest["adapter"]["files"]
    tensor_files = [entry["name"] for entry in entries if "metadata" in entry]
    declared = bundle.manifest["payload"]
    tensors = decode_payload(bundle.payload, tensor_files, tensors=declared["tensors"],
                             compression=declared["compression"], raw_length=declared["raw_length"])
    texts = {entry["name"]: entry["text"] for entry in entries if "text" in entry}
    return BundleFiles(state=sections_to_detector_state(bundle.manifest), tensors=tensors, texts=texts)


def unpack_bundle(bundle: Bundle, out_dir: str | os.PathLike[str], *, durable: bool = True) -> Path:
    """Write the detector directory a (verified) bundle holds; return its path.

    Everything is written to a temporary folder next to ``out_dir`` and renamed into place, so ``out_dir``
    is either untouched or complete. An existing detector at ``out_dir`` is replaced (like
    ``AnomalyDetector.save``); any other existing, non-empty folder is refused. ``durable`` also fsyncs
    the adapter files and the folders, so the result survives a power cut; detector.json is always fsynced
    (core's ``write_json``). The fsyncs are most of the time unpacking takes.
    """
    files = bundle_files(bundle)
    entries = bundle.manifest["adapter"]["files"]
    blobs = {entry["name"]: _file_bytes(entry, files.tensors) for entry in entries}
    state = files.state

    target = Path(out_dir)
    _check_replaceable(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as exc:
        raise OutputError(f"cannot write to {target} ({exc.strerror or exc}); choose another folder") from exc
    try:
        adapter_dir = staging / ADAPTER_DIR
        adapter_dir.mkdir()
        for name, blob in blobs.items():
            _write(adapter_dir / name, blob, durable)
        write_json(staging / DETECTOR_FILE, state, version=detector_schema(state))  # atomic and fsynced by itself
        if durable:
            fsync_dir(adapter_dir)
        _swap_in(staging, target)
        if durable:
            fsync_dir(target.parent)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise OutputError(f"cannot write detector to {target} ({exc.strerror or exc})") from exc
    return target


def _file_bytes(entry: dict[str, Any], tensors: dict[str, dict[str, np.ndarray]]) -> bytes:
    if "text" in entry:
        return entry["text"].encode("utf-8")
    from safetensors import SafetensorError
    from safetensors.numpy import save

    try:
        return save(tensors[entry["name"]], metadata=entry["metadata"])
    except (SafetensorError, ValueError, TypeError) as exc:
        raise BundleError(f"cannot rebuild {entry['name']} from the payload ({exc}); re-pack the bundle") from None


def _check_replaceable(target: Path) -> None:
    if target.exists() and not target.is_dir():
        raise OutputError(f"{target} exists and is not a folder; choose another output folder")
    if target.is_dir() and any(target.iterdir()) and not (target / DETECTOR_FILE).is_file():
        raise OutputError(f"{target} is a non-empty folder that holds no detector; refusing to replace it, "
                          "choose another output folder")


def _write(path: Path, blob: bytes, durable: bool) -> None:
    with open(path, "wb") as handle:
        handle.write(blob)
        if durable:
            handle.flush()
            os.fsync(handle.fileno())



def _swap_in(staging: Path, target: Path) -> None:
    if target.exists():
        if not any(target.iterdir()):
            target.rmdir()
            staging.rename(target)
            return
        backup = target.with_name(f".{target.name}.old")
        shutil.rmtree(backup, ignore_errors=True)
        target.rename(backup)
        try:
            staging.rename(target)
        except OSError:
            backup.rename(target)  # put the old detector back: never leave the slot empty
            raise
        shutil.rmtree(backup, ignore_errors=True)
    else:
        staging.rename(target)
