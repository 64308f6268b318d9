"""The benchmark harness: who competes (contenders), on what machine, and how a run's results are written.

A :class:`Contender` is a name plus a factory of *unfitted* detectors with ``fit`` / ``score`` / ``predict`` /
``score_all``; a suite calls the factory once per asset, so every asset gets a fresh detector. Our methods are
:class:`~edgepeft.detect.detector.AnomalyDetector` with a PEFT method (``kind="edgepeft"``); the classical
detectors of :mod:`edgepeft.bench.baselines` are ``kind="baseline"``. Every result records the machine, date,
git commit and the exact command, so a number in the docs can be traced to the run that produced it.

Example:
    >>> import numpy as np
    >>> [c.name for c in default_contenders("tiny", steps=5, methods=["lora", "pca"])]
    ['lora', 'pca']
    >>> pca = default_contenders("tiny", steps=5, methods=["pca"])[0]
    >>> det = pca.make().fit(np.random.default_rng(0).normal(size=(300, 2)))
    >>> det.score(np.zeros((10, 2))).shape
    (10,)
"""

from __future__ import annotations

import datetime as dt
import functools
import importlib.metadata
import math
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from edgepeft.bench.baselines import BASELINES
from edgepeft.core.config import read_json, write_json
from edgepeft.core.errors import ArtifactError, ConfigError, OutputError

RESULTS_FILE = "results.json"

# PEFT methods proper: a small delta on the frozen base. The targets of the issue are about these.
PEFT_METHODS = ("lora", "dora", "ia3", "adapter", "prefix", "bitfit")
# The same detector with the whole base trained (full) or trained from random weights (scratch).
TRAINED_BASE_METHODS = ("full", "scratch")
ZEROSHOT = "zeroshot"
# Suites that write their own results.md (not the contender tables): docs shows it as is.
SELF_RENDERED = ("stream", "drift", "deploy", "channels", "device", "federated", "rollout")
EDGEPEFT_CONTENDERS = (*PEFT_METHODS, *TRAINED_BASE_METHODS, ZEROSHOT)
ALL_CONTENDERS = (*EDGEPEFT_CONTENDERS, *BASELINES)

Kind = Literal["edgepeft", "baseline"]
# What a contender is *for* in the targets: "peft" must beat every "baseline"; "reference" (full fine-tuning)
# is what LoRA is compared with. Zero-shot and scratch are baselines: adaptation has to beat both.
Role = Literal["peft", "reference", "baseline"]


class Detector(Protocol):
    """What a suite needs from a detector (AnomalyDetector and every classical baseline)."""

    threshold_: float

    def fit(self, X: Any, y: Any = None) -> Any: ...

    def score(self, X: Any) -> np.ndarray: ...

    def predict(self, X: Any) -> np.ndarray: ...

    def score_all(self, X: Any) -> dict[str, np.ndarray]: ...


def make_detector(name: str, params: dict[str, Any]) -> Detector:
    """A fresh, unfitted detector: a classical baseline by registry name, else an AnomalyDetector.

    A module-level function (not a lambda) so a contender's factory can be pickled into a measuring subprocess.
    """
    if name in BASELINES:
        return BASELINES[name](**params)
    from edgepeft.detect.detector import AnomalyDetector

    return AnomalyDetector(**params)


@dataclass(frozen=True)
class Contender:
    """One competitor in a benchmark: ``factory()`` returns an unfitted detector.

    Attributes:
        name: row label in every table (``lora``, ``zeroshot``, ``pca``, ...).
        kind: ``edgepeft`` (AnomalyDetector on a base) or ``baseline`` (classical detector).
        factory: builds a fresh, unfitted detector; picklable.
        role: ``peft``, ``reference`` (full fine-tuning) or ``baseline``; decides how targets read the row.
        trains: False when ``fit`` trains no weights (zero-shot): training costs are then "none", not zero.
        params: the detector's constructor arguments, recorded in results.json.

    >>> c = Contender("pca", "baseline", functools.partial(make_detector, "pca", {}), role="baseline")
    >>> type(c.make()).__name__
    'PCADetector'
    """

    name: str
    kind: Kind
    factory: Callable[[], Detector]
    role: Role = "peft"
    trains: bool = True
    params: dict[str, Any] | None = None

    def make(self) -> Detector:
        return self.factory()

    def describe(self) -> dict[str, Any]:
        """JSON-ready description (no factory)."""
        return {"name": self.name, "kind": self.kind, "role": self.role, "trains": self.trains,
                "params": dict(self.params or {})}


def parse_methods(methods: Sequence[str] | str | None) -> list[str] | None:
    """``"lora, pca"`` or ``["lora", "pca"]`` -> ``["lora", "pca"]``; None or empty means every contender.

    >>> parse_methods("lora, pca,lora")
    ['lora', 'pca']
    """
    if methods is None:
        return None
    parts = methods.split(",") if isinstance(methods, str) else [p for m in methods for p in m.split(",")]
    names = list(dict.fromkeys(p.strip() for p in parts if p.strip()))
    unknown = [n for n in names if n not in ALL_CONTENDERS]
    if unknown:
        raise ConfigError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(ALL_CONTENDERS)}")
    return names or None


def default_contenders(
    base: str, steps: int, methods: list[str] | None = None, *, seed: int = 0, rank: int = 8
) -> list[Contender]:
    """Every contender of the issue, or the ``methods`` subset in the order given.

    Our methods (lora, dora, ia3, adapter, prefix, bitfit, full, scratch) are ``AnomalyDetector(base, method,
    steps)``; ``zeroshot`` is the pretrained base with no adaptation (steps=0; BitFit is only the container,
    nothing trains); the classical baselines come from :data:`edgepeft.bench.baselines.BASELINES`.
    """
    if steps < 0:
        raise ConfigError(f"steps must be >= 0, got {steps}")
    names = parse_methods(methods) or list(ALL_CONTENDERS)
    contenders = []
    for name in names:
        if name in BASELINES:
            params: dict[str, Any] = {"seed": seed}
            contenders.append(_contender(name, "baseline", params, role="baseline"))
        elif name == ZEROSHOT:
            params = {"base": base, "method": "bitfit", "steps": 0, "seed": seed}
            contenders.append(_contender(name, "edgepeft", params, role="baseline", trains=False))
        else:
            params = {"base": base, "method": name, "rank": rank, "steps": steps, "seed": seed}
            role: Role = "peft" if name in PEFT_METHODS else ("reference" if name == "full" else "baseline")
            contenders.append(_contender(name, "edgepeft", params, role=role))
    return contenders


def _contender(name: str, kind: Kind, params: dict[str, Any], *, role: Role, trains: bool = True) -> Contender:
    # The registry name picks the class; a method name (lora, ...) always builds an AnomalyDetector.
    factory_name = name if kind == "baseline" else "edgepeft"
    return Contender(name, kind, functools.partial(make_detector, factory_name, params), role, trains, params)


# ---------------------------------------------------------------------------------------------- provenance


def machine_info() -> dict[str, Any]:
    """Cores, CPU model, RAM and library versions of this machine (what a timing depends on)."""
    import torch

    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cores_logical": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_bytes": _ram_bytes(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        # Timings are only as good as the machine was quiet: other work shows up here (1, 5, 15 minutes).
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    for package in ("numpy", "peft", "scikit-learn"):
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info[package] = None
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def git_commit(path: str | os.PathLike[str] | None = None) -> str:
    """``git rev-parse HEAD`` of the checkout holding ``path`` (default: this package), or ``"unknown"``."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and commit else "unknown"


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command line of this process, shell-quoted, with the entry point spelled as a user types it.

    >>> command_line(["/venv/bin/edgepeft", "bench", "skab", "--out", "docs/results/skab"])
    'edgepeft bench skab --out docs/results/skab'
    """
    args = list(sys.argv if argv is None else argv)
    if args and Path(args[0]).name == "edgepeft":
        args[0] = "edgepeft"
    elif args and Path(args[0]).name == "cli.py":
        args[:1] = ["python", "-m", "edgepeft.cli"]
    return shlex.join(args)


def run_info(command: str | None = None) -> dict[str, Any]:
    """Provenance of a run: machine, UTC date, git commit, command line (and raw argv), working directory."""
    return {
        "machine": machine_info(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": git_commit(),
        "command": command if command is not None else command_line(),
        "argv": list(sys.argv),
        "cwd": str(Path.cwd()),
    }


# ---------------------------------------------------------------------------------------------- results.json


def jsonable(value: Any) -> Any:
    """Plain JSON types: numpy scalars and arrays unwrapped, paths as text, NaN and inf as null (valid JSON).

    >>> jsonable({"a": np.float32(0.5), "b": [np.int64(2), float("nan")], "c": Path("x")})
    {'a': 0.5, 'b': [2, None], 'c': 'x'}
    """
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return [jsonable(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def write_results(out_dir: str | os.PathLike[str], results: dict[str, Any]) -> Path:
    """Write ``OUT/results.json`` atomically (a failed run never leaves half a file)."""
    path = Path(out_dir) / RESULTS_FILE
    try:
        write_json(path, jsonable(results))
    except OSError as exc:
        raise OutputError(f"cannot write {path} ({exc.strerror or exc}); choose another --out") from exc
    return path


def read_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a results.json (or the folder holding one) written by :func:`write_results`."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.exists():
        raise ArtifactError(f"{path} is missing; run `edgepeft bench <suite> --out {path.parent}` first")
    results = read_json(path)
    # Suites that render their own Markdown only need to name themselves.
    self_rendered = results.get("suite") in SELF_RENDERED
    required = ("suite",) if self_rendered else ("suite", "summary", "contenders")
    for key in required:
        if key not in results:
            raise ArtifactError(f"{path} has no {key!r}; it is not a benchmark result")
    return results
