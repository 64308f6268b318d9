"""Detection-quality metrics: point-wise counts, threshold-free rankings, VUS, and SKAB's changepoint score.

Honest metrics first (see FIELD-NOTES "Detection quality"): point-wise best F1 without adjustment,
AUC-PR and VUS-PR. Point adjustment is here only to compare with papers that report it; it inflates.

Convention shared with ``edgepeft.detect.threshold``: a row is flagged when ``score > threshold``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgepeft.core.errors import ConfigError, DataError

# ------------------------------------------------------------------------------------------------ validation


def check_binary(values: Any, name: str = "labels") -> np.ndarray:
    """A non-empty 1-D array of 0/1 (bools, ints or floats) as a bool array; anything else is a DataError.

    >>> check_binary([0, 1, 1.0]).tolist()
    [False, True, True]
    """
    arr = np.asarray(values)
    if arr.ndim != 1 or arr.size == 0:
        raise DataError(f"{name} must be a non-empty 1-D array of 0/1, got shape {arr.shape}")
    if arr.dtype == bool:
        return arr
    if not np.issubdtype(arr.dtype, np.number):
        raise DataError(f"{name} must be numeric 0/1, got dtype {arr.dtype}")
    bad = ~np.isin(arr, (0, 1))
    if bad.any():
        first = arr[np.flatnonzero(bad)[0]]
        raise DataError(f"{name} must contain only 0 and 1, found {first!r}; binarise the labels first")
    return arr.astype(bool)


def check_scores(values: Any, name: str = "scores") -> np.ndarray:
    """A non-empty 1-D array of finite numbers as float64; NaN/inf or other shapes are a DataError.

    >>> check_scores([0.5, 2]).dtype
    dtype('float64')
    """
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{name} must be numeric: {exc}") from exc
    if arr.ndim != 1 or arr.size == 0:
        raise DataError(f"{name} must be a non-empty 1-D array, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        n_bad = int((~np.isfinite(arr)).sum())
        raise DataError(f"{name} contain {n_bad} NaN/inf value(s); fix or drop those rows before scoring")
    return arr


def _check_same_length(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if len(a) != len(b):
        raise DataError(f"{name_a} has {len(a)} rows but {name_b} has {len(b)}; they must cover the same rows")


def _labels_and_scores(y_true: Any, scores: Any, *, need_normal: bool = False) -> tuple[np.ndarray, np.ndarray]:
    y = check_binary(y_true, "y_true")
    s = check_scores(scores, "scores")
    _check_same_length(y, s, "y_true", "scores")
    if not y.any():
        raise DataError("y_true has no anomalous rows; a ranking metric needs at least one anomaly")
    if need_normal and y.all():
        raise DataError("y_true has no normal rows; this metric needs at least one normal row")
    return y, s


def _segments(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and inclusive end indices of the runs of True in ``y``."""
    padded = np.concatenate(([False], y, [False])).astype(np.int8)
    edges = np.diff(padded)
    return np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1


# ------------------------------------------------------------------------------------------------ point-wise


@dataclass(frozen=True)
class Confusion:
    """Point-wise counts; ``a + b`` (or ``sum``) adds them up, as SKAB does over files (micro average).

    >>> confusion([1, 1, 0, 0], [1, 0, 1, 0]) + confusion([1], [1])
    Confusion(tp=2, fp=1, fn=1, tn=1)
    >>> sum([confusion([1], [0]), confusion([0], [0])])
    Confusion(tp=0, fp=0, fn=1, tn=1)
    """

    tp: int
    fp: int
    fn: int
    tn: int

    def __add__(self, other: Confusion) -> Confusion:
        if not isinstance(other, Confusion):
            return NotImplemented
        return Confusion(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn)

    def __radd__(self, other: object) -> Confusion:
        # Lets the built-in sum() start from 0: sum(confusion(y, p) for y, p in files).
        if other == 0:
            return self
        return NotImplemented


def confusion(y_true: Any, y_pred: Any) -> Confusion:
    """Count TP/FP/FN/TN point-wise, no adjustment, no tolerance window.

    >>> confusion([0, 1, 1, 0], [0, 1, 0, 1])
    Confusion(tp=1, fp=1, fn=1, tn=1)
    """
    y = check_binary(y_true, "y_true")
    p = check_binary(y_pred, "y_pred")
    _check_same_length(y, p, "y_true", "y_pred")
    return Confusion(tp=int(np.sum(y & p)), fp=int(np.sum(~y & p)), fn=int(np.sum(y & ~p)), tn=int(np.sum(~y & ~p)))


def f1_far_mar(c: Confusion) -> tuple[float, float, float]:
    """SKAB's F1 = TP/(TP+(FP+FN)/2), FAR % = FP/(FP+TN)·100, MAR % = FN/(FN+TP)·100.

    0/0 cases read as "nothing went wrong": F1 = 1 when there was nothing to find and nothing was flagged,
    FAR = 0 when there are no normal rows, MAR = 0 when there are no anomalous rows.

    >>> f1_far_mar(Confusion(tp=3, fp=1, fn=1, tn=5))
    (0.75, 16.666666666666664, 25.0)
    """
    f1 = c.tp / (c.tp + (c.fp + c.fn) / 2) if c.tp + c.fp + c.fn else 1.0
    far = c.fp / (c.fp + c.tn) * 100 if c.fp + c.tn else 0.0
    mar = c.fn / (c.fn + c.tp) * 100 if c.fn + c.tp else 0.0
    return float(f1), float(far), float(mar)


def best_f1(y_true: Any, scores: Any) -> tuple[float, float]:
    """Best point-wise F1 over every threshold (no point adjustment) and a threshold reaching it.

    Rows with ``score > threshold`` are flagged; the threshold is the midpoint between the lowest flagged
    score and the next lower one, so it generalises a little better than sitting on a data point.
    One sort, then cumulative counts: O(n log n).

    >>> best_f1([0, 0, 1, 1, 0], [0.1, 0.2, 0.9, 0.8, 0.3])
    (1.0, 0.55)
    """
    y, s = _labels_and_scores(y_true, scores)
    return _best_f1(y, s)


def _best_f1(y: np.ndarray, s: np.ndarray) -> tuple[float, float]:
    order = np.argsort(-s, kind="stable")
    s_desc, y_desc = s[order], y[order]
    tp = np.cumsum(y_desc)
    n_flagged = np.arange(1, len(s) + 1)
    # Only the last row of each run of tied scores is a reachable cut.
    cut = np.append(s_desc[1:] != s_desc[:-1], True)
    f1 = np.where(cut, 2.0 * tp / (n_flagged + y.sum()), -1.0)  # 2TP/(2TP+FP+FN) with 2TP+FP+FN = k+P
    i = int(np.argmax(f1))
    lowest_flagged = s_desc[i]
    if i == len(s) - 1:
        threshold = float(np.nextafter(lowest_flagged, -np.inf))
    else:
        next_lower = s_desc[i + 1]
        threshold = float(next_lower + (lowest_flagged - next_lower) / 2)
        if not next_lower <= threshold < lowest_flagged:  # adjacent floats: the midpoint rounds up
            threshold = float(next_lower)
    return float(f1[i]), threshold


def auc_pr(y_true: Any, scores: Any) -> float:
    """Area under the precision-recall curve as average precision, sum of (R_k - R_k-1) * P_k over cuts.

    Step-wise, no interpolation; the same value as scikit-learn's ``average_precision_score``.

    >>> auc_pr([0, 1, 0, 1], [0.1, 0.9, 0.8, 0.3])  # ranked +, -, +, -: (1/1 + 2/3) / 2
    0.8333333333333333
    """
    y, s = _labels_and_scores(y_true, scores)
    order = np.argsort(-s, kind="stable")
    s_desc = s[order]
    tp = np.cumsum(y[order])
    cut = np.append(s_desc[1:] != s_desc[:-1], True)  # tied scores are one threshold
    tp_cut = tp[cut]
    precision = tp_cut / (np.flatnonzero(cut) + 1)
    recall_step = np.diff(tp_cut, prepend=0) / tp[-1]
    return float(np.sum(recall_step * precision))


# ------------------------------------------------------------------------------------------------ point adjust


def point_adjust(y_true: Any, y_pred: Any) -> np.ndarray:
    """Point adjustment: one flagged row inside a true anomaly segment flags the whole segment.

    INFLATES results (a single lucky hit counts as the whole event); report it only beside point-wise
    metrics, to compare with papers that use it.

    >>> point_adjust([0, 1, 1, 1, 0, 1], [1, 0, 1, 0, 0, 0]).tolist()
    [1, 1, 1, 1, 0, 0]
    """
    y = check_binary(y_true, "y_true")
    p = check_binary(y_pred, "y_pred")
    _check_same_length(y, p, "y_true", "y_pred")
    adjusted = p.copy()
    for start, end in zip(*_segments(y), strict=True):
        if p[start : end + 1].any():
            adjusted[start : end + 1] = True
    return adjusted.astype(np.int8)


def best_f1_point_adjusted(y_true: Any, scores: Any) -> tuple[float, float]:
    """Best F1 after point adjustment, and its threshold (flag ``score > threshold``). INFLATES; secondary.

    At any threshold, an adjusted segment is flagged iff its maximum score is, so replacing each segment's
    scores by their maximum turns this into the ordinary best F1: still O(n log n).

    >>> best_f1_point_adjusted([0, 1, 1, 1, 0], [0.5, 0.1, 0.9, 0.2, 0.3])[0]
    1.0
    """
    y, s = _labels_and_scores(y_true, scores)
    starts, ends = _segments(y)
    bounds = np.stack([starts, ends + 1], axis=1).ravel()
    seg_max = np.maximum.reduceat(np.append(s, -np.inf), bounds)[::2]
    adjusted = s.copy()
    adjusted[y] = np.repeat(seg_max, ends - starts + 1)
    return _best_f1(y, adjusted)


# ------------------------------------------------------------------------------------------------ VUS

DEFAULT_MAX_BUFFER = 200  # TSB-AD's get_metrics default: buffer up to 2 x slidingWindow(100)
DEFAULT_N_THRESHOLDS = 250  # as in the reference code (thre=250)


def vus_pr(
    y_true: Any, scores: Any, *, max_buffer: int | None = None, n_thresholds: int = DEFAULT_N_THRESHOLDS
) -> float:
    """Volume under the range-PR surface (VUS-PR; Paparrizos et al., VLDB 2022), mean over buffers 0..max.

    Mirrors ``RangeAUC_volume_opt`` of TheDatumOrg/TSB-AD (``TSB_AD/evaluation/basic_metrics.py``): each true
    segment gets a soft buffer of ``w // 2`` rows either side weighted ``sqrt(1 - d / w)``, range recall is
    scaled by the share of (buffered) segments hit, and the precision-recall area is taken over
    ``n_thresholds`` score quantiles, for every buffer width ``w = 0..max_buffer``. ``max_buffer=None``
    uses TSB-AD's default of 200; TSB-AD's benchmark passes twice the series' period (or pass twice your
    window length). Vectorised over buffers and thresholds: a 10k-row series takes well under a second.

    >>> round(vus_pr([0, 0, 1, 0, 0], [0, 0, 0, 1, 0], max_buffer=2), 4)  # a near miss; plain AP is 0.2
    0.3333
    """
    return _vus(y_true, scores, max_buffer, n_thresholds)[1]


def vus_roc(
    y_true: Any, scores: Any, *, max_buffer: int | None = None, n_thresholds: int = DEFAULT_N_THRESHOLDS
) -> float:
    """Volume under the range-ROC surface (VUS-ROC), same definitions as :func:`vus_pr`.

    >>> vus_roc([0, 1, 1, 0], [0.1, 0.9, 0.8, 0.2], max_buffer=2)
    1.0
    """
    return _vus(y_true, scores, max_buffer, n_thresholds)[0]


def _vus(y_true: Any, scores: Any, max_buffer: int | None, n_thresholds: int) -> tuple[float, float]:
    y, s = _labels_and_scores(y_true, scores, need_normal=True)
    max_w = DEFAULT_MAX_BUFFER if max_buffer is None else max_buffer
    if isinstance(max_w, bool) or not isinstance(max_w, int | np.integer) or max_w < 0:
        raise ConfigError(f"max_buffer must be a non-negative int, got {max_buffer!r}")
    if isinstance(n_thresholds, bool) or not isinstance(n_thresholds, int | np.integer) or n_thresholds < 1:
        raise ConfigError(f"n_thresholds must be a positive int, got {n_thresholds!r}")
    max_w, n_thr = int(max_w), int(n_thresholds)
    n = len(s)
    n_pos = float(y.sum())
    starts, ends = _segments(y)
    windows = np.arange(max_w + 1)
    half = windows // 2  # (W+1,) buffer reach of each width

    # Thresholds as in the reference: scores at evenly spaced ranks, flag = score >= threshold.
    thresholds = np.sort(s)[::-1][np.linspace(0, n - 1, n_thr).astype(int)]  # (T,) non-increasing
    # first_flag[i]: index of the first threshold flagging row i (thresholds only go down from there).
    first_flag = n_thr - np.searchsorted(thresholds[::-1], s, side="right")  # (n,) in 0..T
    n_flagged = np.cumsum(np.bincount(first_flag, minlength=n_thr + 1)[:n_thr])  # (T,)
    core_hits = np.cumsum(np.bincount(first_flag[y], minlength=n_thr + 1)[:n_thr])  # (T,)

    # Soft buffer weight of normal rows near a segment: a row d rows outside a segment gets sqrt(1 - d / w)
    # for d <= w // 2; a row near two segments sums both, clipped at 1, as the reference does. Pairs
    # (row, distance) are sorted by distance so width w only touches the prefix with d <= w // 2.
    hmax = max_w // 2
    dist = np.arange(1, hmax + 1)  # (H,)
    pos = np.concatenate([(starts[:, None] - dist[None, :]).ravel(), (ends[:, None] + dist[None, :]).ravel()])
    pos_dist = np.concatenate([np.tile(dist, len(starts)), np.tile(dist, len(ends))])
    keep = (pos >= 0) & (pos < n)
    keep[keep] &= ~y[pos[keep]]  # segment rows are 1 already
    pos, pos_dist = pos[keep], pos_dist[keep]
    order = np.argsort(pos_dist, kind="stable")
    pos, pos_dist = pos[order], pos_dist[order]
    rows, pair_row = np.unique(pos, return_inverse=True)
    row_flag = first_flag[rows]
    n_pairs_within = np.searchsorted(pos_dist, half, side="right")  # (W+1,)
    buffer_hits = np.zeros((max_w + 1, n_thr))  # flagged buffer weight, per width and threshold
    for w in windows[n_pairs_within > 0]:
        m = n_pairs_within[w]
        weight = np.minimum(np.bincount(pair_row[:m], np.sqrt(1 - pos_dist[:m] / w), minlength=len(rows)), 1.0)
        buffer_hits[w] = np.cumsum(np.bincount(row_flag, weight, minlength=n_thr + 1)[:n_thr])

    # Existence: how many buffered (and merged) segments contain a flagged row, per width and threshold.
    n_seg = len(starts)
    bounds = np.stack([starts, ends + 1], axis=1).ravel()
    seg_first = np.minimum.reduceat(np.append(first_flag, n_thr), bounds)[::2]  # (S,)
    reach = np.full((n_seg, hmax + 1), n_thr)
    reach[:, 0] = seg_first
    if hmax:
        pad = np.concatenate([first_flag, [n_thr]])  # out-of-range rows point at the sentinel
        before = starts[:, None] - dist[None, :]
        after = ends[:, None] + dist[None, :]
        before = np.where(before >= 0, before, n)
        after = np.where(after < n, after, n)
        near = np.minimum(pad[before], pad[after])  # (S, H)
        reach[:, 1:] = np.minimum(seg_first[:, None], np.minimum.accumulate(near, axis=1))
    existence = np.zeros((max_w + 1, n_thr))
    n_groups = np.zeros(max_w + 1)
    gaps = starts[1:] - ends[:-1]
    for w in windows:  # W+1 cheap steps over segments, not rows
        h = half[w]
        new_group = np.concatenate(([True], gaps > 2 * h))  # the reference merges when e+h >= s'-h
        group_first = np.minimum.reduceat(reach[:, h], np.flatnonzero(new_group))
        existence[w] = np.cumsum(np.bincount(group_first, minlength=n_thr + 1)[:n_thr])
        n_groups[w] = len(group_first)

    tp = core_hits[None, :] + buffer_hits  # (W+1, T)
    p_new = n_pos + buffer_hits / 2  # (P + N_labels) / 2 with N_labels = P + flagged buffer weight
    tpr = np.minimum(tp / p_new, 1.0) * existence / n_groups[:, None]
    fpr = (n_flagged[None, :] - tp) / (n - p_new)
    precision = tp / n_flagged[None, :]

    ap = np.sum(np.diff(tpr, axis=1, prepend=0.0) * precision, axis=1)  # (W+1,)
    zeros, ones = np.zeros((max_w + 1, 1)), np.ones((max_w + 1, 1))
    roc_x = np.hstack([zeros, fpr, ones])
    roc_y = np.hstack([zeros, tpr, ones])
    roc = np.sum(np.diff(roc_x, axis=1) * (roc_y[:, 1:] + roc_y[:, :-1]) / 2, axis=1)
    return float(roc.mean()), float(ap.mean())


# ------------------------------------------------------------------------------------------------ SKAB NAB

# (A_tp, A_fp, A_fn) per profile, SKAB's table_of_coef (A_tn is unused by the score).
SKAB_PROFILES: dict[str, tuple[float, float, float]] = {
    "standard": (1.0, -0.11, -1.0),
    "low_fp": (1.0, -0.22, -1.0),
    "low_fn": (1.0, -0.11, -2.0),
}
_DETALIZATION = 1000  # SKAB's my_scale(detalization=1000)


def predicted_changepoints(y_pred: Any) -> np.ndarray:
    """Rising and falling edges of a binary prediction, as SKAB derives them: ``|diff|``, first row = pred[0].

    >>> predicted_changepoints([1, 1, 0, 0, 1]).tolist()
    [1, 0, 1, 0, 1]
    """
    p = check_binary(y_pred, "y_pred").astype(np.int8)
    edges = np.abs(np.diff(p, prepend=0))  # prepend 0 makes edges[0] = pred[0], as SKAB sets it
    return edges.astype(np.int8)


def _nab_scale(a_tp: float, a_fp: float) -> np.ndarray:
    # SKAB's "improved" scale (my_scale, koef=1): A_tp at the window start falling on tanh to A_fp at its end.
    x = np.linspace(-np.pi / 2, np.pi / 2, _DETALIZATION)
    return (a_tp - a_fp) / 2 * -1 * np.tanh(x) / np.tanh(np.pi / 2) + (a_tp - a_fp) / 2 + a_fp


def _nab_file(
    cp_true: np.ndarray, cp_pred: np.ndarray, times: np.ndarray, window: float
) -> tuple[np.ndarray, int, int]:
    """Per file: the window position (0..999) of each first hit, the FP count, the FN count."""
    start = times[cp_true]
    end = start + window
    # SKAB's intersection_mode="cut right window": an overlapped window starts where the previous ends.
    # Windows then touch, and a prediction exactly on the shared edge counts in both, as in SKAB.
    if len(start) > 1:
        start[1:] = np.where(end[:-1] >= start[1:], end[:-1], start[1:])
    pred_t = times[cp_pred]
    lo = np.searchsorted(pred_t, start, side="left")
    hi = np.searchsorted(pred_t, end, side="right")
    hit = hi > lo
    first = pred_t[np.minimum(lo, len(pred_t) - 1)] if len(pred_t) else np.zeros(len(start))
    # Only the first prediction in a window counts; later ones there are neither TP nor FP.
    event = ((first[hit] - start[hit]) / (end[hit] - start[hit]) * _DETALIZATION).astype(int)
    event = np.minimum(event, _DETALIZATION - 1)
    if len(start) == 0:  # a file without changepoints: every predicted edge is a false alarm
        return event, len(pred_t), 0
    win = np.searchsorted(start, pred_t, side="right") - 1
    covered = (win >= 0) & (pred_t <= end[np.maximum(win, 0)])
    return event, int((~covered).sum()), int((~hit).sum())


def _check_runs(runs: Sequence[Any], window: float) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    if not np.isfinite(window) or window <= 0:
        raise ConfigError(f"window must be a positive number of rows (seconds), got {window!r}")
    if len(runs) == 0:
        raise DataError("no runs given; pass one (changepoint_labels, predicted_anomaly) pair per file")
    checked = []
    for k, run in enumerate(runs):
        if len(run) not in (2, 3):
            raise DataError(f"run {k} must be (true_changepoints, predicted_anomaly[, times_seconds])")
        cp_true = check_binary(run[0], f"run {k} true changepoints")
        pred = check_binary(run[1], f"run {k} predicted anomaly")
        _check_same_length(cp_true, pred, f"run {k} true changepoints", f"run {k} predicted anomaly")
        if len(run) == 3:
            times = check_scores(run[2], f"run {k} times")
            _check_same_length(cp_true, times, f"run {k} true changepoints", f"run {k} times")
            if np.any(np.diff(times) <= 0):
                raise DataError(f"run {k} times must be strictly increasing (seconds)")
        else:
            times = np.arange(len(cp_true), dtype=np.float64)
        checked.append((cp_true, predicted_changepoints(pred).astype(bool), times))
    return checked


def skab_changepoint_scores(runs: Sequence[Any], window: float = 60) -> dict[str, float]:
    """SKAB's NAB-style changepoint score for all three profiles: ``{"standard", "low_fp", "low_fn"}``.

    Each run is ``(true_changepoints, predicted_anomaly)`` over the same test rows (0/1 per row), optionally
    with a third array of row times in seconds (SKAB measures its window in time; without times a row is one
    second). Follows ``chp_score(metric="nab", window_width="60s", anomaly_window_destination="righter")``
    of waico/SKAB ``core/metrics.py``: predicted changepoints are the edges of the prediction; each true
    changepoint opens the window [t, t + window]; the first prediction in it scores on the tanh curve from
    A_tp to A_fp, predictions outside every window cost A_fp, empty windows cost A_fn; raw, null and perfect
    scores are summed over files, then 100 · (S − S_null) / (S_perfect − S_null). Not rounded (SKAB prints
    two decimals).

    >>> truth = np.zeros(300, int); truth[[100, 200]] = 1
    >>> skab_changepoint_scores([(truth, (np.arange(300) >= 100) & (np.arange(300) < 200))])["standard"]
    100.0
    """
    checked = _check_runs(runs, window)
    parts = [_nab_file(cp_true, cp_pred, times, float(window)) for cp_true, cp_pred, times in checked]
    n_windows = sum(int(cp_true.sum()) for cp_true, _, _ in checked)
    if n_windows == 0:
        raise DataError("no true changepoints in any run; the changepoint score is undefined (0/0)")
    results = {}
    for profile, (a_tp, a_fp, a_fn) in SKAB_PROFILES.items():
        scale = _nab_scale(a_tp, a_fp)
        raw = sum(scale[event].sum() + a_fp * n_fp + a_fn * n_fn for event, n_fp, n_fn in parts)
        null, perfect = n_windows * a_fn, n_windows * a_tp
        results[profile] = float(100 * (raw - null) / (perfect - null))
    return results


def skab_changepoint_score(runs: Sequence[Any], profile: str = "standard", window: float = 60) -> float:
    """SKAB's changepoint score for one profile (``standard``, ``low_fp`` or ``low_fn``).

    See :func:`skab_changepoint_scores`. A prediction that misses every changepoint window scores
    below 0; predicting nothing scores exactly 0, a perfect prediction 100.

    >>> truth = np.zeros(200, int); truth[50] = 1
    >>> skab_changepoint_score([(truth, np.zeros(200, int))])
    0.0
    """
    if profile not in SKAB_PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; choose one of {sorted(SKAB_PROFILES)}")
    return skab_changepoint_scores(runs, window)[profile]
