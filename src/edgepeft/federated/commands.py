"""`edgepeft federate`: learn one adapter across many assets with Flower, then give each asset its own detector."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

console = Console()


def federate(
    data: Annotated[str, typer.Argument(help="The assets: csv:DIR (one normal-data CSV per asset), asd:DIR, "
                                             "fleet:N[:SEED] or synthetic:N:ROWS.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the global adapter, checkpoint, history and "
                                      "the per-asset detectors. A checkpoint there is resumed.")],
    clients: Annotated[int | None, typer.Option(min=1, help="Simulated clients (default: one per asset).")] = None,
    rounds: Annotated[int, typer.Option(min=1, help="Federated rounds.")] = 5,
    local_steps: Annotated[int, typer.Option(min=1, help="Training steps per client per round.")] = 20,
    aggregation: Annotated[str, typer.Option(help="ffa (LoRA A frozen: exact, half the bytes), svd (exact "
                                                  "average re-factorised) or fedavg (naive reference).")] = "ffa",
    base: Annotated[str, typer.Option(help="Base model.")] = "tiny",
    method: Annotated[str, typer.Option(help="PEFT method.")] = "lora",
    rank: Annotated[int, typer.Option(min=1, help="LoRA rank.")] = 4,
    dp_epsilon: Annotated[float | None, typer.Option(help="DP-SGD on every client: epsilon per client over the "
                                                          "whole federation (record: a training window).")] = None,
    dp_delta: Annotated[float, typer.Option(help="DP delta.")] = 1e-5,
    secagg: Annotated[bool, typer.Option("--secagg", help="SecAgg+: the server sees only the sum of the "
                                         "updates (ffa or fedavg).")] = False,
    central_dp_noise: Annotated[float | None, typer.Option(
        help="Client-level DP by Flower: clients clip their update, the server adds this noise multiplier.")] = None,
    fraction_fit: Annotated[float, typer.Option(help="Share of clients trained per round.")] = 1.0,
    min_clients: Annotated[int, typer.Option(min=1, help="Fewest usable updates to aggregate a round.")] = 2,
    round_timeout: Annotated[float | None, typer.Option(help="Seconds to wait for a round (stragglers are "
                                                             "skipped).")] = None,
    personalise_steps: Annotated[int, typer.Option(min=0, help="Local fine-tuning steps of each asset's "
                                                   "detector from the global adapter (0: as is).")] = 30,
    detectors: Annotated[bool, typer.Option(help="Write each asset's calibrated detector under OUT/detectors "
                                            "(pack one with `edgepeft pack`).")] = True,
    seed: Annotated[int, typer.Option(help="Seed of the adapter's initialisation and the local sampling.")] = 0,
    deployment: Annotated[bool, typer.Option("--deployment", help="Deployment mode: a Flower SuperLink and one "
                                             "SuperNode per client as real processes on loopback, `flwr run` "
                                             "(instead of the simulation engine).")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", help="Flower's and Ray's own logs.")] = False,
) -> None:
    """Federated PEFT: one adapter learned across assets with Flower, no data leaving an asset."""
    from edgepeft.federated.app import RunSettings
    from edgepeft.federated.data import load_partition, partition_count
    from edgepeft.federated.run import simulate
    from edgepeft.federated.task import FederatedConfig

    cfg = FederatedConfig(base=base, method=method, rank=rank, aggregation=aggregation, rounds=rounds,
                          local_steps=local_steps, dp_epsilon=dp_epsilon, dp_delta=dp_delta, seed=seed)
    run = RunSettings(data=data, out=str(out), fraction_fit=fraction_fit, min_clients=min_clients, secagg=secagg,
                      central_dp_noise=central_dp_noise, round_timeout=round_timeout)
    n_assets = partition_count(data)
    if deployment:
        from edgepeft.federated.deploy import deploy

        result = deploy(cfg, run, clients, keep_logs=verbose)
    else:
        result = simulate(cfg, run, clients, verbose=verbose)
    table = Table("round", "clients", "rejected", "loss", "epsilon (max)", "seconds", title="federation")
    for row in result.history:
        table.add_row(str(row["round"]), str(row["clients"]), str(len(row["rejected"])),
                      "-" if row["loss"] is None else f"{row['loss']:.4f}",
                      "-" if row["epsilon_max"] is None else f"{row['epsilon_max']:.2f}", f"{row['seconds']:.1f}")
    console.print(table)
    up = result.summary["bytes_per_round_per_client"]["up"]
    console.print(f"global adapter: {result.global_path} ({up:,} bytes per client per round each way"
                  + (f"; DP epsilon <= {result.summary['epsilon_max']:.2f} per client at delta {dp_delta:g}"
                     if result.summary["epsilon_max"] is not None else "") + ")", highlight=False)
    if not detectors:
        return
    written = 0
    for index in range(min(n_assets, clients or n_assets)):
        name, values = load_partition(data, index)
        det = cfg.detector(init_adapter=str(result.global_path), steps=personalise_steps).fit(values)
        det.save(Path(out) / "detectors" / name)
        written += 1
    console.print(f"{written} personalised detectors under {Path(out) / 'detectors'} "
                  f"({personalise_steps} local steps each, own threshold)", highlight=False)
