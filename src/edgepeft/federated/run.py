"""Running a federation: Flower's simulation engine on this machine, and writing its result.

Example (three synthetic assets, two rounds; Flower starts Ray, so this takes some seconds):
    >>> import tempfile
    >>> out = tempfile.mkdtemp()
    >>> cfg = FederatedConfig(rounds=2, local_steps=2, batch_size=4)
    >>> result = simulate(cfg, RunSettings(data="synthetic:3:300", out=out))  # doctest: +SKIP
    >>> result.global_path.name, len(result.history)  # doctest: +SKIP
    ('global_adapter.safetensors', 2)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepeft.core.errors import ConfigError
from edgepeft.federated.app import HISTORY_FILE, RunSettings, load_checkpoint, make_client_app, run_server
from edgepeft.federated.data import partition_count
from edgepeft.federated.task import FederatedConfig, GlobalState, base_sha256, initial_state, wire_bytes
from edgepeft.peft.shared import save_global_adapter

GLOBAL_FILE = "global_adapter.safetensors"
SUMMARY_FILE = "federation.json"


@dataclass
class FederationResult:
    state: GlobalState
    history: list[dict[str, Any]]
    global_path: Path
    summary: dict[str, Any]


def _not_deprecation(record: logging.LogRecord) -> bool:
    # Flower 1.42 marks run_simulation deprecated in favour of `flwr run`, which needs a packaged app: the Python
    # entry point is still what runs a simulation from our own command.
    return "DEPRECATED FEATURE" not in record.getMessage()


@contextlib.contextmanager
def own_environment() -> Iterator[None]:
    """Give the process its environment back afterwards: Ray's driver sets PYTHONPATH (its own path and this
    interpreter's site-packages), PYTHONBREAKPOINT and more in ``os.environ``, which every later subprocess of the
    caller would inherit (a fresh virtual environment started from it would see this one's packages)."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def quiet_flower(verbose: bool) -> Iterator[None]:
    """Flower and Ray log every round at INFO; keep their warnings and errors unless ``verbose``."""
    names = ("flwr", "ray")
    levels = {name: logging.getLogger(name).level for name in names}
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # no GPUs are asked for: silence its tip
    if not verbose:
        for name in names:
            logging.getLogger(name).setLevel(logging.WARNING)
        logging.getLogger("flwr").addFilter(_not_deprecation)
    try:
        yield
    finally:
        logging.getLogger("flwr").removeFilter(_not_deprecation)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def simulate(cfg: FederatedConfig, run: RunSettings, n_clients: int | None = None, *, cpus: int | None = None,
             verbose: bool = False) -> FederationResult:
    """One federation in Flower's simulation engine: ``n_clients`` virtual SuperNodes (default: one per asset of
    ``run.data``), each running the ClientApp on its partition, Ray as the backend with one CPU per client."""
    from flwr.server import ServerApp
    from flwr.simulation import run_simulation

    available = partition_count(run.data)
    n_clients = available if n_clients is None else n_clients
    if not 1 <= n_clients <= available:
        raise ConfigError(f"{run.data!r} holds {available} asset(s); cannot simulate {n_clients} clients")
    if run.min_clients > n_clients:
        raise ConfigError(f"min_clients {run.min_clients} exceeds the {n_clients} clients")
    if run.secagg and cfg.aggregation == "svd":
        raise ConfigError("SecAgg+ gives the server only the sum of the updates; the SVD scheme needs each "
                          "client's product B_i A_i. Use --aggregation ffa (exact for LoRA, and summable)")
    cpus = cpus or max(1, min(os.cpu_count() or 1, n_clients))
    outcome: dict[str, GlobalState] = {}

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Any, context: Any) -> None:
        # Wait until every virtual SuperNode is registered: the legacy client manager looks again only every 5 s,
        # and a round sampled before then would see part of the fleet.
        deadline = time.monotonic() + 60
        while len(list(grid.get_node_ids())) < n_clients and time.monotonic() < deadline:
            time.sleep(0.02)
        outcome["state"] = run_server(grid, context, cfg, run, n_clients)

    # Ray's session files go to a private folder (short: its socket paths must stay under 108 characters), removed
    # afterwards; /tmp/ray would otherwise keep every run's.
    ray_dir = tempfile.mkdtemp(prefix="epray")
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"num_cpus": cpus, "num_gpus": 0, "include_dashboard": False,
                             "logging_level": "error", "log_to_driver": verbose, "_temp_dir": ray_dir}}
    try:
        with own_environment(), quiet_flower(verbose):
            run_simulation(server_app=server_app,
                           client_app=make_client_app(),
                           num_supernodes=n_clients, backend_config=backend, verbose_logging=False)
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
    if "state" not in outcome:
        raise ConfigError("the federation stopped before its server finished; see the log above")
    return finish(cfg, run, outcome["state"], n_clients)


def finish(cfg: FederatedConfig, run: RunSettings, state: GlobalState, n_clients: int) -> FederationResult:
    """Write the global adapter (tensors + what they were trained on) and a summary beside the checkpoint."""
    out = Path(run.out)
    _, done, history = load_checkpoint(out, initial_state(cfg))
    summary = {
        "config": cfg.to_record(),
        "run": {k: v for k, v in vars(run).items() if k != "extra"},
        "clients": n_clients,
        "rounds_done": done,
        "bytes_per_round_per_client": {"up": wire_bytes(state), "down": wire_bytes(state)},
        "rejected": sum(len(h["rejected"]) for h in history),
        "epsilon_max": max((h["epsilon_max"] for h in history if h.get("epsilon_max") is not None), default=None),
        "delta": cfg.dp_delta if cfg.dp_epsilon is not None else None,
    }
    path = save_global_adapter(out / GLOBAL_FILE, state.tensors, cfg.base, cfg.peft_config(), base_sha256(cfg),
                               extra={"federation": {k: summary[k] for k in ("clients", "rounds_done")},
                                      "aggregation": cfg.aggregation})
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1) + "\n")
    return FederationResult(state, history, path, summary)


def read_history(out: str | os.PathLike[str]) -> list[dict[str, Any]]:
    path = Path(out) / HISTORY_FILE
    return json.loads(path.read_text()) if path.is_file() else []
