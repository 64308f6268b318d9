"""The training side of the streaming loop: rolling buffer, encoder fast paths, online trainer, checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgepeft.core.errors import ArtifactError
from edgepeft.peft import PeftConfig, get_method
from edgepeft.train.stream import (
    OnlineTrainer,
    RowBuffer,
    StreamEncoder,
    StreamTrainConfig,
    checkpoint_files,
    latest_checkpoint,
    read_checkpoint,
    scale_windows,
    write_checkpoint,
)
from tests.conftest import make_tiny_base, sine_series


def _stages(method: str = "adapter", adapt_last: int | None = 1, n_channels: int = 3) -> StreamEncoder:
    base = make_tiny_base()
    base.set_n_channels(n_channels)
    model = get_method(method).attach(base, PeftConfig(method=method, adapt_last=adapt_last))
    return StreamEncoder(model, get_method(method).encoder(model))


def _filled_buffer(n_rows: int = 300, n_channels: int = 3, **kwargs: object) -> RowBuffer:
    buffer = RowBuffer(256, n_channels, **kwargs)  # type: ignore[arg-type]
    for row in sine_series(n_rows, n_channels):
        buffer.append(row, learnable=True)
    return buffer


def test_buffer_windows_pad_before_the_stream_start() -> None:
    buffer = _filled_buffer(40)
    raw, pad = buffer.windows(np.array([16, 40]), window_len=32, patch_len=8)
    assert raw.shape == (2, 32, 3) and pad.shape == (2, 3, 4)
    assert pad[0, 0].tolist() == [True, True, False, False]  # rows -16..-1 do not exist
    assert not pad[1].any()
    np.testing.assert_array_equal(raw[1], buffer.rows(8, 40))
    scaled = scale_windows(raw, pad, lambda v: v + 100.0)
    assert (scaled[0, :16] == 0).all() and (scaled[0, 16:] > 90).all()


def test_buffer_state_round_trip_and_flags() -> None:
    buffer = _filled_buffer(300)
    buffer.set_flags(280, 290, False)
    other = RowBuffer(256, 3)
    other.load_state_dict(buffer.state_dict())
    assert other.count == 300 and other.oldest == 44
    np.testing.assert_array_equal(other.rows(44, 300), buffer.rows(44, 300))
    assert other.flag_range(279, 291).tolist() == [1] + [0] * 10 + [1]
    with pytest.raises(IndexError):
        other.rows(0, 10)


@pytest.mark.parametrize("method,adapt_last", [("adapter", 1), ("adapter", None), ("bitfit", 2)])
def test_shared_temporal_scoring_equals_plain_passes(method: str, adapt_last: int | None) -> None:
    """The fast path (temporal blocks once per patch) computes what the forecast and blind passes compute."""
    stages = _stages(method, adapt_last)
    with torch.no_grad():  # make the adapters non-trivial
        for param in stages.model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    windows = np.stack([sine_series(32, 3, seed=s) for s in range(4)])  # (K, L, C)
    hidden = np.zeros((4, 3, 4), bool)
    hidden[:, :, -1] = True
    hidden[0, :, :2] = True  # one window with padding
    fast, recorded = stages.predict(windows, hidden, blind=True, record=stages.prefix_len)
    model = stages.model
    x, mask = torch.from_numpy(windows), torch.from_numpy(hidden)
    with torch.no_grad():
        forecast = model(x, mask)[:, -8:, :].numpy()
        np.testing.assert_allclose(fast[..., 0], forecast, rtol=1e-4, atol=1e-5)
        for channel in range(3):
            blind_mask = mask.clone()
            blind_mask[:, channel, :] = True
            blind = model(x, blind_mask)[:, -8:, channel].numpy()
            np.testing.assert_allclose(fast[..., channel, 1], blind, rtol=1e-4, atol=1e-5)
    assert recorded is not None and recorded.shape == (4, 3, 5, 32)


def test_cached_features_give_the_training_loss_of_the_full_forward() -> None:
    stages = _stages("adapter", adapt_last=1)  # the temporal block is frozen: its output can be cached
    assert stages.prefix_len == 1
    windows = np.stack([sine_series(32, 3, seed=s) for s in range(2)])
    hidden = np.zeros((2, 3, 4), bool)
    hidden[:, :, -1] = True
    _, features = stages.predict(windows, hidden, blind=False, record=stages.prefix_len)
    target = hidden.copy()
    full = stages.loss(windows, hidden, target)
    cached = stages.loss(windows, hidden, target, torch.from_numpy(features))
    assert float(full.detach()) == pytest.approx(float(cached.detach()), rel=1e-5)


def test_trainer_learns_only_learnable_windows_and_round_trips() -> None:
    stages = _stages("adapter", adapt_last=None)
    buffer = _filled_buffer(200)
    buffer.set_flags(100, 200, False)
    trainer = OnlineTrainer(stages, StreamTrainConfig(batch_size=4, measure_every=1), 3e-3, 4, False, 3)
    ends = trainer.eligible_ends(buffer, upto=200)
    assert ends.min() == 16 and ends.max() == 100  # >= two real patches; nothing that touches row 100+
    assert trainer.eligible_ends(buffer, upto=200, aligned=True).tolist() == list(range(16, 101, 8))
    identity = lambda v: v  # noqa: E731
    assert trainer.update(buffer, 200, identity) is not None
    assert trainer.memory is not None and trainer.memory.peak_bytes > trainer.memory.saved_bytes > 0
    state = trainer.state_dict()
    clone = OnlineTrainer(_stages("adapter", adapt_last=None), StreamTrainConfig(batch_size=4), 3e-3, 4, False, 3)
    clone.load_state_dict(state)
    trainer.update(buffer, 200, identity)
    clone.update(buffer, 200, identity)
    for name, param in trainer.named.items():
        assert torch.equal(param, clone.named[name])
    empty = _filled_buffer(200)
    empty.set_flags(0, 200, False)
    assert trainer.update(empty, 200, identity) is None


def test_checkpoints_are_verified_and_only_the_newest_kept(tmp_path) -> None:
    for position in (10, 20, 30):
        write_checkpoint(tmp_path, position, {"position": position, "tensor": torch.arange(3)})
    files = checkpoint_files(tmp_path)
    assert [f.name for f in files] == ["checkpoint-000000000030.pt", "checkpoint-000000000020.pt"]
    assert read_checkpoint(files[0])["position"] == 30
    blob = bytearray(files[0].read_bytes())
    blob[-5] ^= 0xFF  # a flipped bit
    files[0].write_bytes(bytes(blob))
    with pytest.raises(ArtifactError, match="corrupt"):
        read_checkpoint(files[0])
    (tmp_path / ".checkpoint-000000000040.pt.abc.tmp").write_bytes(b"half a write")
    path, state = latest_checkpoint(tmp_path)  # type: ignore[misc]
    assert state["position"] == 20 and path.name.endswith("20.pt")
    assert not list(tmp_path.glob(".checkpoint-*.tmp"))
    assert latest_checkpoint(tmp_path / "missing") is None
