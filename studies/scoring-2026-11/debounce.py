"""Alarm persistence (debounce) on cached SKAB errors: an alarm starts after k_on consecutive rows over the
threshold and ends after k_off consecutive rows under it (causal). Default scoring otherwise.

Usage: python debounce.py CACHE.npz   (CACHE from collect_errors.py on skab)
"""
import sys

import numpy as np

from edgepeft.data.datasets import load_skab
from edgepeft.detect.metrics import skab_changepoint_scores
from edgepeft.detect.scoring import combine_errors
from edgepeft.detect.threshold import make_threshold


def debounce(above: np.ndarray, k_on: int, k_off: int) -> np.ndarray:
    out = np.zeros(len(above), bool)
    state, run_on, run_off = False, 0, 0
    for t, a in enumerate(above):
        run_on, run_off = (run_on + 1, 0) if a else (0, run_off + 1)
        if not state and run_on >= k_on:
            state = True
        elif state and run_off >= k_off:
            state = False
        out[t] = state
    return out


def main(path: str) -> None:
    runs = load_skab("../shared/datasets/skab")
    z = np.load(path)
    cases = []
    for i in range(34):
        e = z[f"{i}_errors"]
        s = combine_errors(e, z[f"{i}_cherr"], z[f"{i}_w"], 8, "max")
        cases.append((s > make_threshold("pot", 0.01).fit(s[320:400]).threshold_, z[f"{i}_labels"], runs[i]))
    for k_on, k_off in [(1, 1), (3, 1), (3, 3), (5, 1), (5, 3), (5, 5), (8, 1), (8, 3), (8, 8), (10, 1), (10, 5),
                        (15, 1), (15, 5), (1, 10), (5, 10), (10, 30)]:
        tp = fp = fn = tn = 0
        pairs = []
        for above, y, run in cases:
            p = debounce(above, k_on, k_off)[400:]
            tp += (p & (y == 1)).sum(); fp += (p & (y == 0)).sum()
            fn += (~p & (y == 1)).sum(); tn += (~p & (y == 0)).sum()
            pairs.append((run.changepoints, p.astype(int)))
        cp = skab_changepoint_scores(pairs)
        print(f"k_on {k_on:2d} k_off {k_off:2d}  F1 {tp / (tp + (fp + fn) / 2):.3f} FAR {100 * fp / (fp + tn):5.1f} "
              f"MAR {100 * fn / (fn + tp):5.1f} CP {cp['standard']:.2f} / {cp['low_fp']:.2f} / {cp['low_fn']:.2f}")


if __name__ == "__main__":
    main(sys.argv[1])
