"""Does a shorter forecast horizon sharpen the dynamics evidence? Per asset: today's patch forecast (row k of a
patch predicted k+1 rows ahead) vs a horizon-h forecast (windows every row, each row predicted h rows ahead).

python studies/detector-v2/horizon.py asd [n_assets] [h]
"""
import sys

import numpy as np
import torch

from edgepeft.data.datasets import load_asd, load_skab
from edgepeft.data.windows import gather_windows
from edgepeft.detect.detector import AnomalyDetector
from edgepeft.detect.metrics import auc_pr, best_f1
from edgepeft.detect.scoring import channel_evidence, trailing_mean

torch.set_num_threads(1)
ds = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 4
h = int(sys.argv[3]) if len(sys.argv) > 3 else 1
if ds == "fleet":
    from edgepeft.data.synthetic import make_pump_fleet
    runs = [(r.train, r.test, r.labels) for r in make_pump_fleet(n, seed=0)]
else:
    rr = load_asd("../shared/datasets/asd") if ds == "asd" else load_skab("../shared/datasets/skab")
    runs = [(r.train, r.test, r.labels) for r in rr[:n]]


@torch.no_grad()
def short_errors(det, scaled, h):
    """Row t predicted from rows < t - h + 1: the window's last patch hidden, row t at position h-1 of it."""
    enc = det.method_.encoder(det.model_)
    L, P = enc.window_len, enc.patch_len
    starts = np.arange(len(scaled)) - (L - P) - (h - 1)
    win, hid = gather_windows(scaled, starts, L, P)
    hid[:, :, -1] = True
    win[:, L - P:, :] = 0.0
    out = np.zeros((len(scaled), scaled.shape[1], 2), np.float32)
    blank = enc.hidden_channel_features()
    for s in range(0, len(win), 64):
        f, m, sd = enc.temporal_features(torch.from_numpy(win[s:s + 64]), torch.from_numpy(hid[s:s + 64]))
        out[s:s + 64, :, 0] = enc.mix(f, m, sd)[:, L - P + h - 1, :].numpy()
        out[s:s + 64, :, 1] = enc.blind_mix(f, blank)[:, L - P + h - 1, :].numpy()
    return (out - scaled[:, :, None]) ** 2


res = {"patch": [], f"h={h}": []}
for i, (train, test, lab) in enumerate(runs):
    det = AnomalyDetector(base="tiny", method="lora", steps=150, evidence="dynamics").fit(train)
    history = ds != "asd"
    series = np.concatenate([train, test]) if history else test
    keep = len(train) if history else 0
    sc = det._prepare(series)
    s = det.score_errors(sc, det._row_errors(sc))[keep:]
    res["patch"].append((best_f1(lab, s)[0], auc_pr(lab, s)))
    tr = det._prepare(train)
    e_tr = short_errors(det, tr, h)
    cherr = np.maximum(e_tr[64:].mean(0), 1e-6)
    e = short_errors(det, sc, h)
    ev = channel_evidence(e, cherr, det.evidence_weights_)
    s2 = trailing_mean(np.log1p(ev).max(1), det.smoothing)[keep:]
    res[f"h={h}"].append((best_f1(lab, s2)[0], auc_pr(lab, s2)))
    print(i, {k: np.round(np.mean(v, 0), 3).tolist() for k, v in res.items()}, flush=True)
