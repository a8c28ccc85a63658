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
run writes (config.json, metrics.jsonl with TensorBoard, results.json) but NO
checkpoints: this path is for short ablation runs, not for runs anyone resumes.
Under train.nonfinite=stop a run whose loss turns non-finite stops and is recorded
as diverged (results hold NaN losses and the step it reached) instead of raising,
since a learning-rate grid is expected to overshoot.
"""
from __future__ import annotations

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
from lmmask.eval import floor as floor_lib

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


def _nan_results(eval_sets) -> dict:
  return {f"{name}_{m}": math.nan for name in eval_sets for m in ("loss", "ppl", "accuracy")}


def train_seed_group(configs, workdirs, log=print, final_extras=None) -> list[dict]:
  """Train `configs` (identical but for seed and optim.lr) together; write their workdirs.

  Each run goes through the normal loop's pieces (train.py): its logger (metrics.jsonl
  and TensorBoard), the train.nonfinite policy (skip: the update is dropped and
  counted; stop: that run stops, recorded as diverged, and the group stops early once
  every run has), the periodic evaluation with the entropy-floor alarm, and the
  results builder with the corpus's end-of-run extras; its results add `runner`,
  `diverged` and `seed`.

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
  floors = [floor_lib.FloorMonitor(c, src, w) for c, src, w in zip(configs, sources, workdirs)]
  policies = [train.NonfinitePolicy(c, 0, f"lmmask ({os.path.basename(w)})")
              for c, w in zip(configs, workdirs)]
  stopped = [None] * n          # the step at which a run stopped (train.nonfinite=stop)
  best_val = [math.inf] * n
  best_step = [None] * n
  last_eval = [None] * n        # (step, numbers) of each run's latest evaluation
  total, t = c0.train.steps, c0.train
  loggers = [train.Logger(w) for w in workdirs]
  t0 = time.perf_counter()
  window_t, window_tokens = t0, np.zeros(n)
  done = 0
  try:
    for step in range(total):
      bs = [src.train_batch(step) for src in sources]
      batch = jax.tree.map(lambda *xs: np.stack(xs), *bs)
      stacked, metrics = step_fn(stacked, batch)
      metrics = jax.device_get(metrics)
      done = step + 1
      rows = [{k: v[i] for k, v in metrics.items()} for i in range(n)]
      for i, row in enumerate(rows):
        if stopped[i] is None and policies[i].check(row, done):
          stopped[i] = done
          log(f"  {os.path.basename(workdirs[i])}: non-finite at step {done}; stopped "
              f"(train.nonfinite=stop)")
        window_tokens[i] += float(row["real_tokens"])
      if train.is_due(done, t.log_every, total):
        now = time.perf_counter()
        for i, (c, row) in enumerate(zip(configs, rows)):
          if stopped[i] is None:  # a stopped run logs nothing more, as a normal run
            row["tokens_per_sec"] = window_tokens[i] / max(now - window_t, 1e-9)
            row["lr"] *= float(c.optim.lr)  # the shared schedule is the unit-lr one
            loggers[i].write(done, "train", train.train_row(row))
        window_t, window_tokens = now, np.zeros(n)
      if all(s is not None for s in stopped):
        log(f"  all {n} seeds diverged by step {done}; stopping early")
        break
      if train.is_due(done, t.eval_every, total):
        for i in range(n):
          if stopped[i] is not None:
            continue
          ev = train.evaluate_and_log(configs[i], unstack(stacked, i), sources[i], eval_sets,
                                      floors[i], loggers[i], done)
          last_eval[i] = (done, ev)
          if ev["val_loss"] < best_val[i]:
            best_val[i], best_step[i] = ev["val_loss"], done
  finally:
    for logger in loggers:
      logger.close()
  elapsed = time.perf_counter() - t0
  out = []
  for i, (c, w) in enumerate(zip(configs, workdirs)):
    state = unstack(stacked, i)
    diverged = stopped[i] is not None
    if diverged:
      final_eval = _nan_results(eval_sets)
      state = state.replace(step=jnp.asarray(stopped[i], jnp.int32))
    elif last_eval[i] is not None and last_eval[i][0] == done:
      final_eval = last_eval[i][1]
    else:
      final_eval = step_lib.run_evals(state, eval_sets)
    diverged = diverged or not np.isfinite(final_eval["train_loss"])
    res = train.build_results(c, state, sources[i], floors[i], final_eval, best_val=best_val[i],
                              best_step=best_step[i], steps_done=int(state.step),
                              seconds=elapsed / n, skips=policies[i].skips, extras=not diverged)
    res.update({"diverged": diverged, "runner": f"seedvmap x{n}", "seed": c.seed})
    if final_extras is not None and not diverged:
      res.update(final_extras(c, state, sources[i]))
    wd.atomic_write_json(os.path.join(w, wd.RESULTS_FILE), res)
    out.append(res)
  return out
