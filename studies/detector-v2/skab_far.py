"""SKAB at the deployed threshold (pooled F1 / FAR / MAR) for each fusion candidate, refitted and recalibrated on the
training rows exactly as `calibrate` does. Test labels only evaluate.

python studies/detector-v2/skab_far.py
"""
import numpy as np
import torch

from edgepeft.data.datasets import load_skab
from edgepeft.detect.detector import DYNAMICS, FUSION_CANDIDATES, AnomalyDetector
from edgepeft.detect.metrics import confusion, f1_far_mar

torch.set_num_threads(1)
runs = load_skab("../shared/datasets/skab")
names = ["auto", "dsr", "dlsr", "dr", "ds"]
totals = {k: confusion([0], [0]) for k in names}
for i, run in enumerate(runs):
    det = AnomalyDetector(base="tiny", method="lora", steps=150).fit(run.train)
    series = np.concatenate([run.train, run.test])
    sc_tr, sc = det._prepare(run.train), det._prepare(series)
    n_tr = len(run.train)
    n_fit = n_tr - max(int(round(n_tr * det.calib_fraction)), 8)
    errors_tr = det._row_errors(sc_tr)
    errors = det._row_errors(sc)
    skip = min(64, n_fit // 2)
    reference = det._reference_evidence(sc_tr, errors_tr)
    fit_rows = {k: (v[n_fit:] if k == DYNAMICS else v[skip:]) for k, v in reference.items()}
    auto_weights = dict(det.fusion_.weights_)
    for name, weights in zip(names, [auto_weights, *FUSION_CANDIDATES], strict=True):
        det.fusion_.fit(fit_rows, dict(weights))
        det._calibrate_threshold(sc_tr, errors_tr, n_fit, reference)
        pred = det._alarms(det.score_errors(sc, errors))[n_tr:]
        totals[name] = totals[name] + confusion(run.labels, pred)
    print(i, run.name, flush=True)
for name, c in totals.items():
    f1, far, mar = f1_far_mar(c)
    print(f"{name:5s} F1 {f1:.3f} FAR {far:.1f} MAR {mar:.1f}")
