"""Best SKAB settings found by searching on the test labels (an upper bound, not a result): python search.py CACHE VARIANT."""
import sys, numpy as np
sys.path.insert(0, "studies/scoring-2026-11")  # run from the repository root
from variants import score
from debounce import debounce
from edgepeft.data.datasets import load_skab
from edgepeft.detect.metrics import skab_changepoint_scores
from edgepeft.detect.threshold import make_threshold
runs = load_skab("../shared/datasets/skab")
z = np.load(sys.argv[1]); variant = sys.argv[2]
cases = []
for i in range(34):
    e = z[f"{i}_errors"]; s = score(e, z[f"{i}_cherr"], z[f"{i}_w"], e[:320], variant)
    thr = make_threshold("pot", 0.01).fit(s[320:400]).threshold_
    cases.append((s - thr, z[f"{i}_labels"], runs[i]))
best = []
for off in [-0.1, 0, 0.1, 0.2, 0.3]:
  for k_on, k_off in [(1,1),(3,3),(5,3),(8,3),(8,8),(10,5),(5,10),(10,10),(15,15)]:
    tp = fp = fn = tn = 0; pairs = []
    for s, y, run in cases:
        p = debounce(s > off, k_on, k_off)[400:]
        tp += (p & (y == 1)).sum(); fp += (p & (y == 0)).sum(); fn += (~p & (y == 1)).sum(); tn += (~p & (y == 0)).sum()
        pairs.append((run.changepoints, p.astype(int)))
    f1 = tp / (tp + (fp + fn) / 2); far = 100 * fp / (fp + tn); mar = 100 * fn / (fn + tp)
    best.append((f1, far, mar, skab_changepoint_scores(pairs)["standard"], off, k_on, k_off))
for b in sorted(best)[-8:]: print("F1 %.3f FAR %.1f MAR %.1f CP %.2f off %.1f on %d off %d" % b)
print("best CP", max(best, key=lambda b: b[3]))
