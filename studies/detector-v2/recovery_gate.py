"""A recovery gate on the level and scale evidence: keep the 16-row trailing evidence only while the last 4 rows
are still outside their own normal envelope, so an alarm clears once the sensor is back inside its range instead
of when the fault has left the trailing window. Test labels only evaluate.

python studies/detector-v2/recovery_gate.py {demo|fleet|skab|asd} {off|gate}

Prints the suite's mean best-F1 (and VUS-PR, point-wise F1 / FAR at the deployed threshold where the suite has them).
"""
import sys

import numpy as np
import pandas as pd
import torch

from edgepeft.detect import evidence as ev
from edgepeft.detect.detector import AnomalyDetector
from edgepeft.detect.metrics import best_f1, confusion, f1_far_mar, vus_pr
from edgepeft.detect.scoring import trailing_mean

SHORT = 4
suite, mode = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)


def _short(values):
    values = np.asarray(values, dtype=np.float64)
    return trailing_mean(values, SHORT), np.log(ev.trailing_std(values, SHORT) + ev.SCALE_FLOOR)


_fit, _evidence = ev.StateModel.fit, ev.StateModel.evidence


def fit(self, values):
    _fit(self, values)
    level, scale = _short(values)
    skip = min(self.state_window, len(level) // 2)
    self.short_level_ = np.quantile(level[skip:], ev.ENVELOPE, axis=0)
    self.short_scale_ = np.quantile(scale[skip:], ev.ENVELOPE, axis=0)
    return self


def evidence(self, values):
    out = _evidence(self, values)
    level, scale = _short(values)
    out["level"] = np.where(ev._outside(level, *self.short_level_) > 0, out["level"], 0.0)
    out["scale"] = np.where(ev._outside(scale, *self.short_scale_) > 0, out["scale"], 0.0)
    return out


if mode == "gate":
    ev.StateModel.fit, ev.StateModel.evidence = fit, evidence


def assets():
    if suite in ("demo", "fleet"):
        from edgepeft.data.synthetic import make_pump_fleet
        for p in make_pump_fleet(6 if suite == "demo" else 20):
            yield pd.DataFrame(p.train, columns=p.channels), p.test, p.labels, True
    elif suite == "skab":
        from edgepeft.data.datasets import load_skab
        for r in load_skab("../shared/datasets/skab"):
            yield r.train, r.test, r.labels, True
    else:
        from edgepeft.data.datasets import load_asd
        for r in load_asd("../shared/datasets/asd"):
            yield r.train, r.test, r.labels, False


bf, vs, f1s, fars, pooled = [], [], [], [], confusion([0], [0])
for train, test, labels, history in assets():
    det = AnomalyDetector(base="tiny", method="lora", steps=150).fit(train)
    train = np.asarray(train)
    out = det.score_all(np.concatenate([train, test]) if history else test)
    keep = len(train) if history else 0
    score, alarm = out["score"][keep:], out["anomaly"][keep:]
    c = confusion(labels, alarm)
    pooled = pooled + c
    f1, far, _ = f1_far_mar(c)
    bf.append(best_f1(labels, score)[0]), vs.append(vus_pr(labels, score)), f1s.append(f1), fars.append(far)
pooled_f1, pooled_far, pooled_mar = f1_far_mar(pooled)
print(f"{suite} {mode}: best-F1 {np.mean(bf):.3f} VUS-PR {np.mean(vs):.3f} F1 {np.mean(f1s):.3f} "
      f"FAR {np.mean(fars):.2f} % | pooled F1 / FAR / MAR {pooled_f1:.3f} / {pooled_far:.1f} / {pooled_mar:.1f}")
