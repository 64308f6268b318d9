"""Scoring variants on cached per-row errors (see README.md): SKAB protocol metrics, or best-F1 / AUC-PR / VUS-PR.

Usage: python variants.py CACHE.npz [VARIANT,...]   (CACHE from collect_errors.py)
"""
import sys

import numpy as np

from edgepeft.bench.suites import VUS_MAX_BUFFER
from edgepeft.detect.metrics import auc_pr, best_f1, skab_changepoint_scores, vus_pr
from edgepeft.detect.scoring import channel_evidence, combine_errors, trailing_mean
from edgepeft.detect.threshold import make_threshold

SMOOTHING, Q = 8, 0.99
VARIANTS = ["max", "pooled", "p99err-max", "p99err-pooled", "chsmooth", "chnorm", "chnorm2"]


def score(e, ce, w, fit, variant):
    """fit: the errors of the rows the adapter was fitted on (the held-out calibration rows are not used)."""
    if variant in ("max", "pooled"):
        return combine_errors(e, ce, w, SMOOTHING, variant)
    if variant.startswith("p99err"):  # each channel's error divided by its 99th percentile instead of its mean
        return combine_errors(e, np.maximum(np.quantile(fit[64:], Q, axis=0), 1e-6), w, SMOOTHING, variant[7:])
    logged = np.log1p(channel_evidence(e, ce, w))
    smoothed = trailing_mean(logged, SMOOTHING)
    if variant == "chsmooth":  # smooth each channel, then the max
        return smoothed.max(1)
    fit_smoothed = trailing_mean(np.log1p(channel_evidence(fit, ce, w)), SMOOTHING)[64:]
    scale = np.maximum(np.quantile(fit_smoothed, Q, axis=0), 1e-3)  # each channel's normal tail
    if variant == "chnorm":  # smooth each channel, divide by its normal tail, max
        return (smoothed / scale).max(1)
    if variant == "chnorm2":  # divide each channel by its normal tail, max, then smooth
        return trailing_mean((logged / scale).max(1), SMOOTHING)
    raise ValueError(variant)


def skab(z, variant, offsets=(0.0,)):
    from edgepeft.data.datasets import load_skab

    runs = load_skab("../shared/datasets/skab")
    scores, labels, pairs = [], [], []
    for i in range(34):
        e, y = z[f"{i}_errors"], z[f"{i}_labels"]
        s = score(e, z[f"{i}_cherr"], z[f"{i}_w"], e[:320], variant)
        thr = make_threshold("pot", 0.01).fit(s[320:400]).threshold_
        scores.append(s[400:] - thr)
        labels.append(y)
    out = []
    for off in offsets:
        tp = fp = fn = tn = 0
        pairs = []
        for s, y, run in zip(scores, labels, runs):
            p = s > off
            tp += (p & (y == 1)).sum(); fp += (p & (y == 0)).sum()
            fn += (~p & (y == 1)).sum(); tn += (~p & (y == 0)).sum()
            pairs.append((run.changepoints, p.astype(int)))
        cp = skab_changepoint_scores(pairs)["standard"]
        out.append(f"F1 {tp / (tp + (fp + fn) / 2):.3f} FAR {100 * fp / (fp + tn):5.1f} "
                   f"MAR {100 * fn / (fn + tp):5.1f} CP {cp:.2f}")
    return " | ".join(out)


def ranked(z, variant):
    n = len([k for k in z.files if k.endswith("_labels")])
    res = []
    for i in range(n):
        e, y, tr = z[f"{i}_errors"], z[f"{i}_labels"], z[f"{i}_trerr"]
        n_fit = len(tr) - int(round(len(tr) * 0.2))
        s = score(e, z[f"{i}_cherr"], z[f"{i}_w"], tr[:n_fit], variant)
        res.append((best_f1(y, s)[0], auc_pr(y, s), vus_pr(y, s, max_buffer=VUS_MAX_BUFFER)))
    r = np.array(res)
    return f"best-F1 {r[:, 0].mean():.3f} AUC-PR {r[:, 1].mean():.3f} VUS-PR {r[:, 2].mean():.3f}"


if __name__ == "__main__":
    path = sys.argv[1]
    z = np.load(path)
    for variant in (sys.argv[2].split(",") if len(sys.argv) > 2 else VARIANTS):
        result = ranked(z, variant) if "0_trerr" in z.files else skab(z, variant)
        print(f"{path.split('/')[-1]:28s} {variant:14s} {result}", flush=True)
