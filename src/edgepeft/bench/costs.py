"""Measured costs of a contender, in the same run as its quality numbers: nothing here is estimated.

- trainable parameters and their share of the base; adapter bytes as written to disk;
- peak training memory two ways:
  (a) tensor bytes of one real training step: the activations autograd saves for backward (caught with
      ``torch.autograd.graph.saved_tensors_hooks``, unique storages, weights excluded), plus the gradients
      and the AdamW state that step creates;
  (b) process RSS: the adaptation runs in a fresh ``spawn`` subprocess; its peak RSS after imports and model
      load minus its RSS at that point. The kernel's peak counter is reset first (``/proc/self/clear_refs``),
      because importing torch and peft peaks higher than a small model's training (see :func:`_measure`).
      Inference (scoring the test rows) is measured the same way in its own subprocess;
- scoring throughput (rows x channels per second) and the latency of scoring one window, p50 / p99.

Example (tensor bytes of a training step, full fine-tuning versus a frozen model):
    >>> import numpy as np
    >>> from edgepeft.models.patch_encoder import PatchEncoder, PatchEncoderConfig
    >>> series = np.random.default_rng(0).normal(size=(300, 2)).astype(np.float32)
    >>> def model(trainable):
    ...     base = PatchEncoder(PatchEncoderConfig(d_model=16, n_heads=2, n_layers=1, d_ff=32))
    ...     base.set_n_channels(2)
    ...     return base.requires_grad_(trainable)
    >>> full = tensor_memory_probe(model(True), series, batch_size=4)
    >>> frozen = tensor_memory_probe(model(False), series, batch_size=4)
    >>> full.activation_bytes > 0, frozen.activation_bytes, full.grad_bytes == full.trainable_bytes
    (True, 0, True)
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import pickle
import resource
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgepeft.core.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from edgepeft.bench.harness import Contender, Detector
    from edgepeft.detect.detector import AnomalyDetector

# Generous: a fresh interpreter imports torch and peft (about 8 s) before it measures anything.
CHILD_TIMEOUT_S = 900


# ---------------------------------------------------------------------------------------------- parameters


def is_edgepeft(det: Any) -> bool:
    from edgepeft.detect.detector import AnomalyDetector

    return isinstance(det, AnomalyDetector)


def parameter_costs(det: Detector, trains: bool) -> dict[str, Any]:
    """Trainable parameters, share of the base, base size; None for classical baselines (no base)."""
    if not is_edgepeft(det):
        return {"trainable_parameters": None, "trainable_share": None, "base_parameters": None}
    report = det.report_  # type: ignore[attr-defined]
    trainable = int(report["trainable_parameters"]) if trains else 0
    return {
        "trainable_parameters": trainable,
        "trainable_share": float(report["trainable_share"]) if trains else 0.0,
        "base_parameters": int(report["base_parameters"]),
    }


def adapter_bytes(det: Detector, trains: bool) -> int | None:
    """Bytes of the adapter tensor files as saved to disk (a temporary folder); None where there is no adapter."""
    if not is_edgepeft(det) or not trains:
        return None
    with tempfile.TemporaryDirectory(prefix="edgepeft-bench-") as tmp:
        folder = det.save(Path(tmp) / "detector")  # type: ignore[attr-defined]
        return int(det.adapter_bytes(folder))  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------- (a) tensor bytes


@dataclass
class TensorMemory:
    """Bytes held by tensors during one training step, by kind (unique storages, measured)."""

    activation_bytes: int  # saved for backward, excluding the weights themselves
    grad_bytes: int
    optimizer_bytes: int  # AdamW exp_avg, exp_avg_sq, step
    parameter_bytes: int  # every weight, frozen or not (resident whether training or not)
    trainable_bytes: int

    @property
    def training_bytes(self) -> int:
        """What training adds on top of the resident weights."""
        return self.activation_bytes + self.grad_bytes + self.optimizer_bytes

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "training_bytes": self.training_bytes}


def _unique_nbytes(tensors: Any) -> int:
    storages: dict[int, int] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(storages.values())


def tensor_memory_probe(
    model: nn.Module, series: np.ndarray, *, batch_size: int = 32, lr: float = 1e-3, seed: int = 0,
    micro_batch: int | None = None,
) -> TensorMemory:
    """One real training step of ``model`` on windows of ``series`` (T, C), exactly as ``adapt`` takes one.

    With ``micro_batch`` the step runs as ``adapt`` runs it: the batch goes through the model a micro-batch at a
    time, each part's graph freed by its backward pass before the next is built, so the activations reported
    are the largest any one part saved. The model is changed by the step: pass a fresh copy. A model with
    nothing trainable builds no autograd graph, so it saves no activations and has no gradients or optimizer
    state.
    """
    import torch

    from edgepeft.data.windows import training_windows
    from edgepeft.train.adapt import AdaptConfig, patch_loss, target_count
    from edgepeft.train.masks import sample_hidden

    params = [p for p in model.parameters() if p.requires_grad]
    weights = [*model.parameters(), *model.buffers()]
    weight_ptrs = {t.untyped_storage().data_ptr() for t in weights}
    encoder = model.get_base_model() if hasattr(model, "get_base_model") else model
    rng = np.random.default_rng(seed)
    cfg = AdaptConfig(batch_size=batch_size, micro_batch=micro_batch)
    windows, pad = training_windows(series.astype(np.float32), batch_size, encoder.window_len, encoder.patch_len, rng)
    hidden, target = sample_hidden(pad, rng, cfg.forecast_prob, cfg.mask_ratio)
    x, h, t = torch.from_numpy(windows), torch.from_numpy(hidden), torch.from_numpy(target)
    total = target_count(t)
    parameter_bytes = _unique_nbytes(weights)
    trainable_bytes = _unique_nbytes(params)
    model.train()
    optimizer = torch.optim.AdamW(params, lr=lr) if params else None
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    peak_saved = 0
    for part in cfg.chunks():
        saved: dict[int, int] = {}

        def pack(tensor: torch.Tensor, saved: dict[int, int] = saved) -> torch.Tensor:
            storage = tensor.untyped_storage()
            ptr = storage.data_ptr()
            # A weight saved for backward (x @ W needs W) is resident anyway: it is not a training cost.
            if ptr not in weight_ptrs:
                saved[ptr] = max(saved.get(ptr, 0), storage.nbytes())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = patch_loss(model(x[part], h[part]), x[part], t[part], total)
        if optimizer is None or not loss.requires_grad:
            model.eval()
            return TensorMemory(0, 0, 0, parameter_bytes, trainable_bytes)
        peak_saved = max(peak_saved, sum(saved.values()))
        loss.backward()
    assert optimizer is not None
    grad_bytes = _unique_nbytes(p.grad for p in params if p.grad is not None)
    optimizer.step()
    state = [t for per_param in optimizer.state.values() for t in per_param.values() if torch.is_tensor(t)]
    model.eval()
    return TensorMemory(peak_saved, grad_bytes, _unique_nbytes(state), parameter_bytes, trainable_bytes)


@dataclass
class AdaptationSetup:
    """What ``AnomalyDetector.fit`` trains, rebuilt from its parameters: model, scaled fit rows, loop settings."""

    model: nn.Module
    fit_rows: np.ndarray  # (n_fit, C) standardised
    steps: int
    batch_size: int
    lr: float
    seed: int
    micro_batch: int | None = None


def adaptation_setup(det: AnomalyDetector, train: np.ndarray, trains: bool = True) -> AdaptationSetup:
    """Mirror of the set-up in ``AnomalyDetector.fit`` (scaler, fit/calibration split, channel tags, method,
    learning rate), so the probes measure the model that fit trains, not a look-alike."""
    import torch

    from edgepeft.data.scaler import ChannelScaler
    from edgepeft.models.registry import load_base
    from edgepeft.peft import PeftConfig, PeftMethod, get_method

    values = np.asarray(train, dtype=np.float32)
    base = load_base(det.base)
    n_calib = max(int(round(len(values) * det.calib_fraction)), base.patch_len)
    scaled = ChannelScaler().fit(values).transform(values)
    base.set_n_channels(values.shape[1], seed=det.seed)
    method = get_method(det.method)
    torch.manual_seed(det.seed)  # as fit does: the same initial adapter weights
    model = method.attach(base, PeftConfig(method=det.method, rank=det.rank, **(det.peft_options or {})))
    if not trains:
        PeftMethod.freeze_all(model)  # zero-shot: nothing is trained, not even the channel tags
    lr = det.lr if det.lr is not None else method.default_lr
    return AdaptationSetup(model, scaled[: len(values) - n_calib].astype(np.float32), det.steps, det.batch_size,
                           lr, det.seed, getattr(det, "micro_batch", None))


def training_tensor_memory(det: Detector, train: np.ndarray, trains: bool) -> TensorMemory | None:
    """Tensor bytes of one training step of a fresh copy of ``det``'s model; None for classical baselines."""
    if not is_edgepeft(det):
        return None
    setup = adaptation_setup(det, train, trains)  # type: ignore[arg-type]
    return tensor_memory_probe(setup.model, setup.fit_rows, batch_size=setup.batch_size, lr=setup.lr, seed=setup.seed,
                               micro_batch=setup.micro_batch)


# ---------------------------------------------------------------------------------------------- (b) process RSS


def _status_bytes(field: str) -> int:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/self/status")


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter VmHWM (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _measure(work: Any) -> dict[str, Any]:
    """Run ``work()`` and report its peak RSS above the RSS just before it started.

    The peak is read from VmHWM, the same per-process high-water mark that ``ru_maxrss`` reports, because
    ``ru_maxrss`` cannot be reset: it keeps the maximum of exited threads and is inherited across fork + exec,
    so a spawned child starts with its *parent's* peak. ``ru_maxrss`` is recorded as well, for comparison.
    """
    import gc

    gc.collect()
    baseline = _status_bytes("VmRSS")
    reset = _reset_peak()
    started = time.perf_counter()
    work()
    seconds = time.perf_counter() - started
    peak = _status_bytes("VmHWM")
    return {
        "rss_after_load_bytes": baseline,
        "peak_rss_bytes": peak,
        "increase_bytes": max(peak - baseline, 0),
        # Without a reset the peak may be the imports' own: the increase is then an upper bound.
        "peak_reset": reset,
        "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # kB on Linux
        "seconds": seconds,
    }


def _child_setup(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)


def _train_child(contender: Contender, train_path: str, threads: int | None) -> dict[str, Any]:
    """In a fresh interpreter: imports and model load, then the adaptation alone, measured."""
    train = np.load(train_path)
    det = contender.make()
    if contender.kind == "baseline":
        # No model to load and no torch: warm the scikit-learn imports, then the whole fit is the training.
        import sklearn.decomposition  # noqa: F401
        import sklearn.ensemble  # noqa: F401

        return _measure(lambda: det.fit(train))
    _child_setup(threads)  # imports torch: counted in the baseline, as on a device that runs the detector
    from edgepeft.train.adapt import AdaptConfig, adapt

    setup = adaptation_setup(det, train, contender.trains)  # type: ignore[arg-type]
    cfg = AdaptConfig(steps=setup.steps if contender.trains else 0, batch_size=setup.batch_size, seed=setup.seed,
                      micro_batch=setup.micro_batch)
    return _measure(lambda: adapt(setup.model, setup.fit_rows, cfg, lr=setup.lr))


def _infer_child(saved: str, test_path: str, threads: int | None) -> dict[str, Any]:
    """In a fresh interpreter: load the fitted detector, then score the test rows, measured."""
    test = np.load(test_path)
    path = Path(saved)
    if path.is_dir():
        _child_setup(threads)
        from edgepeft.detect.detector import AnomalyDetector

        det: Any = AnomalyDetector.load(path)
    else:
        import sklearn.decomposition  # noqa: F401
        import sklearn.ensemble  # noqa: F401

        with open(path, "rb") as handle:
            det = pickle.load(handle)  # our own file, written a moment ago by the parent
    det.score(test[: min(len(test), 128)])  # the first call builds lazy state (thread pools); not measured
    return _measure(lambda: det.score(test))


def process_memory(
    contender: Contender, det: Detector, train: np.ndarray, test: np.ndarray, threads: int | None = None
) -> dict[str, Any]:
    """Peak RSS increase of adaptation and of inference, each in its own fresh ``spawn`` subprocess.

    The two subprocesses run side by side (they share nothing; only the wall clock is saved).
    """
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="edgepeft-rss-") as tmp:
        train_path, test_path = Path(tmp) / "train.npy", Path(tmp) / "test.npy"
        np.save(train_path, np.asarray(train, dtype=np.float32))
        np.save(test_path, np.asarray(test, dtype=np.float32))
        if is_edgepeft(det):
            saved = det.save(Path(tmp) / "detector")  # type: ignore[attr-defined]
        else:
            saved = Path(tmp) / "detector.pkl"
            saved.write_bytes(pickle.dumps(det))
        pools = [concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) for _ in range(2)]
        try:
            train_job = pools[0].submit(_train_child, contender, str(train_path), threads) if contender.trains else None
            infer_job = pools[1].submit(_infer_child, str(saved), str(test_path), threads)
            training = train_job.result(timeout=CHILD_TIMEOUT_S) if train_job is not None else None
            inference = infer_job.result(timeout=CHILD_TIMEOUT_S)
        except (concurrent.futures.process.BrokenProcessPool, concurrent.futures.TimeoutError, OSError) as exc:
            # An hour-long benchmark should not be lost to one measurement: record the failure, keep going.
            failed = {"error": f"measuring subprocess failed ({type(exc).__name__}: {exc}); a spawned process "
                      "re-imports the main script, so a script must guard its entry with "
                      "`if __name__ == '__main__':` (the edgepeft command does), or pass --no-rss"}
            training, inference = (failed if contender.trains else None), failed
        finally:
            for pool in pools:
                pool.shutdown(wait=True, cancel_futures=True)
    return {"training": training, "inference": inference}


# ---------------------------------------------------------------------------------------------- speed


def window_rows(det: Detector) -> int:
    """Rows in one scoring window: the base's ``window_len``; baselines are timed on the default base window."""
    from edgepeft.models.patch_encoder import PatchEncoderConfig
    from edgepeft.models.registry import base_config

    base = getattr(det, "base", None)
    try:
        return int(base_config(base).window_len if base else PatchEncoderConfig().window_len)
    except ConfigError:  # a user-registered base: ask a fitted model
        return int(det.method_.encoder(det.model_).window_len)  # type: ignore[attr-defined]


def window_latency(det: Detector, stream: np.ndarray, n_calls: int = 200, n_warmup: int = 5) -> dict[str, Any]:
    """Latency of scoring a stream window by window: ``n_calls`` calls on consecutive windows, in ms."""
    if n_calls < 1:
        raise ConfigError(f"latency calls must be >= 1, got {n_calls}")
    rows = window_rows(det)
    stream = np.asarray(stream, dtype=np.float32)
    if len(stream) < rows:
        stream = np.resize(stream, (rows, stream.shape[1]))  # repeat a too-short stream to one full window
    n_starts = len(stream) - rows + 1
    times = []
    for call in range(n_warmup + n_calls):
        start = call % n_starts
        window = stream[start : start + rows]
        began = time.perf_counter()
        det.score(window)
        if call >= n_warmup:
            times.append(time.perf_counter() - began)
    ms = np.asarray(times) * 1e3
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "calls": n_calls,
        "window_rows": rows,
    }


def throughput(n_rows: int, n_channels: int, seconds: float) -> float:
    """Rows x channels scored per second.

    >>> throughput(1000, 8, 0.5)
    16000.0
    """
    return float(n_rows * n_channels / seconds) if seconds > 0 else float("inf")


def contender_costs(
    contender: Contender,
    det: Detector,
    train: np.ndarray,
    test: np.ndarray,
    *,
    rss: bool = True,
    latency_calls: int = 200,
    threads: int | None = None,
) -> dict[str, Any]:
    """Every per-contender cost measured on one fitted detector and its asset's data."""
    tensors = training_tensor_memory(det, train, contender.trains)
    costs: dict[str, Any] = {
        **parameter_costs(det, contender.trains),
        "adapter_bytes": adapter_bytes(det, contender.trains),
        "train_tensor_bytes": tensors.to_dict() if tensors is not None and contender.trains else None,
        "latency": window_latency(det, test, latency_calls),
    }
    if rss:
        memory = process_memory(contender, det, train, test, threads)
        costs["train_rss"], costs["infer_rss"] = memory["training"], memory["inference"]
    else:
        costs["train_rss"] = costs["infer_rss"] = None
    return costs
