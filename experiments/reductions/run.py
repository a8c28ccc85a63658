"""Ablation 1: loss reductions x batch size x lr x seed, AdamW and plain SGD arms.

  PYTHONPATH=. python experiments/reductions/run.py
  PYTHONPATH=. python experiments/reductions/run.py tiny   # smoke run, seconds

Runs configs/sweeps/reductions.py (variants adam and sgd) through lmmask.sweep
into $LMMASK_EXPERIMENTS/reductions/{adam,sgd} (default /tmp/lmmask/experiments),
measures gradient-norm ratios between reductions, and writes results.md and
PNG plots next to this file. Finished sweep points are skipped on a rerun.
`tiny`: both arms with the sum reduction at B=8 only, two learning rates, seed=0,
4 steps, two batches for the gradient-norm ratios, everything in a temporary
directory.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402  (experiments/common.py)
import jax  # noqa: E402
import numpy as np  # noqa: E402

from lmmask import config as config_lib  # noqa: E402
from lmmask import losses, sweep  # noqa: E402
from lmmask import step as step_lib
from lmmask.data import (
  pipeline,  # noqa: E402
  verbs_source,
)

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = common.output_dir(HERE)
REDUCTIONS = losses.REDUCTIONS  # the gradient-norm ratios always cover all of them
SWEPT = ("sum",) if common.is_tiny() else REDUCTIONS  # the sweep's reduction grid
BATCHES = (8,) if common.is_tiny() else (8, 32, 128)  # must match the sweep's batch_size grid


def run_arm(arm):
  cfg = sweep.load_config_file(f"configs/sweeps/reductions.py:{arm}")
  if common.is_tiny():
    cfg = common.shrink_sweep(cfg)
    cfg.grid.data.batch_size = list(BATCHES)
    cfg.grid.optim.lr = list(cfg.grid.optim.lr)[:2]
    cfg.grid.loss.reduction = list(SWEPT)
  wd = os.path.join(common.workdir("reductions"), arm)
  t0 = time.time()
  rows = sweep.run(cfg, wd)
  print(f"{arm}: sweep took {time.time() - t0:.0f} s", flush=True)
  common.copy(os.path.join(wd, "results.csv"), OUT, f"{arm}_results.csv")
  common.copy(os.path.join(wd, "plots", "train_loss_vs_lr.png"), OUT, f"{arm}_train_loss_vs_lr.png")
  return cfg, rows


def analyse(arm, cfg, rows, metric="train_loss"):
  lrs = sorted(set(cfg.grid.optim.lr))
  table, best, edge, curves = [], {}, {}, {}
  for red in SWEPT:
    for b in BATCHES:
      cells, means = [], {}
      for lr in lrs:
        vals = [r[metric] for r in rows if r["loss.reduction"] == red
                and r["data.batch_size"] == b and r["optim.lr"] == lr and r["status"] == "done"]
        m, s = common.mean_std(vals)
        diverged = sum(not np.isfinite(v) for v in vals)
        means[lr] = m if diverged == 0 else float("inf")
        cells.append(common.fmt_ms(m, s) + (f" ({diverged} div.)" if 0 < diverged < len(vals)
                                           else ""))
      lr_best = min(means, key=means.get)
      stable = [lr for lr in lrs if np.isfinite(means[lr])]
      best[(red, b)] = lr_best
      edge[(red, b)] = max(stable) if stable else float("nan")
      curves[(red, b)] = means
      table.append([red, b, *cells, f"{lr_best:g}"])
  header = ["reduction", "B", *[f"lr={lr:g}" for lr in lrs], "best lr"]
  drift = []
  for red in SWEPT:
    bl = [best[(red, b)] for b in BATCHES]
    el = [edge[(red, b)] for b in BATCHES]
    drift.append([red, *[f"{x:g}" for x in bl], f"{bl[-1] / bl[0]:g}",
                  *[f"{x:g}" for x in el], f"{el[-1] / el[0]:g}"])
  return (common.md_table(header, table),
          common.md_table(["reduction", *[f"best lr B={b}" for b in BATCHES],
                           "best(128)/best(8)", *[f"largest stable lr B={b}" for b in BATCHES],
                           "stable(128)/stable(8)"], drift), best, edge, curves)


def plot_collapse(arm, curves, ratios):
  """train loss against lr x (|g_red| / |g_token_mean|): the token-equivalent lr."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(BATCHES), figsize=(4.2 * len(BATCHES), 3.6), sharey=True,
                           squeeze=False)
  axes = axes[0]
  for ax, (b, rat, _, _) in zip(axes, ratios):
    for red in SWEPT:
      means = curves[(red, b)]
      xs = [lr * rat[red][0] for lr in means]
      ax.plot(xs, [means[lr] if np.isfinite(means[lr]) else np.nan for lr in means], "o-",
              ms=3, label=red)
    ax.set_xscale("log")
    ax.set_xlabel("lr x |g| / |g_token_mean|  (token-equivalent lr)")
    ax.set_title(f"{arm}, B={b}", fontsize=9)
    ax.legend(fontsize=7)
  axes[0].set_ylabel("final train loss (mean over seeds)")
  fig.tight_layout()
  path = os.path.join(OUT, f"{arm}_train_loss_vs_equivalent_lr.png")
  fig.savefig(path, dpi=90)
  plt.close(fig)


def grad_norm_ratios(n_batches=8):
  """Gradient global norm of each reduction / that of token_mean, same params and batch."""
  base = config_lib.apply_overrides(sweep.load_config_file("configs/verbs.py:tiny"), {})
  corpus, tr, _ = verbs_source.splits(base)
  state = step_lib.create_train_state(base, jax.random.PRNGKey(0), vocab_size=len(corpus.vocab),
                                      keys_are_prefix=True)

  def gnorm(params, batch, reduction):
    def f(p):
      logits = step_lib.forward(state, p, batch, deterministic=True)
      return losses.masked_cross_entropy(logits, batch.targets, batch.loss_mask,
                                         reduction=reduction)[0]
    g = jax.grad(f)(params)
    return jax.numpy.sqrt(sum(jax.numpy.sum(x ** 2) for x in jax.tree.leaves(g)))
  gnorm = jax.jit(gnorm, static_argnums=2)
  out = []
  for b in BATCHES:
    ratios = {r: [] for r in REDUCTIONS}
    tokens, per_seq = [], []
    for step in range(n_batches):
      batch = pipeline.train_batch(tr, step=step, batch_size=b, seed=0,
                                   pad_id=corpus.vocab.pad_id)
      ref = float(gnorm(state.params, batch, "token_mean"))
      for r in REDUCTIONS:
        ratios[r].append(float(gnorm(state.params, batch, r)) / ref)
      n = float(batch.loss_mask.sum())
      tokens.append(n)
      per_seq.append(n / b)
    out.append((b, {r: common.mean_std(v) for r, v in ratios.items()},
                common.mean_std(tokens)[0], common.mean_std(per_seq)[0]))
  rows = []
  for b, rat, n_tok, n_seq in out:
    rows.append([b, f"{n_tok:.1f}", f"{rat['sum'][0]:.1f}", f"{n_seq:.2f}",
                 f"{rat['seq_mean'][0]:.2f}", f"{rat['seq_mean_of_means'][0]:.3f} ± "
                 f"{rat['seq_mean_of_means'][1]:.3f}"])
  return common.md_table(
      ["B", "targets/batch N", "‖g‖ sum / token_mean", "N/B", "‖g‖ seq_mean / token_mean",
       "‖g‖ seq_mean_of_means / token_mean"], rows), out


def main():
  t0 = time.time()
  parts = ["# Ablation 1 results (generated by experiments/reductions/run.py)", ""]
  summary = {}
  n_ratio_batches = 2 if common.is_tiny() else 8
  ratios_md, ratios = grad_norm_ratios(n_ratio_batches)
  for arm in ("sgd", "adam"):
    cfg, rows = run_arm(arm)
    full, drift, best, edge, curves = analyse(arm, cfg, rows)
    plot_collapse(arm, curves, ratios)
    summary[arm] = {"best_lr": {f"{r}/B={b}": lr for (r, b), lr in best.items()},
                    "largest_stable_lr": {f"{r}/B={b}": lr for (r, b), lr in edge.items()}}
    parts += [f"## {arm}: final train loss (full train set, token mean, dropout off), "
              f"mean ± std over seeds {list(cfg.grid.seed)}", "",
              f"{cfg.fixed.train.steps} steps per run; `{arm}_results.csv` has every run; "
              "'diverged' = a seed's loss became non-finite.", "",
              full, "", f"### {arm}: best lr (lowest mean) and largest lr with no diverged "
              "seed, per batch size", "", drift, ""]
  parts += ["## Gradient-norm ratios at initialisation "
            f"(seed=0, {n_ratio_batches} training batches each)", "",
            ratios_md, ""]
  summary["grad_ratios"] = {str(b): {r: m for r, (m, _) in rat.items()} | {"N": n, "N/B": nb}
                            for b, rat, n, nb in ratios}
  parts.append(f"Total wall time: {time.time() - t0:.0f} s.")
  common.write_results(OUT, parts, summary)


if __name__ == "__main__":
  main()
