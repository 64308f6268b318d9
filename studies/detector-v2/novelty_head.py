"""Feasibility: a per-channel head on the cross-channel tokens, trained (with the adapter, or alone on the frozen
base) to tell windows with a fault injected into one channel from clean ones (NCAD-style outlier exposure).
Compares the fused v2 score with and without the head's evidence. Test labels only evaluate.

python studies/detector-v2/novelty_head.py fleet [n_assets] [head_steps]
"""
import sys
import time

import numpy as np
import torch
from torch import nn

from edgepeft.data.windows import scoring_windows, training_windows
from edgepeft.detect.detector import AnomalyDetector
from edgepeft.detect.evidence import Fusion
from edgepeft.detect.metrics import auc_pr, best_f1
from edgepeft.detect.scoring import trailing_mean

torch.set_num_threads(1)
ds = sys.argv[1]
n_assets = int(sys.argv[2]) if len(sys.argv) > 2 else 20
head_steps = int(sys.argv[3]) if len(sys.argv) > 3 else 150


def inject(win, rng):
    """Fault in one random channel over the last 1-4 patches of half the windows. (B, L, C) -> labels (B, C)."""
    B, L, C = win.shape
    lab = np.zeros((B, C), np.float32)
    for b in range(0, B, 2):
        c = rng.integers(C)
        n = 8 * rng.integers(1, 5)
        seg = win[b, L - n:, c].copy()
        k = rng.integers(6)
        sd = max(float(win[b, :, c].std()), 0.3)
        if k == 0:
            seg += rng.choice([-1, 1]) * rng.uniform(1, 3) * sd
        elif k == 1:
            seg[:] = seg[0]
        elif k == 2:
            seg += rng.uniform(0.5, 1.5) * sd * rng.standard_normal(n)
        elif k == 3:
            seg += rng.choice([-1, 1]) * rng.uniform(1, 3) * sd * np.linspace(0, 1, n)
        elif k == 4:
            seg = seg[::-1].copy()
        else:
            seg *= rng.uniform(1.5, 2.5)
        win[b, L - n:, c] = seg
        lab[b, c] = 1
    return win, lab


class Head(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.lin = nn.Linear(2 * d, 1)

    def forward(self, tok):  # (B, C, N+1, D)
        t = self.norm(tok)
        return self.lin(torch.cat([t[:, :, 0], t[:, :, 1:].mean(2)], -1)).squeeze(-1)  # (B, C)


def train_head(det, scaled_fit, train_adapter, rng):
    enc = det.method_.encoder(det.model_)
    head = Head(enc.cfg.d_model)
    params = list(head.parameters()) + ([p for p in det.model_.parameters() if p.requires_grad] if train_adapter else [])
    opt = torch.optim.AdamW(params, lr=3e-3)
    det.model_.train()
    for step in range(head_steps):
        win, hid = training_windows(scaled_fit, 32, enc.window_len, enc.patch_len, rng)
        hid[:, :, -1] = True
        win, lab = inject(win.copy(), rng)
        ctx = torch.enable_grad() if train_adapter else torch.no_grad()
        with ctx:
            f, m, s = enc.temporal_features(torch.from_numpy(win), torch.from_numpy(hid))
            tok = enc.mix_tokens(f)
        logit = head(tok if train_adapter else tok.detach())
        loss = nn.functional.binary_cross_entropy_with_logits(logit, torch.from_numpy(lab))
        opt.zero_grad()
        loss.backward()
        opt.step()
    det.model_.eval()
    return head


@torch.no_grad()
def novelty(det, head, scaled):
    enc = det.method_.encoder(det.model_)
    win, hid = scoring_windows(scaled, enc.window_len, enc.patch_len)
    out = []
    for s0 in range(0, len(win), 256):
        f, m, s = enc.temporal_features(torch.from_numpy(win[s0:s0 + 256]), torch.from_numpy(hid[s0:s0 + 256]))
        out.append(nn.functional.softplus(head(enc.mix_tokens(f))).numpy())
    return np.repeat(np.concatenate(out), enc.patch_len, axis=0)[: len(scaled)]


if ds == "fleet":
    from edgepeft.data.synthetic import make_pump_fleet
    runs = [(r.train, r.test, r.labels) for r in make_pump_fleet(n_assets, seed=0)]
    history = True
else:
    from edgepeft.data.datasets import load_asd, load_skab
    rr = load_skab("../shared/datasets/skab") if ds == "skab" else load_asd("../shared/datasets/asd")
    runs = [(r.train, r.test, r.labels) for r in rr[:n_assets]]
    history = ds == "skab"
res = {k: [] for k in ("v2", "v2+head(adapter)", "v2+head(frozen)", "head(adapter)", "head(frozen)")}
t0 = time.time()
for i, (train, test, lab) in enumerate(runs):
    for label, method, steps, train_adapter in (("adapter", "lora", 150, True), ("frozen", "bitfit", 0, False)):
        det = AnomalyDetector(base="tiny", method=method, steps=steps, evidence="dynamics,level,scale,relation").fit(train)
        series = np.concatenate([train, test]) if history else test
        keep = len(train) if history else 0
        sc, sc_tr = det._prepare(series), det._prepare(train)
        n_tr = len(train)
        n_fit = n_tr - max(int(round(n_tr * 0.2)), 8)
        errors_tr = det._row_errors(sc_tr)
        ref = det._reference_evidence(sc_tr, errors_tr)
        ev = det._evidence(sc)
        if label == "adapter":
            s = trailing_mean(det.fusion_.raw_score(ev), 8)[keep:]
            res["v2"].append((best_f1(lab, s)[0], auc_pr(lab, s)))
        rng = np.random.default_rng(0)
        head = train_head(det, sc_tr[:n_fit], train_adapter, rng)
        # the adapter moved: recompute dynamics for both
        errors_tr = det._row_errors(sc_tr)
        ref = det._reference_evidence(sc_tr, errors_tr)
        ev = det._evidence(sc)
        ref["novelty"] = novelty(det, head, sc_tr)
        ev["novelty"] = novelty(det, head, sc)
        fit_rows = {k: (v[n_fit:] if k in ("dynamics", "novelty") else v[64:]) for k, v in ref.items()}
        fusion = Fusion().fit(fit_rows)
        s = trailing_mean(fusion.raw_score(ev), 8)[keep:]
        res[f"v2+head({label})"].append((best_f1(lab, s)[0], auc_pr(lab, s)))
        hk = Fusion().fit({"novelty": fit_rows["novelty"]})
        s = trailing_mean(hk.raw_score({"novelty": ev["novelty"]}), 8)[keep:]
        res[f"head({label})"].append((best_f1(lab, s)[0], auc_pr(lab, s)))
    print(i, round(time.time() - t0), {k: np.round(np.mean(v, 0), 3).tolist() for k, v in res.items()}, flush=True)
