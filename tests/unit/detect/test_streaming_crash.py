"""Crash safety: a real streaming process killed with SIGKILL at random moments, at least 20 times.

Every restart must resume from the newest checkpoint on disk, no checkpoint file may ever be unreadable, and
the outputs and the adapter at the end must be bit-identical to a run that was never interrupted.

The processes are forked from a forkserver that has imported torch and edgepeft once: a fresh interpreter per
restart would spend seconds on imports and the test would mostly measure those.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import torch

from edgepeft.detect.stream_files import RUNS_LOG, stream_array
from edgepeft.train.stream import checkpoint_files, latest_checkpoint, read_checkpoint
from tests.conftest import sine_series

KILLS = 20
PARAMS = {"base": "tiny", "method": "bitfit", "warmup": 100, "warmup_steps": 10, "update_every": 16,
          "batch_size": 4, "continual": "replay", "seed": 0}
CHECKPOINT_EVERY = 16


def _newest_position(directory: Path) -> int:
    """Position of the newest checkpoint, after checking that every checkpoint file there is readable."""
    for path in checkpoint_files(directory):
        read_checkpoint(path)  # raises ArtifactError on a torn or corrupt file
    found = latest_checkpoint(directory)
    return 0 if found is None else int(found[1]["detector"]["n_seen"])


def _starts(directory: Path) -> list[int]:
    log = directory / RUNS_LOG
    return [int(line.split()[1]) for line in log.read_text().splitlines()] if log.exists() else []


def test_sigkill_at_random_moments_resumes_from_the_last_good_checkpoint(tmp_path: Path) -> None:
    values = sine_series(3000, 2, seed=7)
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["edgepeft.detect.streaming", "torch._dynamo"])
    old_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the forkserver: one thread, like the rest of the suite
    try:
        reference_dir = tmp_path / "reference"
        kwargs = {"checkpoint_every": CHECKPOINT_EVERY}
        reference = ctx.Process(target=stream_array, args=(values, PARAMS),
                                kwargs={**kwargs, "checkpoint_dir": reference_dir})
        reference.start()
        rng = random.Random(0)
        kills, resumed_at, rounds = 0, [], []
        # A round kills one stream until it reaches its end. On a machine whose speed changes under other load, a
        # run can finish before its kill lands; then a new round starts on a fresh stream, so the test always
        # gets its kills, and every round's finished stream is checked against the uninterrupted one.
        while kills < KILLS and len(rounds) < 5:
            killed_dir = tmp_path / f"killed-{len(rounds)}"
            rounds.append(killed_dir)
            rate = None  # rows per second of a run, as observed so far
            while kills < KILLS:
                before = _newest_position(killed_dir)
                child = ctx.Process(target=stream_array, args=(values, PARAMS),
                                    kwargs={**kwargs, "checkpoint_dir": killed_dir})
                starts = len(_starts(killed_dir))
                # Spread the kills over the whole stream whatever the machine's speed: aim each run at an equal
                # share of the rows still to go, then kill it at a random moment around that.
                share = (len(values) - before) / (KILLS - kills + 2)
                delay = 0.4 if not rate else min(max(share / rate, 0.05), 1.0)
                pause = rng.uniform(0.3 * delay, 1.7 * delay)
                child.start()
                time.sleep(pause)
                try:
                    os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
                except ProcessLookupError:
                    # The run reached the end of the stream before its kill landed: it must have finished
                    # cleanly. Not counted as a kill; the next round starts a fresh stream.
                    child.join()
                    assert child.exitcode == 0, child.exitcode
                    assert _newest_position(killed_dir) == len(values)
                    break
                child.join()
                assert child.exitcode == -signal.SIGKILL
                kills += 1
                new_starts = _starts(killed_dir)[starts:]
                assert new_starts in ([], [before]), (new_starts, before)  # resumed exactly at the newest checkpoint
                resumed_at += new_starts
                after = _newest_position(killed_dir)
                assert after >= before  # progress is never lost
                if after > before:
                    rate = (after - before) / pause
        for killed_dir in rounds:
            final = ctx.Process(target=stream_array, args=(values, PARAMS),
                                kwargs={**kwargs, "checkpoint_dir": killed_dir})
            final.start()
            final.join()
            assert final.exitcode == 0
        reference.join()
        assert reference.exitcode == 0
    finally:
        if old_threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old_threads
    assert kills >= KILLS, f"only {kills} kills landed before the stream ended; the machine was too fast or slow"
    assert len(set(resumed_at)) > 3  # the kills landed at many different points of the stream
    # Every finished stream reads back from its checkpoints (no rows are recomputed): bit-identical.
    expected = stream_array(values, PARAMS, checkpoint_dir=reference_dir, checkpoint_every=CHECKPOINT_EVERY)
    for killed_dir in rounds:
        done = stream_array(values, PARAMS, checkpoint_dir=killed_dir, checkpoint_every=CHECKPOINT_EVERY)
        assert done.resumed_from == len(values)
        for key in ("score", "p_anomaly", "anomaly", "probation"):
            assert np.array_equal(getattr(done, key), getattr(expected, key)), (killed_dir.name, key)
        assert done.detector.adapter_bytes() == expected.detector.adapter_bytes()
        assert torch.equal(torch.from_numpy(done.score), torch.from_numpy(expected.score))
