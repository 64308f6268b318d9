"""``edgepeft serve`` (and ``edgepeft export-onnx``): thin commands over the runtime.

The CLI registers them (``app.command()(serve)``); ``python -m edgepeft.runtime serve ...`` runs the same
functions without the rest of the CLI (used by the tests and the load test to start a server subprocess).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def serve(
    state: Annotated[Path, typer.Option("--state", help="State folder: installed adapters + state.json (created "
                                        "if missing).")] = Path("edgepeft-state"),
    base: Annotated[str, typer.Option(help="Resident base model every adapter must be trained on.")] = "tiny",
    host: Annotated[str, typer.Option(help="Interface to bind; keep 127.0.0.1 unless a TLS proxy fronts it.")
                    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    trusted_key: Annotated[list[Path] | None, typer.Option(
        "--trusted-key", help="Public key (KEY.pub from `edgepeft keygen`) whose bundles are accepted; repeatable. "
        "Without one, bundles are refused (scoring still works).")] = None,
    token_file: Annotated[Path | None, typer.Option(
        "--token-file", help="File holding the write token (else $EDGEPEFT_TOKEN, else STATE/token, generated).")
                          ] = None,
    engine: Annotated[str, typer.Option(help="torch, or onnx: LoRA adapters through one ONNX Runtime graph "
                                        "(other methods fall back to torch).")] = "torch",
    int8: Annotated[bool, typer.Option("--int8/--no-int8", help="With --engine onnx: int8 dynamically quantised "
                                       "base graph.")] = False,
    graph: Annotated[Path | None, typer.Option(
        "--graph", help="With --engine onnx: the scoring graph to serve (`edgepeft export-onnx`); what a device "
        "install without torch serves.")] = None,
    cache_mb: Annotated[float, typer.Option(help="RAM budget of loaded adapters (LRU, reloaded on demand).")
                        ] = 256.0,
    threads: Annotated[int, typer.Option(help="torch / ONNX Runtime threads per request. 1 suits small models: "
                                         "requests run concurrently, and intra-op threads only spin.")] = 1,
    scoring_workers: Annotated[int, typer.Option(help="Scoring requests run at once; the rest queue. 1 suits "
                                                 "small models, whose requests are mostly Python.")] = 1,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "warning",
) -> None:
    """Serve many assets' adapters over HTTP on one resident base model, with atomic hot swap."""
    import uvicorn
    from rich.console import Console

    from edgepeft.runtime.server import create_app, resolve_token
    from edgepeft.runtime.service import DeviceRuntime, RuntimeConfig

    config = RuntimeConfig(state_dir=state, base=base, engine=engine, cache_mb=cache_mb,
                           trusted_keys=list(trusted_key or []), onnx_int8=int8, graph=graph, threads=threads,
                           scoring_workers=scoring_workers)
    token, token_source = resolve_token(token_file, state)
    runtime = DeviceRuntime.open(config)
    if graph is None:
        # Hugging Face peft (LoRA, DoRA, IA3 adapters) takes seconds to import; a server that has not loaded such
        # an adapter yet would pay that inside its first install. Import it now, before settle() freezes what is
        # loaded. A server of a graph never imports torch or peft.
        import peft  # noqa: F401

    runtime.settle()
    app = create_app(runtime, token)
    console = Console(stderr=True)
    keys = f"{len(runtime.trusted_keys)} trusted key(s)" if runtime.trusted_keys else "no trusted key: installs refused"
    console.print(
        f"[green]serving[/] http://{host}:{port} (docs at /docs): base {base}, engine {engine}, "
        f"{len(runtime.state.assets)} asset(s), {keys}; write token from {token_source}",
        highlight=False,
    )
    # Keep idle connections longer than clients do (httpx and most pools: 5 s, uvicorn's default is also 5 s):
    # when both sides time out together, a request sent on a connection the server is closing fails.
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False, timeout_keep_alive=75)


def export_onnx(
    out: Annotated[Path, typer.Argument(help="Output .onnx file.")],
    adapter: Annotated[Path | None, typer.Option(
        "--adapter", help="Detector folder: export that asset's merged model. Without it: the base graph with "
        "LoRA A/B as inputs, shared by every LoRA adapter.")] = None,
    base: Annotated[str, typer.Option(help="Base model (for the shared LoRA graph).")] = "tiny",
    int8: Annotated[bool, typer.Option("--int8/--no-int8", help="Also write OUT with .int8.onnx: dynamic int8 "
                                       "quantisation.")] = False,
) -> None:
    """Export an ONNX model: the shared scoring graph with LoRA inputs (what `serve --engine onnx --graph` serves,
    with or without torch), or one asset's merged model."""
    from rich.console import Console

    from edgepeft.runtime.onnx import export_lora_graph, export_merged, quantize_int8
    from edgepeft.runtime.resident import ResidentBase

    path = export_merged(adapter, out) if adapter is not None else export_lora_graph(ResidentBase.load(base), out)
    written = [path]
    if int8:
        written.append(quantize_int8(path, path.with_suffix(".int8.onnx")))
    Console(stderr=True).print(
        "[green]exported[/] " + ", ".join(f"{p} ({p.stat().st_size / 1024:.0f} KB)" for p in written),
        highlight=False,
    )


def export_c(
    adapter: Annotated[Path, typer.Argument(help="Detector folder written by `edgepeft adapt` (Detector v2).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the C sources.")],
) -> None:
    """Export one asset's detector as C99 sources for a microcontroller: int8 weights, static buffers, no malloc."""
    from rich.console import Console

    from edgepeft.runtime.export_c import BUDGET_FLASH, BUDGET_RAM
    from edgepeft.runtime.export_c import export_c as run_export

    export = run_export(adapter, out)
    flash_note = "" if export.flash_bytes <= BUDGET_FLASH else " (over a 256 KB budget)"
    ram_note = "" if export.ram_bytes <= BUDGET_RAM else " (over a 64 KB budget)"
    Console(stderr=True, soft_wrap=True).print(
        f"[green]exported[/] {export.folder}: {len(export.files)} files, {export.channels} channels; needs flash "
        f"{export.flash_bytes / 1024:.1f} KB{flash_note} + code, RAM {export.ram_bytes / 1024:.1f} KB{ram_note} "
        "(see edgepeft_model.h); build: cc -std=c99 -O2 your_main.c edgepeft.c -lm",
        highlight=False,
    )
