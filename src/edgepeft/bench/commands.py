"""``edgepeft bench ...``: thin commands over :mod:`edgepeft.bench.suites` and :mod:`edgepeft.bench.docs`.

Mounted by the CLI as ``app.add_typer(bench_app, name="bench")``. Errors are our own exception types; the CLI's
``main`` turns them into one line and a non-zero exit code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

bench_app = typer.Typer(
    no_args_is_help=True,
    help="Benchmarks end to end: results.json, results.md and plots per suite; docs/BENCHMARKS.md from them.",
)

DataOpt = Annotated[Path | None, typer.Option("--data", help="Dataset folder (default ../shared/datasets/<suite>).")]
MethodsOpt = Annotated[
    str | None,
    typer.Option("--methods", help="Comma-separated contenders, e.g. lora,full,pca (default: all: lora, dora, ia3, "
                 "adapter, prefix, bitfit, full, scratch, zeroshot, iforest, pca, movvar, sqdiff, knn, cnn)."),
]
LimitOpt = Annotated[int | None, typer.Option("--limit", help="Only the first N files / assets (smoke runs).")]
BaseOpt = Annotated[str, typer.Option("--base", help="Base model of our methods: tiny or small.")]
StepsOpt = Annotated[int, typer.Option("--steps", help="Adaptation steps per asset.")]
OutOpt = Annotated[Path | None, typer.Option("--out", help="Output folder (default bench-out/<suite>).")]
MaxRowsOpt = Annotated[int | None, typer.Option("--max-rows", help="Only the first N test rows per asset (smoke).")]
RssOpt = Annotated[bool, typer.Option("--rss/--no-rss", help="Measure process RSS in fresh subprocesses.")]
LatencyOpt = Annotated[int, typer.Option("--latency-calls", help="Windows scored one by one for p50/p99 latency.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of every detector (and of the simulated fleet).")]
ThreadsOpt = Annotated[int | None, typer.Option("--threads", help="torch threads (default: one per core).")]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bars on stderr.")]


def _options(**kwargs: Any) -> Any:
    from edgepeft.bench.harness import command_line, git_commit
    from edgepeft.bench.suites import SuiteOptions

    return SuiteOptions(command=command_line(), commit=git_commit(), **kwargs)


def _out(out: Path | None, suite: str) -> Path:
    from edgepeft.core.errors import OutputError

    path = out if out is not None else Path("bench-out") / suite
    if path.exists() and not path.is_dir():
        raise OutputError(f"--out {path} is a file; give a folder")
    return path


def _report(results: dict[str, Any], out: Path) -> None:
    """One summary line per target on stdout, and where the files are."""
    from rich.console import Console

    console = Console(soft_wrap=True)  # one line per target, whatever the terminal width
    for target in results["targets"]:
        style = {"met": "green", "missed": "red"}.get(target["status"], "yellow")
        note = " (indicative)" if target.get("indicative") and target["status"] != "not evaluated" else ""
        console.print(f"[{style}]{target['status'].upper()}[/]{note} {target['target']}: {target['measured']}",
                      highlight=False)
    console.print(f"results -> {out / 'results.json'}, {out / 'results.md'}, plots: {', '.join(results['plots'])}",
                  highlight=False)


def _print_targets(results: dict[str, Any], folder: Path, console: Any = None) -> None:
    """A self-rendered suite's targets, one line each, and where its results went."""
    from rich.console import Console

    console = console or Console(soft_wrap=True)
    for target in results["targets"]:
        console.print(f"{target['status'].upper()} {target['target']}: {target['measured']}", highlight=False)
    console.print(f"results -> {folder / 'results.json'}, {folder / 'results.md'}", highlight=False)


@bench_app.command()
def skab(
    data: DataOpt = None,
    methods: MethodsOpt = None,
    limit: LimitOpt = None,
    base: BaseOpt = "small",
    steps: StepsOpt = 150,
    out: OutOpt = None,
    max_rows: MaxRowsOpt = None,
    rss: RssOpt = True,
    latency_calls: LatencyOpt = 200,
    seed: SeedOpt = 0,
    threads: ThreadsOpt = None,
    progress: ProgressOpt = True,
) -> None:
    """SKAB, published protocol: 34 files, fit on the first 400 rows, F1 / FAR / MAR and changepoint score."""
    from edgepeft.bench.suites import run_skab

    folder = _out(out, "skab")
    opts = _options(base=base, steps=steps, methods=methods, limit=limit, max_rows=max_rows, seed=seed, rss=rss,
                    latency_calls=latency_calls, threads=threads, progress=progress)
    results = run_skab(data or Path("../shared/datasets/skab"), opts, folder)
    _report(results, folder)


@bench_app.command()
def asd(
    data: DataOpt = None,
    methods: MethodsOpt = None,
    limit: LimitOpt = None,
    base: BaseOpt = "small",
    steps: StepsOpt = 150,
    out: OutOpt = None,
    max_rows: MaxRowsOpt = None,
    rss: RssOpt = True,
    latency_calls: LatencyOpt = 200,
    seed: SeedOpt = 0,
    threads: ThreadsOpt = None,
    progress: ProgressOpt = True,
) -> None:
    """ASD: one detector per server; best F1 (no point adjustment), F1 at our threshold, AUC-PR, VUS-PR."""
    from edgepeft.bench.suites import run_asd

    folder = _out(out, "asd")
    opts = _options(base=base, steps=steps, methods=methods, limit=limit, max_rows=max_rows, seed=seed, rss=rss,
                    latency_calls=latency_calls, threads=threads, progress=progress)
    results = run_asd(data or Path("../shared/datasets/asd"), opts, folder)
    _report(results, folder)


@bench_app.command()
def fleet(
    pumps: Annotated[int, typer.Option("--pumps", help="Simulated pumps (the benchmark uses >= 20).")] = 20,
    n_train: Annotated[int, typer.Option("--train-rows", help="Normal training rows per pump.")] = 3000,
    n_test: Annotated[int, typer.Option("--test-rows", help="Test rows per pump (with faults).")] = 3000,
    methods: MethodsOpt = None,
    limit: LimitOpt = None,
    base: BaseOpt = "small",
    steps: StepsOpt = 150,
    out: OutOpt = None,
    max_rows: MaxRowsOpt = None,
    rss: RssOpt = True,
    latency_calls: LatencyOpt = 200,
    seed: SeedOpt = 0,
    threads: ThreadsOpt = None,
    progress: ProgressOpt = True,
) -> None:
    """Simulated pump fleet (generated, so no --data): the same metrics as ASD, one adapter per pump."""
    from edgepeft.bench.suites import run_fleet

    folder = _out(out, "fleet")
    opts = _options(base=base, steps=steps, methods=methods, limit=limit, max_rows=max_rows, seed=seed, rss=rss,
                    latency_calls=latency_calls, threads=threads, progress=progress)
    results = run_fleet(opts, folder, n_pumps=pumps, n_train=n_train, n_test=n_test)
    _report(results, folder)


@bench_app.command()
def docs(
    docs_dir: Annotated[Path, typer.Option("--docs", help="Docs folder holding results/<suite>/results.json.")] = Path(
        "docs"
    ),
) -> None:
    """Regenerate docs/BENCHMARKS.md from docs/results/<suite>/results.json (never edit it by hand)."""
    from rich.console import Console

    from edgepeft.bench.docs import regenerate_benchmarks

    path = regenerate_benchmarks(docs_dir)
    Console().print(f"wrote {path}", highlight=False)


@bench_app.command()
def deploy(
    out: Annotated[Path | None, typer.Option(help="Output folder (default bench-out/deploy).")] = None,
    quick: Annotated[bool, typer.Option(help="Short load test (10 s, 100 req/s, 50 swaps) instead of 60 s.")] = False,
    base: Annotated[str, typer.Option(help="Base the bundle sizes are compared with.")] = "small",
) -> None:
    """Bundle bytes vs base, install/activate time, torch vs ONNX Runtime, memory per adapter, hot-swap load test."""
    from edgepeft.bench.deploy_bench import run_deploy_bench

    folder = _out(out, "deploy")
    results = run_deploy_bench(folder, quick=quick, base=base)
    _print_targets(results, folder)


@bench_app.command()
def device(
    out: Annotated[Path | None, typer.Option(help="Output folder (default bench-out/device).")] = None,
    assets: Annotated[int, typer.Option(min=1, help="Assets installed and served (one bundle each).")] = 100,
    seconds: Annotated[float, typer.Option(min=0.1, help="Scoring throughput: seconds of requests per engine.")
                       ] = 5.0,
    quality: Annotated[str, typer.Option(help="Suites for fp32 vs int8 vs int8 quantisation-aware quality "
                                         "(comma list of skab, asd, fleet; empty: none).")] = "skab,asd,fleet",
    limit: Annotated[int | None, typer.Option(min=1, help="At most this many assets per quality suite.")] = None,
    data: Annotated[Path, typer.Option("--data", help="Folder holding skab/ and asd/.")] = Path(
        "../shared/datasets"),
) -> None:
    """The device process, torch runtime vs the torch-free device install, side by side: peak RSS with every asset
    resident, start to first score, install + activate over HTTP, scoring throughput."""
    from edgepeft.bench.device_bench import run_device_bench
    from edgepeft.core.errors import ConfigError

    suites = tuple(part.strip() for part in quality.split(",") if part.strip())
    unknown = [suite for suite in suites if suite not in ("skab", "asd", "fleet")]
    if unknown:
        raise ConfigError(f"--quality lists unknown suites {unknown}; choose among skab, asd, fleet")
    folder = _out(out, "device")
    results = run_device_bench(folder, assets=assets, seconds=seconds, data=data, quality=suites, limit=limit)
    _print_targets(results, folder)


@bench_app.command()
def channels(
    out: Annotated[Path | None, typer.Option(help="Output folder (default bench-out/channels).")] = None,
    counts: Annotated[str, typer.Option("--channels", help="Comma-separated channel counts.")] = "8,16,32,64",
    rows: Annotated[int, typer.Option(min=100, help="Rows scored per channel count.")] = 2000,
    repeats: Annotated[int, typer.Option(min=1, help="Timed repeats (best kept).")] = 3,
    base: Annotated[str, typer.Option(help="Base model.")] = "tiny",
    data: Annotated[Path | None, typer.Option("--data", help="SKAB folder for the v2 vs v1 throughput ratio "
                                              "(default ../shared/datasets/skab; skipped when absent).")] = None,
) -> None:
    """Scoring cost per value from 8 to 64 channels (one-pass blind prediction against the C copies), and the SKAB
    scoring throughput of this scoring core against the first version's, side by side."""
    from rich.console import Console

    from edgepeft.bench.scaling import run_channel_scaling
    from edgepeft.core.errors import ConfigError

    try:
        numbers = [int(part) for part in counts.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--channels must be comma-separated whole numbers, got {counts!r}") from None
    if not numbers or min(numbers) < 1:
        raise ConfigError(f"--channels must list channel counts >= 1, got {counts!r}")
    folder = _out(out, "channels")
    results = run_channel_scaling(folder, channels=numbers, rows=rows, repeats=repeats, base=base,
                                  skab=data or Path("../shared/datasets/skab"))
    console = Console(soft_wrap=True)
    for row in results["rows"]:
        console.print(f"{row['channels']:>3} channels: {row['values_per_s']:>10,.0f} values/s one pass, "
                      f"{row['copies_values_per_s']:>10,.0f} with C copies", highlight=False)
    _print_targets(results, folder, console)


@bench_app.command()
def rollout(
    out: Annotated[Path | None, typer.Option(help="Output folder (default bench-out/rollout).")] = None,
    devices: Annotated[int, typer.Option(min=1, max=100_000, help="Light simulated devices (the real TUF client, "
                                         "emulated scoring).")] = 1000,
    real_agents: Annotated[int, typer.Option(min=0, max=16, help="Real devices: a runtime and an agent process "
                                             "each.")] = 3,
    poll_seconds: Annotated[float, typer.Option(min=1, help="Poll interval of every device.")] = 20.0,
    steady_seconds: Annotated[float, typer.Option(min=5, help="Length of the steady-polling measurement.")] = 60.0,
    backends: Annotated[str, typer.Option(help="Comma list of sqlite, postgresql.")] = "sqlite,postgresql",
    seed: SeedOpt = 0,
) -> None:
    """The fleet server under a fleet's polling load: roll good adapters to every device, then a bad one whose
    canary the health gate must roll back; time, bytes per device, server CPU per poll and API latency."""
    from rich.console import Console

    from edgepeft.bench.rollout_bench import run_rollout_bench
    from edgepeft.core.errors import ConfigError

    console = Console(stderr=True, soft_wrap=True)
    chosen = tuple(part.strip() for part in backends.split(",") if part.strip())
    unknown = [b for b in chosen if b not in ("sqlite", "postgresql")]
    if unknown or not chosen:
        raise ConfigError(f"--backends must list sqlite and/or postgresql, got {backends!r}")
    folder = out or Path("bench-out/rollout")
    run_rollout_bench(folder, n_devices=devices, n_real=real_agents, poll_seconds=poll_seconds,
                      steady_seconds=steady_seconds, backends=chosen, seed=seed, console=console)
    console.print(f"[green]results[/] -> {folder}/results.md", highlight=False)


@bench_app.command()
def federated(
    out: Annotated[Path | None, typer.Option(help="Output folder (default bench-out/federated). Parts already "
                                             "there are reused: a killed run resumes.")] = None,
    suites: Annotated[str, typer.Option(help="Comma list of asd, fleet.")] = "asd,fleet",
    pumps: Annotated[int, typer.Option(min=2, help="Pumps in the fleet's federation.")] = 50,
    new_pumps: Annotated[int, typer.Option(min=1, help="Pumps outside it (cold start).")] = 10,
    rounds: Annotated[int, typer.Option(min=1, help="Federated rounds.")] = 5,
    local_steps: Annotated[int, typer.Option(min=1, help="Local steps per client per round.")] = 20,
    personalise_steps: Annotated[int, typer.Option(min=0, help="Local fine-tuning from the global adapter.")] = 30,
    cold_rows: Annotated[int, typer.Option(min=100, help="Normal rows of a cold-start asset.")] = 150,
    epsilons: Annotated[str, typer.Option(help="DP-SGD epsilons (comma list; empty: none).")] = "1,4,8",
    secagg: Annotated[bool, typer.Option(help="Also run the FFA federation under SecAgg+ (its cost).")] = True,
    scale_clients: Annotated[int, typer.Option(min=0, help="Clients of the scale run (0: none).")] = 1000,
    limit: Annotated[int | None, typer.Option(min=1, help="Evaluate only the first N member assets (smoke).")] = None,
    seed: SeedOpt = 0,
    data: Annotated[Path, typer.Option("--data", help="Folder holding asd/.")] = Path("../shared/datasets"),
) -> None:
    """Federated adapters (FedAvg, FFA-LoRA, SVD; with DP-SGD; personalised) vs local-only and centralised, cold
    start, communication, SecAgg+ cost and a 1,000-client simulation, in one run."""
    from edgepeft.bench.federated_bench import run_federated_bench
    from edgepeft.core.errors import ConfigError

    chosen = tuple(part.strip() for part in suites.split(",") if part.strip())
    unknown = [suite for suite in chosen if suite not in ("asd", "fleet")]
    if unknown:
        raise ConfigError(f"--suites lists unknown suites {unknown}; choose among asd, fleet")
    try:
        eps = tuple(float(part) for part in epsilons.split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"--epsilons must be numbers separated by commas, got {epsilons!r}") from None
    if any(not e > 0 for e in eps):
        raise ConfigError(f"--epsilons must be > 0, got {epsilons!r}")
    folder = _out(out, "federated")
    results = run_federated_bench(folder, data=data, suites=chosen, pumps=pumps, new_pumps=new_pumps, rounds=rounds,
                                  local_steps=local_steps, personalise_steps=personalise_steps, cold_rows=cold_rows,
                                  epsilons=eps, secagg=secagg, scale_clients=scale_clients, limit=limit, seed=seed)
    _print_targets(results, folder)
