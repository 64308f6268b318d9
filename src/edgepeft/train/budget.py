"""Training memory on the device: measure it, and plan a training set-up that fits a budget.

What is measured (all real, nothing estimated from formulas):
- ``LiveTensorBytes``: the peak of tensor bytes that a piece of work allocates and holds at the same time,
  tracked op by op (a ``TorchDispatchMode`` sees every new storage; a finaliser sees it die). For a training
  step that is activations saved for backward, recomputed activations under checkpointing, gradients,
  temporaries and optimizer state created on the first step; for scoring it is the forward pass's
  temporaries. Weights that existed before are not counted: they are resident whether training or not.
- saved-tensor bytes (``torch.autograd.graph.saved_tensors_hooks``): the part autograd keeps for backward.
- optimizer state and other persistent training state (feature cache, replay reservoir, EWC anchors).
- process RSS and its high-water mark, for the whole run (allocator and interpreter included).

The planner tries set-ups in order of preference (the most adapted blocks, no activation checkpointing, frozen
features cached) and fits the largest micro-batch each allows (an update always uses the full batch; windows go
through the model a micro-batch at a time, gradients accumulated), from two measured probe steps (memory grows
linearly with the windows in flight) checked by a third at the chosen size. It needs no model knowledge: the
caller supplies a ``probe(candidate, batch_size) -> bytes`` that runs one real step.

Example:
    >>> import torch
    >>> tracker = LiveTensorBytes()
    >>> with tracker:
    ...     a = torch.zeros(1000)        # 4000 bytes
    ...     b = torch.zeros(1000)        # 8000 held at once
    ...     del a, b
    ...     c = torch.zeros(500)
    >>> tracker.peak_bytes
    8000
    >>> plan = plan_training(lambda cand, batch: 1000 + 100 * batch, 2500,
    ...                      [PlanCandidate(adapt_last=1)], max_batch=32)
    >>> plan.batch_size, plan.micro, plan.peak_bytes
    (32, 15, 2500)
"""

from __future__ import annotations

import resource
import sys
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from edgepeft.core.errors import ConfigError

MB = 1024 * 1024


class LiveTensorBytes(TorchDispatchMode):
    """Context manager: peak bytes of tensor storages allocated inside it and alive at the same time.

    Storages are keyed by their data pointer, so views and in-place results are not counted twice.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._live: dict[int, int] = {}

    def _free(self, key: int) -> None:
        self.live_bytes -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:  # noqa: ANN401
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor) and item.device.type != "meta":
                storage = item.untyped_storage()
                key, size = storage.data_ptr(), storage.nbytes()
                if size and key not in self._live:
                    self._live[key] = size
                    self.live_bytes += size
                    weakref.finalize(storage, self._free, key)
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        return out


class SavedTensorBytes:
    """Context manager: unique bytes autograd saves for backward, excluding the given (resident) weights."""

    def __init__(self, weights: Sequence[torch.Tensor] = ()) -> None:
        self._exclude = {w.untyped_storage().data_ptr() for w in weights}
        self._saved: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)

    @property
    def saved_bytes(self) -> int:
        return sum(self._saved.values())

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in self._exclude:
            self._saved[key] = max(self._saved.get(key, 0), storage.nbytes())
        return tensor

    def __enter__(self) -> SavedTensorBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)


@dataclass
class StepMemory:
    """Measured memory of one training step, in bytes.

    ``peak_bytes`` is what training needs on top of the resident model: the step's own peak (which includes
    the gradients and any optimizer state it created) plus the persistent state that existed before it.
    """

    step_peak_bytes: int  # tensors the step allocated and held at once
    saved_bytes: int  # of which autograd saved for backward
    grad_bytes: int  # gradients of the trained parameters (alive from backward to the optimizer step)
    optimizer_bytes: int  # optimizer state after the step
    persistent_bytes: int  # optimizer state that existed before the step, plus cache/replay/EWC state

    @property
    def peak_bytes(self) -> int:
        return self.step_peak_bytes + self.persistent_bytes

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "peak_bytes": self.peak_bytes}


def measure_step(
    step: Callable[[], Any],
    params: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    optimizer_bytes: Callable[[], int],
    state_bytes: int = 0,
) -> StepMemory:
    """Run ``step()`` once, measuring it: ``params`` are the trained tensors, ``weights`` every resident one."""
    before = optimizer_bytes()
    live, saved = LiveTensorBytes(), SavedTensorBytes(weights)
    with live, saved:
        step()
    grad_bytes = sum(p.numel() * p.element_size() for p in params)
    return StepMemory(live.peak_bytes, saved.saved_bytes, grad_bytes, optimizer_bytes(), before + state_bytes)


def measure_peak(work: Callable[[], Any]) -> int:
    """Peak live tensor bytes of ``work()`` (for scoring: the forward pass's temporaries)."""
    live = LiveTensorBytes()
    with live:
        work()
    return live.peak_bytes


def process_rss() -> dict[str, int]:
    """This process's resident memory now and its high-water mark, in bytes."""
    import psutil

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is kilobytes on Linux and bytes on macOS.
    peak_bytes = peak if sys.platform == "darwin" else peak * 1024
    return {"rss_bytes": int(psutil.Process().memory_info().rss), "peak_rss_bytes": int(peak_bytes)}


# ---------------------------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class PlanCandidate:
    """One training set-up the planner may pick.

    Attributes:
        adapt_last: adapters in the last N blocks only (None: every block); earlier blocks run without storing
            activations.
        cache_features: reuse the frozen blocks' outputs computed while scoring instead of recomputing them
            (saves compute, costs the cache's memory).
        checkpoint_blocks: recompute the adapted blocks' activations in backward instead of storing them.
    """

    adapt_last: int | None
    cache_features: bool = False
    checkpoint_blocks: bool = False


@dataclass(frozen=True)
class TrainingPlan:
    """The set-up the planner chose and its measured peak.

    ``batch_size`` windows make one update; they go through the model ``micro_batch`` at a time with gradients
    accumulated (the step's activations scale with the micro-batch, the update's statistics with the batch).

    >>> TrainingPlan(16, 1, True, False, 3 * MB, 4 * MB, micro_batch=4).describe()
    'batch 16 in micro-batches of 4, adapters in the last 1 block(s), frozen features cached, no activation \
checkpointing: 3.0 MB of 4.0 MB'
    """

    batch_size: int
    adapt_last: int | None
    cache_features: bool
    checkpoint_blocks: bool
    peak_bytes: int
    budget_bytes: int | None
    micro_batch: int | None = None  # None: the whole batch at once

    @property
    def micro(self) -> int:
        return self.batch_size if self.micro_batch is None else min(self.micro_batch, self.batch_size)

    def describe(self) -> str:
        batch = f"batch {self.batch_size}"
        if self.micro < self.batch_size:
            batch += f" in micro-batches of {self.micro}"
        blocks = "every block" if self.adapt_last is None else f"the last {self.adapt_last} block(s)"
        cache = "frozen features cached" if self.cache_features else "no feature cache"
        ckpt = "activation checkpointing" if self.checkpoint_blocks else "no activation checkpointing"
        budget = "" if self.budget_bytes is None else f" of {self.budget_bytes / MB:.1f} MB"
        return f"{batch}, adapters in {blocks}, {cache}, {ckpt}: {self.peak_bytes / MB:.1f} MB{budget}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _largest_batch(probe: Callable[[int], int], budget_bytes: int, max_batch: int) -> tuple[int, int]:
    """(batch size, measured bytes) of the largest batch <= max_batch within the budget; (0, bytes at 1) if none."""
    one = probe(1)
    if one > budget_bytes:
        return 0, one
    if max_batch == 1:
        return 1, one
    two = probe(2)
    per_window = max(two - one, 1)
    batch = min(max_batch, 1 + (budget_bytes - one) // per_window)
    while batch > 2:
        # The linear model is checked by a real step; allocator rounding may make a batch a little dearer.
        measured = probe(batch)
        if measured <= budget_bytes:
            return batch, measured
        batch = min(batch - 1, 1 + (budget_bytes - one) * (batch - 1) // max(measured - one, 1))
    return (2, two) if batch == 2 and two <= budget_bytes else (1, one)


def plan_training(
    probe: Callable[[PlanCandidate, int], int],
    budget_bytes: int,
    candidates: Sequence[PlanCandidate],
    *,
    max_batch: int,
    headroom: float = 0.0,
) -> TrainingPlan:
    """The preferred candidate that fits ``budget_bytes`` with the largest micro-batch up to ``max_batch``.

    ``probe(candidate, n)`` measures a step on ``n`` windows at once. Every plan updates on ``max_batch`` windows;
    what the budget decides is how many go through the model at once (the micro-batch; gradients accumulate).
    ``candidates`` come most preferred first. A candidate taking the whole batch at once wins in that order; if
    none does, the one with the largest micro-batch does. ``headroom`` is the share of the budget kept free for steps
    that need more than the probe did (real batches mix masking patterns differently). Raises
    :class:`ConfigError` naming the smallest budget that would fit when nothing fits even at batch 1.
    """
    if budget_bytes <= 0:
        raise ConfigError(f"the memory budget must be positive, got {budget_bytes} bytes")
    if not candidates:
        raise ConfigError("no training set-up to plan")
    if not 0.0 <= headroom < 1.0:
        raise ConfigError(f"headroom must be in [0, 1), got {headroom}")
    usable = int(budget_bytes * (1 - headroom))
    best: TrainingPlan | None = None
    smallest = None
    for candidate in candidates:
        batch, measured = _largest_batch(lambda b, c=candidate: probe(c, b), usable, max_batch)
        if batch == 0:
            smallest = measured if smallest is None else min(smallest, measured)
            continue
        plan = TrainingPlan(max_batch, candidate.adapt_last, candidate.cache_features, candidate.checkpoint_blocks,
                            measured, budget_bytes, micro_batch=batch)
        if batch == max_batch:
            return plan
        if best is None or plan.micro > best.micro:
            best = plan
    if best is None:
        need = (smallest or 0) / (1 - headroom) / MB
        raise ConfigError(
            f"training does not fit in {budget_bytes / MB:.2f} MB: even the leanest set-up (adapters in the last "
            f"block, activation checkpointing, batch 1) needs {need:.2f} MB; pass --budget-mb {need * 1.05:.2f} "
            "or more, or use a lighter --optimizer (adafactor, sgd) or a smaller --base"
        )
    return best


def fixed_plan(candidate: PlanCandidate, batch_size: int, micro_batch: int | None = None) -> TrainingPlan:
    """The plan when no budget is given: the requested set-up as it is (peak measured later, during the run)."""
    c = candidate
    return TrainingPlan(batch_size, c.adapt_last, c.cache_features, c.checkpoint_blocks, 0, None, micro_batch)
