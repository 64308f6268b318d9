"""Cache, per asset, what every candidate evidence needs: the detector's forecast/blind errors, the adapted
and zero-shot cross-channel tokens per scoring window, the scaled series and the labels.

python studies/detector-v2/collect.py fleet|skab|asd|demo METHOD [STEPS]   -> runs/v2/<ds>-<method>.npz
"""
import sys
import time
from pathlib import Path

import numpy as np
import torch

from edgepeft.data.datasets import load_asd, load_skab
from edgepeft.data.windows import scoring_windows
from edgepeft.detect.detector import AnomalyDetector

torch.set_num_threads(1)
ds, method = sys.argv[1], sys.argv[2]
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 150


@torch.no_grad()
def tokens(det, scaled):
    enc = det.method_.encoder(det.model_)
    windows, hidden = scoring_windows(scaled, enc.window_len, enc.patch_len)
    out = []
    for s in range(0, len(windows), 256):
        f, m, sd = enc.temporal_features(torch.from_numpy(windows[s:s + 256]), torch.from_numpy(hidden[s:s + 256]))
        t = enc.mix_tokens(f)  # (b, C, N+1, D)
        out.append(torch.cat([t[:, :, 0], t[:, :, -1]], dim=-1).numpy())
    return np.concatenate(out)  # (K, C, 2D)


if ds in ("fleet", "demo"):
    from edgepeft.data.synthetic import make_pump_fleet
    runs = make_pump_fleet(20 if ds == "fleet" else 6, n_train=3000, n_test=3000, seed=0)
    items = [(f"pump-{i}", r.train, r.test, r.labels) for i, r in enumerate(runs)]
    history = True
else:
    runs = load_skab("../shared/datasets/skab") if ds == "skab" else load_asd("../shared/datasets/asd")
    items = [(r.name, r.train, r.test, r.labels) for r in runs]
    history = ds == "skab"
out = {}
t0 = time.time()
for i, (name, train, test, labels) in enumerate(items):
    det = AnomalyDetector(base="tiny", method=method if method != "zeroshot" else "bitfit",
                          steps=0 if method == "zeroshot" else steps, seed=0).fit(train)
    series = np.concatenate([train, test]) if history else test
    keep = len(train) if history else 0
    sc_train = det._prepare(train)
    sc = det._prepare(series)
    out[f"{i}_err"] = det._row_errors(sc)
    out[f"{i}_trerr"] = det._row_errors(sc_train)
    out[f"{i}_tok"] = tokens(det, sc)
    out[f"{i}_trtok"] = tokens(det, sc_train)
    out[f"{i}_x"] = sc
    out[f"{i}_trx"] = sc_train
    out[f"{i}_keep"] = np.array(keep)
    out[f"{i}_labels"] = labels
    out[f"{i}_w"] = det.evidence_weights_
    out[f"{i}_cherr"] = det.channel_error_
    out[f"{i}_base_score"] = det.score(series)[keep:]
    print(i, name, round(time.time() - t0, 1), flush=True)
Path("runs/v2").mkdir(parents=True, exist_ok=True)
np.savez(f"runs/v2/{ds}-{method}.npz", n=np.array(len(items)), **out)
