"""Continual learning for the streaming loop: keep earlier normal regimes while adapting to the current one.

Online updates from recent windows only ("naive") follow the current regime and forget the earlier ones:
when an old regime comes back, its normal data reads as anomalous. Two remedies, usable together:
- experience replay: a small reservoir (Vitter's algorithm R, so every window ever offered has the same
  chance to be kept) mixed into every update batch;
- EWC (Kirkpatrick et al., 2017), online form: at consolidation points a diagonal Fisher estimate says which
  adapter parameters mattered; a quadratic penalty keeps those near their consolidated values.

Both states are small (``reservoir_windows`` windows; two copies of the adapter) and are checkpointed.

Example:
    >>> import numpy as np
    >>> reservoir = Reservoir(capacity=4, window_len=8, n_channels=2, n_patches=2)
    >>> rng = np.random.default_rng(0)
    >>> for _ in range(10):
    ...     reservoir.offer(np.zeros((3, 8, 2), np.float32), np.zeros((3, 2, 2), bool), rng)
    >>> reservoir.size, reservoir.seen
    (4, 30)
    >>> ContinualConfig(strategy="replay+ewc").uses_ewc
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from edgepeft.core.errors import ArtifactError, ConfigError

STRATEGIES = ("none", "replay", "ewc", "replay+ewc")


@dataclass
class ContinualConfig:
    """How the streaming loop avoids forgetting earlier regimes.

    Attributes:
        strategy: ``none`` (naive online updates), ``replay``, ``ewc`` or ``replay+ewc``.
        reservoir_windows: windows kept for replay.
        replay_share: share of every update batch drawn from the reservoir.
        ewc_strength: weight of the EWC penalty; the Fisher estimate is normalised to mean 1, so this is
            in units of the training loss per unit of squared parameter change.
        ewc_decay: how much of the previous Fisher estimate survives a consolidation (online EWC).
        fisher_batches: batches used to estimate the Fisher diagonal.
        consolidate_every: also consolidate every N rows (None: only at the end of probation and of each
            announced regime's probation).
    """

    strategy: str = "none"
    reservoir_windows: int = 256
    replay_share: float = 0.5
    ewc_strength: float = 100.0
    ewc_decay: float = 0.5
    fisher_batches: int = 4
    consolidate_every: int | None = None

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"unknown continual strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if self.reservoir_windows < 1 or not 0.0 < self.replay_share < 1.0:
            raise ConfigError("reservoir_windows must be >= 1 and replay_share in (0, 1)")
        if self.ewc_strength < 0 or not 0.0 <= self.ewc_decay <= 1.0 or self.fisher_batches < 1:
            raise ConfigError("ewc_strength must be >= 0, ewc_decay in [0, 1] and fisher_batches >= 1")
        if self.consolidate_every is not None and self.consolidate_every < 1:
            raise ConfigError(f"consolidate_every must be >= 1 row (or None), got {self.consolidate_every}")

    @property
    def uses_replay(self) -> bool:
        return "replay" in self.strategy

    @property
    def uses_ewc(self) -> bool:
        return "ewc" in self.strategy


class Reservoir:
    """A uniform sample of every training window offered so far, in raw units (scaled when replayed)."""

    def __init__(self, capacity: int, window_len: int, n_channels: int, n_patches: int) -> None:
        self.capacity = capacity
        self.windows = np.zeros((capacity, window_len, n_channels), np.float32)  # (K, L, C)
        self.pad = np.zeros((capacity, n_channels, n_patches), bool)  # (K, C, N)
        self.size = 0
        self.seen = 0

    @property
    def nbytes(self) -> int:
        return int(self.windows.nbytes + self.pad.nbytes)

    def offer(self, windows: np.ndarray, pad: np.ndarray, rng: np.random.Generator) -> None:
        """Algorithm R: keep each offered window with probability capacity / seen."""
        for window, mask in zip(windows, pad, strict=True):
            self.seen += 1
            if self.size < self.capacity:
                slot = self.size
                self.size += 1
            else:
                slot = int(rng.integers(self.seen))
                if slot >= self.capacity:
                    continue
            self.windows[slot] = window
            self.pad[slot] = mask

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``n`` windows drawn with replacement: windows (n, L, C), padding (n, C, N)."""
        index = rng.integers(self.size, size=n)
        return self.windows[index], self.pad[index]

    def state_dict(self) -> dict[str, object]:
        return {"windows": torch.from_numpy(self.windows[: self.size].copy()),
                "pad": torch.from_numpy(self.pad[: self.size].copy()), "seen": self.seen}

    def load_state_dict(self, state: dict[str, object]) -> None:
        windows, pad = state["windows"], state["pad"]
        if not isinstance(windows, torch.Tensor) or not isinstance(pad, torch.Tensor):
            raise ArtifactError("replay reservoir state is malformed")
        size = windows.shape[0]
        if size > self.capacity or windows.shape[1:] != self.windows.shape[1:]:
            raise ArtifactError(f"replay reservoir holds windows of shape {tuple(windows.shape)}, which do not fit "
                                f"this detector ({self.capacity} x {self.windows.shape[1:]})")
        self.windows[:size], self.pad[:size] = windows.numpy(), pad.numpy()
        self.size, self.seen = size, int(state["seen"])  # type: ignore[call-overload]


class EWC:
    """Online elastic weight consolidation over the trained (adapter) parameters.

    >>> w = nn.Parameter(torch.zeros(3))
    >>> ewc = EWC(strength=2.0)
    >>> ewc.consolidate({"w": w}, {"w": torch.tensor([1.0, 1.0, 4.0])})
    >>> with torch.no_grad():
    ...     _ = w.add_(1.0)
    >>> round(float(ewc.penalty({"w": w}).detach()), 4)  # 2 * mean(F / mean(F) * 1^2) with F / mean(F) = [.5, .5, 2]
    2.0
    """

    def __init__(self, strength: float, decay: float = 0.5) -> None:
        self.strength = strength
        self.decay = decay
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}

    @property
    def active(self) -> bool:
        return bool(self.fisher)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.fisher.values(), *self.anchor.values()))

    def consolidate(self, params: dict[str, nn.Parameter], fisher: dict[str, torch.Tensor]) -> None:
        """Fold a new Fisher estimate in and anchor at the current parameter values."""
        total = sum(float(f.sum()) for f in fisher.values())
        count = sum(f.numel() for f in fisher.values())
        scale = count / total if total > 0 else 0.0  # mean 1, so ``strength`` does not depend on the loss scale
        for name, value in fisher.items():
            new = value.detach() * scale
            old = self.fisher.get(name)
            self.fisher[name] = new if old is None else self.decay * old + new
            self.anchor[name] = params[name].detach().clone()

    def penalty(self, params: dict[str, nn.Parameter]) -> torch.Tensor:
        """strength * mean over parameters of F * (theta - theta_anchor)^2."""
        terms = [(self.fisher[n] * (params[n] - self.anchor[n]) ** 2).sum() for n in self.fisher]
        count = sum(f.numel() for f in self.fisher.values())
        return self.strength * torch.stack(terms).sum() / max(count, 1)

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"fisher": dict(self.fisher), "anchor": dict(self.anchor)}

    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        self.fisher = dict(state.get("fisher", {}))
        self.anchor = dict(state.get("anchor", {}))
        if set(self.fisher) != set(self.anchor):
            raise ArtifactError("EWC state is malformed (Fisher and anchor name different parameters)")
