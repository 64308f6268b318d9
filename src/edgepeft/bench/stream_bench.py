"""Benchmarks of the streaming edge loop: ``edgepeft bench stream`` and ``edgepeft bench drift``.

- ``stream``: every contender (PEFT method x optimizer) runs the same simulated pump stream, side by side:
  rows x channels per second sustained while adapting, update latency p50 / p99, measured training and
  scoring peaks, optimizer state. A memory section compares LoRA with full fine-tuning and with scoring
  (inference) on one base: LoRA as the budget planner sets it up for a budget of 1.5 x the scoring peak, and
  full fine-tuning at the same batch size.
- ``drift``: a generated stream whose normal regime changes (two simulated pumps with different dynamics,
  each standardised by its own normal data) and comes back, with faults in every part; the change to the
  new regime is announced (``start_regime``, as an operator logs a new recipe), the returns are not. Naive
  online updates, replay, EWC, both, and no updates at all, each on the same stream: false alarms and
  missed faults per part. Forgetting shows where a known regime comes back.

Both write ``results.json`` (``write_results``) and ``results.md``, like the other suites.

Example (a tiny smoke run of the drift benchmark):
    >>> import tempfile
    >>> stream = drift_stream(seed=0, scale=0.2)
    >>> [part.name for part in stream.parts]  # doctest: +NORMALIZE_WHITESPACE
    ['A', 'A faults', 'B (announced)', 'B faults', 'A returns (known rows)', 'A faults again', 'B returns']
    >>> stream.values.shape[1], int(stream.labels.max())
    (8, 1)
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgepeft.bench.docs import markdown_table, provenance_lines
from edgepeft.bench.harness import jsonable, run_info, write_results
from edgepeft.core.config import atomic_write_bytes
from edgepeft.core.errors import ConfigError, ModelError, OutputError
from edgepeft.data.synthetic import make_pump_fleet
from edgepeft.detect.streaming import StreamingDetector

MB = 1024 * 1024
LORA_FULL_TARGET = 0.25  # LoRA training peak <= 25 % of full fine-tuning's
LORA_INFERENCE_TARGET = 1.5  # and <= 1.5 x the scoring (inference) peak
DEFAULT_CONTENDERS = ("lora:adamw", "lora:sgd", "lora:adafactor", "adapter:adamw", "bitfit:adamw", "full:adamw")
DRIFT_VARIANTS = ("no updates", "naive", "replay", "ewc", "replay+ewc")


# ---------------------------------------------------------------------------------------------- helpers


def _pump_stream(rows: int, n_channels: int, seed: int) -> np.ndarray:
    pump = make_pump_fleet(1, n_train=max(rows // 2, 100), n_test=max(rows - rows // 2, 200), seed=seed)[0]
    values = np.vstack([pump.train, pump.test])[:rows, :n_channels]
    return np.ascontiguousarray(values, dtype=np.float32)


def _percentiles(seconds: np.ndarray) -> dict[str, float | None]:
    if not len(seconds):
        return {"p50_ms": None, "p99_ms": None, "updates": 0}
    ms = seconds * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "updates": len(ms)}


def _machine() -> dict[str, Any]:
    info = run_info()
    if hasattr(os, "getloadavg"):
        info["machine"]["load_average"] = list(os.getloadavg())
    return info


def _mb(value: float | None) -> str:
    return "—" if value is None else f"{value / MB:.2f}"


def ensure_base(base: str) -> tuple[str, str]:
    """(name to load, weights note). A built-in base without pretrained weights is registered with random
    weights under ``<base>-random-weights``: memory and speed do not depend on the weights' values."""
    import torch

    from edgepeft.models.registry import load_base, load_card, register_base

    try:
        load_card(base)
        return base, "pretrained"
    except ModelError:
        pass

    def random_weights() -> Any:  # noqa: ANN401 - a base module
        with torch.random.fork_rng():
            torch.manual_seed(0)  # the same random weights on every load, without touching the caller's RNG
            return load_base(base, pretrained=False)

    name = f"{base}-random-weights"
    register_base(name, random_weights, {"note": "random weights, memory/speed only"})
    return name, "random weights (pretrained weights not installed; memory and speed only)"


def _write_markdown(out: Path, text: str) -> None:
    try:
        atomic_write_bytes(out / "results.md", text.encode())
    except OSError as exc:
        raise OutputError(f"cannot write {out / 'results.md'} ({exc.strerror or exc})") from exc


def _prepare_out(out: str | os.PathLike[str]) -> Path:
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise OutputError(f"--out {path} is a file; give a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {path} ({exc.strerror or exc}); choose another --out") from exc
    return path


# ---------------------------------------------------------------------------------------------- bench stream


@dataclass
class StreamBenchOptions:
    """Settings of ``edgepeft bench stream``.

    Attributes:
        base: base model (a built-in without weights is measured with random weights, and says so).
        contenders: ``method:optimizer`` pairs, e.g. ``lora:adafactor``.
        rows, channels: the simulated pump stream (8 channels at most).
        warmup: probation rows; throughput and latency are measured on the rows after it.
        update_every, batch_size: the online training cadence.
        memory_base: base of the memory comparison (LoRA vs full vs scoring); None: the same as ``base``.
        seed: seed of the stream and of every detector.
        threads: torch threads (None: torch's default).
    """

    base: str = "tiny"
    contenders: tuple[str, ...] = DEFAULT_CONTENDERS
    rows: int = 2000
    channels: int = 8
    warmup: int = 400
    update_every: int = 16
    batch_size: int = 16
    memory_base: str | None = "small"
    seed: int = 0
    threads: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.channels <= 8:
            raise ConfigError(f"--channels must be 1..8 (the simulated pump has 8 sensors), got {self.channels}")
        if self.rows < self.warmup + 200:
            raise ConfigError(f"--rows must exceed --warmup by at least 200, got {self.rows} and {self.warmup}")
        for item in self.contenders:
            if item.count(":") != 1:
                raise ConfigError(f"contender {item!r} must be method:optimizer, e.g. lora:adafactor")


def _run_contender(base: str, method: str, optimizer: str, values: np.ndarray,
                   opts: StreamBenchOptions) -> dict[str, Any]:
    det = StreamingDetector(base=base, method=method, optimizer=optimizer, warmup=opts.warmup,
                            warmup_steps=20, update_every=opts.update_every, batch_size=opts.batch_size,
                            measure_every=50, seed=opts.seed)
    det.process_many(values[: opts.warmup])  # probation, including its training burst: not timed
    probation_updates = len(det.update_latencies())
    started = time.perf_counter()
    det.process_many(values[opts.warmup :])
    seconds = time.perf_counter() - started
    live = values[opts.warmup :]
    memory = det.memory_report()
    return {
        "method": method,
        "optimizer": optimizer,
        "rows": len(live),
        "channels": live.shape[1],
        "seconds": seconds,
        "values_per_s": live.size / seconds if seconds > 0 else None,
        "update_latency": _percentiles(det.update_latencies()[probation_updates:]),
        "memory": memory,
        "adapter_bytes": len(det.adapter_bytes()),
    }


def memory_comparison(base: str, values: np.ndarray, *, batch_size: int = 16, seed: int = 0) -> dict[str, Any]:
    """Measured training peaks of LoRA and full fine-tuning against the scoring peak, on ``base``.

    LoRA is planned by the budget planner for a budget of 1.5 x the measured scoring peak; full fine-tuning runs
    the same recipe (batch, micro-batches, checkpointing) and, for reference, the whole batch at once; LoRA in
    the last block and on every block with the whole batch at once are shown too (on every block is where the
    field notes found LoRA no cheaper than full fine-tuning).
    """
    warmup = 100
    stream = values[: warmup + 48]

    def run(**kwargs: Any) -> StreamingDetector:
        det = StreamingDetector(base=base, warmup=warmup, warmup_steps=2, update_every=16, measure_every=1,
                                seed=seed, **kwargs)
        det.process_many(stream)
        return det

    # The budget: 1.5 x the scoring peak of the leanest LoRA model (adapters in the last block only); a plan
    # with more adapted blocks scores at least as expensively, so the ratio below holds against its own scoring.
    lean = run(method="lora", batch_size=batch_size, adapt_last=1)
    scoring = int(lean.memory_report()["scoring_peak_bytes"])
    budget_mb = LORA_INFERENCE_TARGET * scoring / MB
    planned = run(method="lora", batch_size=batch_size, budget_mb=budget_mb)
    plan = planned.plan_
    rows: dict[str, dict[str, Any]] = {}

    def record(name: str, det: StreamingDetector) -> dict[str, Any]:
        report = det.memory_report()
        rows[name] = {"training_peak_bytes": report["training_peak_bytes"], "plan": report["plan"],
                      "step": report["training_step"], "optimizer_state_bytes": report["optimizer_state_bytes"],
                      "scoring_peak_bytes": report["scoring_peak_bytes"],
                      "trainable_parameters": report["trainable_parameters"]}
        return rows[name]

    how = f"batch {plan.batch_size} in micro-batches of {plan.micro}" if plan.micro < plan.batch_size else \
        f"batch {plan.batch_size}"
    ckpt = ", checkpointing" if plan.checkpoint_blocks else ""
    lora = record(f"lora, planned for 1.5 x scoring ({how}{ckpt}, adapt_last {plan.adapt_last})", planned)
    # Full fine-tuning as it is usually run (the whole batch at once), which the target compares with ...
    full = record(f"full fine-tuning, batch {batch_size} at once", run(method="full", batch_size=batch_size))
    # ... and with the planner's memory recipe (micro-batches, checkpointing): only the trained weights differ.
    same = record(f"full fine-tuning, the same recipe ({how}{ckpt})",
                  run(method="full", batch_size=plan.batch_size, micro_batch=plan.micro,
                      checkpoint_blocks=plan.checkpoint_blocks))
    record(f"lora, last block only, batch {batch_size} at once", lean)
    record(f"lora on every block, batch {batch_size} at once", run(method="lora", batch_size=batch_size))
    lora_peak, full_peak = lora["training_peak_bytes"], full["training_peak_bytes"]
    return {
        "base": base,
        "scoring_peak_bytes": scoring,
        "budget_mb": budget_mb,
        "plan": plan.to_dict(),
        "rows": rows,
        "lora_over_full": lora_peak / full_peak,
        "lora_over_full_same_recipe": lora_peak / same["training_peak_bytes"],
        "lora_over_scoring": lora_peak / lora["scoring_peak_bytes"],
    }


def run_stream_bench(opts: StreamBenchOptions, out: str | os.PathLike[str],
                     progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every contender on the same stream, then the memory comparison; write results.json and results.md."""
    import torch

    if opts.threads:
        torch.set_num_threads(opts.threads)
    folder = _prepare_out(out)
    base, weights = ensure_base(opts.base)
    values = _pump_stream(opts.rows, opts.channels, opts.seed)
    contenders: dict[str, Any] = {}
    for item in opts.contenders:
        method, optimizer = item.split(":")
        if progress is not None:
            progress(f"{item} on {opts.rows} rows x {opts.channels} channels")
        contenders[item] = _run_contender(base, method, optimizer, values, opts)
    memory = None
    if opts.memory_base:
        memory_base, memory_weights = ensure_base(opts.memory_base)
        if progress is not None:
            progress(f"memory: lora vs full vs scoring on {opts.memory_base}")
        memory = {**memory_comparison(memory_base, values, batch_size=opts.batch_size, seed=opts.seed),
                  "weights": memory_weights, "base_name": opts.memory_base}
    targets = []
    if memory is not None:
        targets = [
            {"target": f"LoRA training peak <= {LORA_FULL_TARGET:.0%} of full fine-tuning's ({opts.memory_base}, "
                       f"batch {opts.batch_size} at once)",
             "status": "met" if memory["lora_over_full"] <= LORA_FULL_TARGET else "missed",
             "measured": f"{memory['lora_over_full']:.1%}"},
            {"target": f"LoRA training peak <= {LORA_INFERENCE_TARGET} x the scoring peak ({opts.memory_base})",
             "status": "met" if memory["lora_over_scoring"] <= LORA_INFERENCE_TARGET else "missed",
             "measured": f"{memory['lora_over_scoring']:.2f} x"},
        ]
    results = {
        "suite": "stream",
        **_machine(),
        "settings": {**{k: v for k, v in vars(opts).items() if k != "contenders"}, "base_weights": weights,
                     "contenders": list(opts.contenders)},
        "contenders": [{"name": name, "kind": "edgepeft", "role": "peft"} for name in contenders],
        "summary": contenders,
        "memory": memory,
        "targets": targets,
    }
    results = jsonable(results)
    write_results(folder, results)
    _write_markdown(folder, render_stream(results))
    return results


def render_stream(results: dict[str, Any]) -> str:
    """Markdown of a ``bench stream`` result."""
    settings = results["settings"]
    lines = ["# Streaming edge loop: throughput, update latency, memory", ""]
    lines += provenance_lines({**results, "settings": {}})
    lines += [f"- Stream: simulated pump, {settings['rows']} rows x {settings['channels']} channels, probation "
              f"{settings['warmup']} rows (not timed), one update every {settings['update_every']} rows, batch "
              f"{settings['batch_size']}; base `{settings['base']}` ({settings['base_weights']})", ""]
    header = ["Contender", "Values/s while adapting", "Update p50 / p99 ms", "Training peak MB",
              "of which optimizer KB", "Scoring peak MB", "Trainable", "Process RSS peak MB"]
    rows = []
    for name, row in results["summary"].items():
        memory, latency = row["memory"], row["update_latency"]
        rows.append([
            name,
            "—" if row["values_per_s"] is None else f"{row['values_per_s']:,.0f}",
            "—" if latency["p50_ms"] is None else f"{latency['p50_ms']:.1f} / {latency['p99_ms']:.1f}",
            _mb(memory["training_peak_bytes"]),
            f"{memory['optimizer_state_bytes'] / 1024:.1f}",
            _mb(memory["scoring_peak_bytes"]),
            f"{memory['trainable_parameters']:,}",
            _mb(memory["peak_rss_bytes"]),
        ])
    lines += markdown_table(header, rows)
    lines += ["Training peak: the largest measured update (tensors it holds at once: activations, recomputed "
              "activations, gradients, temporaries) plus the optimizer state and other training state; weights are "
              "resident either way and not counted. Scoring peak: the same measure for scoring one patch "
              "(forecast + blind passes).", ""]
    memory = results.get("memory")
    if memory:
        lines += [f"## Memory: LoRA vs full fine-tuning vs scoring (base `{memory['base_name']}`, "
                  f"{memory['weights']})", ""]
        lines += [f"Scoring peak of the leanest LoRA model {_mb(memory['scoring_peak_bytes'])} MB; LoRA budget 1.5 x "
                  f"that = "
                  f"{memory['budget_mb']:.2f} MB; the planner chose: batch {memory['plan']['batch_size']} in "
                  f"micro-batches of {memory['plan']['micro_batch']}, adapt_last {memory['plan']['adapt_last']}, "
                  f"cache {memory['plan']['cache_features']}, checkpointing {memory['plan']['checkpoint_blocks']}.",
                  ""]
        rows = [[name, _mb(r["training_peak_bytes"]), _mb(r["scoring_peak_bytes"]),
                 f"{r['optimizer_state_bytes'] / 1024:.1f}", f"{r['trainable_parameters']:,}"]
                for name, r in memory["rows"].items()]
        lines += markdown_table(
            ["Set-up", "Training peak MB", "Scoring peak MB", "Optimizer state KB", "Trainable"], rows)
        lines += [f"LoRA / full fine-tuning (batch at once): **{memory['lora_over_full']:.1%}**; LoRA / full "
                  f"fine-tuning with the same memory recipe: {memory['lora_over_full_same_recipe']:.1%}; LoRA / its "
                  f"own scoring peak: **{memory['lora_over_scoring']:.2f} x**. Full fine-tuning cannot shed its "
                  "gradients and AdamW state for every weight (3 x the model); LoRA's peak is the adapted block's "
                  "activations in flight, which the micro-batch bounds.", ""]
    if results.get("targets"):
        lines += ["## Targets", ""]
        lines += markdown_table(["Target", "Status", "Measured"],
                        [[t["target"], t["status"].upper(), t["measured"]] for t in results["targets"]])
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------- bench drift


@dataclass
class Part:
    name: str
    start: int
    stop: int
    announced: bool  # a new regime announced here (start_regime)


@dataclass
class DriftStream:
    """A generated stream with regime changes and faults: values (rows, 8), labels (rows,), its parts."""

    values: np.ndarray
    labels: np.ndarray
    parts: list[Part]
    faults: list[tuple[int, int]]  # (start, stop) of each fault, stream coordinates


def drift_stream(seed: int = 0, scale: float = 1.0) -> DriftStream:
    """Regime A (pump 1), faults in A, regime B (pump 2, announced), faults in B, A again, B again.

    Each pump is standardised by its own normal rows, so the regimes share a scale and differ in dynamics
    (shaft speed, resonances, load pattern, noise): the same sensors on a machine run in another mode. When A
    returns it first replays normal rows the detector learned in part A (a known mode coming back: any false
    alarm there is forgetting, not novelty), then goes on with new A rows with faults. ``scale`` shortens every
    part (smoke runs).
    """
    n_train, n_test = max(int(3000 * scale), 400), max(int(2000 * scale), 400)
    pump_a, pump_b = make_pump_fleet(2, n_train=n_train, n_test=n_test, seed=seed)

    def standardise(pump: Any) -> tuple[np.ndarray, np.ndarray]:
        mean, std = pump.train.mean(axis=0), pump.train.std(axis=0) + 1e-9
        return (pump.train - mean) / std, (pump.test - mean) / std

    train_a, test_a = standardise(pump_a)
    train_b, test_b = standardise(pump_b)
    half = n_test // 2
    split_a = int(n_train * 0.6)
    known_a = train_a[split_a // 3 : split_a]  # rows of part A, past its probation's start
    pieces = [
        ("A", train_a[:split_a], np.zeros(split_a), False),
        ("A faults", test_a[:half], pump_a.labels[:half], False),
        ("B (announced)", train_b[: n_train // 2], np.zeros(n_train // 2), True),
        ("B faults", test_b[:half], pump_b.labels[:half], False),
        ("A returns (known rows)", known_a, np.zeros(len(known_a)), False),
        ("A faults again", test_a[half:], pump_a.labels[half:], False),
        ("B returns", test_b[half:], pump_b.labels[half:], False),
    ]
    parts, at = [], 0
    for name, values, _, announced in pieces:
        parts.append(Part(name, at, at + len(values), announced))
        at += len(values)
    values = np.vstack([p[1] for p in pieces]).astype(np.float32)
    labels = np.concatenate([p[2] for p in pieces]).astype(np.int8)
    edges = np.diff(np.concatenate([[0], labels, [0]]))
    faults = list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist(), strict=True))
    return DriftStream(values, labels, parts, faults)


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    edges = np.diff(np.concatenate([[0], flags.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist(), strict=True))


def drift_metrics(stream: DriftStream, anomaly: np.ndarray, probation: np.ndarray,
                  grace: int = 32) -> dict[str, Any]:
    """False alarms and missed faults, per part and overall.

    A fault is detected if an alarm falls in [start, stop + grace) (smoothing delays the end); an alarm run that
    starts on a normal row outside that range is a false-alarm event; the false-alarm rate counts flagged normal
    rows outside probation and outside the grace after each fault.
    """
    excused = np.zeros(len(anomaly), bool)
    for start, stop in stream.faults:
        excused[start : stop + grace] = True
    normal = (stream.labels == 0) & ~excused & (probation == 0)
    events = [start for start, _ in _runs(anomaly) if not excused[start]]
    per_part = {}
    for part in stream.parts:
        span = slice(part.start, part.stop)
        faults = [(a, b) for a, b in stream.faults if part.start <= a < part.stop]
        detected = sum(bool(anomaly[a : b + grace].any()) for a, b in faults)
        n_normal = int(normal[span].sum())
        per_part[part.name] = {
            "rows": part.stop - part.start,
            "false_alarm_rate": float(anomaly[span][normal[span]].mean()) if n_normal else None,
            "false_alarm_events": sum(part.start <= e < part.stop for e in events),
            "faults": len(faults),
            "missed": len(faults) - detected,
        }
    detected = sum(bool(anomaly[a : b + grace].any()) for a, b in stream.faults)
    return {
        "false_alarm_rate": float(anomaly[normal].mean()) if normal.any() else None,
        "false_alarm_events": len(events),
        "faults": len(stream.faults),
        "missed": len(stream.faults) - detected,
        "fault_row_recall": float(anomaly[stream.labels == 1].mean()) if (stream.labels == 1).any() else None,
        "parts": per_part,
    }


@dataclass
class DriftBenchOptions:
    """Settings of ``edgepeft bench drift``.

    Attributes:
        base, method: the detector's base and PEFT method.
        variants: which of :data:`DRIFT_VARIANTS` to run.
        scale: length of the stream's parts (1 = full).
        warmup: probation rows (also the announced regime's re-probation).
        update_every: rows between online updates.
        seeds: one stream (other pumps) and one detector seed per entry; numbers are reported per seed and as
            mean and range: a single run's false alarms move a lot with the sampled training batches alone.
        threads: torch threads.
    """

    base: str = "tiny"
    method: str = "lora"
    variants: tuple[str, ...] = DRIFT_VARIANTS
    scale: float = 1.0
    warmup: int = 1200
    update_every: int = 16
    seeds: tuple[int, ...] = (0, 1, 2)
    threads: int | None = None

    def __post_init__(self) -> None:
        unknown = [v for v in self.variants if v not in DRIFT_VARIANTS]
        if unknown:
            raise ConfigError(f"unknown drift variant(s) {unknown}; choose from {', '.join(DRIFT_VARIANTS)}")
        if not 0.05 <= self.scale <= 10:
            raise ConfigError(f"--scale must be in [0.05, 10], got {self.scale}")
        if not self.seeds:
            raise ConfigError("give at least one seed")


def _variant_detector(variant: str, opts: DriftBenchOptions, base: str, seed: int) -> StreamingDetector:
    continual = {"no updates": "none", "naive": "none"}.get(variant, variant)
    return StreamingDetector(base=base, method=opts.method, warmup=opts.warmup, warmup_steps=100,
                             update_every=None if variant == "no updates" else opts.update_every,
                             continual=continual, measure_every=0, seed=seed)


def run_variant(stream: DriftStream, det: StreamingDetector) -> dict[str, np.ndarray]:
    """Feed the stream part by part, announcing the parts marked as new regimes."""
    outputs = []
    for part in stream.parts:
        if part.announced:
            det.start_regime()
        outputs.append(det.process_many(stream.values[part.start : part.stop]))
    return {key: np.concatenate([o[key] for o in outputs]) for key in outputs[0]}


def _mean_and_range(values: list[float | None]) -> dict[str, float | None]:
    known = [v for v in values if v is not None]
    if not known:
        return {"mean": None, "min": None, "max": None}
    return {"mean": float(np.mean(known)), "min": float(np.min(known)), "max": float(np.max(known))}


def _aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and range over seeds of every number of :func:`drift_metrics`."""
    out: dict[str, Any] = {key: _mean_and_range([r[key] for r in runs])
                           for key in ("false_alarm_rate", "false_alarm_events", "missed", "faults",
                                       "fault_row_recall", "seconds")}
    out["parts"] = {name: {key: _mean_and_range([r["parts"][name][key] for r in runs])
                           for key in ("false_alarm_rate", "false_alarm_events", "missed", "faults")}
                    for name in runs[0]["parts"]}
    out["replay_and_ewc_bytes"] = runs[0]["replay_and_ewc_bytes"]
    return out


def run_drift_bench(opts: DriftBenchOptions, out: str | os.PathLike[str],
                    progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every variant on the same drift streams (one per seed); write results.json and results.md."""
    import torch

    if opts.threads:
        torch.set_num_threads(opts.threads)
    folder = _prepare_out(out)
    base, weights = ensure_base(opts.base)
    streams = {seed: drift_stream(seed, opts.scale) for seed in opts.seeds}
    per_seed: dict[str, list[dict[str, Any]]] = {v: [] for v in opts.variants}
    for seed, stream in streams.items():
        for variant in opts.variants:
            if progress is not None:
                progress(f"{variant}, seed {seed}, on {len(stream.values)} rows")
            det = _variant_detector(variant, opts, base, seed)
            started = time.perf_counter()
            output = run_variant(stream, det)
            per_seed[variant].append({**drift_metrics(stream, output["anomaly"], output["probation"]),
                                      "seed": seed, "seconds": time.perf_counter() - started,
                                      "replay_and_ewc_bytes": det.trainer_.state_nbytes()})
    first = streams[opts.seeds[0]]
    results = jsonable({
        "suite": "drift",
        **_machine(),
        "settings": {**vars(opts), "variants": list(opts.variants), "seeds": list(opts.seeds),
                     "base_weights": weights, "rows": len(first.values)},
        "stream": {"parts": [vars(p) for p in first.parts],
                   "faults_per_seed": {seed: len(stream.faults) for seed, stream in streams.items()}},
        "contenders": [{"name": v, "kind": "edgepeft", "role": "peft"} for v in opts.variants],
        "summary": {variant: _aggregate(runs) for variant, runs in per_seed.items()},
        "per_seed": per_seed,
    })
    write_results(folder, results)
    _write_markdown(folder, render_drift(results))
    return results


def _pct(stat: dict[str, float | None]) -> str:
    if stat["mean"] is None:
        return "—"
    return f"{100 * stat['mean']:.1f} % ({100 * stat['min']:.1f}–{100 * stat['max']:.1f})"


def _num(stat: dict[str, float | None], digits: int = 1) -> str:
    if stat["mean"] is None:
        return "—"
    return f"{stat['mean']:.{digits}f} ({stat['min']:.0f}–{stat['max']:.0f})"


def render_drift(results: dict[str, Any]) -> str:
    """Markdown of a ``bench drift`` result: means over seeds, (min–max) in brackets."""
    settings, stream = results["settings"], results["stream"]
    lines = ["# Continual learning under regime changes", ""]
    lines += provenance_lines({**results, "settings": {}})
    parts = ", ".join(f"{p['name']} ({p['stop'] - p['start']} rows)" for p in stream["parts"])
    faults = ", ".join(str(n) for n in stream["faults_per_seed"].values())
    lines += [f"- Stream: {settings['rows']} rows x 8 channels: {parts}; faults per seed: {faults}. The change to "
              "B is announced (`start_regime`: a re-probation that learns every row and recalibrates the "
              "threshold), the returns are not. \"A returns\" replays normal rows learned in part A: false alarms "
              "there are forgetting, not novelty.",
              f"- Detector: base `{settings['base']}` ({settings['base_weights']}), `{settings['method']}`, probation "
              f"{settings['warmup']} rows, one update every {settings['update_every']} rows. Seeds "
              f"{', '.join(str(s) for s in settings['seeds'])}: each seed is another pair of pumps and another "
              "detector seed; cells give the mean over seeds and (min–max).",
              "- False-alarm rate: flagged normal rows outside probation and outside 32 rows after a fault; "
              "false-alarm events: alarm runs starting there. A fault is missed when no alarm falls inside it "
              "(or within 32 rows after).", ""]
    names = [p["name"] for p in stream["parts"]]
    header = ["Variant", "False-alarm rate", "False-alarm events", "Missed faults", "Fault-row recall"]
    rows = []
    for variant, s in results["summary"].items():
        recall = "—" if s["fault_row_recall"]["mean"] is None else f"{s['fault_row_recall']['mean']:.2f}"
        rows.append([variant, _pct(s["false_alarm_rate"]), _num(s["false_alarm_events"]),
                     f"{_num(s['missed'])} of {s['faults']['mean']:.1f}", recall])
    lines += markdown_table(header, rows)
    lines += ["False-alarm rate per part (mean over seeds, min–max):", ""]
    rows = [[variant, *(_pct(s["parts"][n]["false_alarm_rate"]) for n in names)]
            for variant, s in results["summary"].items()]
    lines += markdown_table(["Variant", *names], rows)
    lines += ["Missed faults per part (mean over seeds):", ""]
    rows = [[variant, *(f"{s['parts'][n]['missed']['mean']:.1f} of {s['parts'][n]['faults']['mean']:.1f}"
                        if s["parts"][n]["faults"]["mean"] else "—" for n in names)]
            for variant, s in results["summary"].items()]
    lines += markdown_table(["Variant", *names], rows)
    return "\n".join(lines).rstrip() + "\n"
