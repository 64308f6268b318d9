"""Real Flower runs: the simulation engine (Ray), SecAgg+, misbehaving clients, a server killed mid-federation, and
deployment mode with a SuperLink and SuperNodes as processes. Each run takes seconds to a minute."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("flwr")
pytest.importorskip("ray")

from flwr.client import ClientApp  # noqa: E402
from flwr.common import Context  # noqa: E402
from flwr.server import ServerApp  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

from edgepeft.federated.app import AssetClient, RunSettings, make_client_app, run_server  # noqa: E402
from edgepeft.federated.data import load_partition  # noqa: E402
from edgepeft.federated.run import own_environment, simulate  # noqa: E402
from edgepeft.federated.task import FederatedConfig, initial_state, local_update, prepare_asset  # noqa: E402
from edgepeft.peft.shared import read_global_adapter  # noqa: E402

DATA = "synthetic:3:300"
CFG = FederatedConfig(rounds=2, local_steps=3, batch_size=8)
BACKEND = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
           "init_args": {"num_cpus": 2, "num_gpus": 0, "include_dashboard": False, "logging_level": "error",
                         "log_to_driver": False}}


class SpyGrid:
    """Copies everything that reaches the server, as it arrives (the workflow empties arrays after reading them):
    arrays into ``seen``, every bytes value of the config records (SecAgg+'s masked vectors travel there) into
    ``blobs``."""

    def __init__(self, grid: Any, seen: list[np.ndarray], blobs: list[bytes]) -> None:
        self._grid, self.seen, self.blobs = grid, seen, blobs

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> Any:
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            if reply.has_content():
                for record in reply.content.array_records.values():
                    self.seen.extend(np.array(array.numpy(), copy=True) for array in record.values())
                for record in reply.content.config_records.values():
                    for value in record.values():
                        items = value if isinstance(value, list) else [value]
                        self.blobs.extend(bytes(item) for item in items if isinstance(item, bytes))
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def _run(cfg: FederatedConfig, run: RunSettings, n: int, client_app: ClientApp | None = None
         ) -> tuple[Any, list[np.ndarray], list[bytes]]:
    seen: list[np.ndarray] = []
    blobs: list[bytes] = []
    outcome: dict[str, Any] = {}
    app = ServerApp()

    @app.main()
    def main(grid: Any, context: Context) -> None:
        while len(list(grid.get_node_ids())) < n:
            time.sleep(0.02)
        outcome["state"] = run_server(SpyGrid(grid, seen, blobs), context, cfg, run, n)

    with own_environment():
        run_simulation(server_app=app, client_app=client_app or make_client_app(), num_supernodes=n,
                       backend_config=BACKEND)
    return outcome["state"], seen, blobs


def _first_round_updates(cfg: FederatedConfig, n: int) -> list[tuple[np.ndarray, int]]:
    """Each client's round-1 update (its wire tensors, concatenated) and weight, computed here."""
    state = initial_state(cfg)
    out = []
    for index in range(n):
        result = local_update(cfg, state, prepare_asset(*load_partition(DATA, index)), server_round=1)
        out.append((np.concatenate([result.tensors[k].ravel() for k in state.wire]), result.n_windows))
    return out


def test_simulation_learns_a_global_adapter_that_starts_detectors(tmp_path) -> None:
    before = dict(os.environ)
    result = simulate(CFG, RunSettings(data=DATA, out=str(tmp_path)))
    assert dict(os.environ) == before  # Ray's PYTHONPATH and friends do not leak into later subprocesses
    assert [h["round"] for h in result.history] == [1, 2] and all(h["clients"] == 3 for h in result.history)
    assert result.summary["bytes_per_round_per_client"]["up"] == 2048  # FFA: the two B matrices of rank 4
    tensors, meta = read_global_adapter(result.global_path, CFG.base, CFG.peft_config())
    start = initial_state(CFG)
    assert any(not np.allclose(tensors[n], start.tensors[n]) for n in start.wire)
    assert meta["aggregation"] == "ffa" and meta["federation"]["rounds_done"] == 2
    det = CFG.detector(init_adapter=str(result.global_path), steps=2).fit(load_partition(DATA, 0)[1])
    assert np.isfinite(det.score(load_partition(DATA, 1)[1])).all()


def test_secagg_the_server_never_sees_an_individual_update(tmp_path) -> None:
    cfg = FederatedConfig(rounds=1, local_steps=3, batch_size=8)
    updates = _first_round_updates(cfg, 3)
    weights = np.array([w for _, w in updates], dtype=np.float64)
    exact = sum(w * u for (u, _), w in zip(updates, weights, strict=True)) / weights.sum()

    def individual(seen: list[np.ndarray]) -> int:
        flat = [a.ravel() for a in seen]
        return sum(any(a.shape == u.shape and np.allclose(a, u, atol=1e-5) for a in flat) for u, _ in updates)

    plain_state, plain_seen, _ = _run(cfg, RunSettings(data=DATA, out=str(tmp_path / "plain"), min_clients=3), 3)
    assert individual(_concat_replies(plain_seen, 2)) == 3  # without SecAgg+ the server sees every update
    state, seen, blobs = _run(cfg, RunSettings(data=DATA, out=str(tmp_path / "secure"), secagg=True,
                                                min_clients=3), 3)
    assert not seen and blobs  # no array reaches the server; masked vectors, keys and shares do, as bytes
    for update, _ in updates:
        for dtype in (np.float32, np.float64):  # not even a slice of a client's update in the clear
            needle = update[:16].astype(dtype).tobytes()
            assert not any(needle in blob for blob in blobs)
    got = np.concatenate([state.tensors[k].ravel() for k in state.wire])
    np.testing.assert_allclose(got, exact, atol=2e-4)  # the exact weighted mean, up to SecAgg+'s quantisation
    plain = np.concatenate([plain_state.tensors[k].ravel() for k in plain_state.wire])
    np.testing.assert_allclose(plain, exact, atol=1e-5)


def _concat_replies(seen: list[np.ndarray], per_reply: int) -> list[np.ndarray]:
    """A reply's wire tensors as one vector (FFA sends two B matrices per client)."""
    return [np.concatenate([a.ravel() for a in seen[i : i + per_reply]]) for i in range(0, len(seen), per_reply)]


class _Misbehaving(AssetClient):
    """Client 1 raises, client 2 sends NaN; client 0 and 3 are honest."""

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict]:
        partition = int(self.context.node_config["partition-id"])
        if partition == 1:
            raise RuntimeError("disk full")
        arrays, n, metrics = super().fit(parameters, config)
        if partition == 2:
            arrays = [np.full_like(a, np.nan) for a in arrays]
        return arrays, n, metrics


def test_misbehaving_clients_never_corrupt_the_global_adapter(tmp_path) -> None:
    app = ClientApp(client_fn=lambda context: _Misbehaving(context).to_client())
    run = RunSettings(data="synthetic:4:300", out=str(tmp_path), min_clients=2)
    state, _, _ = _run(CFG, run, 4, app)
    history = json.loads((tmp_path / "history.json").read_text())
    assert [h["clients"] for h in history] == [2, 2]
    reasons = " ".join(r["reason"] for h in history for r in h["rejected"])
    assert "non-finite" in reasons and "disk full" in reasons
    assert all(np.isfinite(v).all() for v in state.tensors.values())


def _federate(out: Path, rounds: int) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "edgepeft.cli", "federate", "synthetic:3:2000", "--out", str(out),
               "--rounds", str(rounds), "--local-steps", "40", "--no-detectors"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def test_a_server_killed_mid_federation_resumes_from_its_last_round(tmp_path) -> None:
    process = _federate(tmp_path, 6)
    history = tmp_path / "history.json"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (history.exists() and json.loads(history.read_text())):
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the server and its Ray workers, mid-federation
    process.wait()
    done = json.loads(history.read_text())
    assert 1 <= len(done) < 6, "the federation finished before it could be killed"
    resumed = _federate(tmp_path, 6)
    output = resumed.communicate(timeout=300)[0].decode()
    assert resumed.returncode == 0, output[-2000:]
    final = json.loads(history.read_text())
    assert [h["round"] for h in final] == list(range(1, 7))
    assert final[: len(done)] == done  # the rounds before the kill were kept, not run again
    assert json.loads((tmp_path / "federation.json").read_text())["rounds_done"] == 6


def test_deployment_mode_superlink_and_supernodes_as_processes(tmp_path) -> None:
    from edgepeft.federated.deploy import deploy

    result = deploy(FederatedConfig(rounds=1, local_steps=2, batch_size=8), RunSettings(data="synthetic:2:300",
                    out=str(tmp_path)), timeout=400)
    assert [h["clients"] for h in result.history] == [2]
    assert result.global_path.exists() and not (tmp_path / "deployment-logs").exists()


def test_client_level_dp_clips_every_update_before_the_server_sees_it(tmp_path) -> None:
    """Flower's client-side clipping wrapper and mod: with a tiny clip and no noise, the global adapter moves by at
    most the clip per round, whatever the clients' own updates were."""
    clip = 0.01
    run = RunSettings(data=DATA, out=str(tmp_path), min_clients=3, central_dp_noise=0.0, central_dp_clip=clip)
    state, seen, _ = _run(FederatedConfig(rounds=1, local_steps=3, batch_size=8), run, 3)
    start = initial_state(CFG)
    moved = np.sqrt(sum(float(np.sum((state.tensors[n] - start.tensors[n]) ** 2)) for n in start.wire))
    assert 0 < moved <= clip + 1e-6
    unclipped = _first_round_updates(FederatedConfig(rounds=1, local_steps=3, batch_size=8), 1)[0][0]
    start_flat = np.concatenate([start.tensors[n].ravel() for n in start.wire])
    assert np.linalg.norm(unclipped - start_flat) > 10 * clip  # the clip did bite
    for reply in _concat_replies(seen, 2):
        assert np.linalg.norm(reply - start_flat) <= clip + 1e-6
