"""Score variants with the interp kind: python interp_variants.py runs/s5/DS-METHOD-interp.npz."""
import sys, numpy as np
from edgepeft.detect.scoring import trailing_mean
from edgepeft.detect.threshold import make_threshold
from edgepeft.detect.metrics import skab_changepoint_scores, best_f1, auc_pr, vus_pr
from edgepeft.bench.suites import VUS_MAX_BUFFER
path = sys.argv[1]; z = np.load(path); n = len([k for k in z.files if k.endswith("_labels")])
skab = "skab" in path
def score(i, variant, agg="max"):
    e = z[f"{i}_errors"].astype(np.float64); tr = z[f"{i}_trerr"].astype(np.float64); w2 = z[f"{i}_w"]
    nfit = len(tr) - int(round(len(tr) * 0.2)); ctx = min(64, nfit // 2)
    norm = np.maximum(np.maximum(tr[ctx:nfit].mean(0), tr[nfit:].mean(0)), 1e-6)  # (C,3)
    ev = e / norm
    if variant == "fb": w = np.c_[w2, np.zeros(len(w2))]
    elif variant == "fi": w = np.c_[w2[:, 0], np.zeros(len(w2)), np.full(len(w2), 0.5)]
    elif variant == "fbi": w = np.c_[w2 * 2 / 3, np.full(len(w2), 1 / 3)]
    elif variant == "i": w = np.c_[np.zeros((len(w2), 2)), np.ones(len(w2))]
    elif variant == "bi": w = np.c_[np.zeros(len(w2)), w2[:, 1], np.full(len(w2), 0.5)]
    x = (ev * w).sum(-1)
    L = np.log1p(x); s = L.max(1) if agg == "max" else np.log1p(x.mean(1))
    return trailing_mean(s, 8), len(tr), nfit
for variant in ["fb", "fi", "fbi", "i", "bi"]:
    if skab:
        from edgepeft.data.datasets import load_skab
        runs = load_skab("../shared/datasets/skab")
        TP = FP = FN = TN = 0; pairs = []
        for i in range(n):
            s, ntr, nfit = score(i, variant); y = z[f"{i}_labels"]
            thr = make_threshold("pot", 0.01).fit(s[nfit:ntr]).threshold_; p = s[ntr:] > thr
            TP += (p & (y == 1)).sum(); FP += (p & (y == 0)).sum(); FN += (~p & (y == 1)).sum(); TN += (~p & (y == 0)).sum()
            pairs.append((runs[i].changepoints, p.astype(int)))
        cp = skab_changepoint_scores(pairs)["standard"]
        print(variant, "F1 %.3f FAR %5.1f MAR %5.1f CP %.2f" % (TP / (TP + (FP + FN) / 2), 100 * FP / (FP + TN), 100 * FN / (FN + TP), cp))
    else:
        res = []
        for i in range(n):
            s, _, _ = score(i, variant); y = z[f"{i}_labels"]
            res.append((best_f1(y, s)[0], auc_pr(y, s), vus_pr(y, s, max_buffer=VUS_MAX_BUFFER)))
        r = np.array(res); print(variant, f"best-F1 {r[:,0].mean():.3f} AUC-PR {r[:,1].mean():.3f} VUS-PR {r[:,2].mean():.3f}")
