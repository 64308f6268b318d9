"""Metrics: hand-worked cases, brute-force equivalence, and SKAB's changepoint score semantics."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgepeft.core.errors import ConfigError, DataError
from edgepeft.detect.metrics import (
    Confusion,
    auc_pr,
    best_f1,
    best_f1_point_adjusted,
    confusion,
    f1_far_mar,
    point_adjust,
    predicted_changepoints,
    skab_changepoint_score,
    skab_changepoint_scores,
    vus_pr,
    vus_roc,
)

# ------------------------------------------------------------------------------------------------ helpers


def _f1_of(y: np.ndarray, pred: np.ndarray) -> float:
    return f1_far_mar(confusion(y, pred))[0]


def _brute_best_f1(y: np.ndarray, s: np.ndarray) -> float:
    # Every distinct score as a cut "flag score >= v"; nothing smarter.
    return max(_f1_of(y, s >= v) for v in np.unique(s))


def _naive_vus(y: np.ndarray, s: np.ndarray, max_buffer: int, n_thr: int = 250) -> tuple[float, float]:
    """VUS written straight from the definitions, one buffer width and one threshold at a time."""
    y = np.asarray(y, bool)
    n, n_pos = len(y), y.sum()
    segs, a = [], None
    for i in range(n + 1):
        on = i < n and y[i]
        if on and a is None:
            a = i
        if not on and a is not None:
            segs.append((a, i - 1))
            a = None
    thresholds = np.sort(s)[::-1][np.linspace(0, n - 1, n_thr).astype(int)]
    rocs, aps = [], []
    for w in range(max_buffer + 1):
        h = w // 2
        ext = y.astype(float)
        for a, b in segs:
            for d in range(1, h + 1):
                if b + d < n:
                    ext[b + d] += math.sqrt(1 - d / w)
                if a - d >= 0:
                    ext[a - d] += math.sqrt(1 - d / w)
        ext = np.minimum(ext, 1.0)
        groups: list[list[int]] = []
        for a, b in segs:
            if groups and groups[-1][1] >= a - h:  # buffered ranges touch: one segment
                groups[-1][1] = b + h
            else:
                groups.append([a - h, b + h])
        tpr, fpr, prec = [0.0], [0.0], [1.0]
        for t in thresholds:
            pred = s >= t
            weight = np.where(y, 1.0, ext * pred)
            tp, n_labels = float(np.sum(weight * pred)), float(np.sum(weight))
            hits = sum(pred[max(lo, 0) : min(hi, n - 1) + 1].any() for lo, hi in groups)
            p_new = (n_pos + n_labels) / 2
            tpr.append(min(tp / p_new, 1) * hits / len(groups))
            fpr.append((pred.sum() - tp) / (n - p_new))
            prec.append(tp / pred.sum())
        aps.append(sum((tpr[k] - tpr[k - 1]) * prec[k] for k in range(1, n_thr + 1)))
        xs, ys = [*fpr, 1.0], [*tpr, 1.0]
        rocs.append(sum((xs[k] - xs[k - 1]) * (ys[k] + ys[k - 1]) / 2 for k in range(1, len(xs))))
    return float(np.mean(rocs)), float(np.mean(aps))


labelled_scores = st.integers(min_value=2, max_value=40).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(0, 1), min_size=n, max_size=n).filter(lambda v: 0 < sum(v) < len(v)),
        st.lists(st.integers(0, 6), min_size=n, max_size=n),  # few values: plenty of ties
    )
)

# ------------------------------------------------------------------------------------------------ point-wise


def test_confusion_hand_case_and_sum_over_files():
    # truth 1 1 0 0 1 / pred 1 0 1 0 1: TP rows 0,4; FN row 1; FP row 2; TN row 3.
    c = confusion([1, 1, 0, 0, 1], [1, 0, 1, 0, 1])
    assert c == Confusion(tp=2, fp=1, fn=1, tn=1)
    assert c + confusion([0, 1], [0, 1]) == Confusion(tp=3, fp=1, fn=1, tn=2)
    assert confusion([True, False], [1.0, 0.0]) == Confusion(tp=1, fp=0, fn=0, tn=1)
    assert sum([c, c]) == Confusion(tp=4, fp=2, fn=2, tn=2)


def test_f1_far_mar_hand_case():
    # TP=2 FP=1 FN=1 TN=1: F1 = 2/(2+1) = 2/3; FAR = 1/2 = 50 %; MAR = 1/3 = 33.3 %.
    f1, far, mar = f1_far_mar(Confusion(tp=2, fp=1, fn=1, tn=1))
    assert f1 == pytest.approx(2 / 3)
    assert far == pytest.approx(50.0)
    assert mar == pytest.approx(100 / 3)


def test_f1_far_mar_skab_flag_everything_matches_readme():
    # SKAB README totals: 23,801 test rows, 12,771 anomalous; flagging everything gives F1 0.70, FAR 100, MAR 0.
    f1, far, mar = f1_far_mar(Confusion(tp=12771, fp=23801 - 12771, fn=0, tn=0))
    assert round(f1, 2) == 0.70
    assert (far, mar) == (100.0, 0.0)


def test_f1_far_mar_zero_over_zero_reads_as_nothing_wrong():
    assert f1_far_mar(Confusion(tp=0, fp=0, fn=0, tn=5)) == (1.0, 0.0, 0.0)
    assert f1_far_mar(Confusion(tp=3, fp=0, fn=0, tn=0)) == (1.0, 0.0, 0.0)
    assert f1_far_mar(Confusion(tp=0, fp=2, fn=0, tn=0))[0] == 0.0


@pytest.mark.parametrize(
    ("y_true", "y_pred", "message"),
    [
        ([0, 1], [0, 1, 1], "same rows"),
        ([0, 2], [0, 1], "only 0 and 1"),
        ([0, np.nan], [0, 1], "only 0 and 1"),
        ([], [], "non-empty"),
        ([[0, 1]], [[0, 1]], "1-D"),
        (["a", "b"], [0, 1], "numeric"),
    ],
)
def test_confusion_validates_inputs(y_true, y_pred, message):
    with pytest.raises(DataError, match=message):
        confusion(y_true, y_pred)


def test_best_f1_hand_case():
    # Sorted scores 0.9(+) 0.7(-) 0.6(+) 0.2(-) 0.1(-), P = 2. Cuts: top1 F1 = 2*1/(1+2) = 2/3,
    # top2 2/(2+2) = 1/2, top3 2*2/(3+2) = 4/5, top4 4/6, top5 4/7. Best 0.8 flagging >= 0.6,
    # threshold midway between 0.6 and 0.2.
    y = np.array([0, 1, 0, 1, 0])
    s = np.array([0.1, 0.9, 0.7, 0.6, 0.2])
    f1, threshold = best_f1(y, s)
    assert f1 == pytest.approx(0.8)
    assert threshold == pytest.approx(0.4)
    assert _f1_of(y, s > threshold) == pytest.approx(0.8)


def test_best_f1_flag_all_threshold_is_below_every_score():
    f1, threshold = best_f1([1, 1, 1, 0], [0.0, 0.0, 1.0, 1.0])
    # Ties: top cut flags {2,3}: F1 = 2/(2+3) = 0.4; all: 2*3/(4+3) = 6/7.
    assert f1 == pytest.approx(6 / 7)
    assert threshold < 0.0


@settings(max_examples=60, deadline=None)
@given(labelled_scores)
def test_best_f1_equals_brute_force(case):
    y, s = np.array(case[0]), np.array(case[1], dtype=float)
    f1, threshold = best_f1(y, s)
    assert f1 == pytest.approx(_brute_best_f1(y, s))
    assert _f1_of(y, s > threshold) == pytest.approx(f1)


def test_best_f1_equals_brute_force_on_seeded_continuous_scores():
    rng = np.random.default_rng(7)
    y = rng.random(400) < 0.2
    s = rng.normal(size=400) + y
    f1, threshold = best_f1(y, s)
    assert f1 == pytest.approx(_brute_best_f1(y, s))
    assert _f1_of(y, s > threshold) == pytest.approx(f1)


def test_auc_pr_hand_case():
    # Ranked: 0.9(+) 0.8(-) 0.3(+) 0.1(-); AP = mean precision at each positive = (1/1 + 2/3) / 2.
    assert auc_pr([0, 1, 0, 1], [0.1, 0.9, 0.8, 0.3]) == pytest.approx(5 / 6)
    # A tie between a positive and a negative is one cut: precision 1/2 at recall 1.
    assert auc_pr([1, 0], [0.5, 0.5]) == pytest.approx(0.5)


def test_auc_pr_matches_sklearn():
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(3)
    y = rng.random(500) < 0.1
    s = np.round(rng.normal(size=500) + y, 1)  # rounded: ties included
    assert auc_pr(y, s) == pytest.approx(average_precision_score(y, s))


@pytest.mark.parametrize("fn", [best_f1, auc_pr, best_f1_point_adjusted, vus_pr])
def test_ranking_metrics_validate(fn):
    with pytest.raises(DataError, match="no anomalous rows"):
        fn([0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(DataError, match="NaN/inf"):
        fn([0, 1, 0], [0.1, np.inf, 0.3])
    with pytest.raises(DataError, match="same rows"):
        fn([0, 1, 0], [0.1, 0.2])


# ------------------------------------------------------------------------------------------------ point adjust


def test_point_adjust_hand_case():
    # Segments [1..3] (hit at 2) and [5] (missed); the false alarm at 0 stays.
    out = point_adjust([0, 1, 1, 1, 0, 1], [1, 0, 1, 0, 0, 0])
    assert out.tolist() == [1, 1, 1, 1, 0, 0]


def test_best_f1_point_adjusted_hand_case_inflates():
    # Segment [2..5] has one high score (0.9) among low ones. Point-wise best: flag only 0.9 -> 2/(1+4) = 0.4,
    # or flag all 6 -> 8/10 = 0.8. Adjusted: flagging > 0.5 marks the whole segment: F1 = 1.
    y = np.array([0, 0, 1, 1, 1, 1])
    s = np.array([0.5, 0.3, 0.1, 0.9, 0.2, 0.0])
    assert best_f1(y, s)[0] == pytest.approx(0.8)
    f1_pa, threshold = best_f1_point_adjusted(y, s)
    assert f1_pa == pytest.approx(1.0)
    assert _f1_of(y, point_adjust(y, s > threshold)) == pytest.approx(1.0)


@settings(max_examples=40, deadline=None)
@given(labelled_scores)
def test_best_f1_point_adjusted_equals_brute_force(case):
    y, s = np.array(case[0]), np.array(case[1], dtype=float)
    brute = max(_f1_of(y, point_adjust(y, s >= v)) for v in np.unique(s))
    f1, threshold = best_f1_point_adjusted(y, s)
    assert f1 == pytest.approx(brute)
    assert f1 >= best_f1(y, s)[0] - 1e-12
    assert _f1_of(y, point_adjust(y, s > threshold)) == pytest.approx(f1)


# ------------------------------------------------------------------------------------------------ VUS


def test_vus_pr_hand_case_near_miss():
    # Anomaly at row 2, the score peaks one row late (row 3). Buffers w = 0, 1, 2 (w // 2 = 0, 0, 1).
    # w = 0, 1: no buffer. Top threshold flags row 3 only: TP 0, precision 0; next flags all 5:
    #   recall 1, precision 1/5. AP = 1 * 1/5 = 0.2 (the plain AP too).
    # w = 2: rows 1 and 3 get weight a = sqrt(1 - 1/2). Flag row 3: TP = a, labels = 1 + a,
    #   P_new = (1 + 1 + a)/2, recall = 2a/(2 + a), precision a. Flag all: TP = 1 + 2a, recall 1,
    #   precision (1 + 2a)/5. AP = 2a^2/(2+a) + (1 - 2a/(2+a)) (1+2a)/5 = (6 + 3a) / (5 (2 + a)) = 3/5.
    # VUS-PR = (0.2 + 0.2 + 0.6) / 3 = 1/3.
    y, s = [0, 0, 1, 0, 0], [0, 0, 0, 1, 0]
    assert vus_pr(y, s, max_buffer=2) == pytest.approx(1 / 3)
    assert vus_pr(y, s, max_buffer=0) == pytest.approx(auc_pr(y, s)) == pytest.approx(0.2)


def test_vus_perfect_scores_give_one():
    y = np.zeros(300, int)
    y[50:60] = 1
    y[200:230] = 1
    s = y + 0.0
    for max_buffer in (0, 10, 100):
        assert vus_pr(y, s, max_buffer=max_buffer) == pytest.approx(1.0)
        assert vus_roc(y, s, max_buffer=max_buffer) == pytest.approx(1.0)


def test_vus_buffer_rewards_near_misses():
    y = np.zeros(200, int)
    y[100:110] = 1
    late = np.zeros(200)
    late[112:122] = 1.0  # detected two rows after the anomaly ended
    assert vus_pr(y, late, max_buffer=0) < 0.1
    assert vus_pr(y, late, max_buffer=20) > vus_pr(y, late, max_buffer=0) + 0.1


def test_vus_in_unit_interval_on_random_scores():
    rng = np.random.default_rng(11)
    for _ in range(5):
        y = rng.random(300) < 0.15
        s = rng.normal(size=300)
        for value in (vus_pr(y, s, max_buffer=16), vus_roc(y, s, max_buffer=16)):
            assert 0.0 <= value <= 1.0


@settings(max_examples=25, deadline=None)
@given(labelled_scores, st.integers(0, 6))
def test_vus_matches_naive_definition(case, max_buffer):
    y, s = np.array(case[0]), np.array(case[1], dtype=float)
    roc, pr = _naive_vus(y, s, max_buffer)
    assert vus_pr(y, s, max_buffer=max_buffer) == pytest.approx(pr, abs=1e-9)
    assert vus_roc(y, s, max_buffer=max_buffer) == pytest.approx(roc, abs=1e-9)


def test_vus_matches_naive_definition_with_close_segments():
    # Segments 2 rows apart: their buffers overlap (summed, clipped at 1) and they merge for w >= 4.
    rng = np.random.default_rng(5)
    y = np.zeros(60, int)
    y[[10, 11, 14, 15, 16, 30, 45, 46]] = 1
    s = rng.normal(size=60) + y
    roc, pr = _naive_vus(y, s, 12)
    assert vus_pr(y, s, max_buffer=12) == pytest.approx(pr, abs=1e-9)
    assert vus_roc(y, s, max_buffer=12) == pytest.approx(roc, abs=1e-9)


def test_vus_is_fast_on_10k_rows():
    rng = np.random.default_rng(0)
    y = np.zeros(10_000, bool)
    for start in rng.choice(9_900, 40, replace=False):
        y[start : start + rng.integers(1, 80)] = True
    s = rng.normal(size=10_000) + y
    began = time.perf_counter()
    vus_pr(y, s)
    vus_roc(y, s, max_buffer=400)
    assert time.perf_counter() - began < 2.0


def test_vus_validates():
    with pytest.raises(DataError, match="no normal rows"):
        vus_pr([1, 1], [0.1, 0.2])
    with pytest.raises(ConfigError, match="max_buffer"):
        vus_pr([0, 1], [0.1, 0.2], max_buffer=-1)
    with pytest.raises(ConfigError, match="n_thresholds"):
        vus_pr([0, 1], [0.1, 0.2], n_thresholds=0)


# ------------------------------------------------------------------------------------------------ SKAB changepoints

_A_FP = -0.11


def _scale_at(event: int) -> float:
    # SKAB's tanh scale (standard profile) at position `event` of 1000 across the window.
    x = -math.pi / 2 + event * math.pi / 999
    return (1 - _A_FP) / 2 * (1 - math.tanh(x) / math.tanh(math.pi / 2)) + _A_FP


def _cp(n: int, *rows: int) -> np.ndarray:
    out = np.zeros(n, int)
    out[list(rows)] = 1
    return out


def _from(n: int, row: int) -> np.ndarray:
    # Anomaly predicted from `row` to the end: a single (rising) edge at `row`.
    out = np.zeros(n, int)
    out[row:] = 1
    return out


def test_predicted_changepoints_are_edges_with_first_row_as_is():
    assert predicted_changepoints([0, 1, 1, 0, 0, 1]).tolist() == [0, 1, 0, 1, 0, 1]
    assert predicted_changepoints([1, 1, 0]).tolist() == [1, 0, 1]


def test_changepoint_perfect_prediction_scores_100():
    # Anomaly rows 100..199, changepoints where it starts and where normal operation resumes (as SKAB labels).
    truth = _cp(400, 100, 200)
    pred = np.zeros(400, int)
    pred[100:200] = 1
    assert skab_changepoint_scores([(truth, pred), (_cp(50, 0), np.ones(50, int))]) == {
        "standard": 100.0,
        "low_fp": 100.0,
        "low_fn": 100.0,
    }


def test_changepoint_no_prediction_scores_zero():
    runs = [(_cp(300, 10, 200), np.zeros(300, int)), (_cp(100, 50), np.zeros(100, int))]
    assert skab_changepoint_scores(runs) == {"standard": 0.0, "low_fp": 0.0, "low_fn": 0.0}


def test_changepoint_hand_cases_single_window():
    truth = _cp(300, 10)  # window [10, 70] (60 s to the right, ends included)
    # At the window end: position 1000 -> capped at 999 -> the FP weight. S = -0.11, null -1, perfect 1:
    # 100 (-0.11 + 1) / 2 = 44.5; low_fp: 100 (0.78 / 2) = 39; low_fn: null -2: 100 (1.89 / 3) = 63.
    assert skab_changepoint_scores([(truth, _from(300, 70))]) == pytest.approx(
        {"standard": 44.5, "low_fp": 39.0, "low_fn": 63.0}
    )
    # One row later it is outside: one FP and one FN: 100 (-0.11 - 1 + 1) / 2 = -5.5.
    assert skab_changepoint_score([(truth, _from(300, 71))]) == pytest.approx(-5.5)
    # Halfway (row 40): position int(30 / 60 * 1000) = 500; scale(500) = 0.444048...; 100 (S + 1) / 2.
    assert _scale_at(500) == pytest.approx(0.444048507)
    assert skab_changepoint_score([(truth, _from(300, 40))]) == pytest.approx(100 * (_scale_at(500) + 1) / 2)
    assert skab_changepoint_score([(truth, _from(300, 40))]) == pytest.approx(72.2024, abs=1e-4)


def test_changepoint_false_alarms_and_later_predictions_in_window():
    # Hit at the changepoint (+1), a dip at row 150 makes two edges far from any window (2 FPs), and the
    # rows 11..70 carry no other edge. standard: S = 1 - 0.22 = 0.78 -> 100 (1.78 / 2) = 89;
    # low_fp: 1 - 0.44 -> 78; low_fn: null -2, perfect 1 -> 100 (2.78 / 3).
    pred = _from(300, 10)
    pred[150] = 0
    assert skab_changepoint_scores([(_cp(300, 10), pred)]) == pytest.approx(
        {"standard": 89.0, "low_fp": 78.0, "low_fn": 278 / 3}
    )
    # A second edge inside the same window is ignored: only the first prediction counts.
    pred = np.zeros(300, int)
    pred[10:20] = 1
    assert skab_changepoint_score([(_cp(300, 10), pred)]) == pytest.approx(100.0)


def test_changepoint_overlapping_windows_cut_the_right_one():
    # Changepoints at 10 and 40: windows [10, 70] and [40, 100] overlap, so SKAB's "cut right window"
    # makes the second [70, 100]. An edge at 50 is the first TP (position int(40/60*1000) = 666) and
    # leaves the second window empty (FN). standard: S = scale(666) - 1; null -2, perfect 2.
    score = skab_changepoint_score([(_cp(300, 10, 40), _from(300, 50))])
    assert score == pytest.approx(100 * (_scale_at(666) - 1 + 2) / 4)


def test_changepoint_scores_sum_over_files_before_normalising():
    # File 1 perfect (+1), file 2 missed (-1): S = 0, null -2, perfect 2 -> 50.
    runs = [(_cp(100, 20), _from(100, 20)), (_cp(100, 20), np.zeros(100, int))]
    assert skab_changepoint_score(runs) == pytest.approx(50.0)
    # A file without changepoints adds only its false alarms: a dip makes 2 edges, S = 1 - 0.22 -> 89.
    dip = np.zeros(100, int)
    dip[30:40] = 1
    assert skab_changepoint_score([(_cp(100, 20), _from(100, 20)), (np.zeros(100, int), dip)]) == pytest.approx(89.0)


def test_changepoint_window_is_measured_in_time_when_times_given():
    # Rows 2 s apart: the 60 s window after the changepoint (t = 20) ends at t = 80, i.e. row 40.
    times = np.arange(300) * 2.0
    assert skab_changepoint_score([(_cp(300, 10), _from(300, 40), times)]) == pytest.approx(44.5)
    assert skab_changepoint_score([(_cp(300, 10), _from(300, 40))]) == pytest.approx(72.2024, abs=1e-4)


def test_changepoint_validates():
    with pytest.raises(DataError, match="no true changepoints"):
        skab_changepoint_score([(np.zeros(10, int), np.ones(10, int))])
    with pytest.raises(DataError, match="same rows"):
        skab_changepoint_score([(_cp(10, 2), np.zeros(9, int))])
    with pytest.raises(DataError, match="only 0 and 1"):
        skab_changepoint_score([(_cp(10, 2), np.full(10, 0.5))])
    with pytest.raises(DataError, match="strictly increasing"):
        skab_changepoint_score([(_cp(3, 1), np.zeros(3, int), [0.0, 2.0, 1.0])])
    with pytest.raises(DataError, match="no runs"):
        skab_changepoint_score([])
    with pytest.raises(ConfigError, match="unknown profile"):
        skab_changepoint_score([(_cp(10, 2), np.zeros(10, int))], profile="strict")
    with pytest.raises(ConfigError, match="window"):
        skab_changepoint_score([(_cp(10, 2), np.zeros(10, int))], window=0)
