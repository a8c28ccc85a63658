"""Train several seeds and learning rates of one experiment at once, under vmap.

For tiny models a training step costs less than its dispatch and a compile costs
more than the whole run, so a sweep with many seeds and learning rates spends most
of its time in per-run overhead (tracing, compiling, checkpointing).
`train_seed_group` takes configs that differ only in `seed` and `optim.lr`, stacks
their train states, and runs `jax.vmap(step_lib.train_step)` once per step with each
run's own batches (the same `DataSource.train_batch` stream a normal run
sees) and its own dropout keys.

The learning rate becomes data: every optimizer in lmmask.optim is linear in
its peak lr (warmup, cosine/linear/constant decay all scale with it; clipping
comes before it), so the library's optimizer is built with peak lr 1 and its
update is multiplied by the run's lr, held in the optimizer state. This equals
the normal run up to float rounding (checked in tests/test_sweep.py). One compile
then serves the whole group. Each seed's workdir gets the files a normal
run writes (config.json, metrics.jsonl, results.json) but NO checkpoints:
this path is for short ablation runs, not for runs anyone resumes. A run whose
loss turns non-finite is recorded as diverged (results hold NaN losses) instead
of raising, since a learning-rate grid is expected to overshoot.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lmmask import checkpoint as ckpt
from lmmask import config as config_lib
from lmmask import parallel, train
from lmmask import step as step_lib
from lmmask import workdir as wd
from lmmask.data import registry
from lmmask.model import count_params

VARYING = ("seed", "optim.lr")  # the fields that may differ within a group


def _same_but_seed(configs):
  ref = config_lib.flatten(configs[0])
  for c in configs[1:]:
    diff = [k for k, v in config_lib.flatten(c).items() if k not in VARYING and ref.get(k) != v]
    if diff:
      raise ValueError(f"train_seed_group needs configs that differ only in "
                       f"{' and '.join(VARYING)}; these fields differ too: {diff}")


class _LrState(NamedTuple):
  lr: jnp.ndarray  # float32 scalar: this run's peak learning rate


def _scale_by_state_lr() -> optax.GradientTransformation:
  """Multiply updates by the lr stored in the state (so it can differ per vmapped run)."""
  def init(params):
    del params
    return _LrState(lr=jnp.ones((), jnp.float32))

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u: u * state.lr.astype(u.dtype), updates), state
  return optax.GradientTransformation(init, update)


def _unit_lr_state(config, data):
  """The library's train state for `config` with peak lr 1, times a stored lr."""
  unit = config.copy_and_resolve_references()
  unit.optim.lr = 1.0
  s = step_lib.create_train_state(unit, jax.random.PRNGKey(config.seed),
                                  vocab_size=data.vocab_size, keys_are_prefix=data.keys_are_prefix)
  tx = optax.chain(s.tx, _scale_by_state_lr())
  lr = float(config.optim.lr)
  # s.schedule stays the unit-lr one; logged lrs are multiplied by the run's lr.
  return s.replace(tx=tx, opt_state=(s.opt_state, _LrState(lr=jnp.asarray(lr, jnp.float32))))


def _nan_results():
  return {f"{p}_{m}": math.nan for p in ("train", "val", "val_english")
          for m in ("loss", "ppl", "accuracy")}


def train_seed_group(configs, workdirs, log=print, final_extras=None) -> list[dict]:
  """Train `configs` (identical but for seed and optim.lr) together; write their workdirs.

  final_extras(config, state, data) -> dict, if given, adds keys to each run's
  results from its own final state and DataSource (an experiment's generation-based
  metrics, which the stacked state cannot compute)."""
  if len(configs) != len(workdirs) or not configs:
    raise ValueError("give one workdir per config (and at least one config)")
  for c in configs:
    config_lib.validate(c)
  _same_but_seed(configs)
  c0 = configs[0]
  parallel.setup_jax_cache(c0.train.jax_cache_dir)
  for c, w in zip(configs, workdirs):
    if os.path.isdir(os.path.join(w, ckpt.CKPT_DIR)):
      raise ValueError(f"{w} holds checkpoints of a normal run; resume it with "
                       f"train.train_and_evaluate instead of the vmapped path")
    os.makedirs(w, exist_ok=True)
    if wd.claim(w, config_lib.to_dict(c)):
      wd.atomic_write_json(os.path.join(w, wd.CONFIG_FILE), config_lib.to_dict(c))
    open(os.path.join(w, wd.METRICS_FILE), "w").close()  # a rerun starts from step 0

  # Each seed's own data stream: batches are a pure function of (seed, step).
  sources = [registry.load(c, w) for c, w in zip(configs, workdirs)]
  states = [_unit_lr_state(c, src) for c, src in zip(configs, sources)]
  s0 = states[0]
  states = [s.replace(graphdef=s0.graphdef, tx=s0.tx, schedule=s0.schedule) for s in states]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
  del states
  eval_sets = sources[0].eval_sets()  # eval sets do not depend on the seed
  step_fn = jax.jit(jax.vmap(step_lib.train_step), donate_argnums=0)
  n = len(configs)
  unstack = lambda tree, i: jax.tree.map(lambda x: x[i], tree)  # noqa: E731
  logs = [open(os.path.join(w, "metrics.jsonl"), "a") for w in workdirs]
  diverged = np.zeros(n, bool)
  best_val = [math.inf] * n
  best_step = [None] * n
  total, t = c0.train.steps, c0.train
  t0 = time.perf_counter()
  try:
    for step in range(total):
      bs = [src.train_batch(step) for src in sources]
      batch = jax.tree.map(lambda *xs: np.stack(xs), *bs)
      stacked, metrics = step_fn(stacked, batch)
      done = step + 1
      if train.is_due(done, t.log_every, total):
        m = jax.device_get(metrics)
        for i, c in enumerate(configs):
          diverged[i] |= not (np.isfinite(m["loss"][i]) and np.isfinite(m["grad_norm"][i]))
          row = {"step": done, "kind": "train",
                 **{k: float(v[i]) for k, v in m.items() if k not in ("nll_sum", "num_correct")}}
          row["lr"] *= float(c.optim.lr)  # the shared schedule is the unit-lr one
          logs[i].write(json.dumps(row) + "\n")
        if diverged.all():
          log(f"  all {n} seeds diverged by step {done}; stopping early")
          break
      if train.is_due(done, t.eval_every, total):
        for i in range(n):
          if diverged[i]:
            continue
          ev = step_lib.run_evals(unstack(stacked, i), eval_sets)
          logs[i].write(json.dumps({"step": done, "kind": "eval", **ev}) + "\n")
          if ev["val_loss"] < best_val[i]:
            best_val[i], best_step[i] = ev["val_loss"], done
  finally:
    for f in logs:
      f.close()
  elapsed = time.perf_counter() - t0
  num_params = count_params(unstack(stacked, 0).model())
  out = []
  for i, (c, w) in enumerate(zip(configs, workdirs)):
    if diverged[i]:
      ev = _nan_results()
    else:
      ev = step_lib.run_evals(unstack(stacked, i), eval_sets)
      diverged[i] = not np.isfinite(ev["train_loss"])
    res = {"step": total, **ev, "best_val_loss": best_val[i], "best_step": best_step[i],
           "num_params": num_params, "steps_per_sec": total / elapsed / n,
           "train_seconds": elapsed / n, "split": c.data.split,
           "reduction": c.loss.reduction, "causal": bool(c.model.causal),
           "diverged": bool(diverged[i]), "runner": f"seedvmap x{n}"}
    if final_extras is not None and not diverged[i]:
      res.update(final_extras(c, unstack(stacked, i), sources[i]))
    wd.atomic_write_json(os.path.join(w, wd.RESULTS_FILE), res)
    out.append(res)
  return out
