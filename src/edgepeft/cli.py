"""The ``edgepeft`` command line: thin commands over the layers below.

Every error we raise on purpose (``EdgePeftError``) becomes one line on stderr and exit code 2; an
unexpected one becomes one line too (set ``EDGEPEFT_DEBUG=1`` for the traceback). Outputs are written
to a temporary file and renamed into place, so a failed run never clobbers what the user had.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgepeft.core.errors import EdgePeftError, OutputError

# What only the training install has (the `train` extra): a device install lacks them on purpose.
TRAINING_MODULES = frozenset({"torch", "peft", "sklearn", "pyod", "scipy", "matplotlib", "onnx", "psutil"})
FEDERATED_MODULES = frozenset({"flwr", "opacus", "ray"})
FLEET_MODULES = frozenset({"sqlalchemy", "alembic", "psycopg"})

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Per-asset PEFT adapters on a frozen pretrained sensor encoder: adapt, score, inspect, demo.",
)
console = Console(stderr=True, soft_wrap=True)  # a status or error line stays one line, whatever the width
out_console = Console()


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def _split(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def _one_line(text: str) -> str:
    """``text`` on a single line, safe to print through rich (no markup read from it)."""
    return escape(" ".join(str(text).splitlines()).strip())


def _error(message: str) -> None:
    """The error line on stderr: one line whatever the terminal width (README promise), never wrapped."""
    console.print(f"[red]error:[/] {_one_line(message)}", highlight=False, soft_wrap=True)


def check_writable(path: Path, *, directory: bool = False) -> None:
    """Fail early, before any work, if ``path`` cannot be written."""
    parent = path if directory and path.exists() else path.parent
    probe_dir = parent
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not os.access(probe_dir, os.W_OK):
        raise OutputError(f"cannot write to {path}: {probe_dir} is not writable; choose another --out")
    if path.exists() and not directory and path.is_dir():
        raise OutputError(f"{path} is a directory; give a file name for --out")


def write_text_atomic(path: Path, text: str) -> None:
    from edgepeft.core.config import atomic_write_bytes

    try:
        atomic_write_bytes(path, text.encode())
    except OSError as exc:
        raise OutputError(f"cannot write {path} ({exc.strerror or exc})") from exc


def _warn(message: str) -> None:
    """A warning as one yellow line on stderr, never wrapped."""
    console.print(f"[yellow]warning:[/] {_one_line(message)}", highlight=False, soft_wrap=True)


@contextlib.contextmanager
def _warnings_to_console() -> Iterator[None]:
    """Show data warnings (e.g. filled gaps) as one yellow line each instead of Python's format."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            seen: set[str] = set()
            for item in caught:
                message = str(item.message)
                if message not in seen and not issubclass(item.category, DeprecationWarning | FutureWarning):
                    _warn(message)
                    seen.add(message)


@app.command()
def adapt(
    train: Annotated[Path, typer.Argument(help="CSV of the asset's NORMAL operation (rows = time).")],
    out: Annotated[Path, typer.Option("--out", help="Directory to write the adapter (detector) to.")],
    base: Annotated[str, typer.Option(help="Base model: tiny or small (or a registered one).")] = "small",
    method: Annotated[str, typer.Option(help="lora|dora|ia3|adapter|prefix|bitfit|full|scratch")] = "lora",
    rank: Annotated[int, typer.Option(help="LoRA/DoRA rank.")] = 8,
    steps: Annotated[int, typer.Option(help="Adaptation steps.")] = 150,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same adapter).")] = 0,
    target_far: Annotated[float, typer.Option(help="Target false-alarm rate on normal data.")] = 0.01,
    threshold: Annotated[str, typer.Option(help="Threshold calibration: pot or quantile.")] = "pot",
    raise_after: Annotated[int, typer.Option(help="Alarm only after this many consecutive rows over the "
                                             "threshold (1: every such row).")] = 1,
    clear_after: Annotated[int, typer.Option(help="End an alarm after this many consecutive rows under it.")] = 1,
    rows: Annotated[int | None, typer.Option(min=1, help="Use only the first ROWS rows of TRAIN.")] = None,
    time_col: Annotated[str | None, typer.Option("--time-col", help="Timestamp column (else detected).")] = None,
    drop: Annotated[str | None, typer.Option(help="Columns to ignore, e.g. anomaly,changepoint.")] = None,
    base_precision: Annotated[str, typer.Option(help="fp32, or int8: adapt and calibrate against the int8 base "
                                                "(for `serve --graph` with an int8 graph; LoRA only).")] = "fp32",
    init_adapter: Annotated[Path | None, typer.Option(help="Start from a global adapter (e.g. written by "
                                                      "`edgepeft federate`) instead of the base alone.")] = None,
) -> None:
    """Train a per-asset adapter on normal data and calibrate its alarm threshold."""
    from edgepeft.data.csvio import read_sensor_csv
    from edgepeft.detect.detector import AnomalyDetector

    check_writable(out, directory=True)
    with _warnings_to_console():
        table = read_sensor_csv(train, time_col=time_col, drop=_split(drop))
    values = table.values if rows is None else table.values[:rows]
    if rows is not None and rows > len(table.values):
        _warn(f"{train} has only {len(table.values)} rows, fewer than --rows {rows}: all {len(table.values)} "
              "are used for training (make sure none of them is anomalous)")
    import pandas as pd

    frame = pd.DataFrame(values, columns=table.channels)
    det = AnomalyDetector(base=base, method=method, rank=rank, steps=steps, seed=seed,
                          target_far=target_far, threshold=threshold, raise_after=raise_after,
                          clear_after=clear_after, base_precision=base_precision,
                          init_adapter=None if init_adapter is None else str(init_adapter))
    if init_adapter is not None:  # a missing or foreign file fails now, not after a progress bar
        from edgepeft.peft.shared import read_global_adapter

        read_global_adapter(init_adapter, base, det.peft_config())
    with _progress() as progress:
        task = progress.add_task(f"adapting {method} on {base}", total=steps, status="")

        def report(step: int, loss: float) -> None:
            progress.update(task, completed=step, status=f"loss {loss:.4f}")

        det.fit(frame, progress=report)
    det.save(out)
    info = det.info(out)
    console.print(
        f"[green]adapter written[/] to {out}: {info['method']} on {info['base']}, "
        f"{info['trainable_parameters']:,} trainable ({100 * info['trainable_share']:.2f} % of base), "
        f"{info['adapter_bytes'] / 1024:.1f} KB, threshold {info['threshold']:.4g}, "
        f"{info['adapt_seconds']:.1f} s",
        highlight=False,
    )


@app.command()
def score(
    adapter: Annotated[Path, typer.Argument(help="Adapter directory written by `edgepeft adapt`.")],
    data: Annotated[Path, typer.Argument(help="CSV to score (same sensor columns as training).")],
    out: Annotated[Path, typer.Option("--out", help="CSV to write per input row: score, p_anomaly, anomaly, "
                                                "warming_up (1: too little history, alarm held), top_channels.")],
    time_col: Annotated[str | None, typer.Option("--time-col", help="Timestamp column (else detected).")] = None,
    drop: Annotated[str | None, typer.Option(help="Columns to ignore, e.g. anomaly,changepoint.")] = None,
) -> None:
    """Score a CSV with an adapter: one output row per input row, in order."""
    import pandas as pd

    from edgepeft.data.csvio import read_sensor_csv
    from edgepeft.detect.detector import AnomalyDetector

    check_writable(out)
    det = AnomalyDetector.load(adapter)
    with _warnings_to_console():
        table = read_sensor_csv(data, time_col=time_col, drop=_split(drop))
    frame = pd.DataFrame(table.values, columns=table.channels)
    result = det.score_all(frame, explain=True)
    held = [int(row < det.warmup_rows_) for row in range(len(frame))]
    columns = {"score": result["score"], "p_anomaly": result["p_anomaly"], "anomaly": result["anomaly"],
               "warming_up": held, "top_channels": result["top_channels"]}
    output = pd.DataFrame(columns)
    if table.time is not None:
        output.insert(0, "time", table.time)
    buffer = io.StringIO()
    output.to_csv(buffer, index=False, float_format="%.6g")
    write_text_atomic(out, buffer.getvalue())
    n_alerts = int(result["anomaly"].sum())
    console.print(f"[green]scored[/] {len(output)} rows -> {out} ({n_alerts} flagged anomalous)", highlight=False)


@app.command()
def info(adapter: Annotated[Path, typer.Argument(help="Adapter directory written by `edgepeft adapt`.")]) -> None:
    """Show what an adapter is: base, method, trainable share, bytes, threshold."""
    from edgepeft.detect.detector import AnomalyDetector

    det = AnomalyDetector.load(adapter)
    details = det.info(adapter)
    table = Table(title=f"adapter {adapter}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    rows = [
        ("base", f"{details['base']} ({details['base_parameters']:,} parameters, "
                 f"sha256 {details['base_sha256'][:16]}…)"),
        ("method", details["method"]),
        ("peft config", ", ".join(f"{k}={v}" for k, v in details["peft_config"].items() if v is not None)),
        ("channels", f"{len(details['channels'])}: {', '.join(details['channels'])}"),
        ("trainable", f"{details['trainable_parameters']:,} ({100 * details['trainable_share']:.2f} % of base)"),
        ("adapter bytes", f"{details['adapter_bytes']:,} ({details['adapter_bytes'] / 1024:.1f} KB)"),
        ("threshold", f"{details['threshold']:.6g} ({details['threshold_kind']}, target FAR {details['target_far']})"),
        ("alarm persistence", "off (every row over the threshold is flagged)"
         if details["raise_after"] == 1 and details["clear_after"] == 1
         else f"raise after {details['raise_after']} rows over, clear after {details['clear_after']} rows under"),
        ("adapt seconds", f"{details['adapt_seconds']:.2f}"),
    ]
    for key, value in rows:
        table.add_row(key, str(value))
    out_console.print(table)


@app.command()
def pretrain(
    base: Annotated[str, typer.Argument(help="Built-in base to pretrain: tiny or small.")],
    steps: Annotated[int, typer.Option(help="Total steps (a rerun resumes from the last checkpoint).")] = 3000,
    batch_size: Annotated[int, typer.Option(help="Windows per step.")] = 64,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 1e-3,
    data: Annotated[list[Path] | None, typer.Option(help="CSV of real normal data to mix in (repeatable).")] = None,
    checkpoint_dir: Annotated[Path | None, typer.Option(help="Checkpoint folder.")] = None,
    out_dir: Annotated[Path | None, typer.Option(help="Where weights + card go (default: the package).")] = None,
    max_minutes: Annotated[float | None, typer.Option(help="Stop after a checkpoint past this time.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Pretrain a base encoder on generated sensor signals; resumes from checkpoints."""
    from edgepeft.models.registry import base_config
    from edgepeft.train.pretrain import PretrainConfig
    from edgepeft.train.pretrain import pretrain as run_pretrain

    model_cfg = base_config(base)
    cfg = PretrainConfig(
        steps=steps, batch_size=batch_size, lr=lr, data=[str(p) for p in data or []], seed=seed,
        checkpoint_dir=str(checkpoint_dir or Path("runs") / f"pretrain-{base}"),
        out_dir=str(out_dir) if out_dir else None,
    )
    with _progress() as progress:
        task = progress.add_task(f"pretraining {base}", total=steps, status="")

        def report(step: int, total: int, loss: float) -> None:
            progress.update(task, completed=step, status=f"loss {loss:.4f}")

        result = run_pretrain(base, model_cfg, cfg, progress=report,
                              max_seconds=max_minutes * 60 if max_minutes else None)
    if result["finished"]:
        console.print(f"[green]pretrained[/] {base}: validation forecast MSE {result['validation_forecast_mse']:.4f}, "
                      f"weights -> {result['path']}", highlight=False)
    else:
        console.print(f"checkpointed at step {result['steps']}/{steps}; rerun the same command to resume")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for the HTML report, results and adapters.")] = Path(
        "edgepeft-demo"
    ),
    base: Annotated[str, typer.Option(help="Base model: tiny (default, fits the 3-minute demo) or small.")] = "tiny",
    method: Annotated[str, typer.Option(help="PEFT method for every pump.")] = "lora",
    pumps: Annotated[int, typer.Option(help="Simulated pumps (at least 6 covers every fault kind).")] = 6,
    steps: Annotated[int, typer.Option(help="Adaptation steps per pump.")] = 150,
    seed: Annotated[int, typer.Option(help="Seed of the simulated fleet and of training.")] = 0,
) -> None:
    """The main job: adapt one adapter per simulated pump on the shared base, score, compare, report."""
    from edgepeft.bench.demo import run_demo

    result = run_demo(out, base=base, method=method, n_pumps=pumps, steps=steps, seed=seed, console=out_console)
    console.print(f"[green]report[/] -> {result.html_path}", highlight=False)


def _mount_layer_commands() -> None:
    """Commands that live with their layer (their heavy imports stay lazy inside them)."""
    from edgepeft.agent import commands as agent_commands
    from edgepeft.bench import stream_commands
    from edgepeft.bench.commands import bench_app
    from edgepeft.delta import commands as delta_commands
    from edgepeft.federated import commands as federated_commands
    from edgepeft.fleet.commands import fleet_app
    from edgepeft.runtime import commands as runtime_commands

    for name in ("keygen", "pack", "verify", "inspect"):
        app.command(name)(getattr(delta_commands, name))
    app.command("serve")(runtime_commands.serve)
    app.command("agent")(agent_commands.agent)
    app.command("export-onnx")(runtime_commands.export_onnx)
    app.command("export-c")(runtime_commands.export_c)
    app.command("stream")(stream_commands.stream)
    app.command("federate")(federated_commands.federate)
    bench_app.command("stream")(stream_commands.bench_stream)
    bench_app.command("drift")(stream_commands.bench_drift)
    app.add_typer(bench_app, name="bench", help="Benchmarks: quality and measured costs, side by side.")
    app.add_typer(fleet_app, name="fleet", help="The fleet server: registry of devices, bases and signed bundles.")


_mount_layer_commands()


def _limit_threads() -> None:
    """One compute thread unless EDGEPEFT_THREADS says otherwise.

    Our models are small: a second thread buys little, and on a busy machine OpenMP threads spin while
    waiting for each other; measured here, a tiny-base training step went from 0.5 s to 9 s with two
    threads on two loaded cores. Must run before torch is imported.
    """
    threads = os.environ.get("EDGEPEFT_THREADS", "1")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, threads)


def _click_exceptions() -> tuple[type[Exception], type[Exception], type[Exception] | None]:
    """``(ClickException, UsageError, NoArgsIsHelpError)`` of the click that typer runs on.

    typer >= 0.29 ships its own copy of click (``typer._click``): ``click.ClickException`` never matches what
    it raises. Older typer raises click's own classes (where ``NoArgsIsHelpError`` may not exist yet).
    """
    try:
        from typer._click import exceptions as click_exceptions
    except ImportError:  # typer < 0.29 runs on click itself
        from click import exceptions as click_exceptions  # type: ignore[no-redef]
    no_args: type[Exception] | None = getattr(click_exceptions, "NoArgsIsHelpError", None)
    return click_exceptions.ClickException, click_exceptions.UsageError, no_args


def _usage_message(exc: Exception) -> str:
    """A click usage error as one line naming the problem and where help is, e.g.
    ``missing argument 'train' (see: edgepeft adapt --help)``."""
    message = " ".join(exc.format_message().split()).rstrip(".")  # type: ignore[attr-defined]
    if message[:1].isupper() and message[1:2].islower():
        message = message[0].lower() + message[1:]
    ctx = getattr(exc, "ctx", None)
    command = ctx.command_path if ctx is not None else "edgepeft"
    return f"{message} (see: {command} --help)"


def main() -> None:
    """Entry point: run the app, turning our errors into one line and a non-zero exit.

    Our errors exit with their code (2 for bad input), usage mistakes (missing argument, bad value, unknown
    command or option) exit 2 like every click program, an unexpected error exits 1.
    """
    _limit_threads()
    click_exception, usage_error, no_args_is_help = _click_exceptions()
    try:
        app(prog_name="edgepeft", standalone_mode=False)
    except EdgePeftError as exc:
        _error(str(exc))
        sys.exit(exc.exit_code)
    except (typer.Exit, SystemExit) as exc:
        code = getattr(exc, "exit_code", getattr(exc, "code", 0))
        sys.exit(code if isinstance(code, int) else 0)
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]")
        sys.exit(130)
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        if missing in FEDERATED_MODULES:
            _error(f"`edgepeft federate` needs the federated install ({missing} is not installed): "
                   "pip install 'edgepeft[train,federated]'")
            sys.exit(2)
        if missing in FLEET_MODULES:
            _error(f"`edgepeft fleet` needs the fleet install ({missing} is not installed): "
                   "pip install 'edgepeft[fleet]'")
            sys.exit(2)
        if missing not in TRAINING_MODULES:
            raise
        # A device install (numpy + ONNX Runtime) serves and verifies; training, scoring offline and benchmarks
        # need the training side's libraries.
        command = next((arg for arg in sys.argv[1:] if not arg.startswith("-")), "this command")
        _error(f"`edgepeft {command}` needs the training install ({exc.name} is not installed): "
               "pip install 'edgepeft[train]' (a device install serves with `edgepeft serve --engine onnx --graph`)")
        sys.exit(2)
    except typer.Abort:
        _error("aborted")
        sys.exit(1)
    except Exception as exc:  # noqa: BLE001 - the user gets one line; EDGEPEFT_DEBUG shows the traceback
        if no_args_is_help is not None and isinstance(exc, no_args_is_help):
            exc.show()  # type: ignore[attr-defined]  # `edgepeft` or `edgepeft bench` alone: the help
            sys.exit(2)
        if isinstance(exc, usage_error):
            _error(_usage_message(exc))
            sys.exit(2)
        if isinstance(exc, click_exception):
            _error(exc.format_message())  # type: ignore[attr-defined]
            sys.exit(getattr(exc, "exit_code", 1))
        if os.environ.get("EDGEPEFT_DEBUG"):
            raise
        _error(f"unexpected {type(exc).__name__}: {exc} (set EDGEPEFT_DEBUG=1 for details)")
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
