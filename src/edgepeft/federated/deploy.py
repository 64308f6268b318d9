"""Deployment mode on this machine: a Flower SuperLink and one SuperNode per asset as real processes on loopback,
the federation submitted with ``flwr run`` (Flower 1.42's own commands), everything cleaned up afterwards.

The same ServerApp and ClientApp as in simulation (:data:`edgepeft.federated.app.server_app` / ``client_app``),
loaded by Flower from the installed package through a generated Flower app folder (only a ``pyproject.toml``: its
``[tool.flwr.app.config]`` carries this run's settings, read by the ServerApp from ``context.run_config``). Each
SuperNode gets its asset through its node config (``data`` and ``partition-id``), as a real device would hold its
own file. Flower 1.42 facts this relies on (checked against its source and by running it):

- the SuperLink serves every API on one HTTP port (``--host/--port``); each SuperNode needs its own ``--port``;
- ``flwr run APP CONNECTION`` takes the SuperLink's address from ``$FLWR_HOME/config.toml`` (written here);
- the SuperLink installs an app's dependencies with ``uv`` by default: switched off, the installed package is used;
- ``flwr run --stream`` exits 0 even when the ServerApp fails: the run's status is read back with ``flwr ls``.

Example (needs the federated install; starts processes, takes a minute):
    >>> from edgepeft.federated.app import RunSettings
    >>> from edgepeft.federated.task import FederatedConfig
    >>> result = deploy(FederatedConfig(rounds=1, local_steps=2), RunSettings(data="synthetic:2:300",
    ...                 out="/tmp/fed"), n_nodes=2)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from edgepeft.core.errors import ConfigError, EdgePeftError
from edgepeft.federated.app import RunSettings
from edgepeft.federated.data import partition_count
from edgepeft.federated.run import FederationResult, finish
from edgepeft.federated.task import FederatedConfig, initial_state

CONNECTION = "edgepeft-local"


class DeploymentError(EdgePeftError):
    """A SuperLink, SuperNode or run that did not come up or did not finish."""

    exit_code = 1


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_port(port: int, process: subprocess.Popen[bytes], log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise DeploymentError(f"{log.stem} exited ({process.returncode}) before listening; see {log}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.2)
    raise DeploymentError(f"{log.stem} did not listen on port {port} within {timeout:.0f} s; see {log}")


class _Processes:
    """Processes started with one tag in their environment: Flower's own children (SuperExec, ServerApp and
    ClientApp processes, some in sessions of their own) inherit it, so cleanup finds every one of them."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.tag = uuid.uuid4().hex
        self.env, self.logs = {**env, "EDGEPEFT_DEPLOY_TAG": self.tag}, logs
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, command: list[str]) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.logs / f"{name}.log"
        with log.open("wb") as handle:
            process = subprocess.Popen(command, env=self.env, stdout=handle, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        self.started.append(process)
        return process, log

    def tagged(self) -> list[int]:
        needle = f"EDGEPEFT_DEPLOY_TAG={self.tag}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                with contextlib.suppress(OSError):
                    if needle in (entry / "environ").read_bytes().split(b"\0"):
                        found.append(int(entry.name))
        return found

    def stop(self) -> list[int]:
        """Terminate everything; returns the pids still alive afterwards (none, normally)."""
        for process in self.started:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and (any(p.poll() is None for p in self.started) or self.tagged()):
            time.sleep(0.2)
        for pid in self.tagged():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for process in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)
        for _ in range(25):  # a killed process takes a moment to disappear from /proc
            if not self.tagged():
                break
            time.sleep(0.2)
        return self.tagged()


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string


def write_app(folder: Path, cfg: FederatedConfig, run: RunSettings) -> Path:
    """A Flower app folder whose components are edgepeft's (installed) and whose config is this run's."""
    settings = {**cfg.to_record(), **{k: v for k, v in vars(run).items() if k != "extra" and v is not None}}
    lines = ['[build-system]', 'requires = ["hatchling"]', 'build-backend = "hatchling.build"', "",
             "[project]", 'name = "edgepeft-federation"', 'version = "1.0.0"',
             'description = "edgepeft federated adapters (components from the installed edgepeft)"',
             'license = "Apache-2.0"', "dependencies = []", "", "[tool.flwr.app]", 'publisher = "edgepeft"', "",
             "[tool.flwr.app.components]", 'serverapp = "edgepeft.federated.app:server_app"',
             'clientapp = "edgepeft.federated.app:client_app"', "", "[tool.flwr.app.config]"]
    lines += [f"{key} = {_toml_value(value)}" for key, value in settings.items()]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text("\n".join(lines) + "\n")
    return folder


def deploy(cfg: FederatedConfig, run: RunSettings, n_nodes: int | None = None, *, timeout: float = 1800.0,
           keep_logs: bool = False) -> FederationResult:
    """Run one federation in deployment mode: a SuperLink, ``n_nodes`` SuperNodes (default: one per asset of
    ``run.data``), ``flwr run``; the global adapter lands in ``run.out`` as in simulation."""
    available = partition_count(run.data)
    n_nodes = available if n_nodes is None else n_nodes
    if not 1 <= n_nodes <= available or run.min_clients > n_nodes:
        raise ConfigError(f"{run.data!r} holds {available} asset(s): cannot deploy {n_nodes} SuperNodes with "
                          f"min_clients {run.min_clients}")
    if run.secagg and cfg.aggregation == "svd":
        raise ConfigError("SecAgg+ gives the server only the sum of the updates; use --aggregation ffa")
    bin_dir = Path(sys.executable).parent
    missing = [name for name in ("flower-superlink", "flower-supernode", "flwr") if not (bin_dir / name).exists()]
    if missing:
        raise ConfigError(f"{', '.join(missing)} not found beside {sys.executable}: "
                          "pip install 'edgepeft[train,federated]'")
    out = Path(run.out).resolve()
    run = RunSettings(**{**{k: v for k, v in vars(run).items() if k != "extra"}, "out": str(out)})
    work = Path(tempfile.mkdtemp(prefix="edgepeft-deploy-"))
    home, flwr_home, logs = work / "home", work / "flwr", out / "deployment-logs"
    for folder in (home, flwr_home, logs):
        folder.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    (flwr_home / "config.toml").write_text(f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                                           f'address = "127.0.0.1:{port}"\ninsecure = true\n')
    env = {**os.environ, "HOME": str(home), "FLWR_HOME": str(flwr_home),
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",  # Flower starts its helpers by name
           "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "NO_PROXY": "127.0.0.1,localhost",
           "no_proxy": "127.0.0.1,localhost", "PYTHONUNBUFFERED": "1"}
    processes = _Processes(env, logs)
    succeeded = False
    try:
        link, link_log = processes.start("superlink", [
            str(bin_dir / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port),
            "--database", str(work / "superlink.db"), "--disable-runtime-dependency-installation"])
        _wait_port(port, link, link_log)
        for index in range(n_nodes):
            node_port = _free_port()
            node, node_log = processes.start(f"supernode-{index}", [
                str(bin_dir / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
                "--node-config", f"partition-id={index} num-partitions={n_nodes}",
                "--host", "127.0.0.1", "--port", str(node_port)])
            _wait_port(node_port, node, node_log)
        app = write_app(work / "app", cfg, run)
        flwr = str(bin_dir / "flwr")
        try:
            submitted = subprocess.run([flwr, "run", str(app), CONNECTION, "--stream"], env=processes.env,
                                       cwd=work, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise DeploymentError(f"the federation did not finish within {timeout:.0f} s; logs in {logs}") from None
        (logs / "flwr-run.log").write_text(submitted.stdout + submitted.stderr)
        match = re.search(r"run (\d+)", submitted.stdout + submitted.stderr)
        if submitted.returncode != 0 or match is None:
            raise DeploymentError(f"`flwr run` failed ({submitted.returncode}); see {logs / 'flwr-run.log'}")
        listed = subprocess.run([flwr, "ls", CONNECTION, "--run-id", match.group(1), "--format", "json"],
                                env=processes.env, cwd=work, capture_output=True, text=True, timeout=60,
                                check=False)
        status = re.search(r'"status":\s*"([^"]+)"', listed.stdout)
        if status is None or status.group(1) != "finished:completed":
            raise DeploymentError(f"the run ended {status.group(1) if status else 'unknown'}; see "
                                  f"{logs / 'flwr-run.log'}")
        succeeded = True
    finally:
        leftover = processes.stop()
        shutil.rmtree(work, ignore_errors=True)
        if succeeded and not keep_logs and not leftover:  # a failed run keeps its logs
            shutil.rmtree(logs, ignore_errors=True)
    if leftover:
        raise DeploymentError(f"processes {leftover} survived the cleanup")
    from edgepeft.federated.app import load_checkpoint

    state, _, _ = load_checkpoint(out, initial_state(cfg))
    return finish(cfg, run, state, n_nodes)
