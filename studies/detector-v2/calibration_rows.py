"""Which training rows should calibrate the threshold? Every row with a window of history (the state kinds
cross-fitted, the dynamics in-sample on the fitted rows) vs the held-out rows only (every kind out-of-sample).
Pooled F1 / FAR / MAR at the deployed threshold; test labels only evaluate.

python studies/detector-v2/calibration_rows.py fleet|skab [n_assets]
"""
import sys

import numpy as np
import torch

from edgepeft.data.datasets import load_skab
from edgepeft.detect.detector import AnomalyDetector
from edgepeft.detect.metrics import confusion, f1_far_mar
from edgepeft.detect.scoring import trailing_mean
from edgepeft.detect.threshold import make_threshold

torch.set_num_threads(1)
ds = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 99
if ds == "fleet":
    from edgepeft.data.synthetic import make_pump_fleet
    runs = [(r.train, r.test, r.labels) for r in make_pump_fleet(min(n, 20), seed=0)]
else:
    runs = [(r.train, r.test, r.labels) for r in load_skab("../shared/datasets/skab")[:n]]
totals = {"all rows": confusion([0], [0]), "held-out rows": confusion([0], [0])}
for i, (train, test, lab) in enumerate(runs):
    det = AnomalyDetector(base="tiny", method="lora", steps=150).fit(train)
    sc_tr = det._prepare(train)
    n_tr = len(train)
    n_fit = n_tr - max(int(round(n_tr * det.calib_fraction)), 8)
    errors_tr = det._row_errors(sc_tr)
    calib = trailing_mean(det.fusion_.raw_score(det._reference_evidence(sc_tr, errors_tr)), det.smoothing)
    score = det.score(np.concatenate([train, test]))[n_tr:]
    for name, rows in (("all rows", calib[min(64, n_fit // 2):]), ("held-out rows", calib[n_fit:])):
        th = make_threshold(det.threshold, det.target_far).fit(rows).threshold_
        totals[name] = totals[name] + confusion(lab, score > th)
    print(i, flush=True)
for name, c in totals.items():
    f1, far, mar = f1_far_mar(c)
    print(f"{ds} {name:14s} F1 {f1:.3f} FAR {far:.1f} MAR {mar:.1f}")
