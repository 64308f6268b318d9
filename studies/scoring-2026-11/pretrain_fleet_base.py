"""Pretrain the tiny architecture on generated signals plus real normal data: python pretrain_fleet_base.py pump|asd."""
import sys, glob
from edgepeft.models.registry import base_config
from edgepeft.train.pretrain import PretrainConfig, pretrain
which = sys.argv[1]; share = float(sys.argv[2]) if len(sys.argv) > 2 else 0.5
data = (["../shared/datasets/skab/anomaly-free/anomaly-free.csv"] if which == "pump"
        else sorted(glob.glob("../shared/datasets/asd/omi-*/train.csv")))
cfg = PretrainConfig(steps=4000, batch_size=64, data=data, real_share=share,
                     checkpoint_dir=f"runs/s5/ck-{which}", out_dir=f"runs/s5/base-{which}", seed=0)
r = pretrain(which, base_config("tiny"), cfg, progress=lambda s, t, l: print(s, round(l, 4), flush=True) if s % 250 == 0 else None)
print(r)
