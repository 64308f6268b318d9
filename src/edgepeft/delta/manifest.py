"""The bundle manifest: its schema, its one canonical JSON encoding, and the strict check a device runs.

A manifest says everything about an adapter version except its tensors: which asset and release it is,
which base it binds to (by the base's ``state_sha256``), the PEFT config, the scaler, the calibrated
threshold, training-time metrics, and the length, hash and encoding of the payload that holds the
tensors. Its bytes are canonical (sorted keys, no spaces, ASCII, no NaN), so one manifest has exactly
one encoding and the signed digest cannot be varied without changing the meaning.

Example:
    >>> canonical_json({"b": 1.5, "a": [1, "é"]})
    b'{"a":[1,"\\\\u00e9"],"b":1.5}'
    >>> check_name("pump-7", "asset id")
    'pump-7'
"""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime
from typing import Any

from edgepeft.delta.errors import BundleError

MANIFEST_SCHEMA_VERSION = 1
COMPRESSIONS = ("raw", "zstd")
TENSOR_ENCODINGS = ("fp32", "int8")
PAYLOAD_FORMAT = "safetensors"
# Upper bound on a decompressed payload: a zstd frame can claim any size, the device must not believe it.
MAX_RAW_PAYLOAD_BYTES = 64 * 1024 * 1024
MAX_RELEASE = 2**63 - 1
# Deep nesting is never needed by a manifest and is how JSON parsers are made to overflow their stack.
MAX_JSON_DEPTH = 16
# Non-tensor adapter files (adapter_config.json) travel as text inside the manifest.
MAX_TEXT_FILE_BYTES = 64 * 1024

# Names become paths on devices (asset folders, version folders, adapter files): no separators, no dots
# first, so no name can climb out of the folder it is written to.
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"  # also what the fleet server accepts as a device or asset id
_NAME = re.compile(NAME_PATTERN)
_SHA256 = re.compile(r"[0-9a-f]{64}")
_KEY_ID = re.compile(r"[0-9a-f]{16}")
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"

# detector.json keys that the manifest holds under their own sections; every other key of detector.json
# travels unchanged in the ``detector`` section, so a newer detector.json still round-trips.
MAPPED_DETECTOR_KEYS = (
    "base", "base_sha256", "peft_config", "channels", "scaler", "channel_error",
    "threshold", "calibrator", "report",
)

TOP_LEVEL_KEYS = frozenset({
    "schema_version", "asset_id", "adapter_version", "release", "parent_version", "created_at", "expires_at",
    "signer", "base", "peft", "preprocessing", "threshold", "metrics", "detector", "adapter", "payload",
})
PAYLOAD_KEYS = frozenset({"format", "sha256", "length", "raw_length", "compression", "tensors"})


def canonical_json(obj: Any) -> bytes:
    """The one byte encoding of a manifest: sorted keys, no whitespace, ASCII only, finite numbers only."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of two equal keys; two parsers disagreeing on that is a classic signing bug.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {show(key)}")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def parse_manifest(raw: bytes) -> dict[str, Any]:
    """Decode manifest bytes, insisting they are exactly the canonical encoding of what they decode to."""
    try:
        manifest = json.loads(raw.decode("ascii"), object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
        canonical = canonical_json(manifest)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BundleError(f"bundle manifest is not valid JSON ({_short(exc)}); the file is corrupt, download it again"
                          ) from None
    if canonical != raw:
        raise BundleError("bundle manifest is not in canonical form; the file was altered or not made by "
                          "`edgepeft pack`, do not install it")
    if not isinstance(manifest, dict):
        raise BundleError("bundle manifest is not a JSON object; the file is corrupt, download it again")
    _check_depth(manifest)
    return manifest


def show(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters: messages quote what a file says, and a file may say a lot."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:120]


def _check_depth(obj: Any) -> None:
    stack = [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise BundleError(f"bundle manifest nests deeper than {MAX_JSON_DEPTH} levels; the file is corrupt")
        # Only containers go on the stack: a manifest is mostly lists of numbers, and this runs on every install.
        values = item.values() if isinstance(item, dict) else item
        stack.extend((value, depth + 1) for value in values if isinstance(value, dict | list))


def check_name(value: Any, what: str) -> str:
    """An asset id, version or file name: 1-128 of ``A-Z a-z 0-9 . _ -``, not starting with a dot."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise BundleError(f"{what} {show(value)} is not allowed; use 1-128 letters, digits, '.', '_' or '-', "
                          "starting with a letter or digit")
    return value


def as_utc(moment: datetime | None) -> datetime:
    """``moment`` in UTC (a naive datetime is taken to be UTC already); None means now."""
    if moment is None:
        return datetime.now(UTC)
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def format_time(moment: datetime) -> str:
    """UTC, to the second: ``2026-11-22T04:30:00Z``."""
    return as_utc(moment).strftime(TIME_FORMAT)


def parse_time(value: Any, what: str) -> datetime:
    """Parse a manifest timestamp written by :func:`format_time` (timezone-aware, UTC)."""
    if not isinstance(value, str) or len(value) != 20:
        raise BundleError(f"manifest {what} {show(value)} is not a UTC time like 2026-11-22T04:30:00Z; "
                          "the file is corrupt")
    try:
        # fromisoformat is several times cheaper than strptime, but accepts more spellings; the shape check
        # keeps exactly TIME_FORMAT's.
        if value[4] + value[7] + value[10] + value[13] + value[16] + value[19] != "--T::Z" or not (
            value[:4] + value[5:7] + value[8:10] + value[11:13] + value[14:16] + value[17:19]
        ).isdecimal() or not value.isascii():
            raise ValueError(value)
        return datetime.fromisoformat(value[:19]).replace(tzinfo=UTC)
    except ValueError:
        raise BundleError(f"manifest {what} {show(value)} is not a UTC time like 2026-11-22T04:30:00Z; "
                          "the file is corrupt") from None


def _field(section: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    name = _label(where, key)
    if key not in section:
        raise BundleError(f"manifest has no {name}; the bundle is malformed, re-pack it")
    value = section[key]
    # bool is an int subclass in Python; a counter of `true` is malformed, not 1.
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        raise BundleError(f"manifest {name} has the wrong type ({type(value).__name__}); "
                          "the bundle is malformed, re-pack it")
    return value


def _label(where: str, key: str) -> str:
    return key if where == "manifest" else f"{where}.{key}"


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _section(manifest: dict[str, Any], key: str, keys: frozenset[str] | None = None) -> dict[str, Any]:
    section = _field(manifest, key, dict, "manifest")
    if keys is not None and set(section) != keys:
        extra, missing = sorted(set(section) - keys), sorted(keys - set(section))
        raise BundleError(f"manifest {key} section has unexpected keys {show(extra)} / lacks {show(missing)}; "
                          "the bundle is malformed or from a newer edgepeft")
    return section


def _int(section: dict[str, Any], key: str, where: str, low: int, high: int) -> int:
    value = _field(section, key, int, where)
    if not low <= value <= high:
        raise BundleError(f"manifest {_label(where, key)} = {value} is outside [{low}, {high}]; "
                          "the bundle is malformed")
    return value


def _hex(section: dict[str, Any], key: str, where: str, pattern: re.Pattern[str] = _SHA256) -> str:
    value = _field(section, key, str, where)
    if not pattern.fullmatch(value):
        raise BundleError(f"manifest {_label(where, key)} is not a lower-case hex digest; the bundle is malformed")
    return value


def validate_manifest(manifest: Any) -> dict[str, Any]:
    """Check every field a device relies on; raise :class:`BundleError` naming the first problem.

    Sections that only the detector interprets (scaler, threshold state, PEFT config) are checked for
    type here and in full by ``AnomalyDetector.load`` after unpacking.
    """
    if not isinstance(manifest, dict):
        raise BundleError("bundle manifest is not a JSON object; the file is corrupt, download it again")
    version = manifest.get("schema_version")
    if version != MANIFEST_SCHEMA_VERSION:
        raise BundleError(f"bundle manifest has schema_version {show(version)}; this edgepeft reads "
                          f"{MANIFEST_SCHEMA_VERSION}; upgrade edgepeft on this device or re-pack with a matching one")
    unknown, missing = sorted(set(manifest) - TOP_LEVEL_KEYS), sorted(TOP_LEVEL_KEYS - set(manifest))
    if unknown or missing:
        raise BundleError(f"bundle manifest has unexpected fields {show(unknown)} / lacks {show(missing)}; "
                          "the bundle is malformed or from a newer edgepeft")
    check_name(manifest["asset_id"], "asset id")
    check_name(manifest["adapter_version"], "adapter version")
    if manifest["parent_version"] is not None:
        check_name(manifest["parent_version"], "parent version")
    _int(manifest, "release", "manifest", 0, MAX_RELEASE)
    _hex(manifest, "signer", "manifest", _KEY_ID)
    created = parse_time(manifest["created_at"], "created_at")
    if manifest["expires_at"] is not None and parse_time(manifest["expires_at"], "expires_at") <= created:
        raise BundleError("manifest expires_at is not after created_at; the bundle is malformed, re-pack it")

    base = _section(manifest, "base", frozenset({"name", "sha256"}))
    _field(base, "name", str, "base")
    _hex(base, "sha256", "base")

    peft = _section(manifest, "peft", frozenset({"method", "config"}))
    method = _field(peft, "method", str, "peft")
    config = _field(peft, "config", dict, "peft")
    if config.get("method", method) != method:
        raise BundleError(f"manifest peft.method {show(method)} disagrees with peft.config; the bundle is malformed")

    pre = _section(manifest, "preprocessing", frozenset({"channels", "scaler", "channel_error"}))
    channels = _field(pre, "channels", list, "preprocessing")
    if not channels or not all(isinstance(name, str) for name in channels):
        raise BundleError("manifest preprocessing.channels must be a non-empty list of names; the bundle is malformed")
    _field(pre, "scaler", dict, "preprocessing")
    errors = _field(pre, "channel_error", list, "preprocessing")
    # One entry per channel: a number, or one number per error kind (forecast, blind).
    if len(errors) != len(channels) or not all(
        _is_number(v) or (isinstance(v, list) and all(_is_number(x) for x in v)) for v in errors
    ):
        raise BundleError("manifest preprocessing.channel_error must hold one entry of numbers per channel; "
                          "the bundle is malformed")

    threshold = _section(manifest, "threshold", frozenset({"value", "state", "calibrator"}))
    value = _field(threshold, "value", (int, float), "threshold")
    state = _field(threshold, "state", dict, "threshold")
    _field(threshold, "calibrator", dict, "threshold")
    if state.get("threshold", value) != value:
        raise BundleError("manifest threshold.value disagrees with threshold.state; the bundle is malformed")

    metrics = _field(manifest, "metrics", dict, "manifest")
    if not all(v is None or _is_number(v) for v in metrics.values()):
        raise BundleError("manifest metrics must map names to numbers; the bundle is malformed")

    detector = _field(manifest, "detector", dict, "manifest")
    # schema_version is written by write_json itself on unpacking; a copy here would override it.
    clash = sorted(set(detector) & {*MAPPED_DETECTOR_KEYS, "schema_version"})
    if clash:
        raise BundleError(f"manifest detector section repeats {show(clash)}; the bundle is malformed")
    _field(detector, "params", dict, "detector")
    _field(detector, "base_parameters", int, "detector")
    listed = _field(detector, "adapter_files", list, "detector")

    carried = _validate_adapter(_section(manifest, "adapter", frozenset({"files"})))
    if not all(isinstance(name, str) for name in listed) or not set(listed) <= carried:
        raise BundleError("manifest detector.adapter_files names files the bundle does not carry; "
                          "the bundle is malformed, re-pack it")
    _validate_payload(_section(manifest, "payload", PAYLOAD_KEYS))
    return manifest


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _utf8(text: str) -> bytes | None:
    # JSON can spell lone surrogates (\\ud800) that no file can hold: treat them as malformed, not a crash.
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return None


def _validate_adapter(adapter: dict[str, Any]) -> set[str]:
    files = _field(adapter, "files", list, "adapter")
    if not files:
        raise BundleError("manifest adapter.files is empty; the bundle carries no adapter, re-pack it")
    seen: set[str] = set()
    for entry in files:
        if not isinstance(entry, dict):
            raise BundleError("manifest adapter.files entries must be objects; the bundle is malformed")
        name = check_name(entry.get("name"), "adapter file name")
        if name in seen:
            raise BundleError(f"manifest lists adapter file {show(name)} twice; the bundle is malformed")
        seen.add(name)
        if name.endswith(".safetensors"):
            if set(entry) != {"name", "metadata"}:
                raise BundleError(f"manifest entry of {name} must hold name and metadata; the bundle is malformed")
            metadata = entry["metadata"]
            if metadata is not None and not (
                isinstance(metadata, dict)
                and all(isinstance(v, str) and _utf8(v) is not None and _utf8(k) is not None
                        for k, v in metadata.items())
            ):
                raise BundleError(f"manifest metadata of {name} must map names to strings; the bundle is malformed")
        else:
            if set(entry) != {"name", "text"} or not isinstance(entry["text"], str):
                raise BundleError(f"manifest entry of {name} must hold name and text; the bundle is malformed")
            encoded = _utf8(entry["text"])
            if encoded is None or len(encoded) > MAX_TEXT_FILE_BYTES:
                raise BundleError(f"adapter file {name} is not UTF-8 text of at most {MAX_TEXT_FILE_BYTES} bytes; "
                                  "the bundle is malformed")
    return seen


def _validate_payload(payload: dict[str, Any]) -> None:
    if payload["format"] != PAYLOAD_FORMAT:
        raise BundleError(f"payload format {show(payload['format'])} is unknown; this edgepeft reads {PAYLOAD_FORMAT}")
    _hex(payload, "sha256", "payload")
    _int(payload, "length", "payload", 0, MAX_RAW_PAYLOAD_BYTES)
    _int(payload, "raw_length", "payload", 0, MAX_RAW_PAYLOAD_BYTES)
    if payload["compression"] not in COMPRESSIONS:
        raise BundleError(f"payload compression {show(payload['compression'])} is unknown; this edgepeft reads "
                          f"{'/'.join(COMPRESSIONS)}, upgrade it")
    if payload["tensors"] not in TENSOR_ENCODINGS:
        raise BundleError(f"payload tensor encoding {show(payload['tensors'])} is unknown; this edgepeft reads "
                          f"{'/'.join(TENSOR_ENCODINGS)}, upgrade it")
    if payload["compression"] == "raw" and payload["raw_length"] != payload["length"]:
        raise BundleError("payload raw_length differs from length for an uncompressed payload; the bundle is malformed")


def detector_state_to_sections(state: dict[str, Any]) -> dict[str, Any]:
    """Split a detector.json dict into the manifest sections that describe it (the inverse of
    :func:`sections_to_detector_state`)."""
    missing = [key for key in MAPPED_DETECTOR_KEYS if key not in state]
    if missing:
        raise BundleError(f"detector.json lacks {missing}; re-save the detector with this edgepeft")
    threshold_state = state["threshold"]
    if not isinstance(threshold_state, dict) or "threshold" not in threshold_state:
        raise BundleError("detector.json threshold has no calibrated value; re-fit the detector")
    peft_config = state["peft_config"]
    return {
        "base": {"name": state["base"], "sha256": state["base_sha256"]},
        "peft": {"method": peft_config.get("method") if isinstance(peft_config, dict) else None,
                 "config": peft_config},
        "preprocessing": {"channels": state["channels"], "scaler": state["scaler"],
                          "channel_error": state["channel_error"]},
        "threshold": {"value": threshold_state["threshold"], "state": threshold_state,
                      "calibrator": state["calibrator"]},
        # Metrics are informational: a NaN (e.g. the loss of a zero-step fit) becomes null, not a refusal.
        "metrics": {key: (v if _is_number(v) else None) for key, v in dict(state["report"]).items()},
        "detector": {key: value for key, value in state.items() if key not in MAPPED_DETECTOR_KEYS},
    }


def sections_to_detector_state(manifest: dict[str, Any]) -> dict[str, Any]:
    """Rebuild the detector.json dict (without schema_version) a manifest was made from."""
    pre, threshold = manifest["preprocessing"], manifest["threshold"]
    return {
        **manifest["detector"],
        "base": manifest["base"]["name"],
        "base_sha256": manifest["base"]["sha256"],
        "peft_config": manifest["peft"]["config"],
        "channels": pre["channels"],
        "scaler": pre["scaler"],
        "channel_error": pre["channel_error"],
        "threshold": threshold["state"],
        "calibrator": threshold["calibrator"],
        "report": manifest["metrics"],
    }
