"""``edgepeft keygen | pack | verify | inspect``: thin commands over :mod:`edgepeft.delta`.

Plain typer-annotated functions; the CLI registers them as top-level commands. Errors are our own
exception types (``BundleError`` and friends); the CLI's ``main`` turns them into one line and exit code 2.
Status lines go to stderr, tables to stdout, as in the rest of the CLI.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer


def _consoles() -> tuple[Any, Any]:
    from rich.console import Console

    # Made per call, not at import: rich then writes to whatever stdout/stderr are at that moment.
    return Console(stderr=True), Console()


def keygen(
    out: Annotated[Path, typer.Option("--out", help="Private key file to write (KEY.pub is written next to it).")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing key pair.")] = False,
) -> None:
    """Make an Ed25519 signing key pair: KEY (private, mode 0600) for `pack`, KEY.pub for devices and `verify`."""
    from edgepeft.delta.keys import generate_key, key_id, save_keypair

    key = generate_key()
    public_path = save_keypair(key, out, overwrite=force)
    status, _ = _consoles()
    status.print(f"[green]key pair written[/]: {out} (private, keep it secret) and {public_path} (public, give it "
                 f"to devices); key id {key_id(key.public_key())}", highlight=False)


def pack(
    detector: Annotated[Path, typer.Argument(help="Detector directory written by `edgepeft adapt`.")],
    key: Annotated[Path, typer.Option("--key", help="Private key from `edgepeft keygen`.")],
    out: Annotated[Path, typer.Option("--out", help="Bundle file to write (X.edelta).")],
    asset: Annotated[str, typer.Option("--asset", help="Asset id the adapter belongs to, e.g. pump-7.")],
    version: Annotated[str, typer.Option("--version", help="Adapter version, e.g. 2026.11.22-1.")],
    release: Annotated[int, typer.Option("--release", help="Release counter: must grow with every release of "
                                         "this asset (devices refuse older or equal ones).")],
    parent: Annotated[str | None, typer.Option("--parent", help="Version this one replaces.")] = None,
    expires_days: Annotated[float | None, typer.Option("--expires-days", help="Devices refuse the bundle this many "
                                                       "days after packing (default: never).")] = None,
    int8: Annotated[bool, typer.Option("--int8", help="Quantise fp32 adapter tensors to int8 (about 4x smaller; "
                                       "scores change slightly).")] = False,
    zstd: Annotated[bool, typer.Option("--zstd", help="Compress the tensors with zstd.")] = False,
    torch_free: Annotated[bool, typer.Option("--torch-free", help="Refuse an adapter that a device without torch "
                                             "(`serve --graph`) cannot serve: LoRA only.")] = False,
) -> None:
    """Sign a detector into one .edelta bundle: adapter tensors, manifest and signature in a single file."""
    from edgepeft.delta.bundle import read_bundle
    from edgepeft.delta.keys import load_private_key
    from edgepeft.delta.pack import pack_bundle, write_bundle

    if torch_free:
        _check_torch_free(detector)
    private_key = load_private_key(key)
    data = pack_bundle(detector, private_key, asset_id=asset, version=version, release=release,
                       parent_version=parent, expires_days=expires_days, int8=int8, zstd=zstd)
    write_bundle(data, out)
    bundle = read_bundle(data)
    payload = bundle.manifest["payload"]
    status, _ = _consoles()
    status.print(f"[green]bundle written[/] to {out}: {bundle.asset_id} {bundle.version} release {bundle.release}, "
                 f"{len(data):,} bytes ({payload['tensors']}, {payload['compression']}), base {bundle.base_name} "
                 f"{bundle.base_sha256[:12]}…, signed by {bundle.signer}", highlight=False)


def _check_torch_free(detector: Path) -> None:
    import json

    from edgepeft.core.config import read_json
    from edgepeft.core.errors import ConfigError
    from edgepeft.delta.pack import graph_refusal
    from edgepeft.detect.core import DETECTOR_FILE, SCHEMA_VERSIONS

    state = read_json(detector / DETECTOR_FILE, versions=SCHEMA_VERSIONS)
    config_path = detector / "adapter" / "adapter_config.json"
    try:
        config = json.loads(config_path.read_text()) if config_path.exists() else None
    except (OSError, json.JSONDecodeError):
        config = None
    refusal = graph_refusal(str((state.get("peft_config") or {}).get("method")), config)
    if refusal is not None:
        raise ConfigError(f"--torch-free: {refusal}; a device without torch refuses it (adapt with --method lora)")


def verify(
    bundle: Annotated[Path, typer.Argument(help="Bundle file (.edelta).")],
    pubkey: Annotated[list[Path], typer.Option("--pubkey", help="Trusted public key (KEY.pub); repeatable.")],
    base_sha256: Annotated[str | None, typer.Option("--base-sha256", help="Require this base hash (the "
                                                    "state_sha256 in the base's model card).")] = None,
) -> None:
    """Check a bundle's signature against trusted keys (and its base hash); exit 0 only if it may be installed."""
    from edgepeft.delta.bundle import verify_bundle
    from edgepeft.delta.keys import load_public_key
    from edgepeft.delta.pack import read_bundle_file

    keys = [load_public_key(path) for path in pubkey]
    verified = verify_bundle(read_bundle_file(bundle), keys, resident_base_sha256=base_sha256)
    expires = verified.manifest["expires_at"] or "never"
    status, _ = _consoles()
    status.print(f"[green]verified[/] {bundle}: {verified.asset_id} {verified.version} release {verified.release}, "
                 f"signed by {verified.signer}, base {verified.base_name} {verified.base_sha256[:12]}…, "
                 f"expires {expires}", highlight=False)


def inspect(bundle: Annotated[Path, typer.Argument(help="Bundle file (.edelta).")]) -> None:
    """Show a bundle's manifest (no key needed; the signature is NOT checked, use `verify` for that)."""
    from rich.table import Table

    from edgepeft.delta.bundle import read_bundle
    from edgepeft.delta.pack import read_bundle_file

    data = read_bundle_file(bundle)
    parsed = read_bundle(data)
    table = Table(title=f"bundle {bundle}", caption="signature not checked: run `edgepeft verify` before trusting it",
                  show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for field, value in manifest_rows(parsed.manifest, len(data)):
        table.add_row(field, value)
    _, out = _consoles()
    out.print(table)


def manifest_rows(manifest: dict[str, Any], file_bytes: int) -> list[tuple[str, str]]:
    """The manifest as (field, value) lines for a table, most useful first."""
    payload, threshold, pre = manifest["payload"], manifest["threshold"], manifest["preprocessing"]
    config = manifest["peft"]["config"]
    metrics = manifest["metrics"]
    files = manifest["adapter"]["files"]
    return [
        ("asset", manifest["asset_id"]),
        ("version", manifest["adapter_version"]),
        ("release", str(manifest["release"])),
        ("parent version", manifest["parent_version"] or "-"),
        ("created", manifest["created_at"]),
        ("expires", manifest["expires_at"] or "never"),
        ("signer key id", manifest["signer"]),
        ("base", f"{manifest['base']['name']} (state sha256 {manifest['base']['sha256']})"),
        ("method", manifest["peft"]["method"]),
        ("peft config", ", ".join(f"{k}={v}" for k, v in sorted(config.items()) if v is not None)),
        ("channels", f"{len(pre['channels'])}: {', '.join(map(str, pre['channels']))}"),
        ("threshold", f"{threshold['value']:.6g} ({threshold['state'].get('kind', '?')}, target FAR "
                      f"{threshold['state'].get('target_far', '?')})"),
        ("metrics", ", ".join(f"{k}={_number(v)}" for k, v in sorted(metrics.items()))),
        ("adapter files", ", ".join(entry["name"] for entry in files)),
        ("payload", f"{payload['length']:,} bytes ({payload['raw_length']:,} raw), tensors {payload['tensors']}, "
                    f"compression {payload['compression']}"),
        ("payload sha256", payload["sha256"]),
        ("file bytes", f"{file_bytes:,}"),
        ("schema version", str(manifest["schema_version"])),
    ]


def _number(value: Any) -> str:
    if value is None:
        return "-"
    # detector.json stores every metric as a float; counts read better without ".0".
    return f"{int(value):,}" if float(value).is_integer() and abs(value) < 2**53 else f"{value:.4g}"
