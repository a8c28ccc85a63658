"""Train state, the jitted steps, and the whole run (`train_and_evaluate`)."""
from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lmmask import checkpoint as ckpt
from lmmask import floor as floor_lib  # issue 4: entropy-floor leak alarm
from lmmask import accumulate, guards, losses, packing, parallel, preempt, schedules
from lmmask import init_from as init_lib
from lmmask.batching import Batch
from lmmask.data import pipeline, verbs
from lmmask.data.source import DataSource
from lmmask.model import Decoder, DecoderConfig, count_params


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray                 # int32 scalar: optimizer steps taken
  params: Any                       # nnx.State of the model's nnx.Param variables
  opt_state: Any                    # optax state
  rng: jnp.ndarray                  # base PRNG key; step k uses fold_in(rng, k)
  graphdef: Any = flax.struct.field(pytree_node=False)
  tx: Any = flax.struct.field(pytree_node=False)
  schedule: Any = flax.struct.field(pytree_node=False)
  reduction: str = flax.struct.field(pytree_node=False, default="token_mean")
  causal: bool = flax.struct.field(pytree_node=False, default=True)
  z_loss: float = flax.struct.field(pytree_node=False, default=0.0)  # loss.z_loss coefficient
  skip_nonfinite: bool = flax.struct.field(pytree_node=False, default=False)  # train.nonfinite
  grad_accum_steps: int = flax.struct.field(pytree_node=False, default=1)  # micro-batches/step
  # Right padding, no packing: real keys are a prefix, the fused attention uses lengths.
  keys_are_prefix: bool = flax.struct.field(pytree_node=False, default=False)

  def model(self) -> Decoder:
    return nnx.merge(self.graphdef, self.params)

  def checkpoint_tree(self):
    return {"step": self.step, "params": self.params, "opt_state": self.opt_state,
            "rng": self.rng}

  def replace_from_tree(self, tree):
    return self.replace(step=tree["step"], params=tree["params"],
                        opt_state=tree["opt_state"], rng=tree["rng"])


# ---------------------------------------------------------------------------
# Config checks and construction.

NONFINITE_POLICIES = ("stop", "skip")  # train.nonfinite
RESUME_POLICIES = ("auto", "require")  # train.resume


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def validate_config(config) -> None:
  """Clear errors for values that would otherwise fail deep inside a run."""
  def need(cond, field, msg):
    if not cond:
      raise ValueError(f"config.{field}: {msg}")
  d, m, o, t = config.data, config.model, config.optim, config.train
  corpus_name = d.get("corpus", "verbs")
  need(corpus_name in DATA_CORPORA, "data.corpus",
       f"unknown corpus {corpus_name!r}; valid: {', '.join(DATA_CORPORA)}")
  if corpus_name == "verbs":
    need(d.split in verbs.SPLIT_POLICIES or "random" in str(d.split), "data.split",
         f"unknown split {d.split!r}; valid: {', '.join(verbs.SPLIT_POLICIES)}")
  need(d.pad_side in ("left", "right"), "data.pad_side", f"must be left|right, got {d.pad_side!r}")
  for f in ("batch_size", "eval_batch_size", "length"):
    need(_is_int(d[f]) and d[f] > 0, f"data.{f}", f"must be a positive int, got {d[f]!r}")
  need(d.length >= 2, "data.length", "must be >= 2 (an input and a target)")
  for f in ("d_model", "n_layers", "n_heads", "d_ff", "max_len"):
    need(_is_int(m[f]) and m[f] > 0, f"model.{f}", f"must be a positive int, got {m[f]!r}")
  need(m.d_model % m.n_heads == 0, "model.d_model",
       f"{m.d_model} is not divisible by model.n_heads={m.n_heads}; make d_model a multiple "
       f"of n_heads (e.g. {m.n_heads * max(1, m.d_model // m.n_heads)}) or change n_heads")
  need(m.max_len >= d.length - 1, "model.max_len",
       f"{m.max_len} is shorter than the model input length data.length-1={d.length - 1}")
  need(config.loss.reduction in losses.REDUCTIONS, "loss.reduction",
       f"unknown reduction {config.loss.reduction!r}; valid: {', '.join(losses.REDUCTIONS)}")
  need(config.loss.get("z_loss", 0.0) >= 0, "loss.z_loss",
       f"must be >= 0 (0 disables), got {config.loss.get('z_loss')}")
  need(_is_num(o.lr) and o.lr > 0, "optim.lr", f"must be a number > 0, got {o.lr!r}")
  need(o.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
  need(o.decay_steps > o.warmup_steps, "optim.decay_steps",
       f"{o.decay_steps} must exceed warmup_steps={o.warmup_steps}")
  need(o.schedule in schedules.SCHEDULES, "optim.schedule",
       f"unknown {o.schedule!r}; valid: {', '.join(schedules.SCHEDULES)}")
  need(o.name in schedules.OPTIMIZERS, "optim.name",
       f"unknown {o.name!r}; valid: {', '.join(schedules.OPTIMIZERS)}")
  need(o.clip_norm >= 0, "optim.clip_norm", f"must be >= 0, got {o.clip_norm}")
  for f in ("steps", "log_every", "eval_every", "ckpt_every", "keep_checkpoints"):
    need(_is_int(t[f]) and t[f] > 0, f"train.{f}", f"must be a positive int, got {t[f]!r}")
  need(t.get("nonfinite", "stop") in NONFINITE_POLICIES, "train.nonfinite",
       f"unknown policy {t.get('nonfinite')!r}; valid: {', '.join(NONFINITE_POLICIES)}")
  need(t.get("resume", "auto") in RESUME_POLICIES, "train.resume",
       f"unknown policy {t.get('resume')!r}; valid: {', '.join(RESUME_POLICIES)}")
  ga = o.get("grad_accum_steps", 1)  # issue 7
  need(_is_int(ga) and ga > 0, "optim.grad_accum_steps", f"must be a positive int, got {ga!r}")
  need(_is_int(ga) and ga > 0 and d.batch_size % ga == 0, "optim.grad_accum_steps",
       f"{ga} must divide data.batch_size={d.batch_size}")
  need(not d.get("packing", False) or corpus_name == "verbs", "data.packing",
       f"is the verbs corpus's packing; corpus {corpus_name!r} has its own "
       f"(text: data.pack) -- set data.packing=False")
  need(not (d.get("packing", False) and d.pad_side != "right"), "data.pad_side",
       "packing fills rows from the left; set data.pad_side=right with data.packing")


def decoder_config(config, vocab_size: int) -> DecoderConfig:
  m = dict(config.model)
  m.pop("causal")
  if m["vocab_size"] == -1:
    m["vocab_size"] = vocab_size
  elif m["vocab_size"] != vocab_size:
    raise ValueError(f"config.model.vocab_size={m['vocab_size']} but the corpus vocabulary "
                     f"has {vocab_size} tokens; set it to -1 or {vocab_size}")
  return DecoderConfig.from_dict(m)


def create_train_state(config, rng, *, vocab_size: int) -> TrainState:
  cfg = decoder_config(config, vocab_size)
  init_rng, train_rng = jax.random.split(rng)
  model = Decoder(cfg, rngs=nnx.Rngs(params=init_rng))
  graphdef, params = nnx.split(model, nnx.Param)
  tx, sched = schedules.make_optimizer(config.optim)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=train_rng, graphdef=graphdef, tx=tx, schedule=sched,
                    reduction=losses.check_reduction(config.loss.reduction),
                    causal=bool(config.model.causal),
                    z_loss=float(config.loss.get("z_loss", 0.0)),
                    skip_nonfinite=config.train.get("nonfinite", "stop") == "skip",
                    grad_accum_steps=int(config.optim.get("grad_accum_steps", 1)),
                    keys_are_prefix=keys_are_prefix(config))


def keys_are_prefix(config) -> bool:
  """True when every row's real tokens are a prefix (right padding, one document per
  row), so segment ids add nothing and the fused attention can use lengths. Only
  the verbs and shards corpora (unpacked) qualify; text rows may be packed."""
  d = config.data
  return (d.get("corpus", "verbs") in ("verbs", "shards") and d.pad_side == "right"
          and not d.get("packing", False))


# ---------------------------------------------------------------------------
# Steps (module-level; jit them at the call site, donating the state).

def _forward(state: TrainState, params, batch: Batch, *, deterministic: bool, rng=None):
  model = nnx.merge(state.graphdef, params)
  rngs = None if deterministic else nnx.Rngs(dropout=rng)
  # Unpacked batches have segment_ids == key_mask: dropping them changes nothing.
  return model(batch.inputs, key_mask=batch.key_mask, positions=batch.positions,
               segment_ids=None if state.keys_are_prefix else batch.segment_ids,
               causal=state.causal, deterministic=deterministic, rngs=rngs,
               keys_are_prefix=state.keys_are_prefix)


def train_step(state: TrainState, batch: Batch):
  """One optimizer step on `batch`; returns (new_state, metrics)."""
  rng = jax.random.fold_in(state.rng, state.step)

  # Exact under accumulation and sharding: weights from the global mask (accumulate.py).
  # loss = cross-entropy + z-loss term (differentiated); metrics["loss"] stays the
  # cross-entropy, metrics["z_loss"] is the z-loss term (when loss.z_loss > 0).
  logits_fn = lambda p, mb, r: _forward(state, p, mb, deterministic=False, rng=r)  # noqa: E731
  loss, grads, metrics = accumulate.loss_and_grads(
      logits_fn, state.params, batch, reduction=state.reduction,
      steps=state.grad_accum_steps, rng=rng, z_loss=state.z_loss)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  grad_norm = optax.global_norm(grads)
  # A batch with no counted target (all-zero loss mask) has loss 0 and must not
  # train: keep params AND optimizer state (AdamW would still move them). The
  # step counter still advances (the batch is consumed; data order and lr
  # schedule are step-derived). See lmmask/guards.py. train.nonfinite=skip uses
  # the same mechanism for a non-finite loss or gradient.
  skipped_empty = guards.no_targets(metrics)
  keep_old = skipped_empty
  extra = {}
  if state.skip_nonfinite:  # static: a non-finite step keeps params and opt state, bit for bit
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep_old = keep_old | ~finite
    extra["skipped"] = (~finite).astype(jnp.float32)
  params, opt_state = guards.keep_if(keep_old, (state.params, state.opt_state),
                                     (params, opt_state))
  metrics = dict(metrics, lr=state.schedule(state.step), grad_norm=grad_norm,
                 update_norm=jnp.where(keep_old, 0.0, optax.global_norm(updates)),
                 param_norm=optax.global_norm(params), real_tokens=batch.key_mask.sum(),
                 skipped_empty=skipped_empty.astype(jnp.float32), **extra)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(state: TrainState, batch: Batch):
  """Dropout-off metrics as sums (nll_sum, num_tokens, num_correct, ...)."""
  logits = _forward(state, state.params, batch, deterministic=True)
  _, metrics = losses.masked_cross_entropy(logits, batch.targets, batch.loss_mask,
                                           reduction="token_mean")
  return metrics


_eval_step_jit = jax.jit(eval_step)


def evaluate(state: TrainState, batches) -> dict:
  """Token-mean loss, PPL and accuracy over a list of batches (exact, from sums)."""
  nll = tokens = correct = 0.0
  for b in batches:
    m = jax.device_get(_eval_step_jit(state, b))
    nll += float(m["nll_sum"])
    tokens += float(m["num_tokens"])
    correct += float(m["num_correct"])
  loss = nll / tokens if tokens else 0.0
  return {"loss": loss, "ppl": math.exp(loss), "accuracy": correct / tokens if tokens else 0.0,
          "num_tokens": tokens}


# ---------------------------------------------------------------------------
# The run.

DATA_CORPORA = ("verbs", "text", "shards")


def load_verb_data(config):
  corpus = verbs.build_corpus(config.data.split, include_lexicon=config.data.include_lexicon)
  v = corpus.vocab
  kw = dict(length=config.data.length, pad_id=v.pad_id, pad_side=config.data.pad_side)
  return corpus, pipeline.pad_split(corpus.train, **kw), pipeline.pad_split(corpus.val, **kw)


def load_data(config, workdir: str | None = None) -> DataSource:
  """The corpus named by config.data.corpus: "verbs" (embedded), "text" (files) or
  "shards" (prepared token/mask shards, e.g. chat SFT)."""
  corpus = config.data.get("corpus", "verbs")
  if corpus == "text":
    from lmmask.data import text
    return text.load_text_data(config, workdir)
  if corpus == "shards":
    from lmmask.data import shards
    return shards.data_source(config)
  if corpus != "verbs":
    raise ValueError(f"config.data.corpus: unknown corpus {corpus!r}; "
                     f"valid: {', '.join(DATA_CORPORA)}")
  vc, train_split, val_split = load_verb_data(config)
  pad_id = vc.vocab.pad_id
  return DataSource(
      vocab_size=len(vc.vocab), pad_id=pad_id, info=vc,
      train_batch=lambda step: verbs_train_batch(config, train_split, step, pad_id),
      eval_sets=lambda: build_eval_sets(config, train_split, val_split, pad_id))


def verbs_train_batch(config, train_split, step, pad_id):
  """The verbs training batch of `step`: packed (issue 7, lmmask/packing.py) with
  data.packing, else one padded example per row."""
  if config.data.get("packing", False):
    batch, _ = packing.train_batch(train_split, step=step, batch_size=config.data.batch_size,
                                   seed=config.seed, pad_id=pad_id,
                                   docs_per_row=config.data.pack_docs_per_row)
    return batch
  return pipeline.train_batch(train_split, step=step, batch_size=config.data.batch_size,
                              seed=config.seed, pad_id=pad_id)


def _host_rows(batch, rows, batch_size):
  """This process's rows [lo, hi) of a global batch (issue 7; all rows on one host)."""
  lo, hi = rows
  if (lo, hi) == (0, batch_size):
    return batch
  return jax.tree.map(lambda x: x[lo:hi], batch)


def provenance() -> dict:
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def git(*args):
    try:
      return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True,
                            timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
      return ""
  from importlib import metadata
  versions = {}
  for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "ml_collections"):
    try:
      versions[pkg] = metadata.version(pkg)
    except metadata.PackageNotFoundError:
      versions[pkg] = None
  return {"git_commit": git("rev-parse", "HEAD") or None,
          "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
          "versions": versions, "python": platform.python_version(),
          "device_kind": jax.devices()[0].device_kind, "platform": jax.default_backend(),
          "device_count": jax.device_count(), "argv": sys.argv,
          "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def setup_jax_cache(path: str):
  if path:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


class _Logger:
  """JSONL + TensorBoard event files, appended across resumed runs."""

  def __init__(self, workdir):
    self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
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


def _is_due(step: int, every: int, last: int) -> bool:
  return step % every == 0 or step == last


def _summary(prefix, m):
  return {f"{prefix}_loss": m["loss"], f"{prefix}_ppl": m["ppl"],
          f"{prefix}_accuracy": m["accuracy"]}


def build_eval_sets(config, train_split, val_split, pad_id):
  bs = config.data.eval_batch_size
  return {
      "train": pipeline.eval_batches(train_split, batch_size=bs, pad_id=pad_id),
      "val": pipeline.eval_batches(val_split, batch_size=bs, pad_id=pad_id),
      "val_english": pipeline.eval_batches(val_split, batch_size=bs, pad_id=pad_id,
                                           english_only=True),
  }


def run_evals(state, eval_sets) -> dict:
  out = {}
  for name, batches in eval_sets.items():
    out.update(_summary(name, evaluate(state, batches)))
  return out


_PROFILING = []


def _profile(config, workdir, step, start):
  """jax.profiler trace of steps [profile_start, profile_start + profile_steps) (issue 7)."""
  first = config.train.get("profile_start", -1)
  if first < 0:
    return
  last = first + config.train.profile_steps
  if step is not None and step == max(first, start) and step < last and not _PROFILING:
    jax.profiler.start_trace(os.path.join(workdir, "profile"))
    _PROFILING.append(True)
  elif _PROFILING and (step is None or step >= last):
    jax.profiler.stop_trace()
    _PROFILING.clear()


def train_and_evaluate(config, workdir: str) -> dict:
  """Train (or resume) the experiment in `config` inside `workdir`; return results."""
  validate_config(config)
  if "distributed" in config:
    parallel.initialize_distributed(config.distributed)  # before any device is touched
  setup_jax_cache(config.train.jax_cache_dir)
  cfg_dict = ckpt.config_to_dict(config)
  writer = parallel.is_writer()  # issue 7: only process 0 writes files outside orbax
  ckpt.check_workdir(workdir)
  is_new = ckpt.claim_workdir(workdir, cfg_dict) if os.path.isdir(workdir) else True
  if config.train.get("resume", "auto") == "require" and not ckpt.committed_steps(workdir):
    raise FileNotFoundError(
        f"train.resume='require' but {os.path.join(workdir, ckpt.CKPT_DIR)} holds no "
        f"checkpoint to resume from; check --workdir, or set train.resume=auto to start "
        f"from step 0")

  data = load_data(config, workdir)
  init_from = config.train.get("init_from", "")
  if init_from:  # checked before anything is written into the workdir
    base_cfg = init_lib.check_compatible(config, workdir, data.vocab_size, data.info)
  state = create_train_state(config, jax.random.PRNGKey(config.seed),
                             vocab_size=data.vocab_size)
  # issue 7: device mesh; params and optimizer state laid out on it (restores keep it).
  mesh = parallel.mesh_from_config(config)
  parallel.check_batch_size(config.data.batch_size, mesh, state.grad_accum_steps)
  state = parallel.shard_state(state, mesh)
  rows = parallel.process_rows(parallel.batch_sharding(mesh), config.data.batch_size)
  eval_sets = data.eval_sets()
  floor_monitor = floor_lib.FloorMonitor(config, data, workdir)  # issue 4

  os.makedirs(workdir, exist_ok=True)
  if is_new and writer:
    ckpt.atomic_write_json(os.path.join(workdir, ckpt.CONFIG_FILE), cfg_dict)
  mngr = ckpt.manager(workdir, ckpt.CKPT_DIR, config.train.keep_checkpoints)
  best = ckpt.manager(workdir, ckpt.BEST_DIR, 1)
  best_val = math.inf
  skips = 0  # updates dropped by train.nonfinite=skip, over the whole experiment
  if mngr.latest_step() is not None:
    _, tree, meta = ckpt.restore(mngr, None, state.checkpoint_tree(),
                                 quarantine=os.path.join(workdir, ckpt.DAMAGED_DIR))
    state = state.replace_from_tree(tree)
    best_val = meta.get("best_val_loss", math.inf)
    skips = int(meta.get("nonfinite_skips", 0))
    print(f"resumed from step {int(state.step)} in {workdir}", flush=True)
  elif init_from:
    state, base_step = init_lib.restore_base_params(config, state, base_cfg, data.vocab_size)
    state = parallel.shard_state(state, mesh)  # the base params arrive unsharded
    init_info = {"workdir": os.path.abspath(init_from), "step": base_step}
    if writer:
      ckpt.atomic_write_json(os.path.join(workdir, init_lib.MODEL_FILE), init_lib.model_record(
          config, data.vocab_size, data.info, init_info))
    print(f"initialised from {init_from} (step {base_step}); fresh optimizer", flush=True)
  if writer and not os.path.exists(os.path.join(workdir, init_lib.MODEL_FILE)):
    ckpt.atomic_write_json(os.path.join(workdir, init_lib.MODEL_FILE),
                           init_lib.model_record(config, data.vocab_size, data.info))
  if writer:
    ckpt.atomic_write_json(os.path.join(workdir, "provenance.json"), provenance())

  total = config.train.steps
  meta = lambda: {"config": cfg_dict, "best_val_loss": best_val,  # noqa: E731
                  "nonfinite_skips": skips}
  logger = _Logger(workdir) if writer else None
  step_fn = parallel.jit_train_step(train_step, state, mesh)  # issue 7: sharded, donated
  start = int(state.step)
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
      batch = _host_rows(data.train_batch(step), rows, config.data.batch_size)
      batch = parallel.put_batch(batch, mesh, config.data.batch_size)
      _profile(config, workdir, step, start)
      state, metrics = step_fn(state, batch)
      metrics = jax.device_get(metrics)
      steps_done += 1
      done = step + 1
      bad = [name for name, key in (("loss", "loss"), ("gradient norm", "grad_norm"))
             if not np.isfinite(metrics[key])]
      if bad and state.skip_nonfinite:
        skips += 1
        print(f"lmmask: non-finite {' and '.join(bad)} at step {done}; update skipped "
              f"(train.nonfinite=skip, {skips} skipped so far)", file=sys.stderr, flush=True)
      elif bad:
        raise FloatingPointError(
            f"non-finite {' and '.join(bad)} at step {done} (loss={metrics['loss']}, "
            f"grad_norm={metrics['grad_norm']}); stopped without saving it: the last good "
            f"checkpoint is kept in {mngr.directory}. Lower optim.lr, check the data, or "
            f"rerun with train.nonfinite=skip to skip such updates.")
      if state.skip_nonfinite:
        metrics["nonfinite_skips"] = skips
      window_tokens += float(metrics["real_tokens"])
      if bar is not None:
        bar.update(1)
      # --- all periodic work happens here ---
      if _is_due(done, config.train.log_every, total):
        now = time.perf_counter()
        metrics["tokens_per_sec"] = window_tokens / max(now - window_t, 1e-9)
        window_t, window_tokens = now, 0.0
        if logger is not None:
          logger.write(done, "train", {k: v for k, v in metrics.items()
                                       if k not in ("nll_sum", "num_correct")})
        if bar is not None:
          bar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.2e}",
                          tok_s=f"{metrics['tokens_per_sec']:.0f}")
      if _is_due(done, config.train.eval_every, total):
        ev = run_evals(state, eval_sets)
        last_eval = (done, dict(ev))
        ev.update(floor_monitor.check(done, ev))  # issue 4: alarm below the entropy floor
        if logger is not None:
          logger.write(done, "eval", ev)
        if ev["val_loss"] < best_val:
          best_val = ev["val_loss"]
          ckpt.save(best, done, state.checkpoint_tree(), meta())
      if _is_due(done, config.train.ckpt_every, total):
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
    _profile(config, workdir, None, start)
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
      run_evals(state, eval_sets)
  results = {"step": int(state.step), **final_eval,
             "best_val_loss": best_val, "best_step": best.latest_step(),
             "num_params": count_params(state.model()),
             "steps_per_sec": steps_done / elapsed if steps_done else None,
             "train_seconds": elapsed, "split": config.data.get("split"),
             "reduction": config.loss.reduction, "causal": bool(config.model.causal),
             "nonfinite_skips": skips}
  # issue 4: leak alarm, n-gram baseline and (optionally) exact match, next to the model.
  from lmmask import evaluation
  results.update(evaluation.results_extras(config, state, data, floor_monitor, results))
  if writer:
    ckpt.atomic_write_json(os.path.join(workdir, "results.json"), results)
  mngr.close()
  best.close()
  return results


def evaluate_checkpoint(workdir: str, step: int | None = None, which: str = "latest") -> dict:
  """Restore a workdir's checkpoint with its saved config and evaluate it."""
  from ml_collections import ConfigDict
  config = ConfigDict(ckpt.load_saved_config(workdir))
  setup_jax_cache(config.train.jax_cache_dir)
  data = load_data(config, workdir)
  state = create_train_state(config, jax.random.PRNGKey(config.seed),
                             vocab_size=data.vocab_size)
  sub = ckpt.CKPT_DIR if which == "latest" else ckpt.BEST_DIR
  mngr = ckpt.manager(workdir, sub, config.train.keep_checkpoints, create=False) \
      if os.path.isdir(os.path.join(workdir, sub)) else None
  if mngr is None:
    raise FileNotFoundError(f"no checkpoints in {os.path.join(workdir, sub)}; train first")
  restored_step, tree, _ = ckpt.restore(mngr, step, state.checkpoint_tree())
  state = state.replace_from_tree(tree)
  out = {"step": restored_step, **run_evals(state, data.eval_sets())}
  mngr.close()
  return out
