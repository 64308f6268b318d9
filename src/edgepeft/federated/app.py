"""The Flower apps: a ServerApp and a ClientApp, thin shells over :mod:`edgepeft.federated.task`.

Flower's legacy strategy API (``NumPyClient``, ``FedAvg`` subclass, ``DefaultWorkflow``) because its SecAgg+ workflow
runs only with it (FIELD-NOTES, Flower 1.42). The same two apps run in Flower's simulation engine
(:func:`edgepeft.federated.run.simulate`) and in deployment mode (a SuperLink and SuperNodes as real processes: the
module-level :data:`server_app` and :data:`client_app` read their settings from the run config and node config).

What crosses the wire each round: the shared adapter tensors that train (:attr:`GlobalState.wire`: with FFA-LoRA only
the B matrices), the federation's config, and per client its number of training windows, loss, seconds and, under
DP-SGD, its epsilon. Never data, never the channel tags (kept in the client's node state between rounds).

Server side, every round (:class:`AdapterStrategy`):

- each update is checked before it is aggregated: the right tensors and shapes, finite, and within
  ``max_update_norm`` (L2) of the global tensors; an update that fails is rejected and logged with its reason, and
  clients that raise, drop out or straggle past ``round_timeout`` are skipped: the round aggregates whoever is left
  (at least ``min_clients``, or the global adapter stays as it was);
- under SecAgg+ the strategy receives only the sum (every result carries the same, already averaged tensors): it
  checks the aggregate instead, and a non-finite or out-of-bound aggregate leaves the global adapter unchanged;
- the global adapter and the history are checkpointed atomically after every round; a restarted server resumes
  after the last completed round.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from flwr.client import Client, ClientApp, NumPyClient
from flwr.common import (
    Array,
    ArrayRecord,
    Context,
    FitIns,
    FitRes,
    Message,
    Parameters,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import Grid, LegacyContext, ServerApp, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

from edgepeft.core.errors import ConfigError
from edgepeft.federated.aggregate import aggregate_lora_svd, fedavg
from edgepeft.federated.data import load_partition
from edgepeft.federated.task import FederatedConfig, GlobalState, initial_state, local_update, prepare_asset

log = logging.getLogger("edgepeft.federated")

CHECKPOINT_FILE = "checkpoint.npz"
# A client's weight in the average is its number of training windows, capped: one asset (or one client that
# claims a huge count) cannot dominate the global adapter, and SecAgg+ quantises each update scaled by
# weight / MAX_WEIGHT, so the cap is also its max_weight.
MAX_WEIGHT = 10_000
HISTORY_FILE = "history.json"
TAGS_RECORD = "edgepeft.channel_tags"


@dataclass
class RunSettings:
    """The server's own settings (besides :class:`FederatedConfig`, which every client receives).

    Attributes:
        data: where clients find their assets (:func:`edgepeft.federated.data.load_partition`); a SuperNode's own
            ``data`` node config overrides it.
        out: folder for the checkpoint, the history and the global adapter.
        fraction_fit: share of the connected clients sampled each round.
        min_clients: fewest clients to wait for and to aggregate.
        secagg: SecAgg+ (Flower's ``SecAggPlusWorkflow``): the server sees only the sum of the updates.
        central_dp_noise: with a value, Flower's ``DifferentialPrivacyClientSideFixedClipping``: clients clip their
            update to ``central_dp_clip`` (``fixedclipping_mod``) and the server adds Gaussian noise of std
            ``central_dp_noise * central_dp_clip`` to the sum: client-level DP.
        round_timeout: seconds to wait for a round's results; later ones (stragglers) are skipped. None: wait.

    Example:
        >>> RunSettings.from_record({"data": "fleet:8", "secagg": True, "min_clients": 4, "rounds": 3}).secagg
        True
    """

    data: str = ""
    out: str = "federated"
    fraction_fit: float = 1.0
    min_clients: int = 2
    secagg: bool = False
    central_dp_noise: float | None = None
    central_dp_clip: float = 1.0
    round_timeout: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 < self.fraction_fit <= 1 or self.min_clients < 1:
            raise ConfigError("fraction_fit must be in (0, 1] and min_clients >= 1")
        if self.secagg and self.min_clients < 3:
            raise ConfigError("SecAgg+ needs at least 3 clients per round (min_clients >= 3)")
        if self.central_dp_noise is not None and (self.central_dp_noise < 0 or not self.central_dp_clip > 0):
            raise ConfigError("central_dp_noise must be >= 0 and central_dp_clip > 0")

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> RunSettings:
        names = set(cls.__dataclass_fields__) - {"extra"}
        return cls(**{k: v for k, v in record.items() if k in names})


# ---------------------------------------------------------------------------------------------------- server


class AdapterStrategy(FedAvg):
    """FedAvg's client sampling with edgepeft's aggregation schemes, update checks and checkpoints.

    Example:
        >>> cfg = FederatedConfig()
        >>> strategy = AdapterStrategy(cfg, RunSettings(data="synthetic:3:200"), initial_state(cfg), 0, [])
        >>> strategy.check_update([a + 1.0 for a in strategy.state.wire_tensors()])
        'update norm 22.6 exceeds max_update_norm 10'
        >>> strategy.check_update(strategy.state.wire_tensors()) is None
        True
    """

    def __init__(self, cfg: FederatedConfig, run: RunSettings, state: GlobalState, done_rounds: int,
                 history: list[dict[str, Any]]) -> None:
        self.cfg, self.run, self.state, self.done_rounds, self.history = cfg, run, state, done_rounds, history
        super().__init__(
            fraction_fit=run.fraction_fit,
            fraction_evaluate=0.0,
            min_fit_clients=run.min_clients,
            min_available_clients=run.min_clients,
            initial_parameters=ndarrays_to_parameters(state.wire_tensors()),
            accept_failures=True,
        )
        self._round_started = time.perf_counter()
        self.meter: MeteredGrid | None = None  # set by run_server: the bytes on the wire
        self._metered = (0, 0)

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: ClientManager
                      ) -> list[tuple[ClientProxy, FitIns]]:
        self._round_started = time.perf_counter()
        config = {**self.cfg.to_record(), "round": self.done_rounds + server_round,
                  "frozen_digest": self.state.frozen_digest, "data": self.run.data}
        return [(proxy, FitIns(parameters, dict(config)))
                for proxy, _ in super().configure_fit(server_round, parameters, client_manager)]

    def check_update(self, arrays: list[np.ndarray]) -> str | None:
        """Why an update (or, under SecAgg+, the aggregate) cannot be aggregated; None when it can."""
        if len(arrays) != len(self.state.wire):
            return f"sent {len(arrays)} tensors, expected {len(self.state.wire)}"
        distance = 0.0
        for name, array in zip(self.state.wire, arrays, strict=True):
            expected = self.state.tensors[name]
            if array.shape != expected.shape:
                return f"{name.split('.')[-4:-2]} has shape {array.shape}, expected {expected.shape}"
            if not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all():
                return "non-finite or non-float values"
            distance += float(np.sum((array.astype(np.float64) - expected) ** 2))
        if np.sqrt(distance) > self.cfg.max_update_norm:
            return f"update norm {np.sqrt(distance):.3g} exceeds max_update_norm {self.cfg.max_update_norm:g}"
        return None

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Any]]:
        round_index = self.done_rounds + server_round
        accepted: list[tuple[dict[str, np.ndarray], int, dict[str, Any]]] = []
        rejected: list[dict[str, str]] = []
        received = [(proxy, res, parameters_to_ndarrays(res.parameters)) for proxy, res in results]
        secure = self.run.secagg
        for proxy, res, arrays in received:
            client = str(res.metrics.get("asset", proxy.cid))
            reason = None if secure else self.check_update(arrays)
            if reason is None and res.num_examples < 1:
                reason = f"claims {res.num_examples} training windows"
            if reason is not None:
                rejected.append({"client": client, "reason": reason})
                log.warning("round %d: rejected the update of %s: %s", round_index, client, reason)
                continue
            # Client-level DP (Flower's central DP) calibrates its noise for an unweighted mean: equal weights.
            weight = 1 if self.run.central_dp_noise is not None else min(int(res.num_examples), MAX_WEIGHT)
            accepted.append((dict(zip(self.state.wire, arrays, strict=True)), weight, dict(res.metrics)))
        for failure in failures:
            rejected.append({"client": "?", "reason": f"failed: {_failure_reason(failure)}"})
        new_state, note = self.state, ""
        if len(accepted) < self.run.min_clients:
            note = f"only {len(accepted)} usable updates (min_clients {self.run.min_clients}): global kept"
        elif secure:  # every result carries the SecAgg+ sum, already divided by the total weight
            aggregate = [np.asarray(a, dtype=np.float32) for a in received[0][2]]
            reason = self.check_update(aggregate)
            if reason is None:
                new_state = self.state.with_wire(aggregate)
            else:
                note = f"secure aggregate refused ({reason}): global kept"
        else:
            new_state = self._aggregate([u for u, _, _ in accepted], [n for _, n, _ in accepted])
        if note:
            log.warning("round %d: %s", round_index, note)
        self.state = new_state
        self.history.append(self._record(round_index, accepted, rejected, note))
        save_checkpoint(Path(self.run.out), self.state, round_index, self.history)
        return ndarrays_to_parameters(self.state.wire_tensors()), {"accepted": len(accepted),
                                                                   "rejected": len(rejected)}

    def _aggregate(self, updates: list[dict[str, np.ndarray]], weights: list[int]) -> GlobalState:
        if self.cfg.aggregation == "svd" and self.cfg.lora:
            merged, _ = aggregate_lora_svd(updates, weights, rank=self.cfg.rank)
        else:  # fedavg (naive for LoRA), ffa (exact: A is frozen and shared), and every non-LoRA method
            merged = fedavg(updates, weights)
        return self.state.with_wire([merged[name] for name in self.state.wire])

    def _record(self, round_index: int, accepted: list[tuple[dict[str, np.ndarray], int, dict[str, Any]]],
                rejected: list[dict[str, str]], note: str) -> dict[str, Any]:
        metrics = [m for _, _, m in accepted]
        epsilons = [float(m["epsilon"]) for m in metrics if "epsilon" in m]
        losses = [float(m["loss"]) for m in metrics if "loss" in m and np.isfinite(float(m["loss"]))]
        wire = int(sum(self.state.tensors[n].nbytes for n in self.state.wire))
        down, up = (self.meter.down, self.meter.up) if self.meter is not None else (0, 0)
        sent = (down - self._metered[0], up - self._metered[1])
        self._metered = (down, up)
        participants = max(len(accepted) + len(rejected), 1)
        return {
            "round": round_index,
            "clients": len(accepted),
            "rejected": rejected,
            "note": note,
            "loss": float(np.average(losses, weights=[n for _, n, m in accepted if "loss" in m
                                                      and np.isfinite(float(m["loss"]))])) if losses else None,
            "epsilon_max": max(epsilons) if epsilons else None,
            "epsilon": {str(m.get("asset")): float(m["epsilon"]) for m in metrics if "epsilon" in m},
            "tensor_bytes_per_client": wire,  # the adapter tensors each way
            "message_bytes_down_per_client": sent[0] / participants,  # all the round's messages, config included
            "message_bytes_up_per_client": sent[1] / participants,
            "seconds": time.perf_counter() - self._round_started,
        }


def _failure_reason(failure: Any) -> str:
    """The client's own exception (``RuntimeError: disk full``) out of Flower's and Ray's wrapping of it."""
    text = failure[1].status.message if isinstance(failure, tuple) else str(failure)
    text = text.replace("\\n", "\n")  # the traceback arrives with its newlines escaped
    raised = re.findall(r"\b(\w+(?:Error|Exception|Exit)): ([^\n'\\]+)", text)
    own = [f"{kind}: {message.strip()}" for kind, message in raised if kind not in ("ClientAppException",
                                                                                    "RayTaskError")]
    return own[-1][:200] if own else " ".join(text.split())[:200]


def save_checkpoint(out: Path, state: GlobalState, round_index: int, history: list[dict[str, Any]]) -> None:
    """The global tensors and the history after ``round_index``, each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    temporary = out / (CHECKPOINT_FILE + ".tmp.npz")
    np.savez(temporary, round=np.int64(round_index), digest=np.array(state.frozen_digest),
             **{f"t:{name}": value for name, value in state.tensors.items()})
    os.replace(temporary, out / CHECKPOINT_FILE)
    text = out / (HISTORY_FILE + ".tmp")
    text.write_text(json.dumps(history, indent=1) + "\n")
    os.replace(text, out / HISTORY_FILE)


def load_checkpoint(out: Path, fresh: GlobalState) -> tuple[GlobalState, int, list[dict[str, Any]]]:
    """The last completed round's global adapter (or ``fresh`` and round 0 when there is none)."""
    path = out / CHECKPOINT_FILE
    if not path.is_file():
        return fresh, 0, []
    with np.load(path) as saved:
        tensors = {key[2:]: saved[key] for key in saved.files if key.startswith("t:")}
        done, digest = int(saved["round"]), str(saved["digest"])
    if sorted(tensors) != sorted(fresh.tensors) or digest != fresh.frozen_digest:
        raise ConfigError(f"{path} belongs to a federation with another base, method or config; remove {out} or "
                          "choose another --out")
    history_path = out / HISTORY_FILE
    history = json.loads(history_path.read_text()) if history_path.is_file() else []
    return GlobalState(tensors, fresh.wire, digest), done, [h for h in history if h["round"] <= done]


def _value_bytes(value: Any) -> int:
    if isinstance(value, bytes | str):
        return len(value)
    if isinstance(value, list):
        return sum(_value_bytes(item) for item in value)
    return 8  # a number


def _content_bytes(message: Any) -> int:
    """Bytes of a message's records: array data, and keys and values of config and metric records. Our own
    count: Flower 1.42's ``ConfigRecord.count_bytes`` fails on an empty list (SecAgg+ sends some)."""
    if not message.has_content():
        return 0
    total = 0
    for record in message.content.values():
        for key, value in record.items():
            data = getattr(value, "data", None)
            total += len(key) + (len(data) if isinstance(data, bytes) else _value_bytes(value))
    return total


class MeteredGrid:
    """A Grid that counts the bytes of every message's content each way (``down``: server to clients, ``up``:
    clients to server; SecAgg+'s extra stages included) and, with ``timeout``, waits at most that many seconds per
    exchange: results of stragglers are dropped (the default fit workflow has no timeout of its own)."""

    def __init__(self, grid: Grid, timeout: float | None = None) -> None:
        self._grid, self._timeout = grid, timeout
        self.down = self.up = 0

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> Any:
        messages = list(messages)
        self.down += sum(_content_bytes(m) for m in messages)
        replies = list(self._grid.send_and_receive(messages, timeout=self._timeout if timeout is None else timeout))
        self.up += sum(_content_bytes(m) for m in replies)
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def secagg_workflow(run: RunSettings, n_clients: int | None = None) -> SecAggPlusWorkflow:
    """SecAgg+ for rounds of about ``n_clients`` (default ``run.min_clients``): each client's secret shared with an odd
    number of others, at most 7 (with all N the cost grows as N^2; an even count halts rounds in Flower 1.42), any
    majority of them reconstructs a dropped client's mask."""
    sampled = max(n_clients or run.min_clients, 3)
    shares = min(sampled if sampled % 2 else sampled - 1, 7)
    return SecAggPlusWorkflow(num_shares=shares, reconstruction_threshold=shares // 2 + 1, max_weight=MAX_WEIGHT,
                              timeout=run.round_timeout)


def run_server(grid: Grid, context: Context, cfg: FederatedConfig, run: RunSettings, n_clients: int | None = None
               ) -> GlobalState:
    """The ServerApp's body: resume or start, run the remaining rounds, leave the global adapter in ``run.out``.
    ``n_clients``: the clients expected (default: those connected when it starts)."""
    n_clients = n_clients or max(len(list(grid.get_node_ids())), run.min_clients)
    per_round = max(int(n_clients * run.fraction_fit), run.min_clients)
    out = Path(run.out)
    state, done, history = load_checkpoint(out, initial_state(cfg))
    remaining = cfg.rounds - done
    if remaining > 0:
        strategy: Any = AdapterStrategy(cfg, run, state, done, history)
        inner = strategy
        if run.central_dp_noise is not None:
            from flwr.server.strategy import DifferentialPrivacyClientSideFixedClipping

            strategy = DifferentialPrivacyClientSideFixedClipping(inner, run.central_dp_noise, run.central_dp_clip,
                                                                  per_round)
        fit_workflow = secagg_workflow(run, per_round) if run.secagg else None
        workflow = DefaultWorkflow(fit_workflow=fit_workflow)
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=remaining), strategy=strategy)
        inner.meter = MeteredGrid(grid, run.round_timeout)
        workflow(inner.meter, legacy)
        state = inner.state
    return state


server_app = ServerApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    record = dict(context.run_config)
    run_server(grid, context, FederatedConfig.from_record(record), RunSettings.from_record(record))


# ---------------------------------------------------------------------------------------------------- client


@lru_cache(maxsize=64)
def _asset(spec: str, partition: int, calib_fraction: float) -> Any:
    name, values = load_partition(spec, partition)
    return prepare_asset(name, values, calib_fraction)


@lru_cache(maxsize=8)
def _fresh_state(record: tuple[tuple[str, Any], ...]) -> GlobalState:
    return initial_state(FederatedConfig.from_record(dict(record)))


class AssetClient(NumPyClient):
    """One asset: trains the global adapter on its own normal rows, keeps its channel tags in its node state."""

    def __init__(self, context: Context) -> None:
        self.context = context

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict]:
        cfg = FederatedConfig.from_record(config)
        node = self.context.node_config
        spec = str(node.get("data", config.get("data", "")))
        partition = int(node.get("partition-id", 0)) if "data" not in node else 0
        asset = _asset(spec, partition, cfg.calib_fraction)
        fresh = _fresh_state(tuple(sorted(cfg.to_record().items())))
        if str(config.get("frozen_digest")) != fresh.frozen_digest:
            raise ConfigError("the server's frozen LoRA A differs from this client's; FFA-LoRA would not be exact")
        state = fresh.with_wire([np.asarray(p, dtype=np.float32) for p in parameters])
        kept = self.context.state.array_records.get(TAGS_RECORD)
        tags = kept["tags"].numpy() if kept is not None and "tags" in kept else None
        result = local_update(cfg, state, asset, int(config["round"]), tags)
        arrays = [result.tensors[name] for name in state.wire]
        if not all(np.isfinite(a).all() for a in arrays):  # never send what the server would reject anyway
            raise ConfigError(f"asset {asset.name}: local training diverged (non-finite adapter)")
        if result.tags is not None:
            self.context.state.array_records[TAGS_RECORD] = ArrayRecord({"tags": Array(result.tags)})
        metrics: dict[str, Any] = {"asset": asset.name, "loss": result.loss, "seconds": result.seconds}
        if result.epsilon is not None:
            metrics["epsilon"] = result.epsilon
        return arrays, min(result.n_windows, MAX_WEIGHT), metrics


def client_fn(context: Context) -> Client:
    return AssetClient(context).to_client()


def _secagg_when_asked(msg: Message, ctxt: Context, call_next: Any) -> Message:
    """Flower's ``secaggplus_mod`` when the server runs SecAgg+ (its stage configs are in the message), else a
    pass-through: the mod itself fails on a plain training message, and a SuperNode's ClientApp cannot know in
    advance which the server will run."""
    from flwr.client.mod import secaggplus_mod
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    if msg.has_content() and RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


def _clipping_when_asked(msg: Message, ctxt: Context, call_next: Any) -> Message:
    """Flower's ``fixedclipping_mod`` when the server's central-DP wrapper sends a clipping norm, else a pass-through
    (the mod raises without one)."""
    from flwr.app.message_type import MessageType
    from flwr.client.mod import fixedclipping_mod
    from flwr.compat.common import recorddict_compat
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    if msg.metadata.message_type == MessageType.TRAIN and msg.has_content():
        config = recorddict_compat.recorddict_to_fitins(msg.content, keep_input=True).config
        if KEY_CLIPPING_NORM in config:
            return fixedclipping_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


def make_client_app() -> ClientApp:
    """The ClientApp: SecAgg+ outermost (it masks what the inner mods and the client produce), then client-side
    clipping, each active only when the server asks for it."""
    return ClientApp(client_fn=client_fn, mods=[_secagg_when_asked, _clipping_when_asked])


client_app = make_client_app()
