"""Ablation 4: held-out split policies (verbs | tense | person) x seeds.

  python launch.py --config=configs/sweeps/splits.py --workdir=DIR --mode=sweep

Sized for 2 CPU cores: the tiny model, 400 steps, the 3 seeds of a split vmapped.
"""
from ml_collections import config_dict


def get_config(arg=None):
  del arg
  c = config_dict.ConfigDict()
  c.name = "splits"                     # sweep name (tables, plots)
  c.base = "configs/verbs.py:tiny"      # the experiment every point starts from
  c.fixed = config_dict.ConfigDict()    # overrides applied to every point
  c.fixed.train = {"steps": 400, "log_every": 25, "eval_every": 50, "ckpt_every": 400,
                   "progress_bar": False}
  c.fixed.data = {"batch_size": 32}
  c.fixed.optim = {"lr": 3e-3, "decay_steps": 400, "warmup_steps": 40}
  c.grid = config_dict.ConfigDict()     # cartesian product of these lists
  c.grid.data = {"split": ["verbs", "tense", "person"]}
  c.grid.seed = [0, 1, 2]
  c.points = []                         # no explicit list: the grid alone
  c.metric = "val_ppl"                  # metric of the tables and the metric plot
  c.x = "data.split"                    # x-axis of the metric plot
  c.facet = ""                          # a single panel
  c.runner = "seedvmap"                 # the seeds of a split train together under vmap
  return c
