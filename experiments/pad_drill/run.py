"""Ablation 3: the pad drill. Loss with pad targets left in vs masked, at known pad fractions.

  PYTHONPATH=. python experiments/pad_drill/run.py
  PYTHONPATH=. python experiments/pad_drill/run.py tiny   # smoke run, seconds

Trains the tiny model twice per seed with the library's `train_step`: once on the
library's batches (pad targets masked) and once on the same batches with the loss
mask replaced by ones (the "forgot to mask the pads" bug; attention still masks
pads). The four runs (2 regimes x 2 seeds) share one vmapped step. Then, on the
train sequences padded to known pad fractions p, it reports
  masked   = token-mean NLL over real targets (the true loss)
  pads in  = token-mean NLL over every target position, pads included
and the ratio pads_in / masked against 1 - p. Writes results.md next to this file.
`tiny`: 4 steps, the report in a temporary directory.
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lmmask import config as config_lib  # noqa: E402
from lmmask import losses, parallel, sweep  # noqa: E402
from lmmask import step as step_lib
from lmmask.batching import batch_from_ids  # noqa: E402
from lmmask.data import (
  pipeline,  # noqa: E402
  verbs_source,
)

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = common.output_dir(HERE)
SEEDS = (0, 1)
REGIMES = ("masked", "pads_in")
STEPS = 4 if common.is_tiny() else 300
CURVE_EVERY = min(50, STEPS)  # steps between the training-loss rows of the report
TARGET_P = (0.5, 0.7, 0.9)  # reached by appending all-pad rows to the L = 14 batch


def make_config(seed):
  return config_lib.apply_overrides(sweep.load_config_file("configs/verbs.py:tiny"), {
      "seed": seed, "train.steps": STEPS, "optim.decay_steps": STEPS,
      "optim.warmup_steps": 30, "data.batch_size": 32, "train.progress_bar": False})


def train_all():
  """2 regimes x 2 seeds under one vmapped train_step; returns the 4 final states."""
  runs = [(reg, s) for reg in REGIMES for s in SEEDS]
  configs = [make_config(s) for _, s in runs]
  parallel.setup_jax_cache(configs[0].train.jax_cache_dir)
  corpus, tr, _ = verbs_source.splits(configs[0])
  states = [step_lib.create_train_state(
      c, jax.random.PRNGKey(c.seed), vocab_size=len(corpus.vocab),
      keys_are_prefix=c.data.pad_side == "right" and not c.data.packing) for c in configs]
  s0 = states[0]
  states = [s.replace(graphdef=s0.graphdef, tx=s0.tx, schedule=s0.schedule) for s in states]
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *states)
  step_fn = jax.jit(jax.vmap(step_lib.train_step), donate_argnums=0)
  pad = corpus.vocab.pad_id
  curve = []
  for step in range(STEPS):
    bs = []
    for (reg, _), c in zip(runs, configs):
      b = pipeline.train_batch(tr, step=step, batch_size=c.data.batch_size, seed=c.seed,
                               pad_id=pad)
      if reg == "pads_in":
        b = b.replace(loss_mask=np.ones_like(b.loss_mask))
      bs.append(b)
    stacked, m = step_fn(stacked, jax.tree.map(lambda *x: np.stack(x), *bs))
    if (step + 1) % CURVE_EVERY == 0:
      curve.append((step + 1, [float(v) for v in jax.device_get(m["loss"])]))
  unstack = [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(len(runs))]
  return runs, unstack, corpus, tr, curve


def drill_batches(split, pad):
  """[(label, batch)] with known pad fractions: L = 12 (tightest), L = 14, + pad rows."""
  ids14 = split.ids                                     # (N, 14), right padded
  longest = int((ids14 != pad).sum(1).max())
  out = [(f"L={longest} (tightest)", batch_from_ids(ids14[:, :longest], pad_id=pad)),
         ("L=14 (training length)", batch_from_ids(ids14, pad_id=pad))]
  b14 = out[-1][1]
  real = float(b14.loss_mask.sum())
  n, t = b14.loss_mask.shape
  for p in TARGET_P:
    extra = int(round(real / ((1 - p) * t))) - n      # all-pad rows to add
    ids = np.concatenate([ids14, np.full((extra, ids14.shape[1]), pad, ids14.dtype)])
    out.append((f"L=14 + {extra} pad rows", batch_from_ids(ids, pad_id=pad)))
  return out


@jax.jit  # once per batch shape: run op by op, this dispatches hundreds of kernels
def _losses(state, batch):
  logits = step_lib.forward(state, state.params, batch, deterministic=True)
  masked, _ = losses.masked_cross_entropy(logits, batch.targets, batch.loss_mask)
  ones = jnp.ones_like(batch.loss_mask)
  pads_in, _ = losses.masked_cross_entropy(logits, batch.targets, ones)
  pad_only = 1.0 - batch.loss_mask
  pad_nll, _ = losses.masked_cross_entropy(logits, batch.targets, pad_only)
  return masked, pads_in, pad_nll


def losses_on(state, batch):
  return tuple(float(x) for x in _losses(state, batch))


def main():
  t0 = time.time()
  runs, states, corpus, tr, curve = train_all()
  print(f"trained {len(runs)} runs in {time.time() - t0:.0f} s", flush=True)
  batches = drill_batches(tr, corpus.vocab.pad_id)
  table, summary = [], []
  for label, batch in batches:
    p = 1.0 - float(batch.loss_mask.sum()) / batch.loss_mask.size
    for reg in REGIMES:
      vals = [losses_on(st, batch) for (r, _), st in zip(runs, states) if r == reg]
      masked = common.mean_std([v[0] for v in vals])
      pads_in = common.mean_std([v[1] for v in vals])
      pad_nll = common.mean_std([v[2] for v in vals])
      ratio = common.mean_std([v[1] / v[0] for v in vals])
      summary.append({"batch": label, "pad_fraction": p, "trained": reg, "masked": masked,
                      "pads_in": pads_in, "pad_nll": pad_nll, "ratio": ratio,
                      "one_minus_p": 1 - p})
      table.append([label, f"{p:.3f}", reg, common.fmt_ms(*masked), common.fmt_ms(*pads_in),
                    common.fmt_ms(*pad_nll), common.fmt_ms(*ratio), f"{1 - p:.3f}"])
  curve_rows = [[s, *[f"{v:.3f}" for v in vs]] for s, vs in curve]
  parts = ["# Ablation 3 results (generated by experiments/pad_drill/run.py)", "",
           f"Tiny model, {STEPS} steps, AdamW lr 3e-3, B=32, seeds {list(SEEDS)} (mean ± std). "
           "Rows: the 280 train sequences (forms + lexicon) as one batch. `masked` is the "
           "true loss (token mean over real targets); `pads in` divides by every target "
           "position and adds the NLL at pad targets; `pad NLL` is the mean NLL at the pad "
           "targets alone.", "",
           common.md_table(["batch", "pad fraction p", "trained with", "masked (true)",
                            "pads in", "pad NLL", "pads in / masked", "1 − p"], table), "",
           "Training loss as each regime optimises it (run order: "
           + ", ".join(f"{r}/seed{s}" for r, s in runs) + "):", "",
           common.md_table(["step", *[f"{r}/s{s}" for r, s in runs]], curve_rows), "",
           f"Total wall time: {time.time() - t0:.0f} s."]
  with open(os.path.join(OUT, "results.md"), "w") as f:
    f.write("\n".join(parts) + "\n")
  with open(os.path.join(OUT, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  print("\n".join(parts))


if __name__ == "__main__":
  main()
