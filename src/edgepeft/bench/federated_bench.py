"""``edgepeft bench federated``: federated adapters against local-only and centralised ones, in one run.

Per suite (ASD's servers; the simulated pump fleet), every contender gives every member asset its own detector, scored
on the asset's labelled test rows (best-F1 and VUS-PR, threshold-free):

- ``local``: today's default: the asset's own adapter from the base alone (150 steps), no federation;
- ``centralised``: the upper bound: one adapter trained on every asset's rows pooled (data that a federation never
  moves), then personalised like the federated ones;
- ``<scheme>``: a Flower federation (simulation engine) with ``fedavg`` (naive), ``ffa`` (FFA-LoRA, exact) or
  ``svd`` (exact average re-factorised); ``-global`` uses the global adapter as is (0 local steps), ``-personal``
  fine-tunes it ``personalise_steps`` on the asset; every variant calibrates its own threshold on its own rows;
- ``ffa-dp<eps>``: FFA with DP-SGD on every client at epsilon ``eps`` (delta 1e-5), personalised (the fine-tune runs
  on the asset's own device: it costs no privacy towards the federation);
- ``zeroshot``: the base with no adapter training (0 steps), its own calibration: what any adapter adds.

Cold start: assets outside the federation with only ``cold_rows`` normal rows: from the base alone vs from the global
adapter. Communication: bytes per client per round (adapter tensors, and every message with SecAgg+) vs full-model
FedAvg of the same base. Scale: ``scale_clients`` synthetic clients in one simulation, its wall time and peak memory.

Long: every part is saved under ``OUT/parts`` as it finishes and skipped on a rerun (resume after a kill).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgepeft.bench.harness import run_info, write_results
from edgepeft.bench.suites import ranking_metrics
from edgepeft.core.errors import ConfigError
from edgepeft.federated.app import RunSettings
from edgepeft.federated.run import GLOBAL_FILE, simulate
from edgepeft.federated.task import FederatedConfig, base_sha256, build_model, prepare_asset
from edgepeft.peft.shared import save_global_adapter, shared_state

LOCAL_STEPS_ALONE = 150  # the default detector's adaptation (AnomalyDetector.steps)
EPSILONS = (1.0, 4.0, 8.0)
SCHEMES = ("fedavg", "ffa", "svd")


@dataclass
class Member:
    name: str
    train: np.ndarray
    test: np.ndarray
    labels: np.ndarray


@dataclass
class SuiteData:
    name: str
    spec: str  # the federation's data spec (its first n_members partitions are the members)
    members: list[Member]
    newcomers: list[Member]  # cold start: outside the federation
    newcomer_federation: int  # how many partitions the cold-start federation uses (0: the members' one)


def load_suite(suite: str, data: Path, pumps: int, new_pumps: int, limit: int | None, seed: int) -> SuiteData:
    if suite == "asd":
        from edgepeft.data.datasets import load_asd

        runs = load_asd(data / "asd")
        members = [Member(r.name, r.train, r.test, r.labels) for r in runs][:limit]
        held = max(1, len(runs) // 4)  # cold start: a federation of the others, then these as newcomers
        return SuiteData("asd", f"asd:{data / 'asd'}", members,
                         [Member(r.name, r.train, r.test, r.labels) for r in runs[-held:]], len(runs) - held)
    if suite == "fleet":
        from edgepeft.data.synthetic import make_pump_fleet
        from edgepeft.federated.data import FLEET_ROWS

        # Pump i depends only on the seed and i: the spec's first `pumps` partitions are these members.
        fleet = [Member(p.name, p.train, p.test, p.labels)
                 for p in make_pump_fleet(pumps + new_pumps, n_train=FLEET_ROWS, seed=seed)]
        return SuiteData("fleet", f"fleet:{pumps}:{seed}", fleet[:pumps][:limit], fleet[pumps:], 0)
    raise ConfigError(f"unknown suite {suite!r}; choose asd or fleet")


class Parts:
    """Finished parts on disk: a rerun skips them."""

    def __init__(self, root: Path) -> None:
        self.root = root / "parts"
        self.root.mkdir(parents=True, exist_ok=True)

    def get(self, key: str, make: Callable[[], Any]) -> Any:
        path = self.root / f"{key}.json"
        if path.is_file():
            return json.loads(path.read_text())
        value = make()
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(value, indent=1))
        temporary.replace(path)
        return value


class PeakMemory:
    """Peak RSS of this process and its children (Ray's workers), sampled every 0.2 s."""

    def __init__(self) -> None:
        import psutil

        self._process, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            total = 0
            with contextlib.suppress(psutil.Error):
                for proc in [self._process, *self._process.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):  # a worker may exit between listing and reading
                        total += proc.memory_info().rss
            self.peak = max(self.peak, total)
            self._stop.wait(0.2)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def centralised_adapter(cfg: FederatedConfig, members: list[Member], steps: int, path: Path) -> Path:
    """The upper bound: one adapter trained on every member's fit rows pooled (each standardised by its own scaler),
    the same channel tags for all (the assets of a suite share their sensors)."""
    from edgepeft.peft import get_method
    from edgepeft.train.adapt import AdaptConfig, adapt

    assets = [prepare_asset(m.name, m.train, cfg.calib_fraction) for m in members]
    widths = {a.scaled.shape[1] for a in assets}
    if len(widths) != 1:
        raise ConfigError("centralised training pools assets with the same channels; these differ")
    pooled = np.concatenate([a.scaled[: a.n_fit] for a in assets])
    model = build_model(FederatedConfig(**{**cfg.to_record(), "aggregation": "svd"}), widths.pop())
    lr = cfg.lr if cfg.lr is not None else get_method(cfg.method).default_lr
    adapt(model, pooled, AdaptConfig(steps=steps, batch_size=cfg.batch_size, seed=cfg.seed,
                                     max_cached_windows=steps * cfg.batch_size), lr)
    return save_global_adapter(path, shared_state(model), cfg.base, cfg.peft_config(), base_sha256(cfg))


def evaluate(cfg: FederatedConfig, member: Member, init: str | None, steps: int) -> dict[str, Any]:
    """The member's own detector from ``init`` (None: the base) after ``steps`` local steps, on its test rows."""
    started = time.perf_counter()
    det = cfg.detector(init_adapter=init, steps=steps).fit(member.train)
    fitted = time.perf_counter() - started
    metrics = ranking_metrics(member.labels, det.score(member.test))
    return {"asset": member.name, "best_f1": metrics["best_f1"], "vus_pr": metrics["vus_pr"],
            "fit_seconds": fitted, "rows": int(len(member.train))}


def _mean(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return float(np.mean(values)) if values else None


def _federation(parts: Parts, work: Path, key: str, cfg: FederatedConfig, run: RunSettings, n_clients: int
                ) -> dict[str, Any]:
    def make() -> dict[str, Any]:
        started = time.perf_counter()
        result = simulate(cfg, run, n_clients)
        history = result.history
        losses = [h["loss"] for h in history if h["loss"] is not None]
        return {
            "global": str(result.global_path), "seconds": time.perf_counter() - started, "clients": n_clients,
            "rounds": len(history), "loss": losses,
            "rounds_to_converge": _rounds_to_converge(losses),
            "tensor_bytes_per_client_round": history[-1]["tensor_bytes_per_client"],
            "message_bytes_per_client_round": {
                "down": float(np.mean([h["message_bytes_down_per_client"] for h in history])),
                "up": float(np.mean([h["message_bytes_up_per_client"] for h in history]))},
            "round_seconds": [h["seconds"] for h in history],
            "rejected": sum(len(h["rejected"]) for h in history),
            "epsilon_max": result.summary["epsilon_max"],
        }

    return parts.get(f"federation-{key}", make)


def _rounds_to_converge(losses: list[float], tolerance: float = 0.02) -> int | None:
    """The first round after which the mean training loss stays within ``tolerance`` (relative) of its last value."""
    if not losses:
        return None
    final = losses[-1]
    for index in range(len(losses)):
        if all(abs(v - final) <= tolerance * abs(final) for v in losses[index:]):
            return index + 1
    return len(losses)


def run_suite(suite: SuiteData, out: Path, cfg: FederatedConfig, personalise_steps: int, cold_rows: int,
              epsilons: tuple[float, ...], secagg: bool, say: Callable[[str], None]) -> dict[str, Any]:
    parts, work = Parts(out / suite.name), out / suite.name / "work"
    n = len(suite.members)
    federations: dict[str, dict[str, Any]] = {}
    for scheme in SCHEMES:
        say(f"{suite.name}: federation {scheme}")
        federations[scheme] = _federation(parts, work, scheme, FederatedConfig(**{**cfg.to_record(),
                                                                                    "aggregation": scheme}),
                                          RunSettings(data=suite.spec, out=str(work / scheme)), n)
    for eps in epsilons:
        say(f"{suite.name}: federation ffa, DP epsilon {eps:g}")
        federations[f"ffa-dp{eps:g}"] = _federation(
            parts, work, f"ffa-dp{eps:g}", FederatedConfig(**{**cfg.to_record(), "dp_epsilon": eps}),
            RunSettings(data=suite.spec, out=str(work / f"ffa-dp{eps:g}")), n)
    if secagg:
        say(f"{suite.name}: federation ffa with SecAgg+")
        federations["ffa-secagg"] = _federation(parts, work, "ffa-secagg", cfg,
                                                RunSettings(data=suite.spec, out=str(work / "ffa-secagg"),
                                                            secagg=True, min_clients=max(2, n // 2)), n)
    central_steps = cfg.rounds * cfg.local_steps * 3  # three times a client's steps: an upper bound's budget
    central = parts.get("centralised", lambda: {"global": str(centralised_adapter(
        cfg, suite.members, central_steps, work / "centralised" / GLOBAL_FILE)), "steps": central_steps})

    contenders: dict[str, tuple[str | None, int]] = {"local": (None, LOCAL_STEPS_ALONE),
                                                     "centralised-personal": (central["global"], personalise_steps)}
    for scheme in SCHEMES:
        contenders[f"{scheme}-global"] = (federations[scheme]["global"], 0)
        contenders[f"{scheme}-personal"] = (federations[scheme]["global"], personalise_steps)
    for eps in epsilons:
        contenders[f"ffa-dp{eps:g}-personal"] = (federations[f"ffa-dp{eps:g}"]["global"], personalise_steps)
    contenders["zeroshot"] = (None, 0)  # the base with no adapter training at all: what any adapter adds
    quality: dict[str, Any] = {}
    for name, (init, steps) in contenders.items():
        say(f"{suite.name}: {name} on {n} assets")
        rows = parts.get(f"quality-{name}", lambda init=init, steps=steps: [evaluate(cfg, m, init, steps)
                                                                           for m in suite.members])
        quality[name] = {"best_f1": _mean(rows, "best_f1"), "vus_pr": _mean(rows, "vus_pr"),
                         "fit_seconds": _mean(rows, "fit_seconds"), "assets": rows}

    # Cold start: newcomers with cold_rows normal rows, from the base vs from a federation they were not part of.
    if suite.newcomer_federation:
        say(f"{suite.name}: cold-start federation of {suite.newcomer_federation} assets")
        cold_global = _federation(parts, work, "ffa-cold", cfg, RunSettings(data=suite.spec, out=str(
            work / "ffa-cold")), suite.newcomer_federation)["global"]
    else:
        cold_global = federations["ffa"]["global"]
    newcomers = [Member(m.name, m.train[:cold_rows], m.test, m.labels) for m in suite.newcomers]
    cold: dict[str, Any] = {}
    for name, (init, steps) in {"base": (None, LOCAL_STEPS_ALONE), "federated-global": (cold_global, 0),
                                "federated-personal": (cold_global, personalise_steps)}.items():
        say(f"{suite.name}: cold start {name} on {len(newcomers)} newcomers")
        rows = parts.get(f"cold-{name}", lambda init=init, steps=steps: [evaluate(cfg, m, init, steps)
                                                                         for m in newcomers])
        cold[name] = {"best_f1": _mean(rows, "best_f1"), "vus_pr": _mean(rows, "vus_pr"), "assets": rows}
    return {"members": n, "newcomers": len(newcomers), "cold_rows": cold_rows, "federations": federations,
            "centralised": central, "quality": quality, "cold_start": cold}


def full_model_bytes(cfg: FederatedConfig) -> int:
    """What full-model FedAvg of the same base sends per client per round, each way (float32)."""
    from edgepeft.models.registry import load_base

    return int(sum(p.numel() for n, p in load_base(cfg.base).named_parameters() if n != "channel_tags") * 4)


def wire_sizes() -> list[dict[str, Any]]:
    """Adapter bytes per client per round (each way) for both bases, the schemes and a few ranks: exact payload
    sizes of the tensors that travel (GlobalState.wire), against full-model FedAvg of the same base."""
    from edgepeft.federated.task import initial_state, wire_bytes

    rows = []
    for base in ("tiny", "small"):
        full = full_model_bytes(FederatedConfig(base=base))
        for rank in (2, 4, 8):
            for scheme in ("ffa", "svd"):
                size = wire_bytes(initial_state(FederatedConfig(base=base, rank=rank, aggregation=scheme)))
                rows.append({"base": base, "rank": rank, "scheme": "ffa" if scheme == "ffa" else "fedavg / svd",
                             "bytes": size, "full_model_bytes": full, "share": size / full})
    return rows


def run_scale(out: Path, clients: int, rows: int) -> dict[str, Any]:
    """``clients`` synthetic assets in one simulation: 2 rounds, 2 local steps each, every client every round."""
    cfg = FederatedConfig(rounds=2, local_steps=2, batch_size=8)
    started = time.perf_counter()
    with PeakMemory() as memory:
        result = simulate(cfg, RunSettings(data=f"synthetic:{clients}:{rows}", out=str(out / "work" / "scale"),
                                           min_clients=clients // 2), clients)
    return {"clients": clients, "rows_per_client": rows, "rounds": len(result.history),
            "clients_per_round": [h["clients"] for h in result.history],
            "seconds": time.perf_counter() - started, "round_seconds": [h["seconds"] for h in result.history],
            "peak_rss_bytes": memory.peak}


def run_federated_bench(out: Path, *, data: Path, suites: tuple[str, ...] = ("asd", "fleet"), pumps: int = 50,
                        new_pumps: int = 10, rounds: int = 5, local_steps: int = 20, personalise_steps: int = 30,
                        cold_rows: int = 150, epsilons: tuple[float, ...] = EPSILONS, secagg: bool = True,
                        scale_clients: int = 1000, limit: int | None = None, seed: int = 0,
                        say: Callable[[str], None] = print) -> dict[str, Any]:
    cfg = FederatedConfig(rounds=rounds, local_steps=local_steps, seed=seed)
    results: dict[str, Any] = {"suite": "federated", **run_info(), "settings": {
        "base": cfg.base, "method": cfg.method, "rank": cfg.rank, "rounds": rounds, "local_steps": local_steps,
        "batch_size": cfg.batch_size, "personalise_steps": personalise_steps, "local_alone_steps": LOCAL_STEPS_ALONE,
        "cold_rows": cold_rows, "epsilons": list(epsilons), "dp_delta": cfg.dp_delta, "pumps": pumps,
        "new_pumps": new_pumps, "limit": limit, "seed": seed, "threads": 1}}
    results["full_model_bytes"] = full_model_bytes(cfg)
    results["wire_sizes"] = wire_sizes()
    for name in suites:
        results[name] = run_suite(load_suite(name, data, pumps, new_pumps, limit, seed), out, cfg,
                                  personalise_steps, cold_rows, epsilons, secagg, say)
        write_results(out, results)
    if scale_clients:
        say(f"scale: {scale_clients} clients in one simulation")
        results["scale"] = Parts(out).get(f"scale-{scale_clients}", lambda: run_scale(out, scale_clients, 200))
    results["targets"] = targets(results)
    write_results(out, results)
    (out / "results.md").write_text(render(results))
    return results


def _status(ok: bool | None) -> str:
    return "not evaluated" if ok is None else "met" if ok else "missed"


def _target(name: str, ok: bool | None, measured: str) -> dict[str, Any]:
    return {"target": name, "status": _status(ok), "measured": measured}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


COLD_START_MARGIN = 0.005  # a cold start "beats" the base only by more than this best-F1 (half a point)


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for suite in ("asd", "fleet"):
        if suite not in results:
            continue
        q = results[suite]["quality"]
        local, fed = q["local"], q["ffa-personal"]
        ok = None if local["best_f1"] is None else (fed["best_f1"] >= local["best_f1"] and fed["vus_pr"] >=
                                                     local["vus_pr"])
        out.append(_target(f"{suite}: federated + personalised (FFA, the default) >= local-only, mean best-F1 and "
                           "VUS-PR", ok, f"{fed['best_f1']:.4f} / {fed['vus_pr']:.4f} vs {local['best_f1']:.4f} / "
                           f"{local['vus_pr']:.4f}"))
        cold = results[suite]["cold_start"]
        best = max(("federated-global", "federated-personal"), key=lambda k: cold[k]["best_f1"] or 0.0)
        ok = cold["base"]["best_f1"] is not None and cold[best]["best_f1"] > cold["base"]["best_f1"] + \
            COLD_START_MARGIN
        out.append(_target(f"{suite}: cold start ({results[suite]['cold_rows']} rows) from the federated adapter "
                           f"beats the base alone by > {COLD_START_MARGIN} best-F1", ok,
                           f"{best} {cold[best]['best_f1']:.4f} / {cold[best]['vus_pr']:.4f} vs base "
                           f"{cold['base']['best_f1']:.4f} / {cold['base']['vus_pr']:.4f}"))
    full = results["full_model_bytes"]
    for suite in ("asd", "fleet"):
        if suite in results:
            ffa = results[suite]["federations"]["ffa"]["tensor_bytes_per_client_round"]
            out.append(_target("bytes per client per round <= 0.2 % of full-model FedAvg (FFA-LoRA tensors)",
                               ffa / full <= 0.002, f"{ffa:,} vs {full:,} bytes: {100 * ffa / full:.2f} %"))
            break
    scale = results.get("scale")
    if scale:
        ok = scale["clients"] >= 1000 and min(scale["clients_per_round"]) >= scale["clients"] // 2
        out.append(_target(">= 1,000 simulated clients in one simulation run", ok,
                           f"{scale['clients']} clients, {scale['clients_per_round']} trained per round, "
                           f"{scale['seconds']:.0f} s, peak RSS {scale['peak_rss_bytes'] / 2**20:.0f} MB"))
    return out


def render(results: dict[str, Any]) -> str:
    """Markdown: provenance, targets, then each suite's contenders, federations and cold start."""
    from edgepeft.bench.docs import provenance_lines

    s = results["settings"]
    lines = ["# Federated PEFT (Flower): federated vs local-only vs centralised adapters", ""]
    lines += provenance_lines({**results, "settings": {}})
    while lines and not lines[-1]:
        lines.pop()
    lines += [f"- Settings: base `{s['base']}`, {s['method']} rank {s['rank']}, {s['rounds']} rounds x "
              f"{s['local_steps']} local steps (batch {s['batch_size']}), personalisation {s['personalise_steps']} "
              f"steps, local-only {s['local_alone_steps']} steps, DP delta {s['dp_delta']:g}, "
              f"{s['threads']} thread per process, Flower simulation engine (Ray) on this machine", ""]
    lines += ["| Target | Status | Measured |", "|---|---|---|"]
    for target in results["targets"]:
        status = target["status"].upper() if target["status"] != "met" else "met"
        lines.append(f"| {target['target']} | **{status}** | {target['measured']} |")
    full = results["full_model_bytes"]
    for suite in ("asd", "fleet"):
        if suite not in results:
            continue
        r = results[suite]
        lines += ["", f"## {suite}: {r['members']} assets, each with its own detector", "",
                  "| Contender | mean best-F1 | mean VUS-PR | fit s per asset |", "|---|---|---|---|"]
        for name, q in r["quality"].items():
            lines.append(f"| {name} | {_fmt(q['best_f1'])} | {_fmt(q['vus_pr'])} | {q['fit_seconds']:.1f} |")
        lines += ["", "| Federation | clients | rounds | rounds to converge | wall s | tensor bytes / client / round "
                  "(% of full model) | message bytes / client / round, down / up | rejected | epsilon (max) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, f in r["federations"].items():
            m = f["message_bytes_per_client_round"]
            lines.append(f"| {name} | {f['clients']} | {f['rounds']} | {f['rounds_to_converge']} | "
                         f"{f['seconds']:.0f} | {f['tensor_bytes_per_client_round']:,} "
                         f"({100 * f['tensor_bytes_per_client_round'] / full:.2f} %) | {m['down']:,.0f} / "
                         f"{m['up']:,.0f} | {f['rejected']} | "
                         f"{'-' if f['epsilon_max'] is None else format(f['epsilon_max'], '.2f')} |")
        cold = r["cold_start"]
        lines += ["", f"Cold start: {r['newcomers']} newcomers with {r['cold_rows']} normal rows each.", "",
                  "| Start | mean best-F1 | mean VUS-PR |", "|---|---|---|"]
        for name, c in cold.items():
            lines.append(f"| {name} | {_fmt(c['best_f1'])} | {_fmt(c['vus_pr'])} |")
    lines += ["", "## Bytes per client per round (adapter tensors, each way)", "",
              "| base | rank | scheme | bytes | full-model FedAvg bytes | share |", "|---|---|---|---|---|---|"]
    for row in results.get("wire_sizes", []):
        lines.append(f"| {row['base']} | {row['rank']} | {row['scheme']} | {row['bytes']:,} | "
                     f"{row['full_model_bytes']:,} | {100 * row['share']:.3f} % |")
    scale = results.get("scale")
    if scale:
        lines += ["", "## Scale", "", f"{scale['clients']} synthetic clients ({scale['rows_per_client']} rows each), "
                  f"{scale['rounds']} rounds, clients trained per round {scale['clients_per_round']}: "
                  f"{scale['seconds']:.0f} s wall ({', '.join(f'{x:.0f}' for x in scale['round_seconds'])} s per "
                  f"round), peak RSS of the process tree {scale['peak_rss_bytes'] / 2**20:.0f} MB."]
    lines.append("")
    return "\n".join(lines)
