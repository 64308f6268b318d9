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
