"""Ablation 2: the three mean reductions x seeds, for per-length-bucket losses.

  python launch.py --config=configs/sweeps/length_bias.py --workdir=DIR --mode=sweep

experiments/length_bias/run.py runs this sweep and then evaluates each point's
checkpoint per tense (length bucket). Sized for 2 CPU cores: tiny model, 400 steps.
"""
from ml_collections import config_dict


def get_config(arg=None):
  del arg
  c = config_dict.ConfigDict()
  c.name = "length_bias"                # sweep name (tables, plots)
  c.base = "configs/verbs.py:tiny"      # the experiment every point starts from
  c.fixed = config_dict.ConfigDict()    # overrides applied to every point
  c.fixed.train = {"steps": 400, "log_every": 25, "eval_every": 100, "ckpt_every": 400,
                   "progress_bar": False}
  c.fixed.data = {"batch_size": 32}
  c.fixed.optim = {"lr": 3e-3, "decay_steps": 400, "warmup_steps": 40}
  c.grid = config_dict.ConfigDict()     # cartesian product of these lists
  c.grid.loss = {"reduction": ["token_mean", "seq_mean", "seq_mean_of_means"]}
  c.grid.seed = [0, 1, 2]
  c.points = []                         # no explicit list: the grid alone
  c.metric = "train_loss"               # metric of the tables and the metric plot
  c.x = "loss.reduction"                # x-axis of the metric plot
  c.facet = ""                          # a single panel
  c.runner = "train"                    # checkpoints are needed for the per-bucket eval
  return c
