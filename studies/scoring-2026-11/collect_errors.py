"""Cache per-row errors for one method on one dataset: python collect_errors.py METHOD BASE(tiny|folder) skab|asd|fleet TAG [SEED]."""
import sys, numpy as np, time, json
from pathlib import Path
from safetensors.torch import load_file
from edgepeft.data.datasets import load_skab, load_asd
from edgepeft.detect.detector import AnomalyDetector
from edgepeft.models.registry import register_base, base_config
from edgepeft.models.patch_encoder import PatchEncoder
method, basedir, ds, tag = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
seed = int(sys.argv[5]) if len(sys.argv) > 5 else 0
base = "tiny"
if basedir != "tiny":
    name = Path(basedir).name
    def factory():
        m = PatchEncoder(base_config("tiny")); m.load_state_dict(load_file(str(Path(basedir) / f"{name.split('-',1)[1]}.safetensors")), strict=False); return m
    register_base("x" + name, factory); base = "x" + name
if ds == "fleet":
    from edgepeft.data.synthetic import make_pump_fleet
    runs = make_pump_fleet(20, n_train=3000, n_test=3000, seed=0)
else:
    runs = load_skab("../shared/datasets/skab") if ds == "skab" else load_asd("../shared/datasets/asd")
out = {}; t0 = time.time()
for i, run in enumerate(runs):
    det = AnomalyDetector(base=base, method=method, steps=150, seed=seed).fit(run.train)
    full = np.concatenate([run.train, run.test]) if ds == "skab" else run.test
    errors = det._row_errors(det._prepare(full))
    if ds == "fleet": errors = det._row_errors(det._prepare(np.concatenate([run.train, run.test])))[len(run.train):]
    out[f"{i}_errors"] = errors; out[f"{i}_labels"] = run.labels; out[f"{i}_cherr"] = det.channel_error_
    if ds != "skab": out[f"{i}_trerr"] = det._row_errors(det._prepare(run.train))
    out[f"{i}_w"] = det.evidence_weights_; out[f"{i}_ntrain"] = np.array(len(run.train))
    out[f"{i}_thr"] = np.array(det.threshold_); out[f"{i}_raw"] = full
    print(i, run.name, round(time.time() - t0, 1), flush=True)
Path("runs/s5").mkdir(parents=True, exist_ok=True)
np.savez(f"runs/s5/{ds}-{method}-{tag}.npz", **out)
