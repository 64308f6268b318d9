"""Cross-fitted calibration of the state evidences (level, scale, relation): python analyse2.py DS METHOD."""
import os
import sys

import numpy as np

from edgepeft.detect.metrics import auc_pr, best_f1, confusion
from edgepeft.detect.scoring import trailing_mean
from edgepeft.detect.threshold import POTThreshold

ds, m = sys.argv[1], sys.argv[2]
W = int(os.environ.get("W", 16))
K = int(os.environ.get("K", 4))
EXPL = float(os.environ.get("EXPL", 0.9))


def trailing_std(x, w):
    mm = trailing_mean(x, w)
    return np.sqrt(np.maximum(trailing_mean(x * x, w) - mm * mm, 0))


def feats(a):
    return trailing_mean(a, W), np.log(trailing_std(a, W) + 0.05), trailing_mean(a, 4)


class State:
    def fit(self, a):
        lv, sc, sm = (f[W:] for f in feats(a))
        self.lv = (lv.mean(0), lv.std(0) + 1e-3)
        self.sc = (sc.mean(0), sc.std(0) + 1e-3)
        mu = sm.mean(0)
        _, s, vt = np.linalg.svd(sm - mu, full_matrices=False)
        share = np.cumsum(s ** 2) / np.sum(s ** 2)
        k = min(int(np.searchsorted(share, EXPL) + 1), max(a.shape[1] - 1, 1))
        self.q = (mu, vt[:k].T)
        return self

    def ev(self, a):
        lv, sc, sm = feats(a)
        z = sm - self.q[0]
        r = z - z @ self.q[1] @ self.q[1].T
        return {"level": ((lv - self.lv[0]) / self.lv[1]) ** 2, "scale": ((sc - self.sc[0]) / self.sc[1]) ** 2,
                "q": r ** 2}


def oof(trx):
    n = len(trx)
    edges = np.linspace(0, n, K + 1).astype(int)
    out = None
    for j in range(K):
        lo, hi = edges[j], edges[j + 1]
        rest = np.concatenate([trx[:lo], trx[hi:]])
        st = State().fit(rest)
        # score the held-out fold with its own history (rows before it, causal features)
        e = st.ev(trx[:hi])
        if out is None:
            out = {k: np.zeros((n, trx.shape[1])) for k in e}
        for k in e:
            out[k][lo:hi] = e[k][lo:hi]
    return out


d = np.load(f"runs/v2/{ds}-{m}.npz")
n = int(d["n"])
kinds_sets = {"dyn": ["dyn"], "q": ["q"], "lvl": ["level"], "dlsq": ["dyn", "level", "scale", "q"],
              "dsq": ["dyn", "scale", "q"], "dq": ["dyn", "q"], "dlq": ["dyn", "level", "q"]}
res = {k: [] for k in kinds_sets}
conf = {k: np.zeros(4) for k in kinds_sets}
for i in range(n):
    trx, x, lab, keep = d[f"{i}_trx"], d[f"{i}_x"], d[f"{i}_labels"], int(d[f"{i}_keep"])
    n_tr = len(trx)
    n_fit = n_tr - max(int(round(n_tr * 0.2)), 8)
    w, cherr = d[f"{i}_w"], d[f"{i}_cherr"]
    ce = cherr[..., None] if cherr.ndim == 1 else cherr
    ev = {"dyn": ((d[f"{i}_err"] / ce) * w).sum(-1)}
    ev_tr = {"dyn": ((d[f"{i}_trerr"] / ce) * w).sum(-1)}
    ev.update(State().fit(trx).ev(x))
    ev_tr.update(oof(trx))
    for name, kinds in kinds_sets.items():
        per, per_tr = [], []
        for k in kinds:
            ref = ev_tr[k][n_fit:] if k == "dyn" else ev_tr[k][W:]
            typ = np.maximum(ref.mean(0), 1e-6)
            lg, lg_tr = np.log1p(ev[k] / typ).max(1), np.log1p(ev_tr[k] / typ).max(1)
            ref_lg = lg_tr[n_fit:] if k == "dyn" else lg_tr[W:]
            med, q = np.median(ref_lg), np.quantile(ref_lg, 0.99)
            per.append((lg - med) / max(q - med, 1e-6))
            per_tr.append((lg_tr - med) / max(q - med, 1e-6))
        s_all = trailing_mean(np.stack(per, 1).max(1), 8)
        s_tr = trailing_mean(np.stack(per_tr, 1).max(1), 8)
        s = s_all[keep:]
        cal = s_tr[n_fit:] if os.environ.get("CAL") == "heldout" else s_tr[W + 8:]
        th = POTThreshold(0.01).fit(cal).threshold_
        c = confusion(lab, s > th)
        conf[name] += [c.tp, c.fp, c.fn, c.tn]
        res[name].append((best_f1(lab, s)[0], auc_pr(lab, s)))
for name, r in res.items():
    r = np.array(r)
    tp, fp, fn, tn = conf[name]
    print(f"{ds} {m:9s} {name:6s} bestF1 {r[:, 0].mean():.3f}  AUC-PR {r[:, 1].mean():.3f}  "
          f"pooled F1 {2 * tp / max(2 * tp + fp + fn, 1):.3f} FAR {100 * fp / max(fp + tn, 1):.1f} "
          f"MAR {100 * fn / max(fn + tp, 1):.1f}")
