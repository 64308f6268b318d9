#!/usr/bin/env bash
# The issue's streaming checks through the CLI: a clean sine (4,032 rows, period 288, no noise, no anomaly) and the
# same with noise (sd 0.05), streamed with --warmup 600; and SKAB other/9.csv streamed vs scored in batch (first
# 400 rows learned). Prints flagged rows after warm-up, false alarms and hits. Run from the repository root.
set -euo pipefail
E=${EDGEPEFT:-.venv/bin/edgepeft}
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-runs/stream-checks}
SKAB=${SKAB:-../shared/datasets/skab/other/9.csv}
mkdir -p "$OUT"
$PY - "$OUT" <<'PY'
import sys
import numpy as np
t = np.arange(4032)
x = np.sin(2 * np.pi * t / 288)
noise = x + 0.05 * np.random.default_rng(0).normal(size=len(t))
for name, values in (("sine", x), ("sine_noise", noise)):
    np.savetxt(f"{sys.argv[1]}/{name}.csv", values[:, None], header="value", comments="", delimiter=",")
PY
for name in sine sine_noise; do
  $E stream "$OUT/$name.csv" --warmup 600 --out "$OUT/$name-stream.csv" > /dev/null
done
$E stream "$SKAB" --drop anomaly,changepoint --warmup 400 --out "$OUT/skab9-stream.csv" > /dev/null
$E adapt "$SKAB" --rows 400 --drop anomaly,changepoint --out "$OUT/skab9-adapter" > /dev/null
$E score "$OUT/skab9-adapter" "$SKAB" --drop anomaly,changepoint --out "$OUT/skab9-batch.csv" > /dev/null
$PY - "$OUT" "$SKAB" <<'PY'
import sys
import pandas as pd
out, skab = sys.argv[1], sys.argv[2]
for name in ("sine", "sine_noise"):
    d = pd.read_csv(f"{out}/{name}-stream.csv").iloc[600:]
    print(f"{name}: {int(d.anomaly.sum())} of {len(d)} rows flagged after warm-up ({100 * d.anomaly.mean():.2f} %), "
          f"{int((d.p_anomaly > 0.5).sum())} with p_anomaly > 0.5")
labels = pd.read_csv(skab, sep=";")["anomaly"].values[400:]
for kind in ("stream", "batch"):
    a = pd.read_csv(f"{out}/skab9-{kind}.csv")["anomaly"].values[400:]
    print(f"skab other/9 {kind}: {int(a.sum())} flagged, false alarms {int(((a == 1) & (labels == 0)).sum())} of "
          f"{int((labels == 0).sum())} normal rows, hits {int(((a == 1) & (labels == 1)).sum())} of {int(labels.sum())}")
PY
