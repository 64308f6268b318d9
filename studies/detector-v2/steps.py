"""Does a longer adaptation let the adapter earn its place? Mean best-F1 of the fused score and of the dynamics kind
alone, zero-shot vs LoRA at several step counts. Test labels only evaluate.

python studies/detector-v2/steps.py asd|skab|fleet [n_assets] [steps ...]
"""
import sys

import numpy as np
import torch

from edgepeft.data.datasets import load_asd, load_skab
from edgepeft.detect.detector import AnomalyDetector
from edgepeft.detect.metrics import best_f1
from edgepeft.detect.scoring import trailing_mean

torch.set_num_threads(1)
ds = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 4
step_list = [int(v) for v in sys.argv[3:]] or [150, 600]
if ds == "fleet":
    from edgepeft.data.synthetic import make_pump_fleet
    runs = [(r.train, r.test, r.labels) for r in make_pump_fleet(n, seed=0)]
else:
    rr = load_asd("../shared/datasets/asd") if ds == "asd" else load_skab("../shared/datasets/skab")
    runs = [(r.train, r.test, r.labels) for r in rr[:n]]
settings = [("zeroshot", "bitfit", 0)] + [(f"lora-{s}", "lora", s) for s in step_list]
res = {name: [] for name, _, _ in settings}
for i, (train, test, lab) in enumerate(runs):
    for name, method, steps in settings:
        det = AnomalyDetector(base="tiny", method=method, steps=steps).fit(train)
        history = ds != "asd"
        series = np.concatenate([train, test]) if history else test
        keep = len(train) if history else 0
        sc = det._prepare(series)
        ev = det._evidence(sc)
        fused = trailing_mean(det.fusion_.raw_score(ev), det.smoothing)[keep:]
        dyn = trailing_mean(det.fusion_.kind_scores(ev)["dynamics"], det.smoothing)[keep:]
        res[name].append((best_f1(lab, fused)[0], best_f1(lab, dyn)[0], det.adapt_seconds_))
    print(i, {k: np.round(np.mean(v, 0), 3).tolist() for k, v in res.items()}, flush=True)
