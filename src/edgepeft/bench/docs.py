"""The report writer: Markdown and plots from ``results.json``, and ``docs/BENCHMARKS.md`` regenerated from the
committed result folders (never edited by hand; STYLE habit 8).

Everything here reads only the results dictionary, so a committed ``results.json`` renders the same tables today
and after the code that produced it has changed.

Example:
    >>> results = {"suite": "fleet", "summary": {}, "contenders": [], "targets": [], "assets": {}, "costs": {}}
    >>> render_results(results).splitlines()[0]
    '# Simulated pump fleet'
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgepeft.bench.harness import RESULTS_FILE, SELF_RENDERED, read_results
from edgepeft.core.config import atomic_write_bytes
from edgepeft.core.errors import ArtifactError, OutputError

SUITE_ORDER = ("skab", "asd", "fleet")
SUITE_TITLES = {
    "skab": "SKAB (water-pump testbed, published leaderboard protocol)",
    "asd": "ASD (12 application servers)",
    "fleet": "Simulated pump fleet",
}
REGENERATE_COMMAND = "edgepeft bench docs"
BENCHMARKS_FILE = "BENCHMARKS.md"
STATUS_TEXT = {"met": "**MET**", "missed": "**MISSED**", "not evaluated": "not evaluated"}
MB = 1024 * 1024


# ---------------------------------------------------------------------------------------------- formatting


def _num(value: Any, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _mb(value: Any) -> str:
    return "—" if value is None else f"{value / MB:.1f}"


def _rss_mb(measured: dict[str, Any] | None, key: str = "increase_bytes") -> str:
    if isinstance(measured, dict) and "error" in measured:
        return "failed"
    return _mb(_get(measured, key))


def _get(d: dict[str, Any] | None, *keys: str) -> Any:
    for key in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Lines of a Markdown table (and a blank line after it); every suite's report uses it."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def _cost_cells(cost: dict[str, Any] | None, rss_measured: bool = True) -> list[str]:
    cost = cost or {}
    no_rss = "—" if rss_measured else "not measured"
    trainable = cost.get("trainable_parameters")
    share = cost.get("trainable_share")
    params = "—" if trainable is None else f"{trainable:,} ({100 * share:.2f} %)"
    adapter = cost.get("adapter_bytes")
    latency = cost.get("latency") or {}
    fit = "—"
    if cost.get("fit_seconds_mean") is not None:
        fit = f"{cost['fit_seconds_mean']:.1f} ({cost['fit_seconds_max']:.1f})"
    return [
        params,
        "—" if adapter is None else f"{adapter / 1024:.1f}",
        fit,
        _mb(_get(cost, "train_tensor_bytes", "training_bytes")),
        _rss_mb(cost.get("train_rss")) if rss_measured else no_rss,
        _rss_mb(cost.get("infer_rss")) if rss_measured else no_rss,
        "—" if cost.get("throughput_values_per_s") is None else f"{cost['throughput_values_per_s']:,.0f}",
        "—" if not latency else f"{latency['p50_ms']:.2f} / {latency['p99_ms']:.2f}",
    ]


COST_HEADER = ["Trainable (share of base)", "Adapter KB", "Fit s/asset mean (max)", "Train tensor MB",
               "Train RSS MB", "Infer RSS MB", "Throughput values/s", "Window latency p50 / p99 ms"]


# ---------------------------------------------------------------------------------------------- one suite


def render_results(results: dict[str, Any], *, level: int = 1, image_prefix: str = "") -> str:
    """Markdown for one suite's results: provenance, protocol, targets, quality with costs, details, plots."""
    h = "#" * level
    suite = results["suite"]
    lines = [f"{h} {_heading(results)}", ""]
    lines += provenance_lines(results)
    if results.get("protocol"):
        lines += [f"{h}# Protocol", ""] + [f"- {p}" for p in results["protocol"]] + [""]
    lines += [f"{h}# Targets (issues \"Real-data benchmarks\" and \"Detector v2\")", ""]
    lines += _targets(results.get("targets", []))
    lines += [f"{h}# Quality and costs", ""]
    lines += _quality_table(results)
    if suite == "skab" and results.get("published"):
        lines += _published(results, h)
    lines += _explanations(results, h)
    lines += _memory_table(results, h)
    lines += _per_asset(results, h)
    if results.get("plots"):
        lines += [f"{h}# Plots", ""]
        lines += [f"![{Path(p).stem}]({image_prefix}{p})" for p in results["plots"]] + [""]
    return "\n".join(lines).rstrip() + "\n"


def _explanations(results: dict[str, Any], h: str) -> list[str]:
    """HitRate@1/@3 of the alert explanations on faults that name their channel (the fleet's sensor faults)."""
    hits = results.get("explanations") or {}
    if not hits:
        return []
    lines = [f"{h}# Alert explanations", "",
             "Sensor faults (drift, stuck) name the channel they corrupt: the share of their rows whose channel is "
             "the row's strongest in the explanation (HitRate@1) or among its three strongest (HitRate@3).", ""]
    table = [[f"`{name}`", str(v["rows"]), _num(v["hit_rate_1"]), _num(v["hit_rate_3"]), str(v["flagged_rows"]),
              _num(v["flagged_hit_rate_1"]), _num(v["flagged_hit_rate_3"])] for name, v in hits.items()]
    return lines + markdown_table(["Contender", "Fault rows", "HitRate@1", "HitRate@3", "Flagged fault rows",
                                   "HitRate@1 (flagged)", "HitRate@3 (flagged)"], table)


def provenance_lines(results: dict[str, Any]) -> list[str]:
    """Machine, load, date, commit, command and settings of a result, as Markdown bullets (every suite's report)."""
    machine = results.get("machine") or {}
    settings = results.get("settings") or {}
    card = results.get("base_card") or {}
    lines = []
    if machine:
        ram = machine.get("ram_bytes")
        memory = f", {ram / 2**30:.1f} GiB RAM" if ram else ""
        lines.append(
            f"- Machine: {machine.get('cpu_model')}, {machine.get('cores_usable')} usable cores "
            f"({machine.get('cores_logical')} logical){memory}; Python {machine.get('python')}, "
            f"torch {machine.get('torch')} (torch threads: {machine.get('torch_threads')}), peft {machine.get('peft')}"
        )
        load, cores = machine.get("load_average"), machine.get("cores_usable") or 1
        if load:
            busy = " — **the machine was busy with other work: timings are pessimistic**" if load[2] > cores else ""
            lines.append(f"- Load average at the end of the run (1 / 5 / 15 min): "
                         f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on {cores} cores{busy}")
    if results.get("date"):
        moved = (f" (HEAD had moved to `{results['commit_at_end'][:12]}` by the end; the numbers come from the "
                 "code imported at the start)") if results.get("commit_at_end") else ""
        lines.append(f"- Date: {results['date']}; commit `{results.get('commit')}`{moved}")
    if results.get("command"):
        lines.append(f"- Command: `{results['command']}` (in `{results.get('cwd')}`)")
    if settings:
        base = f"base `{settings.get('base')}`"
        if card:
            base += f" ({card.get('parameters'):,} parameters, pretrained {card.get('steps')} steps, sha256 " \
                    f"`{str(card.get('sha256'))[:12]}…`)"
        lines.append(f"- Settings: {base}, {settings.get('steps')} adaptation steps, seed {settings.get('seed')}, "
                     f"{settings.get('n_assets')} assets" + (" — **subset run**" if settings.get("subset") else ""))
    return lines + [""] if lines else []


def _targets(targets: list[dict[str, Any]]) -> list[str]:
    if not targets:
        return ["No target of the issue applies to this run.", ""]
    rows = []
    for t in targets:
        status = STATUS_TEXT.get(t["status"], t["status"])
        if t.get("indicative") and t["status"] != "not evaluated":
            status += " (indicative: not the full benchmark)"
        rows.append([t["target"], status, t.get("measured") or "—", t.get("detail") or ""])
    return markdown_table(["Target", "Status", "Measured", "Notes"], rows)


def _quality_table(results: dict[str, Any]) -> list[str]:
    suite = results["suite"]
    summary, costs = results.get("summary", {}), results.get("costs", {})
    roles = {c["name"]: c["role"] for c in results.get("contenders", [])}
    rows = []
    for name, s in summary.items():
        if suite == "skab":
            cp = s.get("changepoint") or {}
            quality = [_num(s["f1"]), _num(s["far"], 1), _num(s["mar"], 1), _num(cp.get("standard"), 2),
                       _num(cp.get("low_fp"), 2), _num(cp.get("low_fn"), 2)]
        else:
            quality = [_num(s.get(k)) for k in ("best_f1", "f1")] + [_num(s.get("far"), 1), _num(s.get("mar"), 1)] \
                + [_num(s.get(k)) for k in ("auc_pr", "vus_pr", "pa_best_f1")]
        rss_measured = (results.get("settings") or {}).get("rss", True)
        rows.append([f"`{name}`", roles.get(name, ""), *quality, *_cost_cells(costs.get(name), rss_measured)])
    if suite == "skab":
        header = ["Contender", "Role", "F1", "FAR %", "MAR %", "CP standard", "CP low-FP", "CP low-FN"]
    else:
        header = ["Contender", "Role", "Best-F1 (no PA)", "F1 @ our threshold", "FAR %", "MAR %", "AUC-PR", "VUS-PR",
                  "PA best-F1 (inflated, secondary)"]
    notes = [
        "Role: `peft` = a PEFT method on the frozen base; `reference` = full fine-tuning; `baseline` = classical "
        "detectors, the zero-shot base and training from scratch. Costs were measured on the first asset "
        "(`measured_on` in results.json); fit time and throughput over all assets. Tensor MB: activations saved for "
        "backward + gradients + optimizer state of one training step. RSS MB: peak RSS increase of a fresh "
        "process over its RSS after imports and model load. — = does not apply; not measured = run with --no-rss.",
        "",
    ]
    return markdown_table(header + COST_HEADER, rows) + notes


def _published(results: dict[str, Any], h: str) -> list[str]:
    published = results["published"]
    summary = results.get("summary", {})
    rows = [[f"`{name}` (this run)", _num(s["f1"], 2), _num(s["far"], 2), _num(s["mar"], 2)]
            for name, s in summary.items()]
    rows += [[p["algorithm"], f"{p['f1']:.2f}", f"{p['far']:.2f}", f"{p['mar']:.2f}"] for p in published["outlier"]]
    lines = [f"{h}# Beside the published SKAB table", "", f"Published: {published['source']}.", ""]
    lines += markdown_table(["Algorithm", "F1", "FAR %", "MAR %"], rows)
    cp_rows = [[f"`{name}` (this run)", *(_num(_get(s, "changepoint", k), 2) for k in ("standard", "low_fp", "low_fn"))]
               for name, s in summary.items()]
    cp_rows += [[p["algorithm"], f"{p['standard']:.2f}", f"{p['low_fp']:.2f}", f"{p['low_fn']:.2f}"]
                for p in published["changepoint"]]
    return lines + markdown_table(["Algorithm (changepoint)", "NAB standard", "low-FP", "low-FN"], cp_rows)


def _memory_table(results: dict[str, Any], h: str) -> list[str]:
    rows = []
    for name, cost in results.get("costs", {}).items():
        tensors = cost.get("train_tensor_bytes") or {}
        train_rss, infer_rss = cost.get("train_rss") or {}, cost.get("infer_rss") or {}
        if not tensors and not train_rss and not infer_rss:
            continue
        rows.append([
            f"`{name}`", _mb(tensors.get("activation_bytes")), _mb(tensors.get("grad_bytes")),
            _mb(tensors.get("optimizer_bytes")), _mb(tensors.get("training_bytes")),
            _mb(tensors.get("parameter_bytes")),
            _rss_mb(train_rss), _rss_mb(train_rss, "rss_after_load_bytes"),
            _rss_mb(infer_rss), _rss_mb(infer_rss, "rss_after_load_bytes"),
            _reset_cell(train_rss, infer_rss),
        ])
    if not rows:
        return []
    header = ["Contender", "Activations MB", "Grads MB", "Optimizer MB", "Training tensors MB", "Weights MB",
              "Train RSS increase MB", "RSS after load MB", "Infer RSS increase MB", "RSS after load MB",
              "Peak counter reset"]
    return [f"{h}# Memory, measured", ""] + markdown_table(header, rows) + [
        "Tensor bytes come from one real training step (saved-tensor hooks, unique storages; weights excluded since "
        "they are resident anyway). RSS comes from fresh `spawn` subprocesses: peak RSS (VmHWM, the high-water mark "
        "`ru_maxrss` reports, read after resetting it through /proc/self/clear_refs, since `ru_maxrss` itself "
        "cannot be reset and a spawned child inherits its parent's) minus the RSS after imports and model load. "
        "Inference scores the asset's test rows. Peak counter reset = no: the increase is an upper bound.", ""]


def _reset_cell(*measured: dict[str, Any]) -> str:
    flags = [m["peak_reset"] for m in measured if "peak_reset" in m]
    if not flags:
        return "failed" if any("error" in m for m in measured) else "—"
    return "yes" if all(flags) else "no"


def _per_asset(results: dict[str, Any], h: str) -> list[str]:
    assets = results.get("assets", {})
    if not assets:
        return []
    names = list(assets)
    order = [r["asset"] for r in assets[names[0]]]
    by_name = {n: {r["asset"]: r for r in rows} for n, rows in assets.items()}
    lines = [f"{h}# Per asset", ""]
    if results["suite"] == "skab":
        metrics = [("f1", "F1 at our threshold"), ("far", "FAR %"), ("mar", "MAR %")]
    else:
        metrics = [("best_f1", "best-F1 (no PA)"), ("vus_pr", "VUS-PR"), ("f1", "F1 at our threshold")]
    for key, label in metrics:
        rows = [[a, *(_num(by_name[n].get(a, {}).get(key), 1 if key in ("far", "mar") else 3) for n in names)]
                for a in order]
        lines += [f"{label}:", ""] + markdown_table(["Asset", *(f"`{n}`" for n in names)], rows)
    return lines


# ---------------------------------------------------------------------------------------------- plots


def write_plots(results: dict[str, Any], out: str | Path) -> list[str]:
    """PNG plots next to results.json (F1 vs trainable share, memory, time and speed); returns file names."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a benchmark box
    import matplotlib.pyplot as plt

    out = Path(out)
    files = []
    for name, draw in (("quality_vs_share.png", _plot_quality), ("memory.png", _plot_memory),
                       ("time_and_speed.png", _plot_speed)):
        fig = draw(results, plt)
        if fig is None:
            continue
        try:
            fig.savefig(out / name, dpi=110, bbox_inches="tight")
        except OSError as exc:
            raise OutputError(f"cannot write {out / name} ({exc.strerror or exc})") from exc
        finally:
            plt.close(fig)
        files.append(name)
    return files


def _quality_key(results: dict[str, Any]) -> tuple[str, str]:
    return ("f1", "SKAB F1 (summed counts)") if results["suite"] == "skab" else ("best_f1", "mean best-F1 (no PA)")


def _plot_quality(results: dict[str, Any], plt: Any) -> Any:
    key, label = _quality_key(results)
    summary, costs = results.get("summary", {}), results.get("costs", {})
    points = [(n, 100 * costs[n]["trainable_share"], summary[n][key]) for n in summary
              if (costs.get(n) or {}).get("trainable_share") and summary[n].get(key) is not None]
    lines = [(n, summary[n][key]) for n in summary
             if not (costs.get(n) or {}).get("trainable_share") and summary[n].get(key) is not None]
    if not points and not lines:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, share, value in points:
        ax.scatter(share, value, color="C0")
        ax.annotate(name, (share, value), textcoords="offset points", xytext=(4, 4), fontsize=8)
    for index, (name, value) in enumerate(lines):
        ax.axhline(value, color=f"C{index + 1}", linestyle="--", linewidth=1, label=f"{name} (no trainable share)")
    if points:
        ax.set_xscale("log")
    ax.set_xlabel("trainable parameters, % of base (log)")
    ax.set_ylabel(label)
    ax.set_title(f"{results['suite']}: quality vs trainable share")
    if lines:
        ax.legend(fontsize=7, loc="best")
    return fig


def _plot_memory(results: dict[str, Any], plt: Any) -> Any:
    costs = results.get("costs", {})
    series = {
        "train tensors": {n: _get(c, "train_tensor_bytes", "training_bytes") for n, c in costs.items()},
        "train RSS increase": {n: _get(c, "train_rss", "increase_bytes") for n, c in costs.items()},
        "infer RSS increase": {n: _get(c, "infer_rss", "increase_bytes") for n, c in costs.items()},
    }
    names = [n for n in costs if any(s[n] is not None for s in series.values())]
    if not names:
        return None
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(names) + 2), 4.2))
    width = 0.8 / len(series)
    for k, (label, values) in enumerate(series.items()):
        xs = [i + (k - 1) * width for i in range(len(names))]
        ax.bar(xs, [(values[n] or 0) / MB for n in names], width, label=label)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("MB")
    ax.set_title(f"{results['suite']}: peak memory, measured (first asset)")
    ax.legend(fontsize=8)
    return fig


def _plot_speed(results: dict[str, Any], plt: Any) -> Any:
    costs = results.get("costs", {})
    names = [n for n, c in costs.items() if c.get("fit_seconds_mean") is not None]
    if not names:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(8.0, 1.2 * len(names) + 3), 4.0))
    left.bar(names, [costs[n]["fit_seconds_mean"] for n in names], color="C2")
    left.set_ylabel("fit seconds per asset (mean)")
    right.bar(names, [costs[n]["throughput_values_per_s"] for n in names], color="C4")
    right.set_yscale("log")
    right.set_ylabel("scoring throughput, rows x channels / s")
    for ax in (left, right):
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(f"{results['suite']}: adaptation time and scoring speed")
    return fig


# ---------------------------------------------------------------------------------------------- BENCHMARKS.md




def render_benchmarks(results_dirs: Sequence[str | os.PathLike[str]], *, relative_to: str | Path | None = None) -> str:
    """docs/BENCHMARKS.md from result folders (each holding results.json); image links relative to ``relative_to``.

    >>> render_benchmarks([]).splitlines()[0].startswith("<!-- Generated by `edgepeft bench docs`")
    True
    """
    loaded = [(Path(d), read_results(Path(d) / RESULTS_FILE)) for d in results_dirs]
    loaded.sort(key=lambda item: (_suite_rank(item[1]["suite"]), str(item[0])))
    lines = [
        f"<!-- Generated by `{REGENERATE_COMMAND}` from docs/results/<suite>/results.json. Do not edit by hand: "
        f"rerun `edgepeft bench <suite> --out docs/results/<suite>`, then `{REGENERATE_COMMAND}`. -->",
        "",
        "# Benchmarks",
        "",
        f"Every number here was produced by `edgepeft bench <suite>` and this page by `{REGENERATE_COMMAND}`; "
        "each section names its machine, date, commit and exact command. Targets missed are marked **MISSED**.",
        "",
    ]
    if not loaded:
        lines += ["No results yet: run `edgepeft bench skab --out docs/results/skab` (and asd, fleet).", ""]
    else:
        for folder, results in loaded:
            title = _section_title(folder, results)
            lines.append(f"- [{title}](#{_anchor(title)}) — `{_shown(folder, relative_to)}`")
        lines.append("")
    for folder, results in loaded:
        prefix = _shown(folder, relative_to) + "/" if relative_to is not None else ""
        own = folder / "results.md"
        if results["suite"] in SELF_RENDERED and own.exists():
            # The streaming suites write their own Markdown (edgepeft bench stream|drift); shown as is,
            # one heading level down.
            lines += [("#" + line) if line.startswith("#") else line for line in own.read_text().splitlines()]
            lines.append("")
        else:
            lines.append(render_results(results, level=2, image_prefix=prefix))
    return "\n".join(lines).rstrip() + "\n"


def _shown(folder: Path, relative_to: str | Path | None) -> str:
    return Path(os.path.relpath(folder, relative_to)).as_posix() if relative_to is not None else str(folder)


def _suite_rank(suite: str) -> int:
    return SUITE_ORDER.index(suite) if suite in SUITE_ORDER else len(SUITE_ORDER)


def _heading(results: dict[str, Any]) -> str:
    """A suite's section title, with the base when it has one (SKAB runs on two bases sit side by side)."""
    suite = results["suite"]
    base = (results.get("settings") or {}).get("base")
    title = SUITE_TITLES.get(suite, suite)
    return f"{title}, base {base}" if base and suite in SUITE_TITLES else title


def _section_title(folder: Path, results: dict[str, Any]) -> str:
    """The heading a result's section gets on the page (a self-rendered suite brings its own)."""
    own = folder / "results.md"
    if results["suite"] in SELF_RENDERED and own.exists():
        first = own.read_text().splitlines()[:1]
        if first and first[0].startswith("#"):
            return first[0].lstrip("#").strip()
    return _heading(results)


def _anchor(title: str) -> str:
    """GitHub's anchor of a heading: lower case, spaces to dashes, other punctuation dropped.

    >>> _anchor("SKAB (water-pump testbed), base tiny")
    'skab-water-pump-testbed-base-tiny'
    """
    return "".join(ch for ch in title.lower().replace(" ", "-") if ch.isalnum() or ch in "-_")


def regenerate_benchmarks(docs_dir: str | Path = "docs") -> Path:
    """Rewrite ``DOCS/BENCHMARKS.md`` from every ``DOCS/results/<suite>/results.json``."""
    docs_dir = Path(docs_dir)
    dirs = sorted(p.parent for p in (docs_dir / "results").glob(f"*/{RESULTS_FILE}"))
    if not dirs:
        raise ArtifactError(f"no {docs_dir}/results/<suite>/{RESULTS_FILE} found; run e.g. "
                            f"`edgepeft bench skab --out {docs_dir}/results/skab` first")
    path = docs_dir / BENCHMARKS_FILE
    try:
        atomic_write_bytes(path, render_benchmarks(dirs, relative_to=docs_dir).encode())
    except OSError as exc:
        raise OutputError(f"cannot write {path} ({exc.strerror or exc})") from exc
    return path
