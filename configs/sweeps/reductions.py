"""Ablation 1: loss reduction x batch size x learning rate x seed (experiments/reductions).

  python launch.py --config=configs/sweeps/reductions.py:adam --workdir=DIR --mode=sweep
  python launch.py --config=configs/sweeps/reductions.py:sgd --workdir=DIR --mode=sweep

Variants: "adam" (AdamW, clipping on, the library default) and "sgd" (plain SGD,
no momentum, no clipping, no weight decay: the update is exactly lr x grad).
Sized for 2 CPU cores: the tiny model, 150 steps per point, seeds and lrs vmapped.
"""
from ml_collections import config_dict

_LRS = {
    # AdamW: half-decades around the default 3e-3, up to where training degrades.
    "adam": [1e-3, 3e-3, 1e-2, 3e-2, 1e-1],
    # Plain SGD: half-decades over 4.5 decades, because the gradient of `sum` is
    # ~B x 9 tokens times that of token_mean (2 to 3 decades apart at B = 8..128).
    "sgd": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0],
}


def get_config(arg="adam"):
  arg = arg or "adam"
  if arg not in _LRS:
    raise ValueError(f"configs/sweeps/reductions.py: unknown variant {arg!r}; valid: {sorted(_LRS)}")
  c = config_dict.ConfigDict()
  c.name = f"reductions_{arg}"          # sweep name (tables, plots)
  c.base = "configs/verbs.py:tiny"      # the experiment every point starts from
  c.fixed = config_dict.ConfigDict()    # overrides applied to every point
  c.fixed.train = {"steps": 150,        # short: the loss floor (~0.7) is not reached yet
                   "log_every": 25, "eval_every": 50, "ckpt_every": 150,
                   "progress_bar": False}
  c.fixed.optim = {"decay_steps": 150, "warmup_steps": 15}
  if arg == "sgd":
    c.fixed.optim.update({"name": "sgd", "clip_norm": 0.0, "momentum": 0.0,
                          "warmup_steps": 0, "schedule": "constant"})
  c.grid = config_dict.ConfigDict()     # cartesian product of these lists
  c.grid.loss = {"reduction": ["token_mean", "seq_mean", "seq_mean_of_means", "sum"]}
  c.grid.data = {"batch_size": [8, 32, 128]}
  c.grid.optim = {"lr": _LRS[arg]}
  c.grid.seed = [0, 1, 2]
  c.points = []                         # no explicit list: the grid alone
  c.metric = "train_loss"               # full train set, token mean, dropout off: what the lr tunes
  c.x = "optim.lr"                      # x-axis of the metric plot
  c.facet = "loss.reduction"            # one panel per reduction
  c.plot_each = False                   # 300+ points: the overlay plot only
  c.runner = "seedvmap"                 # the 3 seeds of a setting train together under vmap
  return c
