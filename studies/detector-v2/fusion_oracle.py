"""Per asset: which fusion candidate did `auto` pick, and what would each candidate (and each kind alone) have
scored? Test labels only evaluate (the "oracle" column is an upper bound, never a setting).

python studies/detector-v2/fusion_oracle.py asd|skab|fleet [n_assets]
"""
import sys

import numpy as np
import torch

from edgepeft.data.datasets import load_asd, load_skab
from edgepeft.detect.detector import FUSION_CANDIDATES, AnomalyDetector
from edgepeft.detect.metrics import best_f1
from edgepeft.detect.scoring import trailing_mean

torch.set_num_threads(1)
ds = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 99
if ds == "fleet":
    from edgepeft.data.synthetic import make_pump_fleet
    runs = [(r.train, r.test, r.labels) for r in make_pump_fleet(min(n, 20), seed=0)]
else:
    rr = load_asd("../shared/datasets/asd") if ds == "asd" else load_skab("../shared/datasets/skab")
    runs = [(r.train, r.test, r.labels) for r in rr[:n]]
names = ["dsr", "dlsr", "dr", "ds"]
rows = []
for i, (train, test, lab) in enumerate(runs):
    det = AnomalyDetector(base="tiny", method="lora", steps=150).fit(train)
    history = ds != "asd"
    series = np.concatenate([train, test]) if history else test
    keep = len(train) if history else 0
    sc = det._prepare(series)
    ev = det._evidence(sc)
    ks = det.fusion_.kind_scores(ev)
    chosen = names[[dict(c) for c in FUSION_CANDIDATES].index(det.fusion_.weights_)]
    per = {}
    for name, cand in zip(names, FUSION_CANDIDATES, strict=True):
        s = trailing_mean(np.max([cand[k] * ks[k] for k in ks], axis=0), det.smoothing)[keep:]
        per[name] = best_f1(lab, s)[0]
    for k in ks:
        per[k] = best_f1(lab, trailing_mean(ks[k], det.smoothing)[keep:])[0]
    rows.append((chosen, per))
    print(i, chosen, {k: round(v, 3) for k, v in per.items()}, flush=True)
print("mean auto", round(np.mean([p[c] for c, p in rows]), 3),
      {k: round(np.mean([p[k] for _, p in rows]), 3) for k in rows[0][1]},
      "oracle", round(np.mean([max(p[c] for c in names) for _, p in rows]), 3))
