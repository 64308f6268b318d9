"""Commands of the streaming edge loop: ``edgepeft stream``, ``edgepeft bench stream``, ``edgepeft bench drift``.

Thin shells over :func:`edgepeft.detect.stream_files.stream_array` and :mod:`edgepeft.bench.stream_bench`; the CLI
registers them (``app.command("stream")(stream)``, ``bench_app.command("stream")(bench_stream)``,
``bench_app.command("drift")(bench_drift)``) and its ``main`` turns our errors into one line. Until then, or
stand-alone, ``python -m edgepeft.bench.stream_commands stream|bench-stream|bench-drift ...`` runs them with
the same error handling.
"""

from __future__ import annotations

import io
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer

from edgepeft.core.errors import ConfigError, EdgePeftError, OutputError


def _split(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def _console() -> Any:  # noqa: ANN401 - a rich Console
    from rich.console import Console

    return Console(stderr=True)


def _check_writable(path: Path, what: str) -> None:
    """Fail before any work if ``path`` cannot be written (a file for --out, a folder for --checkpoint-dir)."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        raise OutputError(f"cannot write to {path}: {probe} is not writable; choose another {what}")
    if what == "--out" and path.is_dir():
        raise OutputError(f"{path} is a directory; give a file name for --out")
    if what == "--checkpoint-dir" and path.exists() and not path.is_dir():
        raise OutputError(f"--checkpoint-dir {path} is a file; give a folder")


def _read(data: Path, time_col: str | None, drop: str | None, console: Any) -> Any:  # noqa: ANN401
    from edgepeft.data.csvio import read_sensor_csv

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = read_sensor_csv(data, time_col=time_col, drop=_split(drop))
    for message in dict.fromkeys(str(w.message) for w in caught if not issubclass(w.category, DeprecationWarning)):
        console.print(f"[yellow]warning:[/] {message}", highlight=False)
    return table


def stream(
    data: Annotated[Path, typer.Argument(help="CSV to stream, row by row (rows = time).")],
    out: Annotated[Path, typer.Option("--out", help="CSV to write: score, p_anomaly, anomaly, probation per row.")],
    warmup: Annotated[int, typer.Option("--warmup", help="Probation rows: learned, scored, never alerted.")] = 400,
    budget_mb: Annotated[float | None, typer.Option("--budget-mb", help="Training memory budget (MiB).")] = None,
    checkpoint_dir: Annotated[Path | None, typer.Option("--checkpoint-dir",
                                                        help="Checkpoint folder; a rerun resumes from it.")] = None,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", help="Rows between checkpoints.")] = 256,
    base: Annotated[str, typer.Option(help="Base model: tiny or small (or a registered one).")] = "small",
    method: Annotated[str, typer.Option(help="lora|dora|ia3|adapter|prefix|bitfit|full")] = "lora",
    rank: Annotated[int, typer.Option(help="LoRA/DoRA rank.")] = 8,
    optimizer: Annotated[str, typer.Option(help="sgd, adamw or adafactor (memory-light).")] = "adamw",
    update_every: Annotated[int, typer.Option("--update-every", help="Rows between online updates (0: none).")] = 16,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per update (at most).")] = 16,
    continual: Annotated[str, typer.Option(help="none, replay, ewc or replay+ewc.")] = "none",
    target_far: Annotated[float, typer.Option(help="Target false-alarm rate on normal data.")] = 0.01,
    threshold: Annotated[str, typer.Option(help="Threshold calibration: pot or quantile.")] = "pot",
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same adapter).")] = 0,
    threads: Annotated[int, typer.Option(help="torch threads; per-row work is small, so 1 is usually fastest.")] = 1,
    time_col: Annotated[str | None, typer.Option("--time-col", help="Timestamp column (else detected).")] = None,
    drop: Annotated[str | None, typer.Option(help="Columns to ignore, e.g. anomaly,changepoint.")] = None,
) -> None:
    """Score a CSV as a stream while adapting on the device: probation, then score-and-learn every row."""
    import pandas as pd
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from edgepeft.core.config import atomic_write_bytes
    from edgepeft.core.errors import DataError
    from edgepeft.detect.stream_files import stream_array

    console = _console()
    if threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    _check_writable(out, "--out")
    if checkpoint_dir is not None:
        _check_writable(checkpoint_dir, "--checkpoint-dir")
    table = _read(data, time_col, drop, console)
    n_rows = len(table.values)
    if n_rows <= warmup:
        raise DataError(f"{data} has {n_rows} rows; --warmup {warmup} needs more rows than that (probation plus "
                        "rows to stream); lower --warmup")
    params = {"base": base, "method": method, "rank": rank, "warmup": warmup, "budget_mb": budget_mb,
              "optimizer": optimizer, "update_every": update_every or None, "batch_size": batch_size,
              "continual": continual, "target_far": target_far, "threshold": threshold, "seed": seed}
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), console=console, transient=False)
    with bar:
        task = bar.add_task(f"streaming {method} on {base}", total=n_rows)
        run = stream_array(table.values, params, channels=table.channels, checkpoint_dir=checkpoint_dir,
                           checkpoint_every=checkpoint_every,
                           progress=lambda done, total: bar.update(task, completed=done))
    output = pd.DataFrame({"score": run.score, "p_anomaly": run.p_anomaly, "anomaly": run.anomaly,
                           "probation": run.probation})
    if table.time is not None:
        output.insert(0, "time", table.time)
    buffer = io.StringIO()
    output.to_csv(buffer, index=False, float_format="%.6g")
    try:
        atomic_write_bytes(out, buffer.getvalue().encode())
    except OSError as exc:
        raise OutputError(f"cannot write {out} ({exc.strerror or exc})") from exc
    if run.resumed_from:
        console.print(f"resumed from the checkpoint at row {run.resumed_from} in {checkpoint_dir}", highlight=False)
    alerts = int(run.anomaly.sum())
    console.print(f"[green]streamed[/] {n_rows} rows -> {out} ({alerts} flagged anomalous; rows 0-{warmup - 1} "
                  f"probation)", highlight=False)
    console.print(memory_line(run.memory), highlight=False)


def memory_line(memory: dict[str, Any]) -> str:
    """One line of measured peak memory (MiB) for the end of a run."""
    def mb(value: Any) -> str:  # noqa: ANN401
        return "n/a" if value is None else f"{value / 2**20:.2f} MB"

    plan = memory["plan"]
    budget = "" if plan.get("budget_bytes") is None else f" (budget {mb(plan['budget_bytes'])})"
    micro = plan.get("micro_batch")
    batch = f"{plan['batch_size']}" + (f" in micro-batches of {micro}" if micro and micro < plan["batch_size"] else "")
    return (f"peak memory: training {mb(memory['training_peak_bytes'])}{budget} (batch {batch}, "
            f"adapt_last {plan['adapt_last']}, cache {plan['cache_features']}, checkpointing "
            f"{plan['checkpoint_blocks']}; optimizer state {mb(memory['optimizer_state_bytes'])}), scoring "
            f"{mb(memory['scoring_peak_bytes'])}, process RSS peak {mb(memory['peak_rss_bytes'])}")


def bench_stream(
    base: Annotated[str, typer.Option("--base", help="Base model of the contenders.")] = "tiny",
    contenders: Annotated[str | None, typer.Option(
        "--contenders", help="method:optimizer pairs, e.g. lora:adamw,lora:adafactor,full:adamw.")] = None,
    rows: Annotated[int, typer.Option("--rows", help="Rows of the simulated pump stream.")] = 2000,
    channels: Annotated[int, typer.Option("--channels", help="Sensors of the stream (1-8).")] = 8,
    warmup: Annotated[int, typer.Option("--warmup", help="Probation rows (not timed).")] = 400,
    memory_base: Annotated[str, typer.Option("--memory-base", help="Base of the LoRA/full/scoring memory "
                                             "comparison ('none' to skip).")] = "small",
    out: Annotated[Path | None, typer.Option("--out", help="Output folder (default bench-out/stream).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the stream and detectors.")] = 0,
    threads: Annotated[int | None, typer.Option("--threads", help="torch threads.")] = None,
) -> None:
    """Throughput while adapting, update latency p50/p99 and measured memory per method, side by side."""
    from edgepeft.bench.stream_bench import DEFAULT_CONTENDERS, StreamBenchOptions, run_stream_bench

    console = _console()
    opts = StreamBenchOptions(base=base, contenders=tuple(_split(contenders)) or DEFAULT_CONTENDERS, rows=rows,
                              channels=channels, warmup=warmup, seed=seed, threads=threads,
                              memory_base=None if memory_base == "none" else memory_base)
    folder = out or Path("bench-out") / "stream"
    results = run_stream_bench(opts, folder, progress=lambda text: console.print(f"[bold]{text}[/]"))
    for target in results["targets"]:
        style = "green" if target["status"] == "met" else "red"
        console.print(f"[{style}]{target['status'].upper()}[/] {target['target']}: {target['measured']}",
                      highlight=False)
    console.print(f"results -> {folder / 'results.json'}, {folder / 'results.md'}", highlight=False)


def bench_drift(
    base: Annotated[str, typer.Option("--base", help="Base model.")] = "tiny",
    method: Annotated[str, typer.Option("--method", help="PEFT method.")] = "lora",
    variants: Annotated[str | None, typer.Option(
        "--variants", help="Comma-separated: no updates, naive, replay, ewc, replay+ewc (default: all).")] = None,
    scale: Annotated[float, typer.Option("--scale", help="Length of the stream's parts (1 = full).")] = 1.0,
    out: Annotated[Path | None, typer.Option("--out", help="Output folder (default bench-out/drift).")] = None,
    seeds: Annotated[str, typer.Option("--seeds", help="Comma-separated seeds (stream + detector each).")] = "0,1,2",
    threads: Annotated[int | None, typer.Option("--threads", help="torch threads.")] = None,
) -> None:
    """False alarms and misses of naive online updates vs replay vs EWC on a stream with regime changes."""
    from edgepeft.bench.stream_bench import DRIFT_VARIANTS, DriftBenchOptions, run_drift_bench

    console = _console()
    warmup = max(200, int(1200 * scale))  # most of regime A: the pump visits its operating levels in it
    try:
        seed_list = tuple(int(part) for part in _split(seeds))
    except ValueError:
        raise ConfigError(f"--seeds must be comma-separated integers, got {seeds!r}") from None
    opts = DriftBenchOptions(base=base, method=method, variants=tuple(_split(variants)) or DRIFT_VARIANTS,
                             scale=scale, warmup=warmup, seeds=seed_list, threads=threads)
    folder = out or Path("bench-out") / "drift"
    results = run_drift_bench(opts, folder, progress=lambda text: console.print(f"[bold]{text}[/]"))
    for variant, summary in results["summary"].items():
        far = summary["false_alarm_rate"]["mean"]
        console.print(f"{variant}: false-alarm rate {'n/a' if far is None else f'{100 * far:.2f} %'}, "
                      f"{summary['false_alarm_events']['mean']:.1f} false-alarm events, "
                      f"{summary['missed']['mean']:.1f} of {summary['faults']['mean']:.1f} faults missed "
                      "(means over seeds)", highlight=False)
    console.print(f"results -> {folder / 'results.json'}, {folder / 'results.md'}", highlight=False)


def _app() -> typer.Typer:
    app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)
    app.command("stream")(stream)
    app.command("bench-stream")(bench_stream)
    app.command("bench-drift")(bench_drift)
    return app


def main() -> None:
    """Stand-alone entry point with the CLI's error handling: our errors become one line and exit code 2."""
    try:
        _app()(standalone_mode=False)
    except EdgePeftError as exc:
        _console().print(f"[red]error:[/] {exc}", highlight=False)
        sys.exit(exc.exit_code)
    except (typer.Exit, SystemExit) as exc:
        code = getattr(exc, "exit_code", getattr(exc, "code", 0))
        sys.exit(code if isinstance(code, int) else 0)
    except Exception as exc:  # noqa: BLE001 - one line, as the CLI does
        try:  # typer >= 0.29 runs on its own copy of click: click.ClickException never matches what it raises
            from typer._click.exceptions import ClickException
        except ImportError:
            from click.exceptions import ClickException  # type: ignore[assignment]
        if isinstance(exc, ClickException):  # a usage mistake: one line, exit 2
            from rich.markup import escape

            _console().print(f"[red]error:[/] {escape(' '.join(exc.format_message().split()))}", highlight=False,
                             soft_wrap=True)
            sys.exit(exc.exit_code)
        if os.environ.get("EDGEPEFT_DEBUG"):
            raise
        _console().print(f"[red]error:[/] unexpected {type(exc).__name__}: {exc}", highlight=False)
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
