"""`edgepeft export-c`: the C99 sources compile cleanly with gcc, score real files as the detector does with int8
weights (within 1e-5), raise the same alarms, and fit the stated flash and RAM."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgepeft.bench.loadtest import series
from edgepeft.core.errors import ModelError
from edgepeft.detect.detector import AnomalyDetector
from edgepeft.runtime.export_c import build_host, export_c, int8_reference, object_sizes, run_host

SHARED = Path(__file__).resolve().parents[4] / "shared" / "datasets"
pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")


def _asset(kind: str) -> tuple[np.ndarray, np.ndarray]:
    if kind == "synthetic":
        rows = series(900, seed=5)
        rows[700:760, 1] = rows[699, 1]  # a stuck sensor
        return rows[:500], rows
    if kind == "skab":
        from edgepeft.data.datasets import load_skab

        run = load_skab(SHARED / "skab")[11]
        return run.train, np.concatenate([run.train, run.test])
    from edgepeft.data.datasets import load_asd

    run = load_asd(SHARED / "asd")[2]
    return run.train[:1200], run.test[:700]


@pytest.mark.parametrize("kind", [
    "synthetic",
    pytest.param("skab", marks=pytest.mark.skipif(not (SHARED / "skab").is_dir(), reason="no ../shared SKAB")),
    pytest.param("asd", marks=pytest.mark.skipif(not (SHARED / "asd").is_dir(), reason="no ../shared ASD")),
])
def test_compiled_c_scores_like_the_int8_detector(kind: str, tmp_path: Path) -> None:
    train, rows = _asset(kind)
    det = AnomalyDetector(base="tiny", method="lora", rank=4, steps=20, seed=0).fit(train)
    folder = det.save(tmp_path / "det")
    export = export_c(folder, tmp_path / "c")
    scores, alarms, _ = run_host(build_host(export.folder), rows)
    reference = int8_reference(folder).score_all(rows)
    assert np.max(np.abs(scores - reference["score"])) < 1e-5
    np.testing.assert_array_equal(alarms, reference["anomaly"])
    # int8 weights move the fp32 detector's scores by a little, not by their scale.
    assert np.max(np.abs(scores - det.score(rows))) < 0.15 * max(1.0, det.threshold_)
    sizes = object_sizes(export.folder)
    assert 0 <= export.ram_bytes - sizes["bss"] <= 1024  # the header's RAM bounds what the toolchain allocates
    assert export.flash_bytes <= sizes["rodata"] + sizes["data"] <= export.flash_bytes + 4096
    header = (export.folder / "edgepeft_model.h").read_text()
    assert f"#define EP_RAM_BYTES {export.ram_bytes}" in header and f"RAM {export.ram_bytes} bytes" in header
    # What the object needs from the C library: memory copies and libm, no allocator, no stdio.
    undefined = subprocess.run(["nm", "-u", str(export.folder / "edgepeft.o")], capture_output=True, text=True)
    symbols = {line.split()[-1] for line in undefined.stdout.splitlines() if line.strip()}
    assert symbols <= {"memcpy", "memmove", "memset", "expf", "logf", "sqrtf", "erff", "log", "log1p", "sqrt"}, symbols


def test_eight_channel_asset_fits_the_microcontroller_budget(tmp_path: Path) -> None:
    det = AnomalyDetector(base="tiny", method="lora", rank=4, steps=5).fit(series(400, n_channels=8))
    export = export_c(det.save(tmp_path / "det"), tmp_path / "c")
    assert export.flash_bytes <= 256 * 1024 and export.ram_bytes <= 64 * 1024


def test_methods_the_c_target_cannot_run_are_refused(tmp_path: Path, every_method: dict[str, Path]) -> None:
    with pytest.raises(ModelError, match="adds modules the C target does not run"):
        export_c(every_method["adapter"], tmp_path / "c")
    export_c(every_method["bitfit"], tmp_path / "bitfit")  # BitFit trains biases only: a plain encoder


def test_cli_export_c_and_its_errors(tmp_path: Path, versions: list[Path]) -> None:
    done = subprocess.run([sys.executable, "-m", "edgepeft.cli", "export-c", str(versions[0]), "--out",
                           str(tmp_path / "c")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "flash" in done.stderr and (tmp_path / "c" / "edgepeft_model.h").exists()
    bad = subprocess.run([sys.executable, "-m", "edgepeft.cli", "export-c", str(tmp_path / "nothing"), "--out",
                          str(tmp_path / "d")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "not an edgepeft detector" in bad.stderr


LEARN_DRIVER = r"""
#include <stdio.h>
#include "edgepeft.h"
#include "edgepeft_model.h"
int main(void) {
    float row[EP_C], score, loss, biases[EP_LEARN_PARAMS];
    long n = 0;
    for (;;) {
        for (int c = 0; c < EP_C; c++)
            if (scanf("%f", &row[c]) != 1) goto done;
        ep_push(row, &score);
        if (++n % EP_P == 0 && ep_learn(LR, &loss) == 0) printf("loss %.9g\n", loss);
    }
done:
    ep_biases(biases);
    for (int i = 0; i < EP_LEARN_PARAMS; i++) printf("%.9g\n", biases[i]);
    return 0;
}
"""
TRAINED = ("channel_blocks.0.attn.o.bias", "channel_blocks.0.ln2.bias", "channel_blocks.0.mlp.fc1.bias",
           "channel_blocks.0.mlp.fc2.bias", "ln_f.bias", "head.bias")


def test_device_learning_step_matches_pytorch(tmp_path: Path) -> None:
    """ep_learn (BitFit of the channel block's o/ln2/fc1/fc2 biases and the head's, SGD) after each of 12 patches
    ends with the biases and losses PyTorch computes for the same steps on the same model."""
    import torch

    from edgepeft.data.windows import scoring_windows

    lr, patches = 0.05, 12
    train, rows = _asset("synthetic")
    det = AnomalyDetector(base="tiny", method="lora", rank=4, steps=10, seed=0).fit(train)
    folder = det.save(tmp_path / "det")
    export = export_c(folder, tmp_path / "c")
    (export.folder / "learn.c").write_text(LEARN_DRIVER)
    binary = export.folder / "learn"
    built = subprocess.run(["gcc", "-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", "-pedantic", "-DEP_LEARN",
                            f"-DLR={lr}f", "-I", str(export.folder), str(export.folder / "learn.c"),
                            str(export.folder / "edgepeft.c"), "-lm", "-o", str(binary)],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    used = rows[: patches * 8]
    text = "\n".join(" ".join(f"{v:.9g}" for v in row) for row in used.astype(np.float32))
    out = subprocess.run([str(binary)], input=text, capture_output=True, text=True, timeout=120).stdout.splitlines()
    c_losses = [float(line.split()[1]) for line in out if line.startswith("loss")]
    c_biases = np.array([float(line) for line in out if not line.startswith("loss")])

    reference = int8_reference(folder)
    encoder = reference.model_
    params = dict(encoder.named_parameters())
    for name, param in params.items():
        param.requires_grad_(name in TRAINED)
    before = np.concatenate([params[name].detach().numpy().ravel() for name in TRAINED])
    scaled = reference.scaler_.transform(used.astype(np.float32))
    windows, hidden = scoring_windows(scaled, encoder.window_len, encoder.patch_len)
    losses = []
    for k in range(patches):
        x, h = torch.from_numpy(windows[k : k + 1]), torch.from_numpy(hidden[k : k + 1])
        feats, mean, std = encoder.temporal_features(x, h)
        pred = encoder.mix(feats, mean, std)[0, -8:, :]
        loss = (((pred - x[0, -8:, :]) / std) ** 2).mean()
        encoder.zero_grad()
        loss.backward()
        with torch.no_grad():
            for name in TRAINED:
                params[name] -= lr * params[name].grad
        losses.append(float(loss.detach()))
    want = np.concatenate([params[name].detach().numpy().ravel() for name in TRAINED])
    np.testing.assert_allclose(c_losses, losses, rtol=1e-4)
    assert np.max(np.abs(c_biases - want)) < 1e-5
    assert np.max(np.abs(want - before)) > 1e-3  # the steps did move them
