"""Candidate evidences and fusions on cached runs (collect.py). Test labels only EVALUATE here.

python studies/detector-v2/analyse.py fleet [lora zeroshot]
"""
import sys

import os

import numpy as np

from edgepeft.detect.metrics import auc_pr, best_f1
from edgepeft.detect.metrics import confusion, f1_far_mar
from edgepeft.detect.scoring import slow_share, trailing_mean
from edgepeft.detect.threshold import POTThreshold

ds = sys.argv[1]
methods = sys.argv[2:] or ["lora", "zeroshot"]
W = 16
CALIB = 0.2


def trailing_std(x, w):
    m = trailing_mean(x, w)
    m2 = trailing_mean(x * x, w)
    return np.sqrt(np.maximum(m2 - m * m, 0))


def row_tokens(tok, n, P=8):
    return np.repeat(tok, P, axis=0)[:n]


def evidences(d, i):
    trx, x = d[f"{i}_trx"], d[f"{i}_x"]
    n_tr = len(trx)
    n_cal = max(int(round(n_tr * CALIB)), 8)
    n_fit = n_tr - n_cal
    fit = trx[:n_fit]
    ev = {}
    slow = slow_share(fit, 64) > 0.3
    fast = ~slow if (~slow).any() else slow
    all_ch = np.ones_like(slow)
    lvl_ch = fast if os.environ.get("SLOW_LEVEL") == "1" else all_ch
    q_ch = fast if os.environ.get("SLOW_Q") == "1" else all_ch
    # dynamics: forecast + blind, as today
    w, cherr = d[f"{i}_w"], d[f"{i}_cherr"]
    ev["dyn"] = ((d[f"{i}_err"] / cherr[..., None] if cherr.ndim == 1 else d[f"{i}_err"] / cherr) * w).sum(-1)
    ev_tr = {"dyn": ((d[f"{i}_trerr"] / (cherr[..., None] if cherr.ndim == 1 else cherr)) * w).sum(-1)}
    # level / scale over the trailing W rows
    for name, f in (("level", lambda a: trailing_mean(a, W)),
                    ("scale", lambda a: np.log(trailing_std(a, W) + 0.05))):
        ff = f(fit)[W:]
        mu, sd = ff.mean(0), ff.std(0) + 1e-3
        ev[name] = ((f(x) - mu) / sd) ** 2 * lvl_ch
        ev_tr[name] = ((f(trx) - mu) / sd) ** 2 * lvl_ch
    # linear relation residual (PCA Q) on smoothed rows
    sm = trailing_mean(fit[:, q_ch], 4)
    mu = sm.mean(0)
    u, s, vt = np.linalg.svd(sm - mu, full_matrices=False)
    share = np.cumsum(s ** 2) / np.sum(s ** 2)
    k = int(np.searchsorted(share, 0.9) + 1)
    k = min(k, max(fit.shape[1] - 1, 1))
    V = vt[:k].T
    for name, a in (("q", x), ("q_tr", trx)):
        z = trailing_mean(a[:, q_ch], 4) - mu
        r = z - z @ V @ V.T
        full = np.zeros(a.shape)
        full[:, q_ch] = r ** 2
        (ev if name == "q" else ev_tr)["q"] = full
        t2 = ((z @ V) ** 2 / (s[:k] ** 2 / len(sm))).sum(1, keepdims=True) / k
        (ev if name == "q" else ev_tr)["t2"] = np.repeat(t2, x.shape[1] if name == "q" else trx.shape[1], 1)
    # embedding state: per-channel Mahalanobis in a PCA of the tokens
    tok, trtok = row_tokens(d[f"{i}_tok"], len(x)), row_tokens(d[f"{i}_trtok"], n_tr)
    C = x.shape[1]
    e, etr = np.zeros((len(x), C)), np.zeros((n_tr, C))
    for c in range(C):
        F = trtok[64:n_fit, c]
        m = F.mean(0)
        uu, ss, vv = np.linalg.svd(F - m, full_matrices=False)
        kk = 8
        var = ss[:kk] ** 2 / len(F) + 1e-6
        for a, o in ((tok[:, c], e), (trtok[:, c], etr)):
            p = (a - m) @ vv[:kk].T
            o[:, c] = (p ** 2 / var).sum(1) / kk
    ev["emb"], ev_tr["emb"] = e, etr
    return ev, ev_tr, n_fit, int(d[f"{i}_keep"])


def fuse_cal(ev, ev_tr, n_fit, kinds, mode):
    """Score of the series and of the training rows (the held-out part calibrates the threshold)."""
    both = {k: np.concatenate([ev_tr[k], ev[k]]) for k in kinds}
    s = fuse(both, ev_tr, n_fit, kinds, mode)
    n_tr = len(ev_tr[kinds[0]])
    return s[n_tr:], s[n_fit:n_tr]


def fuse(ev, ev_tr, n_fit, kinds, mode):
    per_kind = []
    for k in kinds:
        cal = ev_tr[k][n_fit:]
        typ = np.maximum(cal.mean(0), 1e-6)
        lg = np.log1p(ev[k] / typ).max(1)
        lg_cal = np.log1p(cal / typ).max(1)
        if mode == "tail":
            med, q = np.median(lg_cal), np.quantile(lg_cal, 0.99)
            lg = (lg - med) / max(q - med, 1e-6)
        per_kind.append(lg)
    P = np.stack(per_kind, 1)
    raw = P.max(1) if mode in ("tail", "max") else P.mean(1)
    return trailing_mean(raw, 8)


d = {m: np.load(f"runs/v2/{ds}-{m}.npz") for m in methods}
n = int(d[methods[0]]["n"])
variants = {
    "today": None,
    "dyn": (["dyn"], "tail"),
    "level": (["level"], "tail"),
    "scale": (["scale"], "tail"),
    "q": (["q"], "tail"),
    "t2": (["t2"], "tail"),
    "emb": (["emb"], "tail"),
    "dyn+q": (["dyn", "q"], "tail"),
    "dyn+lvl+scl+q": (["dyn", "level", "scale", "q"], "tail"),
    "all-tail": (["dyn", "level", "scale", "q", "emb"], "tail"),
    "all+t2-tail": (["dyn", "level", "scale", "q", "t2", "emb"], "tail"),
    "all-mean": (["dyn", "level", "scale", "q", "emb"], "mean"),
    "noemb+t2": (["dyn", "level", "scale", "q", "t2"], "tail"),
}
for m in methods:
    res = {k: [] for k in variants}
    conf = {k: np.zeros(4) for k in variants}
    for i in range(n):
        lab = d[m][f"{i}_labels"]
        ev, ev_tr, n_fit, keep = evidences(d[m], i)
        for name, spec in variants.items():
            if spec is None:
                s = d[m][f"{i}_base_score"]
                pred = None
            else:
                s_all, cal = fuse_cal(ev, ev_tr, n_fit, *spec)
                s = s_all[keep:]
                th = POTThreshold(0.01).fit(cal).threshold_
                pred = s > th
                c = confusion(lab, pred)
                conf[name] += [c.tp, c.fp, c.fn, c.tn]
            res[name].append((best_f1(lab, s)[0], auc_pr(lab, s)))
    for name, r in res.items():
        r = np.array(r)
        tp, fp, fn, tn = conf[name]
        f1 = 2 * tp / max(2 * tp + fp + fn, 1)
        print(f"{ds} {m:9s} {name:16s} bestF1 {r[:, 0].mean():.3f}  AUC-PR {r[:, 1].mean():.3f}  "
              f"pooled F1 {f1:.3f} FAR {100 * fp / max(fp + tn, 1):.1f} MAR {100 * fn / max(fn + tp, 1):.1f}")
