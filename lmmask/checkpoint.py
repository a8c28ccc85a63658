"""Orbax checkpoints: save, finish, prune and restore, safely.

Checkpoint safety (docs/failures.md):
  * orbax writes each step into `<step>.orbax-checkpoint-tmp` and renames it when
    complete, so an interrupted save never becomes a step; leftovers are removed
    when a training run opens the directory, and after a failed save.
  * with several processes (multi-host) orbax writes from all of them and renames
    on process 0; every removal or rename of lmmask's own (leftovers, pruning,
    quarantine) is done by process 0 alone, between barriers, so no two processes
    ever delete or rename the same path.
  * keep-last-N is done here, not by orbax: older steps are deleted only after
    a newer save has finished without error (orbax picks the steps to delete when
    a save starts and drops them from its step list even if that save fails).
  * `restore` checks shapes against the target first (a mismatch is a
    `CheckpointMismatchError`, never a fallback), then reads the newest step;
    a damaged one is reported and the previous step is tried.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import shutil
import sys
import time

import jax
import orbax.checkpoint as ocp

from lmmask import parallel

CKPT_DIR = "checkpoints"
BEST_DIR = "best"
DAMAGED_DIR = "checkpoints.damaged"  # damaged steps are moved here by a training run
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's in-progress step directories


class CheckpointMismatchError(ValueError):
  """A checkpoint's arrays do not fit the model/optimizer it is restored into."""


class CheckpointDamagedError(RuntimeError):
  """No readable checkpoint among those on disk."""


class CheckpointSaveError(OSError):
  """A checkpoint could not be written; the previous ones are untouched."""


def committed_steps(workdir: str, sub: str = CKPT_DIR) -> list[int]:
  """Steps with a complete (renamed) directory in `workdir/sub`, without opening orbax."""
  d = os.path.join(workdir, sub)
  if not os.path.isdir(d):
    return []
  return sorted(int(n) for n in os.listdir(d)
                if n.isdigit() and os.path.isdir(os.path.join(d, n)))


def _primary() -> bool:
  return jax.process_index() == 0


@dataclasses.dataclass
class Manager:
  """An orbax CheckpointManager and what lmmask keeps beside it (orbax's object is
  not extended: lmmask's state lives here)."""
  orbax: ocp.CheckpointManager
  keep: int                   # newest complete steps kept, pruned by `finish` only after
                              # a newer save completed
  barrier_timeout_s: int      # distributed.barrier_timeout_s: lmmask's barriers, the drain
  pending: int | None = None  # step of the save in flight, for error messages

  @property
  def directory(self):
    return self.orbax.directory

  def latest_step(self) -> int | None:
    return self.orbax.latest_step()

  def all_steps(self):
    return self.orbax.all_steps()

  def close(self) -> None:
    self.orbax.close()


def manager(workdir: str, sub: str, keep: int, create: bool = True, *,
            barrier_timeout_s: int) -> Manager:
  """A manager for `workdir/sub` that keeps the newest `keep` complete steps.

  create=True (training) creates the directory and removes leftover temporary
  step directories of interrupted saves; create=False (eval) only reads.
  barrier_timeout_s: the config's distributed.barrier_timeout_s.
  """
  directory = os.path.abspath(os.path.join(workdir, sub))
  if create:
    if _primary():
      _remove_tmp_dirs(directory)  # saves cut short by a crash (orbax would also, later)
    parallel.barrier(f"ckpt_open_{sub}", barrier_timeout_s)
  # orbax names its cross-process barriers after the step; the latest and the best
  # managers may save the same step at once, so each gets its own barrier prefix.
  opts = ocp.CheckpointManagerOptions(
      max_to_keep=None, create=create, cleanup_tmp_directories=create,
      multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=sub))
  handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
  return Manager(ocp.CheckpointManager(directory, options=opts, item_handlers=handlers),
                 keep=keep, barrier_timeout_s=barrier_timeout_s)


def _remove_tmp_dirs(directory) -> list[str]:
  gone = []
  for path in glob.glob(os.path.join(str(directory), "*" + TMP_SUFFIX + "*")):
    shutil.rmtree(path, ignore_errors=True)
    gone.append(os.path.basename(path))
  return gone


def commit_futures(orbax_mngr: ocp.CheckpointManager) -> list:
  """The background writes of the manager's latest save (empty before any save).

  orbax's public `wait_until_finished` raises at the first failed write while the
  others keep writing into the temporary directory, and no public call waits for
  them all (`AsyncCheckpointer.cancel` abandons them). This is the one place lmmask
  reaches inside orbax, with no fallback: an orbax release that moves these fails
  tests/test_reliability.py instead of silently skipping the drain.
  """
  futures = orbax_mngr._checkpointer._async_manager._commit_futures  # noqa: SLF001
  return list(futures or ())


def _drain(mngr: Manager):
  """After a failed save, wait for that save's other background writes to end."""
  for fut in commit_futures(mngr.orbax):
    try:
      fut.result(timeout=mngr.barrier_timeout_s)
    except Exception:  # noqa: BLE001 - the failure itself is reported by the caller
      pass


def _save_failed(mngr: Manager, step, err: BaseException):
  mngr.pending = None
  _drain(mngr)
  if _primary():
    _remove_tmp_dirs(mngr.directory)
  mngr.orbax.reload()
  done = sorted(mngr.all_steps())
  kept = (f"the previous checkpoint (step {done[-1]}) is intact and a rerun resumes from it"
          if done else "no earlier checkpoint exists, so a rerun starts from step 0")
  errno = getattr(err, "errno", None)
  msg = (f"saving checkpoint step {step} in {mngr.directory} failed: "
         f"{type(err).__name__}: {err}. The partial step was removed; {kept}. Free disk "
         f"space (or fix the error above) and rerun the same command.")
  raise (CheckpointSaveError(errno, msg) if errno else CheckpointSaveError(msg)) from err


def prune(mngr: Manager):
  """Delete all but the newest `keep` complete steps (call with no save in flight)."""
  keep, timeout = mngr.keep, mngr.barrier_timeout_s
  many = jax.process_count() > 1
  if many:  # every process has finished writing (and process 0 renamed) the last save
    parallel.barrier("ckpt_saved", timeout)
  old = []
  if _primary():  # the others must not even list the directory while process 0 deletes
    mngr.orbax.reload()
    old = sorted(mngr.all_steps())[:-keep]
  for step in old:
    # Rename first: a crash during the removal leaves a temporary directory (ignored,
    # and removed by the next run), never a half-deleted step that looks complete.
    path = os.path.join(str(mngr.directory), str(step))
    doomed = f"{path}{TMP_SUFFIX}-deleting"
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed)
  if many:
    parallel.barrier("ckpt_pruned", timeout)
  if old or many:
    mngr.orbax.reload()


def finish(mngr: Manager):
  """Wait for the save in flight; raise CheckpointSaveError if it failed, else prune."""
  try:
    mngr.orbax.wait_until_finished()
  except Exception as e:  # noqa: BLE001 - any failure of the background write
    _save_failed(mngr, mngr.pending, e)
  mngr.pending = None
  prune(mngr)


def save(mngr: Manager, step: int, tree, meta: dict) -> bool:
  """Start an async save of `step` (after the previous one completed).

  Returns False, writing nothing, if `step` already exists: a step is never
  overwritten (after a resume it would hold the same values anyway).
  """
  finish(mngr)
  if step in mngr.all_steps():
    return False
  try:
    mngr.pending = step
    mngr.orbax.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                                   meta=ocp.args.JsonSave(meta)), force=True)
  except Exception as e:  # noqa: BLE001 - e.g. ENOSPC while creating the step directory
    try:
      mngr.orbax.wait_until_finished()
    except Exception:  # noqa: BLE001
      pass
    _save_failed(mngr, step, e)
  return True


def _keystr(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _flat_shapes(tree) -> dict:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {".".join(_keystr(k) for k in path): (tuple(leaf.shape), str(leaf.dtype))
          for path, leaf in leaves}


def check_fits(mngr: Manager, step: int, target):
  """Raise CheckpointMismatchError if `step`'s arrays differ from `target`'s in name,
  shape or dtype. Errors reading the metadata propagate (a damaged checkpoint)."""
  saved = _flat_shapes(mngr.orbax.item_metadata(step)["state"].tree)
  want = _flat_shapes(target)
  order = lambda k: (not k.startswith("params"), k)  # noqa: E731 - parameters first
  problems = [f"{k}: checkpoint {saved[k][0]} {saved[k][1]}, model {want[k][0]} {want[k][1]}"
              for k in sorted(set(saved) & set(want), key=order) if saved[k] != want[k]]
  problems += [f"{k}: only in the checkpoint" for k in sorted(set(saved) - set(want), key=order)]
  problems += [f"{k}: only in the model" for k in sorted(set(want) - set(saved), key=order)]
  if problems:
    more = f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else ""
    raise CheckpointMismatchError(
        f"checkpoint step {step} in {mngr.directory} does not fit this model "
        f"({len(problems)} array(s) differ):\n  " + "\n  ".join(problems[:8]) + more +
        "\nRestore it with the config it was trained with (its workdir's config.json), "
        "or train into a new --workdir.")


def _quarantine(directory, step: int, into: str) -> str:
  os.makedirs(into, exist_ok=True)
  dest = os.path.join(into, f"{step}.{time.strftime('%Y%m%d-%H%M%S')}")
  while os.path.exists(dest):
    dest += "_"
  os.replace(os.path.join(str(directory), str(step)), dest)
  return dest


def _describe(e: BaseException) -> str:
  """The innermost cause's type and first line (orbax wraps tensorstore's precise error)."""
  while e.__cause__ is not None:
    e = e.__cause__
  first = str(e).splitlines()[0][:300] if str(e) else ""
  return f"{type(e).__name__}: {first}"


def restore(mngr: Manager, step: int | None, target, *,
            quarantine: str | None = None):
  """Restore `step` (default: the newest readable one) into the structure of `target`.

  With step=None a damaged newest step is reported on stderr and the previous one
  is tried; with `quarantine` (a directory; training runs pass one) damaged steps
  are moved there so they never shadow a good one again. An explicit `step` is
  never replaced by another. Returns (step, state, meta).
  """
  steps = sorted(mngr.all_steps())
  if not steps:
    raise FileNotFoundError(f"no checkpoint in {mngr.directory}; train first or check "
                            f"--workdir")
  if step is not None and step not in steps:
    raise FileNotFoundError(f"no checkpoint for step {step} in {mngr.directory}; "
                            f"available steps: {steps}")
  candidates = [step] if step is not None else steps[::-1]
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  damaged = []
  for s in candidates:
    try:
      check_fits(mngr, s, target)
      out = mngr.orbax.restore(s, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
      meta = out["meta"]
      if not isinstance(meta, dict):
        raise ValueError(f"meta is {type(meta).__name__}, not a JSON object")
    except CheckpointMismatchError:
      raise
    except Exception as e:  # noqa: BLE001 - tensorstore/JSON/missing-file errors all mean damage
      damaged.append((s, _describe(e)))
      print(f"lmmask: checkpoint step {s} in {mngr.directory} is damaged or unreadable "
            f"({_describe(e)})", file=sys.stderr, flush=True)
      continue
    if damaged:
      # Only now, with an older step known good, are the newer ones called damaged
      # (a systemic error that fails every step moves nothing).
      for bad, _ in damaged:
        where = ""
        if quarantine is not None and _primary():
          where = f"; moved it to {_quarantine(mngr.directory, bad, quarantine)}"
        print(f"lmmask: skipped damaged checkpoint step {bad}{where}", file=sys.stderr,
              flush=True)
      print(f"lmmask: using the previous complete checkpoint, step {s}", file=sys.stderr,
            flush=True)
      mngr.orbax.reload()
    return s, out["state"], meta
  what = f"checkpoint step {step}" if step is not None else f"all {len(steps)} checkpoint(s)"
  reasons = "\n  ".join(f"step {s}: {why}" for s, why in damaged)
  raise CheckpointDamagedError(
      f"{what} in {mngr.directory} could not be read:\n  {reasons}"
      "\nRestore the files from a backup, choose another --step, or move the directory "
      "away to start over.")
