"""`edgepeft export-c`: one asset's detector as C99 sources for a microcontroller.

The adapter is merged into the tiny base (LoRA, DoRA and IA3 merge; BitFit and full fine-tuning are weights
already), every weight matrix becomes int8 with one scale per matrix (``const`` arrays: flash), and the scoring
core's numbers (scaler, error normalisers, state model, fusion, threshold) are written beside them. The C code
(``edgepeft.c``, shipped with the package) streams one row at a time with static buffers only; the generated
``edgepeft_model.h`` states the flash and RAM it needs.

What the C code computes is this detector with int8-rounded weights and float arithmetic (activations are not
quantised): :func:`int8_reference` is that detector in Python, which the tests hold the compiled C to.

Example:
    >>> export = export_c("adapters/pump-1", "pump-1-c")        # doctest: +SKIP
    >>> export.flash_bytes < 256 * 1024, export.ram_bytes < 64 * 1024   # doctest: +SKIP
    (True, True)
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgepeft.core.errors import ModelError, OutputError
from edgepeft.detect.detector import AnomalyDetector
from edgepeft.detect.evidence import EVIDENCE_KINDS, RELATION_SMOOTHING
from edgepeft.models.patch_encoder import PatchEncoder
from edgepeft.train.quant import int8_weight

C_SOURCES = ("edgepeft.c", "edgepeft.h", "example_main.c")
BUDGET_FLASH = 256 * 1024
BUDGET_RAM = 64 * 1024


@dataclass(frozen=True)
class CExport:
    """What :func:`export_c` wrote: the folder, its files, and the flash and RAM the asset needs."""

    folder: Path
    files: list[Path]
    flash_bytes: int
    ram_bytes: int
    channels: int


def _merged_encoder(det: AnomalyDetector) -> PatchEncoder:
    """A plain :class:`PatchEncoder` computing what the adapted model computes (adapter merged in)."""
    if det.fusion_ is None:
        raise ModelError("the C target runs Detector v2 scoring; re-adapt this detector (it predates schema 2)")
    if det.method_.mergeable:
        det.merge()
    encoder = det.method_.encoder(det.model_)
    plain = PatchEncoder(encoder.cfg)
    plain.set_n_channels(det.n_channels_)
    state: dict[str, torch.Tensor] = {}
    for key, value in encoder.state_dict().items():
        if any(part in key for part in ("lora_", "ia3_", "lora_magnitude")):
            continue  # merged into the weights above
        state[key.replace(".base_layer", "")] = value
    missing, unexpected = set(plain.state_dict()) - set(state), set(state) - set(plain.state_dict())
    if missing or unexpected or len(plain.channel_blocks) != 1:
        raise ModelError(f"method {det.peft_config_.method!r} adds modules the C target does not run "
                         f"({sorted(unexpected)[:2] or sorted(missing)[:2]}); adapt with lora, dora, ia3, bitfit "
                         "or full")
    plain.load_state_dict(state)
    return plain.eval()


def _round_weights(encoder: nn.Module) -> None:
    with torch.no_grad():
        for module in encoder.modules():
            if isinstance(module, nn.Linear):
                module.weight.copy_(int8_weight(module.weight))


def int8_reference(detector_dir: str | Path) -> AnomalyDetector:
    """The detector as the C code computes it: adapter merged, every weight matrix rounded to int8 (float
    arithmetic). Scores through the usual scoring core."""
    det = AnomalyDetector.load(detector_dir)
    encoder = _merged_encoder(det)
    _round_weights(encoder)
    det.model_, det.method_ = encoder, _PlainMethod()
    return det


class _PlainMethod:
    """The method interface the scoring core uses, for a plain encoder."""

    mergeable = False

    @staticmethod
    def encoder(model: nn.Module) -> nn.Module:
        return model


def _braced(array: np.ndarray) -> str:
    """A C initializer with one pair of braces per dimension."""
    if array.ndim == 1:
        return "{" + ", ".join(f"{v:.9g}" for v in array) + "}"
    return "{" + ", ".join(_braced(part) for part in array) + "}"


# The biases the device trains with EP_LEARN (ep_learn): in RAM then, in flash otherwise.
TRAINABLE = ("cblock_o_b", "cblock_ln2_b", "cblock_fc1_b", "cblock_fc2_b", "ln_f_b", "head_b")


def _floats(name: str, values: Any, ctype: str = "float") -> str:
    array = np.asarray(values, dtype=np.float64)
    dims = "".join(f"[{n}]" for n in array.shape)
    storage = "EP_TRAINABLE" if name in TRAINABLE else "static const"
    return f"{storage} {ctype} {name}{dims} = {_braced(array)};\n"


class _Writer:
    """Collects the weight arrays and counts their bytes (flash)."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.flash = 0

    def floats(self, name: str, values: Any, ctype: str = "float") -> str:
        array = np.asarray(values)
        self.parts.append(_floats(name, array, ctype))
        self.flash += array.size * (8 if ctype == "double" else 4)
        return name

    def linear(self, name: str, layer: nn.Linear) -> str:
        weight = layer.weight.detach().double().numpy()
        scale = max(float(np.abs(weight).max()), 1e-12) / 127.0
        quantised = np.clip(np.round(weight / scale), -127, 127).astype(np.int8)
        body = ", ".join(str(int(v)) for v in quantised.ravel())
        self.parts.append(f"static const signed char {name}_w[{quantised.size}] = {{{body}}};\n")
        self.flash += quantised.size + 4
        self.floats(f"{name}_b", layer.bias.detach().numpy())
        return f"{{{name}_w, {scale:.9g}f, {name}_b, {layer.out_features}, {layer.in_features}}}"

    def norm(self, name: str, layer: nn.LayerNorm) -> str:
        self.floats(f"{name}_g", layer.weight.detach().numpy())
        self.floats(f"{name}_b", layer.bias.detach().numpy())
        return f"{{{name}_g, {name}_b}}"

    def block(self, name: str, block: nn.Module) -> str:
        parts = [self.norm(f"{name}_ln1", block.ln1), self.norm(f"{name}_ln2", block.ln2)]
        parts += [self.linear(f"{name}_{p}", getattr(block.attn, p)) for p in ("q", "k", "v", "o")]
        parts += [self.linear(f"{name}_fc1", block.mlp.fc1), self.linear(f"{name}_fc2", block.mlp.fc2)]
        return "{" + ", ".join(parts) + "}"


def _ram_bytes(n_channels: int, cfg: Any, state_window: int, smoothing: int) -> int:
    """Bytes of edgepeft.c's static buffers for this asset (mirrors its declarations), alignment included: an upper
    bound on what the linker reserves (.bss)."""
    d, n, p, ff = cfg.d_model, cfg.n_patches, cfg.patch_len, cfg.d_ff
    tokens = n + 1
    wide = max(2 * n_channels, tokens)
    ring = max(state_window, RELATION_SMOOTHING)
    floats = ((cfg.window_len - p) * n_channels + 2 * p * n_channels + n_channels * tokens * d + 2 * tokens * d
              + 3 * wide * d + wide + ff + d + n_channels * d + 2 * (2 * n_channels) * d + n_channels * d
              + 2 * n_channels + n_channels * d + p * n_channels)  # ..., window stats, kept tokens, patch rows
    doubles = ring * n_channels + smoothing
    # + counters and flags, and up to 32 bytes of alignment for each of the 26 buffers: an upper bound.
    return 4 * floats + 8 * doubles + 32 + 26 * 32


def learn_ram_bytes(cfg: Any) -> int:
    """RAM that learning (EP_LEARN) adds: the trained biases move from flash to RAM, plus one gradient each."""
    return 2 * 4 * (4 * cfg.d_model + cfg.d_ff + cfg.patch_len) + 6 * 32


def export_c(detector_dir: str | Path, out: str | Path) -> CExport:
    """Write one asset's C sources into ``out``: edgepeft.c/.h (the runtime), edgepeft_model.h (sizes, settings,
    flash and RAM) and edgepeft_weights.h (int8 weights and the scoring numbers)."""
    det = AnomalyDetector.load(detector_dir)
    encoder = _merged_encoder(det)
    _round_weights(encoder)
    cfg = encoder.cfg
    n_channels = det.n_channels_
    state, fusion = det.state_, det.fusion_
    with torch.no_grad():
        blank = encoder.hidden_channel_features()[cfg.n_patches].numpy()
        tag_proj = encoder.channel_proj(encoder.channel_tags).numpy()
    w = _Writer()
    entries = [
        f"static const linear_t patch_embed = {w.linear('patch_embed', encoder.patch_embed)};\n",
        f"static const linear_t stat_embed = {w.linear('stat_embed', encoder.stat_embed)};\n",
        f"static const linear_t head_linear = {w.linear('head', encoder.head)};\n",
        f"static const norm_t ln_f = {w.norm('ln_f', encoder.ln_f)};\n",
        "static const block_t blocks[EP_LAYERS] = {"
        + ", ".join(w.block(f"block{i}", b) for i, b in enumerate(encoder.blocks)) + "};\n",
        f"static const block_t channel_block = {w.block('cblock', encoder.channel_blocks[0])};\n",
    ]
    w.floats("mask_token", encoder.mask_token.detach().numpy())
    w.floats("pos_embed", encoder.pos_embed.detach().numpy())
    w.floats("blank", blank)
    w.floats("tag_proj", tag_proj)
    w.floats("scaler_mean", det.scaler_.mean_, "double")
    w.floats("scaler_scale", det.scaler_.scale_, "double")
    channel_error = np.broadcast_to(np.asarray(det.channel_error_, np.float64).reshape(n_channels, -1),
                                    (n_channels, 2))
    w.floats("channel_error", channel_error, "double")
    w.floats("evidence_weights", det.evidence_weights_, "double")
    for name in ("level_low", "level_high", "level_std", "scale_low", "scale_high", "scale_std", "relation_mean"):
        w.floats(name, getattr(state, f"{name}_"), "double")
    w.floats("relation_precision", state.relation_precision_, "double")
    kinds = list(fusion.kinds_)
    w.floats("kind_typical", np.stack([fusion.typical_[k] for k in kinds]), "double")
    w.floats("kind_centre", [fusion.centre_[k] for k in kinds], "double")
    w.floats("kind_spread", [fusion.spread_[k] for k in kinds], "double")
    w.floats("kind_weight", [fusion.weights_[k] for k in kinds], "double")
    kind_ids = ", ".join(f"KIND_{k.upper()}" for k in kinds)
    w.parts.append(f"static const int kinds[EP_KINDS] = {{{kind_ids}}};\n")
    ram = _ram_bytes(n_channels, cfg, det.state_window, det.smoothing)
    blind = int(n_channels > 1 and det.blind_weight > 0)
    # ep_push's and block()'s locals: kinds x channels doubles, a few rows of floats, call frames.
    stack = 8 * len(kinds) * n_channels + 8 * n_channels + 4 * n_channels + 4 * (cfg.d_model + cfg.patch_len) + 256
    model_h = f"""/* Generated by `edgepeft export-c` from {Path(detector_dir).name}: do not edit.
 * Asset: {n_channels} channels ({', '.join(det.channels_)}); base {det.base} with its
 * {det.peft_config_.method} adapter merged, int8 weights (one scale per matrix).
 * Needs: flash {w.flash} bytes ({w.flash / 1024:.1f} KB) of weights and constants plus the code;
 *        RAM {ram} bytes ({ram / 1024:.1f} KB) of static buffers plus a stack of about {stack} bytes;
 *        learning on the device (-DEP_LEARN, ep_learn) adds {learn_ram_bytes(cfg)} bytes of RAM.
 */
#ifndef EDGEPEFT_MODEL_H
#define EDGEPEFT_MODEL_H
#define EP_FLASH_BYTES {w.flash}
#define EP_RAM_BYTES {ram}
#define EP_C {n_channels}
#define EP_D {cfg.d_model}
#define EP_HEADS {cfg.n_heads}
#define EP_LAYERS {cfg.n_layers}
#define EP_FF {cfg.d_ff}
#define EP_L {cfg.window_len}
#define EP_P {cfg.patch_len}
#define EP_N {cfg.n_patches}
#define EP_BLIND {blind}
#define EP_STATE_WINDOW {det.state_window}
#define EP_RELATION_SMOOTHING {RELATION_SMOOTHING}
#define EP_SMOOTHING {det.smoothing}
#define EP_KINDS {len(kinds)}
#define EP_THRESHOLD {det.threshold_:.17g}
#define EP_WARMUP_ROWS {det.warmup_rows_}
#define EP_RAISE_AFTER {det.raise_after}
#define EP_CLEAR_AFTER {det.clear_after}
enum {{ {', '.join(f'KIND_{k.upper()} = {i}' for i, k in enumerate(EVIDENCE_KINDS))} }};
#endif
"""
    weights_h = ("/* Generated by `edgepeft export-c`: int8 weights and the detector's scoring numbers. */\n"
                 "#ifdef EP_LEARN\n#define EP_TRAINABLE static\n#else\n#define EP_TRAINABLE static const\n#endif\n"
                 + "".join(w.parts) + "".join(entries))
    folder = Path(out)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        files = [folder / "edgepeft_model.h", folder / "edgepeft_weights.h"]
        files[0].write_text(model_h)
        files[1].write_text(weights_h)
        source = Path(__file__).with_name("c")
        for name in C_SOURCES:
            files.append(Path(shutil.copyfile(source / name, folder / name)))
    except OSError as exc:
        raise OutputError(f"cannot write C sources to {folder} ({exc.strerror or exc})") from exc
    return CExport(folder, files, w.flash, ram, n_channels)


# ---------------------------------------------------------------------------------------------- host build
def build_host(folder: str | Path, cc: str = "gcc") -> Path:
    """Compile the exported sources with their example driver for this machine (-O2, warnings as errors)."""
    import subprocess

    folder = Path(folder)
    binary = folder / "edgepeft_host"
    command = [cc, "-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", "-pedantic", "-I", str(folder),
               str(folder / "example_main.c"), str(folder / "edgepeft.c"), "-lm", "-o", str(binary)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    except FileNotFoundError:
        raise OutputError(f"no C compiler {cc!r} on this machine; install gcc") from None
    if done.returncode != 0:
        raise OutputError(f"{cc} failed on {folder}: {done.stderr.strip()[:500]}")
    return binary


def run_host(binary: str | Path, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Scores, alarms and the seconds spent inside ``ep_push`` for ``rows``, from a :func:`build_host` binary."""
    import subprocess

    text = "\n".join(" ".join(f"{v:.9g}" for v in row) for row in np.asarray(rows, dtype=np.float32))
    done = subprocess.run([str(binary)], input=text, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise OutputError(f"{binary} failed: {done.stderr.strip()[:500]}")
    out = np.array([[float(v) for v in line.split()] for line in done.stdout.splitlines()]).reshape(-1, 2)
    seconds = float(done.stderr.split("seconds")[-1])
    return out[:, 0], out[:, 1].astype(np.int8), seconds


def object_sizes(folder: str | Path, cc: str = "gcc") -> dict[str, int]:
    """text / data / bss bytes of edgepeft.c compiled alone (-O2): the code and constants that go to flash, and the
    static RAM, as the toolchain counts them."""
    import subprocess

    folder = Path(folder)
    obj = folder / "edgepeft.o"
    built = subprocess.run([cc, "-std=c99", "-O2", "-c", "-I", str(folder), str(folder / "edgepeft.c"), "-o",
                            str(obj)], capture_output=True, text=True, timeout=300)
    if built.returncode != 0:
        raise OutputError(f"{cc} failed on {folder}: {built.stderr.strip()[:500]}")
    sizes = subprocess.run(["size", "-A", str(obj)], capture_output=True, text=True, timeout=60).stdout
    out = {"text": 0, "rodata": 0, "data": 0, "bss": 0}
    for line in sizes.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1].isdigit():
            for key in out:
                if parts[0] == f".{key}" or parts[0].startswith(f".{key}."):
                    out[key] += int(parts[1])
    return out
