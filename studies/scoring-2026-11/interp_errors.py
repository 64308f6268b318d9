"""Errors with a third kind: interp = channel c's current patch hidden, every other channel's current patch visible."""
import sys, time, numpy as np, torch
from edgepeft.data.datasets import load_skab, load_asd
from edgepeft.data.windows import scoring_windows
from edgepeft.detect.detector import AnomalyDetector
method, ds = sys.argv[1], sys.argv[2]
if ds == "fleet":
    from edgepeft.data.synthetic import make_pump_fleet
    runs = make_pump_fleet(20, n_train=3000, n_test=3000, seed=0)
else:
    runs = load_skab("../shared/datasets/skab") if ds == "skab" else load_asd("../shared/datasets/asd")

@torch.no_grad()
def errors3(det, scaled):
    enc = det.method_.encoder(det.model_)
    P = enc.patch_len
    windows, hidden = scoring_windows(scaled, enc.window_len, P)
    K, _, C = windows.shape
    out = np.zeros((K, P, C, 3), np.float32)
    blank = enc.hidden_channel_features()
    bw = max(1, 512 // (C * C))
    for s in range(0, K, bw):
        e = min(s + bw, K); b = e - s
        w = torch.from_numpy(windows[s:e]); h = torch.from_numpy(hidden[s:e])
        fa, ma, sa = enc.temporal_features(w, h)
        out[s:e, :, :, 0] = enc.mix(fa, ma, sa)[:, -P:, :].numpy()
        pad = torch.from_numpy(hidden[s:e]).clone(); pad[:, :, -1] = False  # padding only
        fb, mb, sb = enc.temporal_features(w, pad)
        rows = torch.arange(b * C); ch = rows % C
        # blind
        reps = fa.repeat_interleave(C, 0); rm = ma.repeat_interleave(C, 0); rs = sa.repeat_interleave(C, 0)
        reps[rows, ch] = blank; rm[rows, ch] = 0.0; rs[rows, ch] = 1.0
        rec = enc.mix(reps, rm, rs)[:, -P:, :].reshape(b, C, P, C)
        out[s:e, :, :, 1] = torch.diagonal(rec, dim1=1, dim2=3).numpy()
        # interp: others fully visible (fb), channel c as in forecast mode (fa)
        reps = fb.repeat_interleave(C, 0); rm = mb.repeat_interleave(C, 0); rs = sb.repeat_interleave(C, 0)
        fa_r = fa.repeat_interleave(C, 0); ma_r = ma.repeat_interleave(C, 0); sa_r = sa.repeat_interleave(C, 0)
        reps[rows, ch] = fa_r[rows, ch]; rm[rows, ch] = ma_r[rows, ch]; rs[rows, ch] = sa_r[rows, ch]
        rec = enc.mix(reps, rm, rs)[:, -P:, :].reshape(b, C, P, C)
        out[s:e, :, :, 2] = torch.diagonal(rec, dim1=1, dim2=3).numpy()
    pred = out.reshape(-1, C, 3)[: scaled.shape[0]]
    return (pred - scaled[:, :, None]) ** 2

out = {}; t0 = time.time()
for i, run in enumerate(runs):
    det = AnomalyDetector(base="tiny", method=method, steps=150).fit(run.train)
    if ds == "skab":
        full = np.concatenate([run.train, run.test]); e = errors3(det, det._prepare(full)); tr = e[:len(run.train)]
    elif ds == "fleet":
        e = errors3(det, det._prepare(np.concatenate([run.train, run.test])))[len(run.train):]; tr = errors3(det, det._prepare(run.train))
    else:
        e = errors3(det, det._prepare(run.test)); tr = errors3(det, det._prepare(run.train))
    base2 = det._row_errors(det._prepare(run.train))
    assert np.allclose(tr[..., :2], base2, rtol=1e-4, atol=1e-5), "mismatch with detector errors"
    out[f"{i}_errors"] = e; out[f"{i}_trerr"] = tr; out[f"{i}_labels"] = run.labels
    out[f"{i}_cherr"] = det.channel_error_; out[f"{i}_w"] = det.evidence_weights_
    print(i, round(time.time() - t0, 1), flush=True)
np.savez(f"runs/s5/{ds}-{method}-interp.npz", **out)
