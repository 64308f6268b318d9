"""The payload: every adapter tensor in one safetensors blob, optionally int8 and zstd.

Tensor names are prefixed by the file they came from (``adapter_model.safetensors/<name>``) so one blob
can recreate several files. With int8, each fp32 tensor ``T`` travels as ``q = round(T / s)`` in int8 and
its per-tensor symmetric scale ``s = max|T| / 127`` as a one-element fp32 tensor named
``__scale__/<file>/<name>`` (no adapter file is called ``__scale__``: they all end in ``.safetensors``).

Example:
    >>> import numpy as np
    >>> files = {"a.safetensors": {"w": np.array([[0.5, -1.0]], dtype=np.float32)}}
    >>> blob, raw_length = encode_payload(files, int8=True, zstd=False)
    >>> decode_payload(blob, ["a.safetensors"], tensors="int8", compression="raw", raw_length=raw_length)
    {'a.safetensors': {'w': array([[ 0.503937, -1.      ]], dtype=float32)}}
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from edgepeft.delta.errors import BundleError
from edgepeft.delta.manifest import MAX_RAW_PAYLOAD_BYTES, show

SCALE_PREFIX = "__scale__/"
ZSTD_LEVEL = 19  # packing happens once on a server; every byte saved is saved on every download
INT8_LEVELS = 127  # symmetric: -127..127, so 0 is exact and the range is the same on both sides


def quantise(tensor: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-tensor symmetric int8: ``(q, scale)`` with ``tensor ≈ q * scale``; an all-zero tensor gets scale 0."""
    peak = np.float32(np.max(np.abs(tensor))) if tensor.size else np.float32(0)
    scale = np.float32(peak / np.float32(INT8_LEVELS))
    if scale == 0 or not np.isfinite(scale):
        if not np.isfinite(scale):
            raise BundleError("an adapter tensor holds inf or NaN; re-fit the detector before packing it")
        return np.zeros(tensor.shape, dtype=np.int8), np.zeros(1, dtype=np.float32)
    q = np.clip(np.rint(tensor / scale), -INT8_LEVELS, INT8_LEVELS).astype(np.int8)
    return q, np.array([scale], dtype=np.float32)


def dequantise(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """fp32 tensor back from int8 values and their scale."""
    return q.astype(np.float32) * scale.astype(np.float32)[0]


def encode_payload(files: dict[str, dict[str, np.ndarray]], *, int8: bool, zstd: bool) -> tuple[bytes, int]:
    """One safetensors blob (maybe zstd-compressed) from ``{file: {tensor name: array}}``; returns
    ``(payload, raw_length)`` where ``raw_length`` is the uncompressed size."""
    from safetensors.numpy import save

    tensors: dict[str, np.ndarray] = {}
    for file_name, file_tensors in files.items():
        for name, tensor in file_tensors.items():
            key = f"{file_name}/{name}"
            # Only fp32 is quantised: it is what adapters are trained in, and a dequantised tensor must come
            # back in its own dtype (integer tensors would not survive rounding at all).
            if int8 and tensor.dtype == np.float32:
                tensors[key], tensors[SCALE_PREFIX + key] = quantise(tensor)
            else:
                tensors[key] = np.ascontiguousarray(tensor)
    raw = save(tensors)
    if not zstd:
        return raw, len(raw)
    import zstandard

    return zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True).compress(raw), len(raw)


def decode_payload(
    payload: bytes, file_names: list[str], *, tensors: str, compression: str, raw_length: int
) -> dict[str, dict[str, np.ndarray]]:
    """``{file: {tensor name: array}}`` for each of ``file_names`` from a payload; BundleError if it does not
    decode to exactly that (the payload is signed, but a signer's bug must not crash a device)."""
    raw = _decompress(payload, raw_length) if compression == "zstd" else payload
    if len(raw) != raw_length:
        raise BundleError(f"payload decodes to {len(raw):,} bytes, the manifest says {raw_length:,}; "
                          "the bundle is malformed, re-pack it")
    blob = _load_safetensors(raw)
    scales = {key[len(SCALE_PREFIX) :]: value for key, value in blob.items() if key.startswith(SCALE_PREFIX)}
    if scales and tensors != "int8":
        raise BundleError("payload holds int8 scales but the manifest says fp32; the bundle is malformed, re-pack it")
    out: dict[str, dict[str, np.ndarray]] = {name: {} for name in file_names}
    for key, value in blob.items():
        if key.startswith(SCALE_PREFIX):
            if key[len(SCALE_PREFIX) :] not in blob:
                raise BundleError(f"payload has a scale for missing tensor {show(key[len(SCALE_PREFIX):])}; "
                                  "the bundle is malformed")
            continue
        file_name, _, name = key.partition("/")
        if file_name not in out or not name:
            raise BundleError(f"payload tensor {show(key)} belongs to no adapter file the manifest lists; "
                              "the bundle is malformed, re-pack it")
        if key in scales:
            scale = scales[key]
            if value.dtype != np.int8 or scale.dtype != np.float32 or scale.shape != (1,) or not (
                np.isfinite(scale[0]) and scale[0] >= 0
            ):
                raise BundleError(f"payload int8 tensor {show(key)} or its scale is malformed; re-pack the bundle")
            value = dequantise(value, scale)
        out[file_name][name] = value
    return out


def _decompress(payload: bytes, raw_length: int) -> bytes:
    import zstandard

    # Streamed with a hard cap: the frame's own size claim is not trusted (a decompression bomb would lie).
    limit = min(raw_length, MAX_RAW_PAYLOAD_BYTES)
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(payload), read_across_frames=False)
        raw = reader.read(limit + 1)
        trailing = reader.read(1) if len(raw) <= limit else b""
    except zstandard.ZstdError as exc:
        raise BundleError(f"payload is not valid zstd ({exc}); the bundle is malformed, re-pack it") from None
    if len(raw) > limit or trailing:
        raise BundleError(f"payload decompresses to more than the declared {raw_length:,} bytes; "
                          "the bundle is malformed, do not install it")
    return raw


def _load_safetensors(raw: bytes) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        return load(raw)
    except (SafetensorError, ValueError, TypeError, OverflowError) as exc:
        raise BundleError(f"payload is not a readable safetensors blob ({exc}); the bundle is malformed") from None


def file_tensors(path: Any) -> tuple[dict[str, np.ndarray], dict[str, str] | None]:
    """Tensors and metadata of one safetensors file (read without pickle, without torch)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as handle:
            return {name: handle.get_tensor(name) for name in handle.keys()}, handle.metadata()  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise BundleError(f"{path} is not a safetensors file numpy can read ({exc}); re-save the detector") from None
