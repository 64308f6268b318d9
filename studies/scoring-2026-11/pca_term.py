"""Our score plus a linear PCA residual (Q) and/or T-squared term as extra channels in the max.
Usage: python pca_term.py CACHE.npz skab|asd|fleet [noslow]   (noslow: PCA over the non-slow channels only)."""
import sys, numpy as np
from edgepeft.bench.baselines import PCADetector
from edgepeft.data.scaler import ChannelScaler
from edgepeft.detect.scoring import channel_evidence, trailing_mean
from edgepeft.detect.threshold import make_threshold
from edgepeft.detect.metrics import skab_changepoint_scores, best_f1, auc_pr, vus_pr
from edgepeft.bench.suites import VUS_MAX_BUFFER
path, ds = sys.argv[1], sys.argv[2]
z = np.load(path); n = len([k for k in z.files if k.endswith("_labels")])
if ds == "fleet":
    from edgepeft.data.synthetic import make_pump_fleet
    runs = make_pump_fleet(20, n_train=3000, n_test=3000, seed=0)
elif ds == "asd":
    from edgepeft.data.datasets import load_asd; runs = load_asd("../shared/datasets/asd")
else:
    from edgepeft.data.datasets import load_skab; runs = load_skab("../shared/datasets/skab")
NOSLOW = len(sys.argv) > 3
def pca_terms(run, i):
    train = np.asarray(run.train, dtype=np.float64); sc = ChannelScaler().fit(train)
    keep = z[f"{i}_w"][:, 1] > 0 if NOSLOW else np.ones(train.shape[1], bool)
    st = sc.transform(train)[:, keep]; nfit = len(st) - int(round(len(st) * 0.2))
    p = PCADetector(); p._fit_model(st[:nfit])
    full = np.concatenate([train, run.test]) if ds != "asd" else np.asarray(run.test, dtype=np.float64)
    t2, q = p._t2_q(sc.transform(full)[:, keep])
    t2, q = t2 / p.t2_scale_, q / p.q_scale_
    if ds == "fleet": t2, q = t2[len(train):], q[len(train):]
    return t2, q
cache = [pca_terms(r, i) for i, r in enumerate(runs[:n])]
def score(i, variant):
    e = z[f"{i}_errors"]; ev = channel_evidence(e, z[f"{i}_cherr"], z[f"{i}_w"])
    t2, q = cache[i]
    extra = {"deep": [], "+q": [q], "+t2": [t2], "+both": [q, t2], "+sum": [0.5 * (q + t2)]}[variant]
    ev = np.c_[ev, *[x[:, None] for x in extra]] if extra else ev
    return trailing_mean(np.log1p(ev).max(1), 8)
for variant in (["+q", "+both"] if NOSLOW else ["deep", "+q", "+t2", "+both", "+sum"]):
    if ds == "skab":
        TP = FP = FN = TN = 0; pairs = []
        for i in range(n):
            s = score(i, variant); y = z[f"{i}_labels"]
            thr = make_threshold("pot", 0.01).fit(s[320:400]).threshold_; p = s[400:] > thr
            TP += (p & (y == 1)).sum(); FP += (p & (y == 0)).sum(); FN += (~p & (y == 1)).sum(); TN += (~p & (y == 0)).sum()
            pairs.append((runs[i].changepoints, p.astype(int)))
        cp = skab_changepoint_scores(pairs)["standard"]
        print(variant, "F1 %.3f FAR %5.1f MAR %5.1f CP %.2f" % (TP / (TP + (FP + FN) / 2), 100 * FP / (FP + TN), 100 * FN / (FN + TP), cp), flush=True)
    else:
        res = []
        for i in range(n):
            s = score(i, variant); y = z[f"{i}_labels"]
            res.append((best_f1(y, s)[0], auc_pr(y, s), vus_pr(y, s, max_buffer=VUS_MAX_BUFFER)))
        r = np.array(res); print(variant, f"best-F1 {r[:,0].mean():.3f} AUC-PR {r[:,1].mean():.3f} VUS-PR {r[:,2].mean():.3f}", flush=True)
