"""A workdir: who owns it, its JSON files, and the one way to restore it.

A workdir belongs to one experiment: its `config.json` is written once, on the
first run. A later run compares its config with the saved one (both upgraded by
`lmmask.config.upgrade`), ignoring only the resumable fields; any other
difference is refused with the list of differing fields before anything in the
workdir is touched.

`restore_state(workdir)` is the only function that turns a workdir back into a
config, its data and a train state: eval, generate, audit, init_from and the
experiments all call it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib import metadata

import jax
from ml_collections import ConfigDict

from lmmask import checkpoint as ckpt
from lmmask import config as config_lib
from lmmask import parallel
from lmmask import step as step_lib
from lmmask.data import registry

CONFIG_FILE = "config.json"
MODEL_FILE = "model.json"
RESULTS_FILE = "results.json"
PROVENANCE_FILE = "provenance.json"
METRICS_FILE = "metrics.jsonl"
WHICH = {"latest": ckpt.CKPT_DIR, "best": ckpt.BEST_DIR}


def atomic_write_json(path, obj):
  """Write JSON through a temporary file renamed into place: never half a file."""
  d = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp_", suffix=".json")
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(obj, f, indent=2, sort_keys=True, default=str)
      f.write("\n")
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def read_json(path: str, what: str) -> dict:
  if not os.path.exists(path):
    raise FileNotFoundError(f"no {os.path.basename(path)} in {os.path.dirname(path)}: {what}")
  with open(path) as f:
    return json.load(f)


def load_config(workdir: str) -> ConfigDict:
  """The workdir's saved config, upgraded to the current field set."""
  saved = read_json(os.path.join(workdir, CONFIG_FILE),
                    "it is not an lmmask workdir (train into it first with --mode=train)")
  return config_lib.upgrade(saved)


# ---------------------------------------------------------------------------
# Identity.

def check_writable(workdir: str) -> None:
  """Refuse (touching nothing) a workdir that is a file or cannot be written."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise NotADirectoryError(f"workdir {workdir} is a file, not a directory; choose another "
                             f"--workdir")
  probe = os.path.abspath(workdir)
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe):
    raise NotADirectoryError(f"workdir {workdir} cannot be created: {probe} is a file; "
                             f"choose another --workdir")
  if not os.access(probe, os.W_OK | os.X_OK):
    what = "is not writable" if probe == os.path.abspath(workdir) else \
        f"cannot be created: {probe} is not writable"
    raise PermissionError(f"workdir {workdir} {what}; choose another --workdir or fix its "
                          f"permissions")


def claim(workdir: str, config_dict: dict) -> bool:
  """Check the workdir belongs to this experiment. Returns True if it is new.

  Raises ValueError (touching nothing) if the workdir holds another experiment.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    diff = config_lib.identity_diff(saved, config_dict)
    if diff:
      lines = "\n".join(f"  {k}: saved={a!r} now={b!r}" for k, a, b in diff)
      raise ValueError(
          f"workdir {workdir} belongs to a different experiment; these fields differ "
          f"from its {CONFIG_FILE}:\n{lines}\nUse a new --workdir, or rerun with the saved "
          f"values (only {', '.join(sorted(config_lib.RESUMABLE_FIELDS))} and the "
          f"{', '.join(s + '*' for s in config_lib.RESUMABLE_SECTIONS)} sections may change "
          f"on resume).")
    return False
  if os.path.isdir(os.path.join(workdir, ckpt.CKPT_DIR)):
    raise ValueError(f"workdir {workdir} has checkpoints but no {CONFIG_FILE}; refusing to "
                     f"write into it. Use a new --workdir.")
  return True


def provenance() -> dict:
  """Where a run came from: code version, packages, devices, command line."""
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def git(*args):
    try:
      return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True,
                            timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
      return ""
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


def model_record(config, data, init_info=None) -> dict:
  """What a workdir's model.json holds: the resolved architecture and data identity."""
  return {"decoder": dataclasses.asdict(config_lib.decoder_config(config, data.vocab_size)),
          "causal": bool(config.model.causal), "data": data.identity, "init_from": init_info}


# ---------------------------------------------------------------------------
# Restore.

def restore_state(workdir: str, which: str = "latest", step: int | None = None, *,
                  config=None, data=None):
  """(config, data, state, step) of a workdir's checkpoint.

  config: the workdir's saved config unless given (e.g. with a new data.path for
  evaluating on other data); data: the DataSource, built from config unless given.
  """
  if which not in WHICH:
    raise ValueError(f"which must be one of {', '.join(WHICH)}, got {which!r}")
  config = load_config(workdir) if config is None else config
  parallel.setup_jax_cache(config.train.jax_cache_dir)
  data = registry.load(config, workdir) if data is None else data
  state = step_lib.create_train_state(config, jax.random.PRNGKey(config.seed),
                                      vocab_size=data.vocab_size,
                                      keys_are_prefix=data.keys_are_prefix)
  sub = WHICH[which]
  if not ckpt.committed_steps(workdir, sub):
    raise FileNotFoundError(f"no checkpoints in {os.path.join(workdir, sub)}; train first")
  if jax.process_count() > 1:  # restore straight onto the mesh of every process's devices
    try:
      mesh = parallel.mesh_from_config(config)
    except ValueError:  # the run's own mesh does not fit these devices: data parallel
      mesh = parallel.make_mesh(-1, 1)
    state = parallel.shard_state(state, mesh)
  mngr = ckpt.manager(workdir, sub, config.train.keep_checkpoints, create=False,
                      barrier_timeout_s=config.distributed.barrier_timeout_s)
  try:
    restored, tree, _ = ckpt.restore(mngr, step, state.checkpoint_tree())
  finally:
    mngr.close()
  return config, data, state.replace_from_tree(tree), restored


# ---------------------------------------------------------------------------
# Fine-tuning from a base run (train.init_from).
#
# The architecture is the base run's: every field in config.ARCH_FIELDS of the new
# config must equal the base run's (vocab_size compared after resolution), and
# the two datasets must come from the same tokenizer; any difference is refused
# naming the field, before anything is written. Training parameters (lr,
# schedule, dropout, batch size, use_loss_mask, steps, seed) come from the new
# config. Parameters come from the base run's latest checkpoint; the optimizer
# state is fresh and the step counter starts at 0.

def check_init_from(config, workdir: str, data) -> ConfigDict:
  """Validate `config` against the base run in config.train.init_from; returns the
  base run's (upgraded) config. Raises ValueError naming the first field that differs."""
  base = config.train.init_from
  if os.path.abspath(base) == os.path.abspath(workdir):
    raise ValueError(f"train.init_from={base} is this run's own workdir; point it at the "
                     f"base run's workdir")
  base_cfg = load_config(base)
  record = read_json(os.path.join(base, MODEL_FILE),
                     f"train.init_from={base} needs the base run's {MODEL_FILE} (written by "
                     f"every training run); train the base run first")
  base_vocab = record["decoder"]["vocab_size"]
  if config.model.vocab_size not in (-1, base_vocab) or data.vocab_size != base_vocab:
    raise ValueError(
        f"model.vocab_size: the base run in {base} has a vocabulary of {base_vocab} tokens, "
        f"this run's data has {data.vocab_size} (config says {config.model.vocab_size}). "
        f"Prepare the fine-tuning data with the base run's tokenizer (data.tokenizer).")
  for field in config_lib.ARCH_FIELDS:
    if field == "vocab_size":
      continue
    if base_cfg.model[field] != config.model[field]:
      raise ValueError(
          f"model.{field}: the base run in {base} has {base_cfg.model[field]!r}, this config "
          f"has {config.model[field]!r}. The architecture comes from the base run: set "
          f"--config.model.{field}={base_cfg.model[field]} or use another base.")
  base_tok = (record.get("data") or {}).get("tokenizer_sha256")
  new_tok = data.identity.get("tokenizer_sha256")
  if base_tok != new_tok:
    raise ValueError(
        f"data tokenizer (tokenizer_sha256): the base run was trained on data from tokenizer "
        f"{base_tok}, this data comes from {new_tok}; token ids would mean different things. "
        f"Re-run prepare with data.tokenizer=<the base data's tokenizer.json>.")
  return base_cfg


def init_from_base(config, state, base_cfg, data):
  """`state` with the base run's latest params, a fresh optimizer state and step 0.
  Returns (state, base_step)."""
  base = config.train.init_from
  # The base run's own state gives the exact tree (its optimizer may differ).
  _, _, base_state, step = restore_state(base, config=base_cfg, data=data)
  params = base_state.params
  return state.replace(params=params, opt_state=state.tx.init(params),
                       step=jax.numpy.zeros_like(state.step)), int(step)


def inherit_architecture(config, explicit=()) -> ConfigDict:
  """`config` with the base run's architecture (every config.ARCH_FIELDS field of
  train.init_from's config.json, vocab_size included) except the fields in
  `explicit` (those set on the command line), which `check_init_from` then
  compares with the base, refusing a difference by name. So a fine-tuning config
  (e.g. configs/chat.py:sft) can start from any base, an imported one included,
  without spelling out its architecture."""
  if not config.train.init_from:
    return config
  base_cfg = load_config(config.train.init_from)
  config = config.copy_and_resolve_references()
  for field in config_lib.ARCH_FIELDS:
    if field not in explicit:
      config.model[field] = base_cfg.model[field]
  return config
