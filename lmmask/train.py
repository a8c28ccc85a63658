"""The training loop: `train_and_evaluate(config, workdir)`.

Everything else has its own owner: the state and the steps (step.py), the
workdir's files and the one restore (workdir.py), orbax (checkpoint.py), the
corpus (data/registry.py), per-corpus evaluation extras (eval/evaluate.py).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

import jax
import numpy as np

from lmmask import checkpoint as ckpt
from lmmask import config as config_lib
from lmmask import parallel, preempt
from lmmask import step as step_lib
from lmmask import workdir as wd
from lmmask.data import registry
from lmmask.eval import evaluate as evaluation
from lmmask.eval import floor as floor_lib
from lmmask.eval import harness
from lmmask.model import count_params


class Logger:
  """JSONL + TensorBoard event files, appended across resumed runs."""

  def __init__(self, workdir):
    self.jsonl = open(os.path.join(workdir, wd.METRICS_FILE), "a")
    try:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(os.path.join(workdir, "tb"))
    except ImportError:  # tensorboardX is a declared dependency; degrade, don't crash
      self.tb = None

  def write(self, step: int, kind: str, metrics: dict):
    row = {"step": step, "kind": kind, **{k: float(v) for k, v in metrics.items()}}
    self.jsonl.write(json.dumps(row) + "\n")
    self.jsonl.flush()
    if self.tb is not None:
      for k, v in metrics.items():
        self.tb.add_scalar(f"{kind}/{k}", float(v), step)

  def close(self):
    self.jsonl.close()
    if self.tb is not None:
      self.tb.close()


def is_due(step: int, every: int, last: int) -> bool:
  return step % every == 0 or step == last


# ---------------------------------------------------------------------------
# The loop's pieces, shared with the vmapped seed groups (seedvmap.py).

class NonfinitePolicy:
  """train.nonfinite for one run: count and report skipped updates (skip), or say
  what went non-finite so the caller stops the run (stop)."""

  def __init__(self, config, skips: int, name: str):
    self.skip = config.train.nonfinite == "skip"
    self.skips = skips  # updates dropped over the whole experiment (resumes carry it)
    self.name = name    # who reports (a seed group names the run)

  def check(self, metrics: dict, done: int) -> str | None:
    """None when step `done` is finite or its update was skipped (then counted,
    reported and logged as `nonfinite_skips`); else what is non-finite: stop."""
    bad = [name for name, key in (("loss", "loss"), ("gradient norm", "grad_norm"))
           if not np.isfinite(metrics[key])]
    if bad and not self.skip:
      return " and ".join(bad)
    if bad:
      self.skips += 1
      print(f"{self.name}: non-finite {' and '.join(bad)} at step {done}; update skipped "
            f"(train.nonfinite=skip, {self.skips} skipped so far)", file=sys.stderr, flush=True)
    if self.skip:
      metrics["nonfinite_skips"] = self.skips
    return None


def train_row(metrics: dict) -> dict:
  """A step's metrics as logged (the sums behind the means left out)."""
  return {k: v for k, v in metrics.items() if k not in ("nll_sum", "num_correct")}


def evaluate_and_log(config, state, data, eval_sets, floor_monitor, logger, done: int) -> dict:
  """The periodic evaluation: every eval set, the leak alarm below the entropy floor,
  the log lines, and eval.harness_tasks on the live weights (eval/harness.py).
  Returns the eval sets' numbers."""
  ev = step_lib.run_evals(state, eval_sets)
  floor = floor_monitor.check(done, ev)
  if logger is not None:
    logger.write(done, "eval", dict(ev, **floor))
  if config.eval.harness_tasks:
    hv = harness.run_live(config, data, evaluation.host_state(state), done)
    if logger is not None:
      logger.write(done, "harness", hv)
  return ev


def build_results(config, state, data, floor_monitor, final_eval: dict, *, best_val, best_step,
                  steps_done: int, seconds: float, skips: int, extras: bool) -> dict:
  """results.json of a run: its final evaluation, best, size, speed and settings, then
  (extras) the leak alarm and the corpus's own end-of-run extras."""
  results = {"step": int(state.step), **final_eval,
             "best_val_loss": best_val, "best_step": best_step,
             "num_params": count_params(state.model()),
             "steps_per_sec": steps_done / seconds if steps_done else None,
             "train_seconds": seconds, "split": config.data.split,
             "reduction": config.loss.reduction, "causal": bool(config.model.causal),
             "nonfinite_skips": skips}
  if extras:  # n-gram baseline, exact match, ...
    results.update(evaluation.results_extras(config, state, data, floor_monitor, results))
  return results


class Profiler:
  """jax.profiler trace of steps [profile_start, profile_start + profile_steps)."""

  def __init__(self, config, workdir: str, start: int):
    self.first = config.train.profile_start
    self.last = self.first + config.train.profile_steps
    self.start = start
    self.dir = os.path.join(workdir, "profile")
    self.active = False

  def step(self, step: int):
    if self.first < 0:
      return
    if not self.active and step == max(self.first, self.start) and step < self.last:
      jax.profiler.start_trace(self.dir)
      self.active = True
    elif self.active and step >= self.last:
      self.stop()

  def stop(self):
    if self.active:
      jax.profiler.stop_trace()
      self.active = False


def _with_cpu_devices(config):
  """`config` with mesh.cpu_devices=0 (auto) replaced by the count this process runs
  with, so config.json records it (launch.py resolves it before JAX starts; a caller
  that started JAX itself gets what it has)."""
  if config.mesh.cpu_devices:
    return config
  n = jax.local_device_count() if jax.default_backend() == "cpu" else 1
  return config_lib.apply_overrides(config, {"mesh.cpu_devices": n})


def _open_workdir(config, workdir: str, cfg_dict: dict, writer: bool):
  """Claim the workdir, load the data, build the train state, eval sets and floor
  monitor, and (process 0, new workdir) only then write config.json, so an input
  that fails any of these leaves the workdir untouched. Process 0 runs it first,
  creating the files (tokenizer, shards, config.json); the others then run it to
  verify and read them. Returns (data, base_cfg, state, eval_sets, floor_monitor)."""
  wd.check_writable(workdir)
  is_new = wd.claim(workdir, cfg_dict) if os.path.isdir(workdir) else True
  if config.train.resume == "require" and not ckpt.committed_steps(workdir):
    raise FileNotFoundError(
        f"train.resume='require' but {os.path.join(workdir, ckpt.CKPT_DIR)} holds no "
        f"checkpoint to resume from; check --workdir, or set train.resume=auto to start "
        f"from step 0")
  data = registry.load(config, workdir)
  base_cfg = None
  if config.train.init_from:  # checked before anything is written into the workdir
    base_cfg = wd.check_init_from(config, workdir, data)
  state = step_lib.create_train_state(config, jax.random.PRNGKey(config.seed),
                                      vocab_size=data.vocab_size,
                                      keys_are_prefix=data.keys_are_prefix)
  eval_sets = data.eval_sets()
  floor_monitor = floor_lib.FloorMonitor(config, data, workdir)
  if writer:
    os.makedirs(workdir, exist_ok=True)
    if is_new:
      wd.atomic_write_json(os.path.join(workdir, wd.CONFIG_FILE), cfg_dict)
  return data, base_cfg, state, eval_sets, floor_monitor


def train_and_evaluate(config, workdir: str) -> dict:
  """Train (or resume) the experiment in `config` inside `workdir`; return results."""
  config_lib.validate(config)
  parallel.initialize_distributed(config.distributed)  # before any device is touched
  parallel.setup_jax_cache(config.train.jax_cache_dir)
  config = _with_cpu_devices(config)
  cfg_dict = config_lib.to_dict(config)
  writer = parallel.is_writer()  # only process 0 writes files outside orbax
  timeout = config.distributed.barrier_timeout_s
  # Checked before the workdir is touched (config only): a bad mesh writes nothing.
  mesh = parallel.mesh_from_config(config)
  parallel.check_batch_size(config.data.batch_size, mesh, config.optim.grad_accum_steps)
  if writer:
    data, base_cfg, state, eval_sets, floor_monitor = _open_workdir(config, workdir, cfg_dict,
                                                                    writer)
  parallel.barrier("workdir_ready", timeout)  # the others wait for process 0's files
  if not writer:
    data, base_cfg, state, eval_sets, floor_monitor = _open_workdir(config, workdir, cfg_dict,
                                                                    writer)
  init_from = config.train.init_from
  # Params and optimizer state laid out on the mesh (restores keep it).
  state = parallel.shard_state(state, mesh)
  rows = parallel.process_rows(parallel.batch_sharding(mesh), config.data.batch_size)
  if jax.process_count() > 1:
    print(f"lmmask: process {jax.process_index()} of {jax.process_count()} builds rows "
          f"[{rows[0]}, {rows[1]}) of each batch of {config.data.batch_size} on its "
          f"{jax.local_device_count()} device(s) (mesh {dict(mesh.shape)})", flush=True)

  mngr = ckpt.manager(workdir, ckpt.CKPT_DIR, config.train.keep_checkpoints,
                      barrier_timeout_s=timeout)
  best = ckpt.manager(workdir, ckpt.BEST_DIR, 1, barrier_timeout_s=timeout)
  best_val = math.inf
  skips = 0  # updates dropped by train.nonfinite=skip, over the whole experiment
  model_file = os.path.join(workdir, wd.MODEL_FILE)
  if mngr.latest_step() is not None:
    _, tree, meta = ckpt.restore(mngr, None, state.checkpoint_tree(),
                                 quarantine=os.path.join(workdir, ckpt.DAMAGED_DIR))
    state = state.replace_from_tree(tree)
    best_val = meta.get("best_val_loss", math.inf)
    skips = int(meta.get("nonfinite_skips", 0))
    print(f"resumed from step {int(state.step)} in {workdir}", flush=True)
  elif init_from:
    state, base_step = wd.init_from_base(config, state, base_cfg, data)
    state = parallel.shard_state(state, mesh)  # the base params arrive unsharded
    init_info = {"workdir": os.path.abspath(init_from), "step": base_step}
    if writer:
      wd.atomic_write_json(model_file, wd.model_record(config, data, init_info))
    print(f"initialised from {init_from} (step {base_step}); fresh optimizer", flush=True)
  if writer and not os.path.exists(model_file):
    wd.atomic_write_json(model_file, wd.model_record(config, data))
  # model.attention resolved once, here (auto: by backend and packing); logged and kept
  # with the run's provenance, not its results (the maths is the same on every path).
  attention = config_lib.decoder_config(config, data.vocab_size).attention
  print(f"lmmask: model.attention={config.model.attention} -> {attention} "
        f"({jax.default_backend()})", file=sys.stderr, flush=True)
  if writer:
    wd.atomic_write_json(os.path.join(workdir, wd.PROVENANCE_FILE),
                         {**wd.provenance(), "attention": attention})

  total = config.train.steps
  nonfinite = NonfinitePolicy(config, skips, "lmmask")
  meta = lambda: {"config": cfg_dict, "best_val_loss": best_val,  # noqa: E731
                  "nonfinite_skips": nonfinite.skips}
  logger = Logger(workdir) if writer else None
  step_fn = parallel.jit_train_step(step_lib.train_step, state, mesh)  # sharded, donated
  start = int(state.step)
  profiler = Profiler(config, workdir, start)
  bar = None
  if config.train.progress_bar and start < total:
    from tqdm import tqdm
    bar = tqdm(total=total, initial=start, disable=None, dynamic_ncols=True, file=sys.stderr)
  t0 = time.perf_counter()
  window_t, window_tokens = time.perf_counter(), 0.0
  steps_done = 0
  last_eval = None  # (step, metrics) of the latest in-loop evaluation
  completed = False
  stop = preempt.StopSignals().install()  # SIGTERM/SIGINT: finish step, save, exit 128+signum
  try:
    for step in range(start, total):
      # Each process builds only the rows its devices hold (all of them with one).
      batch = data.train_batch(step, rows=None if rows == (0, config.data.batch_size) else rows)
      batch = parallel.put_batch(batch, mesh, config.data.batch_size)
      profiler.step(step)
      state, metrics = step_fn(state, batch)
      metrics = jax.device_get(metrics)
      steps_done += 1
      done = step + 1
      bad = nonfinite.check(metrics, done)
      if bad:
        raise FloatingPointError(
            f"non-finite {bad} at step {done} (loss={metrics['loss']}, "
            f"grad_norm={metrics['grad_norm']}); stopped without saving it: the last good "
            f"checkpoint is kept in {mngr.directory}. Lower optim.lr, check the data, or "
            f"rerun with train.nonfinite=skip to skip such updates.")
      window_tokens += float(metrics["real_tokens"])
      if bar is not None:
        bar.update(1)
      # --- all periodic work happens here ---
      if is_due(done, config.train.log_every, total):
        now = time.perf_counter()
        metrics["tokens_per_sec"] = window_tokens / max(now - window_t, 1e-9)
        window_t, window_tokens = now, 0.0
        if logger is not None:
          logger.write(done, "train", train_row(metrics))
        if bar is not None:
          bar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.2e}",
                          tok_s=f"{metrics['tokens_per_sec']:.0f}")
      if is_due(done, config.train.eval_every, total):
        ev = evaluate_and_log(config, state, data, eval_sets, floor_monitor, logger, done)
        last_eval = (done, ev)
        if ev["val_loss"] < best_val:
          best_val = ev["val_loss"]
          ckpt.save(best, done, state.checkpoint_tree(), meta())
      if is_due(done, config.train.ckpt_every, total):
        ckpt.save(mngr, done, state.checkpoint_tree(), meta())
      if stop.requested and done < total:
        ckpt.save(mngr, done, state.checkpoint_tree(), meta())  # no-op if just saved
        ckpt.finish(mngr)
        ckpt.finish(best)
        msg = (f"lmmask: stopped by {stop.name} after step {done} of {total}; checkpoint "
               f"step {done} is complete in {mngr.directory}. Rerun the same command to "
               f"resume. Exit code {128 + stop.signum}.")
        print(msg, file=sys.stderr, flush=True)
        raise preempt.Interrupted(stop.signum, done, msg)
    completed = True
  finally:
    if bar is not None:
      bar.close()
    profiler.stop()
    # Always wait for saves in flight (an interrupted save must not be left behind);
    # a failed save is reported unless another error is already on its way out.
    errors = []
    for m in (mngr, best):
      try:
        ckpt.finish(m)
      except ckpt.CheckpointSaveError as e:
        errors.append(e)
    if logger is not None:
      logger.close()
    stop.restore()
    if errors and completed:
      raise errors[0]
  elapsed = time.perf_counter() - t0

  # The loop always evaluates its final step; a run with nothing left to train
  # (already at train.steps) evaluates here.
  final_eval = last_eval[1] if last_eval and last_eval[0] == int(state.step) else \
      step_lib.run_evals(state, eval_sets)
  results = build_results(config, state, data, floor_monitor, final_eval, best_val=best_val,
                          best_step=best.latest_step(), steps_done=steps_done, seconds=elapsed,
                          skips=nonfinite.skips, extras=True)
  if writer:
    wd.atomic_write_json(os.path.join(workdir, wd.RESULTS_FILE), results)
  mngr.close()
  best.close()
  return results
