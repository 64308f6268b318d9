"""`edgepeft bench device`: what a device process costs, the torch runtime against the torch-free device install,
side by side in one run.

Each engine runs as a real ``edgepeft serve`` process on the same 100 signed bundles (100 assets, LoRA on the tiny
base): install + activate over HTTP (client-side latency), scoring throughput, peak RSS while 100 assets are
resident and served, and the time from process start to the first score after a restart. The device install is
the same package with the training libraries made unimportable (:func:`device_environment`; the test suite also
installs it into a fresh virtual environment and checks that it has no torch and serves the same bundles).

Example:
    >>> results = run_device_bench(Path("bench-out/device"), assets=10, seconds=1.0)   # doctest: +SKIP
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from edgepeft.bench.docs import provenance_lines
from edgepeft.bench.harness import run_info, write_results

# What the training install adds (the `train` extra) and a device install lacks.
TRAINING_ONLY = ("torch", "peft", "sklearn", "scipy", "pyod", "matplotlib", "onnx", "psutil")
_BLOCKER = """
import sys


class _TrainingOnly:
    # A device install: the training side's libraries are not there.
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {modules!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (a device install)", name=name)
        return None


sys.meta_path.insert(0, _TrainingOnly())
"""


def device_environment(folder: Path, extra_blocked: tuple[str, ...] = ()) -> dict[str, str]:
    """Environment variables under which a Python process behaves as a device install: ``import torch`` (and every
    other training-only library, plus ``extra_blocked``) fails as if it were not installed. Writes a
    ``sitecustomize.py`` into ``folder``; the package itself comes from this checkout's ``src``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(_BLOCKER.format(modules=(*TRAINING_ONLY, *extra_blocked)))
    source = Path(__file__).resolve().parents[2]
    return {"PYTHONPATH": os.pathsep.join([str(folder), str(source)])}


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in bytes (Linux)."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def _measure(name: str, root: Path, bundles: list[tuple[str, bytes]], rows: list[list[float]], args: list[str],
             env: dict[str, str], seconds: float) -> dict[str, Any]:
    import httpx

    from edgepeft.bench.loadtest import ServerProcess

    state = root / f"state-{name}"
    out: dict[str, Any] = {"args": args}
    with ServerProcess(state, args=args, env=env) as server, httpx.Client(timeout=60.0) as client:
        assert server.process is not None
        out["rss_idle_bytes"] = _status(server.process.pid)["VmRSS"]
        installs = []
        for asset_id, data in bundles:
            started = time.perf_counter()
            answer = client.post(f"{server.url}/v1/bundles", content=data, headers=server.auth)
            installs.append(time.perf_counter() - started)
            if answer.status_code != 200:
                raise RuntimeError(f"{name}: installing {asset_id} failed: {answer.text}")
        out["install_activate_p50_ms"] = 1000 * statistics.median(installs)
        out["install_activate_p99_ms"] = 1000 * _percentile(installs, 0.99)
        latencies, values = [], 0
        deadline = time.perf_counter() + seconds
        index = 0
        while time.perf_counter() < deadline or index < len(bundles):  # every asset at least once: all resident
            asset_id = bundles[index % len(bundles)][0]
            started = time.perf_counter()
            answer = client.post(f"{server.url}/v1/assets/{asset_id}/score", json={"rows": rows})
            latencies.append(time.perf_counter() - started)
            if answer.status_code != 200:
                raise RuntimeError(f"{name}: scoring {asset_id} failed: {answer.text}")
            values += len(rows) * len(rows[0])
            index += 1
        out["score_rows_per_s"] = len(rows) * len(latencies) / sum(latencies)
        out["score_p50_ms"] = 1000 * statistics.median(latencies)
        out["score_p99_ms"] = 1000 * _percentile(latencies, 0.99)
        loaded = client.get(f"{server.url}/v1/assets").json()
        out["resident_assets"] = sum(any(v.get("loaded") for v in a["versions"]) for a in loaded)
        out["engines"] = sorted({v["engine"] for a in loaded for v in a["versions"] if v.get("loaded")})
        status = _status(server.process.pid)
        out["rss_serving_bytes"], out["peak_rss_bytes"] = status["VmRSS"], status["VmHWM"]
    # Restarts with every asset installed: process start to the first answered score (active versions warmed at
    # start-up), the median of three; /health is polled every 10 ms so the poll adds little to what is measured.
    starts = []
    for _ in range(3):
        started = time.perf_counter()
        with ServerProcess(state, args=args, env=env, startup_s=120.0, poll_s=0.01) as server, \
                httpx.Client(timeout=60.0) as client:
            answer = client.post(f"{server.url}/v1/assets/{bundles[0][0]}/score", json={"rows": rows})
            starts.append(time.perf_counter() - started)
            if answer.status_code != 200:
                raise RuntimeError(f"{name}: first score after restart failed: {answer.text}")
            assert server.process is not None
            out["restart_peak_rss_bytes"] = _status(server.process.pid)["VmHWM"]
    out["start_to_first_score_s"] = statistics.median(starts)
    out["start_to_first_score_runs_s"] = [round(s, 3) for s in starts]
    return out


def _quality_assets(suite: str, data: Path, limit: int | None) -> list[tuple[str, Any, Any, Any, bool]]:
    """(name, training rows, test rows, labels, score with the training rows as history) of a suite's assets."""
    if suite == "fleet":
        from edgepeft.data.synthetic import make_pump_fleet

        runs = [(p.name, p.train, p.test, p.labels, True) for p in make_pump_fleet(20)]
    elif suite == "skab":
        from edgepeft.data.datasets import load_skab

        runs = [(r.name, r.train, r.test, r.labels, True) for r in load_skab(data / "skab")]
    else:
        from edgepeft.data.datasets import load_asd

        runs = [(r.name, r.train, r.test, r.labels, False) for r in load_asd(data / "asd")]
    return runs[:limit]


def quantisation_quality(root: Path, data: Path, suites: tuple[str, ...], limit: int | None = None
                         ) -> dict[str, Any]:
    """Mean best-F1 / VUS-PR per suite of one LoRA adapter per asset (tiny base, 150 steps), scored through the
    fp32 scoring graph, through the int8 graph as trained (post-training quantisation), and an adapter trained and
    calibrated against the int8 base (quantisation-aware) through the int8 graph; plus bundle bytes."""
    import numpy as np

    from edgepeft.delta import generate_key, pack_bundle
    from edgepeft.detect.detector import AnomalyDetector
    from edgepeft.detect.metrics import best_f1, vus_pr
    from edgepeft.runtime.onnx import export_lora_graph, quantize_int8
    from edgepeft.runtime.ort import GraphBase, OnnxEngine
    from edgepeft.runtime.resident import ResidentBase
    from edgepeft.runtime.serving import SavedDetector

    fp32_path = export_lora_graph(ResidentBase.load("tiny"), root / "quality" / "tiny.onnx")
    graphs = {"fp32": GraphBase.load(fp32_path, 1),
              "int8": GraphBase.load(quantize_int8(fp32_path, root / "quality" / "tiny.int8.onnx"), 1)}
    variants = {"fp32": ("fp32", "fp32"), "int8_post_training": ("fp32", "int8"), "int8_aware": ("int8", "int8")}
    key = generate_key()
    out: dict[str, Any] = {"graph_bytes": {k: g.path.stat().st_size for k, g in graphs.items()}}
    for suite in suites:
        if suite != "fleet" and not (data / suite).is_dir():
            out[suite] = {"skipped": f"{data / suite} not found"}
            continue
        scores: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
        sizes: dict[str, list[int]] = {"fp32": [], "int8": []}
        for index, (_name, train, test, labels, history) in enumerate(_quality_assets(suite, data, limit)):
            series = np.concatenate([np.asarray(train), np.asarray(test)]) if history else np.asarray(test)
            keep = len(train) if history else 0
            saved = {}
            for precision in ("fp32", "int8"):
                det = AnomalyDetector(base="tiny", method="lora", steps=150, base_precision=precision).fit(train)
                folder = det.save(root / "quality" / suite / f"{index}-{precision}")
                saved[precision] = SavedDetector.from_directory(folder)
                if precision == "int8":
                    for int8_tensors in (False, True):
                        sizes["int8" if int8_tensors else "fp32"].append(len(pack_bundle(
                            folder, key, asset_id="q", version="1", release=1, int8=int8_tensors)))
            for variant, (trained, graph) in variants.items():
                engine = OnnxEngine(graphs[graph], root / "quality" / "onnx")
                served = engine.load(saved[trained], asset_id=f"{suite}-{index}", version=variant, release=1)
                score = served.score_all(series)["score"][keep:]
                scores[variant].append((best_f1(labels, score)[0], vus_pr(labels, score)))
        out[suite] = {
            "assets": len(scores["fp32"]),
            **{f"{variant}_best_f1": float(np.mean([s[0] for s in values])) for variant, values in scores.items()},
            **{f"{variant}_vus_pr": float(np.mean([s[1] for s in values])) for variant, values in scores.items()},
            "bundle_bytes_fp32_tensors": float(np.mean(sizes["fp32"])),
            "bundle_bytes_int8_tensors": float(np.mean(sizes["int8"])),
        }
    return out


_LEARN_DRIVER = r"""
#include <stdio.h>
#include <time.h>
#include "edgepeft.h"
#include "edgepeft_model.h"
int main(void) {
    float row[EP_C], score, loss;
    long n = 0, steps = 0;
    double seconds = 0.0;
    for (;;) {
        for (int c = 0; c < EP_C; c++)
            if (scanf("%f", &row[c]) != 1) goto done;
        ep_push(row, &score);
        if (++n % EP_P == 0) {
            clock_t started = clock();
            if (ep_learn(0.01f, &loss) == 0) steps++;
            seconds += (double)(clock() - started) / CLOCKS_PER_SEC;
        }
    }
done:
    printf("%ld %.6f\n", steps, seconds);
    return 0;
}
"""


def _learning_cost(folder: Path, rows: Any) -> dict[str, Any]:
    """RAM that -DEP_LEARN adds (gcc's .bss with and without it) and the time of one ep_learn step."""
    import subprocess

    from edgepeft.runtime.export_c import object_sizes

    (folder / "learn_main.c").write_text(_LEARN_DRIVER)
    binary = folder / "learn_host"
    subprocess.run(["gcc", "-std=c99", "-O2", "-DEP_LEARN", "-I", str(folder), str(folder / "learn_main.c"),
                    str(folder / "edgepeft.c"), "-lm", "-o", str(binary)], check=True, capture_output=True)
    text = "\n".join(" ".join(f"{v:.9g}" for v in row) for row in rows)
    steps, seconds = subprocess.run([str(binary)], input=text, capture_output=True, text=True, check=True
                                    ).stdout.split()
    plain = object_sizes(folder)["bss"]
    subprocess.run(["gcc", "-std=c99", "-O2", "-DEP_LEARN", "-c", "-I", str(folder), str(folder / "edgepeft.c"), "-o",
                    str(folder / "learn.o")], check=True, capture_output=True)
    sizes = subprocess.run(["size", "-A", str(folder / "learn.o")], capture_output=True, text=True).stdout
    learning_bss = sum(int(p[1]) for p in (line.split() for line in sizes.splitlines())
                       if len(p) >= 2 and p[0].startswith((".bss", ".data")) and p[1].isdigit())
    return {"learn_steps": int(steps), "us_per_learn_step": 1e6 * float(seconds) / max(int(steps), 1),
            "learn_ram_bytes": learning_bss, "learn_extra_ram_bytes": learning_bss - plain}


def c_target(root: Path, data: Path) -> dict[str, Any]:
    """The C export of one 8-channel asset (a SKAB run when ../shared is there, else a synthetic one): flash and
    RAM as gcc lays them out, scoring time per row compiled -O2 on this CPU, and agreement with Python."""
    import numpy as np

    from edgepeft.detect.detector import AnomalyDetector
    from edgepeft.runtime.export_c import build_host, export_c, int8_reference, object_sizes, run_host

    if (data / "skab").is_dir():
        from edgepeft.data.datasets import load_skab

        run = load_skab(data / "skab")[0]
        name, train, rows = f"skab {run.name}", run.train, np.concatenate([run.train, run.test])
    else:
        from edgepeft.bench.loadtest import series

        rows = series(1200, n_channels=8)
        name, train = "synthetic, 8 channels", rows[:600]
    det = AnomalyDetector(base="tiny", method="lora", steps=150).fit(train)
    folder = det.save(root / "c-target" / "detector")
    export = export_c(folder, root / "c-target" / "c")
    sizes = object_sizes(export.folder)
    scores, alarms, seconds = run_host(build_host(export.folder), rows)
    reference = int8_reference(folder).score_all(rows)
    fp32 = det.score_all(rows)
    learn = _learning_cost(export.folder, rows)
    return {
        **learn,
        "asset": name, "channels": export.channels, "rows": len(rows),
        "flash_bytes": sizes["text"] + sizes["rodata"] + sizes["data"], "weights_bytes": export.flash_bytes,
        "ram_bytes": sizes["bss"], "header_ram_bytes": export.ram_bytes,
        "us_per_row": 1e6 * seconds / len(rows),
        "max_abs_vs_python_int8": float(np.max(np.abs(scores - reference["score"]))),
        "alarm_agreement_vs_python_int8": float(np.mean(alarms == reference["anomaly"])),
        "max_abs_vs_python_fp32": float(np.max(np.abs(scores - fp32["score"]))),
        "alarm_agreement_vs_python_fp32": float(np.mean(alarms == fp32["anomaly"])),
        "threshold": float(det.threshold_),
    }


def run_device_bench(out: Path, *, assets: int = 100, seconds: float = 5.0, rows_per_request: int = 256,
                     data: Path = Path("../shared/datasets"), quality: tuple[str, ...] = ("skab", "asd", "fleet"),
                     limit: int | None = None) -> dict[str, Any]:
    """Measure the torch runtime and the torch-free device install side by side, and the detection quality of
    the fp32, int8 and int8 quantisation-aware paths on ``quality``'s suites (``limit`` assets each); write
    results.json/.md."""
    from edgepeft.bench.loadtest import payloads, train_versions
    from edgepeft.delta import generate_key, pack_bundle, save_keypair
    from edgepeft.runtime.onnx import export_lora_graph
    from edgepeft.runtime.resident import ResidentBase

    results: dict[str, Any] = {"suite": "device", **run_info(),
                               "settings": {"assets": assets, "seconds": seconds, "rows_per_request": rows_per_request,
                                            "base": "tiny", "method": "lora", "threads": 1,
                                            "quality_suites": list(quality), "quality_limit": limit}}
    with tempfile.TemporaryDirectory(prefix="edgepeft-device-") as tmp:
        root = Path(tmp)
        adapters = train_versions(root / "adapters", 4, steps=20)
        key = generate_key()
        public = save_keypair(key, root / "keys" / "fleet")
        bundles = [(f"asset-{i:03d}", pack_bundle(adapters[i % len(adapters)], key, asset_id=f"asset-{i:03d}",
                                                  version="1", release=1)) for i in range(assets)]
        graph = export_lora_graph(ResidentBase.load("tiny"), root / "tiny.onnx")
        rows = payloads(1, rows_per_request)[0].tolist()
        common = ["--trusted-key", str(public), "--threads", "1"]
        runs = {
            "torch": (["--engine", "torch", *common], {}),
            "device": (["--engine", "onnx", "--graph", str(graph), *common], device_environment(root / "device")),
        }
        for name, (args, env) in runs.items():
            results[name] = _measure(name, root, bundles, rows, args, env, seconds)
        results["graph_bytes"] = graph.stat().st_size
        results["c_target"] = c_target(root, Path(data))
        if quality:
            results["quality"] = quantisation_quality(root, Path(data), quality, limit)
    torch_run, device = results["torch"], results["device"]
    mb = 1024 * 1024
    results["targets"] = [
        {"target": f"device install, {assets} resident assets, serving: peak RSS <= 100 MB",
         "measured": f"{device['peak_rss_bytes'] / mb:.0f} MB (torch runtime "
                     f"{torch_run['peak_rss_bytes'] / mb:.0f} MB; "
                     f"after a restart {device['restart_peak_rss_bytes'] / mb:.0f} MB vs "
                     f"{torch_run['restart_peak_rss_bytes'] / mb:.0f} MB)",
         "status": "met" if max(device["peak_rss_bytes"], device["restart_peak_rss_bytes"]) <= 100 * mb else "missed"},
        {"target": "device install: process start to first score <= 1 s",
         "measured": f"{device['start_to_first_score_s']:.2f} s, median of 3 restarts with {assets} assets warmed "
                     f"(torch runtime {torch_run['start_to_first_score_s']:.2f} s)",
         "status": "met" if device["start_to_first_score_s"] <= 1.0 else "missed"},
        {"target": "device install: install + activate p99 no worse than the torch runtime's (over HTTP)",
         "measured": f"{device['install_activate_p99_ms']:.1f} ms vs {torch_run['install_activate_p99_ms']:.1f} ms "
                     f"(p50 {device['install_activate_p50_ms']:.1f} vs {torch_run['install_activate_p50_ms']:.1f} ms)",
         "status": "met" if device["install_activate_p99_ms"] <= torch_run["install_activate_p99_ms"] else "missed"},
        {"target": "ONNX engine scoring throughput >= the torch engine's (same rows, one thread)",
         "measured": f"{device['score_rows_per_s']:,.0f} vs {torch_run['score_rows_per_s']:,.0f} rows/s "
                     f"({device['score_rows_per_s'] / torch_run['score_rows_per_s']:.2f}x; {rows_per_request}-row "
                     "requests over HTTP)",
         "status": "met" if device["score_rows_per_s"] >= torch_run["score_rows_per_s"] else "missed"},
    ]
    c = results["c_target"]
    results["targets"] += [
        {"target": f"C target, {c['channels']}-channel asset (tiny + adapter, int8): flash <= 256 KB, RAM <= 64 KB",
         "measured": f"flash {c['flash_bytes'] / 1024:.1f} KB (code, int8 weights, constants), RAM "
                     f"{c['ram_bytes'] / 1024:.1f} KB static, as gcc -O2 lays them out",
         "status": "met" if c["flash_bytes"] <= 256 * 1024 and c["ram_bytes"] <= 64 * 1024 else "missed"},
        {"target": "the microcontroller learns: BitFit step in C (channel block and head biases, SGD), RAM stated",
         "measured": f"{c['learn_steps']} steps on the same rows, {c['us_per_learn_step']:.0f} us per step; RAM "
                     f"{c['learn_ram_bytes'] / 1024:.1f} KB with learning ({c['learn_extra_ram_bytes'] / 1024:.1f} KB "
                     "more than scoring only); matches PyTorch within 1e-5 (tests/unit/runtime/test_export_c.py)",
         "status": "met" if c["learn_ram_bytes"] <= 64 * 1024 else "missed"},
        {"target": "C target agrees with Python (the int8-weight detector) within 1e-5",
         "measured": f"max |score difference| {c['max_abs_vs_python_int8']:.2e} over {c['rows']} rows of "
                     f"{c['asset']}, alarms agree on {100 * c['alarm_agreement_vs_python_int8']:.1f} %; against the "
                     f"fp32 detector {c['max_abs_vs_python_fp32']:.3f} (threshold {c['threshold']:.3f}), alarms "
                     f"agree on {100 * c['alarm_agreement_vs_python_fp32']:.1f} %; {c['us_per_row']:.0f} us per row",
         "status": "met" if c["max_abs_vs_python_int8"] <= 1e-5 else "missed"},
    ]
    for suite, numbers in results.get("quality", {}).items():
        if not isinstance(numbers, dict) or "fp32_best_f1" not in numbers:
            continue
        loss = (numbers["fp32_best_f1"] - numbers["int8_aware_best_f1"]) / numbers["fp32_best_f1"]
        results["targets"].append({
            "target": f"{suite}: int8 quantisation-aware mean best-F1 within 1 % of fp32",
            "measured": f"fp32 {numbers['fp32_best_f1']:.3f}, int8 post-training "
                        f"{numbers['int8_post_training_best_f1']:.3f}, int8 aware {numbers['int8_aware_best_f1']:.3f} "
                        f"({-100 * loss:+.2f} %; {numbers['assets']} assets)",
            "status": "met" if loss <= 0.01 else "missed"})
    path = write_results(out, results)
    (path.parent / "results.md").write_text(render(results))
    return results


def render(results: dict[str, Any]) -> str:
    """Markdown: provenance, targets, then both engines' numbers side by side."""
    lines = ["# Device footprint: the torch runtime and the torch-free device install", ""]
    lines += provenance_lines({**results, "settings": {}})
    while lines and not lines[-1]:
        lines.pop()
    settings = results["settings"]
    lines += [f"- Settings: base `{settings['base']}`, LoRA, {settings['assets']} assets (one signed bundle each), "
              f"{settings['rows_per_request']}-row requests for {settings['seconds']} s per engine, "
              f"{settings['threads']} thread; quality suites {', '.join(settings['quality_suites']) or 'none'}"
              + (f" ({settings['quality_limit']} assets each)" if settings.get("quality_limit") else ""), ""]
    lines += ["| Target | Status | Measured |", "|---|---|---|"]
    for target in results["targets"]:
        status = target["status"].upper() if target["status"] != "met" else "met"
        lines.append(f"| {target['target']} | **{status}** | {target['measured']} |")
    keys = [k for k in results["torch"] if k not in ("args", "engines", "start_to_first_score_runs_s")]
    lines += ["", "| Measure | torch runtime | device install (ONNX Runtime, no torch) |", "|---|---|---|"]
    for key in keys:
        values = [results[name][key] for name in ("torch", "device")]
        cells = [f"{v / 1024 / 1024:.1f} MB" if key.endswith("bytes") else f"{v:,.2f}" if isinstance(v, float)
                 else str(v) for v in values]
        lines.append(f"| {key} | {cells[0]} | {cells[1]} |")
    lines += ["", f"Scoring graph: {results['graph_bytes'] / 1024:.0f} KB. Engines serving: torch "
              f"{results['torch']['engines']}, device {results['device']['engines']}."]
    c = results.get("c_target")
    if c:
        lines += ["", "## C target (`edgepeft export-c`)", "", "| Measure | Value |", "|---|---|"]
        for key, value in c.items():
            lines.append(f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |")
    quality = results.get("quality")
    if quality:
        sizes = quality["graph_bytes"]
        lines += ["", "## int8: post-training and quantisation-aware", "",
                  f"Scoring graph fp32 {sizes['fp32'] / 1024:.0f} KB, int8 {sizes['int8'] / 1024:.0f} KB (dynamic "
                  "quantisation: int8 weights, activations quantised per call). One LoRA adapter per asset, tiny "
                  "base, 150 steps; every variant scored through ONNX Runtime.", "",
                  "| Suite | assets | fp32 best-F1 / VUS-PR | int8 post-training | int8 quantisation-aware | "
                  "bundle bytes (fp32 / int8 tensors) |", "|---|---|---|---|---|---|"]
        for suite, n in quality.items():
            if suite == "graph_bytes":
                continue
            if "skipped" in n:
                lines.append(f"| {suite} | skipped: {n['skipped']} | | | | |")
                continue
            cells = [f"{n[f'{v}_best_f1']:.3f} / {n[f'{v}_vus_pr']:.3f}"
                     for v in ("fp32", "int8_post_training", "int8_aware")]
            lines.append(f"| {suite} | {n['assets']} | {' | '.join(cells)} | "
                         f"{n['bundle_bytes_fp32_tensors']:,.0f} / {n['bundle_bytes_int8_tensors']:,.0f} |")
    return "\n".join(lines) + "\n"
