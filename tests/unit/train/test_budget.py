"""Memory measurement and the budget planner."""

from __future__ import annotations

import pytest
import torch

from edgepeft.core.errors import ConfigError
from edgepeft.train.budget import MB, LiveTensorBytes, PlanCandidate, SavedTensorBytes, measure_peak, plan_training


def test_live_bytes_count_what_is_held_at_once() -> None:
    def work() -> None:
        a = torch.ones(1000)
        b = a * 2  # 8000 bytes alive
        del a
        c = b + 1  # still 8000: a was freed
        del b, c

    assert measure_peak(work) == 8000
    tracker = LiveTensorBytes()
    with tracker:
        view = torch.zeros(100)[10:20]  # a view shares its storage: counted once
        _ = view.clone()
    assert tracker.peak_bytes == 400 + 40


def test_saved_bytes_exclude_resident_weights() -> None:
    weight = torch.nn.Parameter(torch.ones(50, 50))
    x = torch.ones(10, 50)
    with SavedTensorBytes([weight]) as saved:
        (x @ weight).tanh().sum()
    assert saved.saved_bytes == 10 * 50 * 4 * 2  # x (for grad of W) and tanh's output; W itself is excluded


def test_planner_prefers_candidates_in_order_and_fits_the_largest_batch() -> None:
    costs = {PlanCandidate(2): (2000, 300), PlanCandidate(1): (1000, 100)}

    def probe(candidate: PlanCandidate, batch: int) -> int:
        fixed, per_window = costs[candidate]
        return fixed + per_window * batch

    order = [PlanCandidate(2), PlanCandidate(1)]
    assert plan_training(probe, 10_000, order, max_batch=16).adapt_last == 2  # 2000 + 16 * 300 fits
    plan = plan_training(probe, 4000, order, max_batch=16)  # only the lean one takes 16 windows at once
    assert (plan.adapt_last, plan.batch_size, plan.micro) == (1, 16, 16)
    plan = plan_training(probe, 1600, order, max_batch=16)  # 16 windows per update, 6 at a time
    assert (plan.adapt_last, plan.batch_size, plan.micro, plan.peak_bytes) == (1, 16, 6, 1600)
    with pytest.raises(ConfigError, match=r"needs 0\.00 MB; pass --budget-mb"):
        plan_training(probe, 500, order, max_batch=16)
    with pytest.raises(ConfigError, match="positive"):
        plan_training(probe, 0, order, max_batch=16)
    assert plan_training(probe, 20 * MB, order, max_batch=1).micro == 1
