"""Workdir ownership, experiment identity and orbax checkpoints.

A workdir belongs to one experiment: its `config.json` is written once, on the
first run. A later run compares its config with the saved one, ignoring only the
fields in `RESUMABLE_FIELDS` (run length, logging, eval and checkpoint cadence).
Any other difference is refused with the list of differing fields before
anything in the workdir is touched.
"""
from __future__ import annotations

import json
import os
import tempfile

import jax
import orbax.checkpoint as ocp

# Fields that may change between runs of the same experiment.
RESUMABLE_FIELDS = frozenset({
    "train.steps", "train.log_every", "train.eval_every", "train.ckpt_every",
    "train.keep_checkpoints", "train.progress_bar", "train.jax_cache_dir",
    # issue 7: layout and speed knobs that do not change the maths
    "train.profile_start", "train.profile_steps", "mesh.data", "mesh.fsdp",
    "distributed.mode", "distributed.coordinator_address", "distributed.num_processes",
    "distributed.process_id", "model.attention", "model.remat", "model.scan_layers",
    "optim.grad_accum_steps",
})

CONFIG_FILE = "config.json"
CKPT_DIR = "checkpoints"
BEST_DIR = "best"


def flatten(d, prefix=""):
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(flatten(v, key + "."))
    else:
      out[key] = v
  return out


def config_to_dict(config) -> dict:
  d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  return json.loads(json.dumps(d))  # tuples -> lists, as they come back from JSON


def atomic_write_json(path, obj):
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


def config_diff(saved: dict, new: dict, ignore=RESUMABLE_FIELDS):
  a, b = flatten(saved), flatten(new)
  keys = sorted((set(a) | set(b)) - set(ignore))
  return [(k, a.get(k, "<absent>"), b.get(k, "<absent>")) for k in keys
          if a.get(k, "<absent>") != b.get(k, "<absent>")]


def claim_workdir(workdir: str, config_dict: dict) -> bool:
  """Check the workdir belongs to this experiment. Returns True if it is new.

  Raises ValueError (touching nothing) if the workdir holds another experiment.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    diff = config_diff(saved, config_dict)
    if diff:
      lines = "\n".join(f"  {k}: saved={a!r} now={b!r}" for k, a, b in diff)
      raise ValueError(
          f"workdir {workdir} belongs to a different experiment; these fields differ "
          f"from its {CONFIG_FILE}:\n{lines}\nUse a new --workdir, or rerun with the saved "
          f"values (only {', '.join(sorted(RESUMABLE_FIELDS))} may change on resume).")
    return False
  if os.path.isdir(os.path.join(workdir, CKPT_DIR)):
    raise ValueError(f"workdir {workdir} has checkpoints but no {CONFIG_FILE}; refusing to "
                     f"write into it. Use a new --workdir.")
  return True


def load_saved_config(workdir: str) -> dict:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no {CONFIG_FILE} in {workdir}: it is not an lmmask workdir "
                            f"(train into it first with --mode=train)")
  with open(path) as f:
    return json.load(f)


def manager(workdir: str, sub: str, keep: int, create: bool = True) -> ocp.CheckpointManager:
  directory = os.path.abspath(os.path.join(workdir, sub))
  opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create)
  return ocp.CheckpointManager(directory, options=opts)


def save(mngr: ocp.CheckpointManager, step: int, tree, meta: dict):
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                           meta=ocp.args.JsonSave(meta)), force=True)


def restore(mngr: ocp.CheckpointManager, step: int | None, target):
  """Restore `step` (default: latest) into the structure/shardings of `target`."""
  steps = mngr.all_steps()
  if not steps:
    raise FileNotFoundError(f"no checkpoint in {mngr.directory}; train first or check "
                            f"--workdir")
  if step is None:
    step = mngr.latest_step()
  elif step not in steps:
    raise FileNotFoundError(f"no checkpoint for step {step} in {mngr.directory}; "
                            f"available steps: {sorted(steps)}")
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  try:
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                      meta=ocp.args.JsonRestore()))
  except (ValueError, KeyError) as e:
    raise ValueError(f"checkpoint step {step} in {mngr.directory} does not fit this model "
                     f"(different architecture or vocabulary?): {e}") from e
  return step, out["state"], out["meta"]
