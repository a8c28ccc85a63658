"""Bad input, table-driven: each case gets one exact error type and message fragments.

Every case also checks that the workdir it points at is left exactly as it was
(or not created at all). Mask-shard and chat-JSONL cases belong to the SFT data
module and are not in this table.
"""
from __future__ import annotations

import dataclasses
import errno
import glob
import json
import os
import shutil
import subprocess
import sys
from typing import Callable

import jax
import numpy as np
import pytest
from conftest import REPO, tiny_config
from ml_collections import ConfigDict

from lmmask import batching, train
from lmmask import checkpoint as ckpt
from lmmask import config as config_lib
from lmmask import step as step_lib
from lmmask import workdir as workdir_lib
from lmmask.data import pipeline, verbs
from lmmask.eval import evaluate as evaluation


class LaunchExit(Exception):
  """launch.py exited non-zero; the message is its stderr."""

  def __init__(self, code, stderr):
    super().__init__(stderr)
    self.code = code


@dataclasses.dataclass
class Ctx:
  tmp: str
  run_dir: str          # the shared tiny_run workdir (read-only for these tests)
  monkeypatch: pytest.MonkeyPatch
  watch: str = ""       # the workdir that must not change

  @property
  def new(self) -> str:  # a workdir path that does not exist yet
    self.watch = os.path.join(self.tmp, "wd")
    return self.watch

  def copy_run(self) -> str:
    self.watch = os.path.join(self.tmp, "copy")
    shutil.copytree(self.run_dir, self.watch)
    return self.watch


@dataclasses.dataclass
class Case:
  id: str
  error: type
  fragments: tuple
  make: Callable[[Ctx], Callable[[], object]]


def _train(**overrides):
  return lambda ctx: (lambda wd=ctx.new: train.train_and_evaluate(tiny_config(**overrides), wd))


def _launch(*args):
  def run():
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, os.path.join(REPO, "launch.py"), *args],
                       capture_output=True, text=True, env=env, timeout=120, cwd=REPO)
    if p.returncode:
      raise LaunchExit(p.returncode, p.stderr)
  return run


def _from_dict(**changes):
  """A config as it would come from a config file or config.json with a wrong type."""
  def make(ctx):
    d = tiny_config().to_dict()
    for key, value in changes.items():
      section, field = key.split(".")
      d[section][field] = value
    return lambda wd=ctx.new: train.train_and_evaluate(ConfigDict(d), wd)
  return make


def _other_shape(ctx):
  other = tiny_config(**{"model.d_model": 48})
  state = step_lib.create_train_state(other, jax.random.PRNGKey(0),
                                   vocab_size=len(verbs.build_vocab()), keys_are_prefix=True)
  ctx.watch = ctx.run_dir
  mngr = ckpt.manager(ctx.run_dir, ckpt.CKPT_DIR, 2, create=False,
                      barrier_timeout_s=other.distributed.barrier_timeout_s)
  return lambda: ckpt.restore(mngr, None, state.checkpoint_tree())


def _eval_no_ckpt(ctx):
  wd = ctx.new
  os.makedirs(wd)
  workdir_lib.atomic_write_json(os.path.join(wd, workdir_lib.CONFIG_FILE), config_lib.to_dict(tiny_config()))
  return lambda: evaluation.evaluate_checkpoint(wd)


def _eval_empty_dir(ctx):
  os.makedirs(ctx.new)
  return lambda: evaluation.evaluate_checkpoint(ctx.watch)


def _ckpts_without_config(ctx):
  wd = ctx.copy_run()
  os.remove(os.path.join(wd, workdir_lib.CONFIG_FILE))
  return lambda: train.train_and_evaluate(tiny_config(), wd)


def _other_experiment(ctx):
  wd = ctx.copy_run()
  return lambda: train.train_and_evaluate(tiny_config(**{"model.d_model": 64}), wd)


def _workdir_is_file(ctx):
  path = ctx.new
  with open(path, "w") as f:
    f.write("not a workdir\n")
  return lambda: train.train_and_evaluate(tiny_config(), path)


def _workdir_under_file(ctx):
  parent = ctx.new
  with open(parent, "w") as f:
    f.write("a file\n")
  return lambda: train.train_and_evaluate(tiny_config(), os.path.join(parent, "run"))


def _not_writable(ctx):
  wd = ctx.new
  os.makedirs(wd)
  if os.geteuid() == 0:
    # root writes through any mode bits: simulate what os.access reports for others
    real = os.access
    ctx.monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if os.path.abspath(p)
                            == os.path.abspath(wd) and mode & os.W_OK else real(p, mode, **kw))
  else:
    os.chmod(wd, 0o555)
  return lambda: train.train_and_evaluate(tiny_config(), wd)


def _damage_all(wd):
  for step_dir in glob.glob(os.path.join(wd, ckpt.CKPT_DIR, "[0-9]*")):
    for f in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True):
      with open(f, "r+b") as fh:
        fh.truncate(1)


def _eval_all_damaged(ctx):
  wd = ctx.copy_run()
  _damage_all(wd)
  return lambda: evaluation.evaluate_checkpoint(wd)


def _train_all_damaged(ctx):
  wd = ctx.copy_run()
  _damage_all(wd)
  return lambda: train.train_and_evaluate(tiny_config(**{"train.steps": 30}), wd)


def _decoder_too_long(ctx):
  from flax import nnx

  from lmmask.model import Decoder, DecoderConfig
  model = Decoder(DecoderConfig(vocab_size=20, dropout=0.0, d_model=8, n_layers=1, n_heads=2, d_ff=16,
                                max_len=4, attention="einsum"), rngs=nnx.Rngs(0))
  return lambda: model(np.zeros((1, 6), np.int32))


CASES = [
    # --- config and command line -----------------------------------------------------------
    Case("override_typo_launch", LaunchExit, ("--config.optim.lrr", "no field 'lrr'",
                                              "did you mean 'lr'"),
         lambda ctx: _launch("--config=configs/verbs.py:tiny", f"--workdir={ctx.new}",
                             "--config.optim.lrr=1e-3")),
    Case("override_section_typo_launch", LaunchExit, ("--config.optimm.lr", "no field 'optimm'"),
         lambda ctx: _launch("--config=configs/verbs.py:tiny", f"--workdir={ctx.new}",
                             "--config.optimm.lr=1e-3")),
    Case("override_wrong_type_launch", LaunchExit,
         ("--config.train.steps=abc", "invalid literal for int()"),
         lambda ctx: _launch("--config=configs/verbs.py:tiny", f"--workdir={ctx.new}",
                             "--config.train.steps=abc")),
    Case("config_variant_typo", LaunchExit, ("unknown variant 'splt'", "split"),
         lambda ctx: _launch("--config=configs/verbs.py:splt=tense", f"--workdir={ctx.new}")),
    Case("wrong_type_assignment", ValueError, ("'lr'", "cannot be casted", "float"),
         lambda ctx: lambda: tiny_config(**{"optim.lr": "fast"})),
    Case("wrong_type_in_config_file", ValueError,
         ("config.data.batch_size", "must be a positive int", "'32'"),
         _from_dict(**{"data.batch_size": "32"})),
    Case("bool_for_int", ValueError, ("config.train.steps", "positive int", "True"),
         _from_dict(**{"train.steps": True})),
    Case("lr_zero", ValueError, ("config.optim.lr", "> 0", "0.0"), _train(**{"optim.lr": 0.0})),
    Case("lr_negative", ValueError, ("config.optim.lr", "> 0", "-0.001"),
         _train(**{"optim.lr": -1e-3})),
    Case("lr_string_in_config_file", ValueError, ("config.optim.lr", "number", "'3e-3'"),
         _from_dict(**{"optim.lr": "3e-3"})),
    Case("steps_zero", ValueError, ("config.train.steps", "positive int", "got 0"),
         _train(**{"train.steps": 0})),
    Case("steps_negative", ValueError, ("config.train.steps", "got -5"),
         _train(**{"train.steps": -5})),
    Case("batch_size_zero", ValueError, ("config.data.batch_size", "positive int", "got 0"),
         _train(**{"data.batch_size": 0})),
    Case("batch_size_negative", ValueError, ("config.data.batch_size", "got -4"),
         _train(**{"data.batch_size": -4})),
    Case("keep_checkpoints_zero", ValueError, ("config.train.keep_checkpoints", "got 0"),
         _train(**{"train.keep_checkpoints": 0})),
    Case("d_model_not_divisible", ValueError,
         ("config.model.d_model", "30 is not divisible by model.n_heads=4", "multiple"),
         _train(**{"model.d_model": 30, "model.n_heads": 4})),
    Case("dropout_out_of_range", ValueError, ("dropout must be in [0, 1)", "1.0"),
         _train(**{"model.dropout": 1.0})),
    Case("vocab_size_mismatch", ValueError, ("config.model.vocab_size=10", "set it to -1"),
         _train(**{"model.vocab_size": 10})),
    Case("unknown_reduction", ValueError, ("config.loss.reduction", "unknown reduction 'mean'",
                                           "token_mean"),
         _train(**{"loss.reduction": "mean"})),
    Case("unknown_optimizer", ValueError, ("config.optim.name", "'adam'", "adamw, sgd"),
         _train(**{"optim.name": "adam"})),
    Case("unknown_nonfinite_policy", ValueError, ("config.train.nonfinite", "'ignore'",
                                                  "stop, skip"),
         _train(**{"train.nonfinite": "ignore"})),
    # --- data --------------------------------------------------------------------------------
    Case("pad_id_outside_vocab", ValueError, ("pad_id=99", "outside the vocabulary [0, 50)"),
         lambda ctx: lambda: batching.batch_from_ids(np.ones((2, 5), np.int32), pad_id=99,
                                                     vocab_size=50)),
    Case("token_id_outside_vocab", ValueError, ("token ids must lie in [0, 50)", "60"),
         lambda ctx: lambda: batching.batch_from_ids(np.full((2, 5), 60, np.int32), pad_id=0,
                                                     vocab_size=50)),
    Case("sequences_longer_than_length", ValueError,
         ("exceed data.length=8", "raise data.length"), _train(**{"data.length": 8})),
    Case("length_longer_than_max_len", ValueError,
         ("config.model.max_len", "16 is shorter", "data.length-1=19"),
         _train(**{"data.length": 20})),
    Case("decoder_input_longer_than_max_len", ValueError,
         ("sequence length 6 exceeds max_len=4", "raise model.max_len"), _decoder_too_long),
    Case("empty_split", ValueError, ("split is empty", "data.split"),
         lambda ctx: lambda: pipeline.pad_split((), length=14, pad_id=0, pad_side="right")),
    Case("empty_held_out_set", ValueError, ("held_out_verbs must be non-empty",),
         lambda ctx: lambda: verbs.build_corpus("verbs", held_out_verbs=())),
    Case("random_split", ValueError, ("'random'", "refused", "verbs", "tense", "person"),
         _train(**{"data.split": "random"})),
    Case("unknown_split", ValueError, ("config.data.split", "'bogus'", "verbs, tense, person"),
         _train(**{"data.split": "bogus"})),
    # --- workdirs and checkpoints ------------------------------------------------------------
    Case("eval_not_a_workdir", FileNotFoundError, ("no config.json in", "--mode=train"),
         _eval_empty_dir),
    Case("eval_without_checkpoints", FileNotFoundError, ("no checkpoints in", "train first"),
         _eval_no_ckpt),
    Case("eval_missing_step", FileNotFoundError, ("no checkpoint for step 7", "[10, 20]"),
         lambda ctx: lambda: evaluation.evaluate_checkpoint(ctx.run_dir, step=7)),
    Case("resume_required_without_checkpoints", FileNotFoundError,
         ("train.resume='require'", "no checkpoint", "train.resume=auto"),
         _train(**{"train.resume": "require"})),
    Case("restore_into_other_shape", ckpt.CheckpointMismatchError,
         ("does not fit this model", "48 array(s) differ",
          "params.blocks.0.attn.qkv.kernel.value: checkpoint (32, 96) float32, model (48, 144)",
          "config.json"),
         _other_shape),
    Case("workdir_of_other_experiment", ValueError,
         ("belongs to a different experiment", "model.d_model: saved=32 now=64", "new --workdir"),
         _other_experiment),
    Case("checkpoints_without_config", ValueError, ("has checkpoints but no config.json",),
         _ckpts_without_config),
    Case("workdir_is_a_file", NotADirectoryError, ("is a file", "another --workdir"),
         _workdir_is_file),
    Case("workdir_under_a_file", NotADirectoryError, ("cannot be created", "is a file"),
         _workdir_under_file),
    Case("workdir_not_writable", PermissionError, ("is not writable", "another --workdir"),
         _not_writable),
    Case("eval_all_checkpoints_damaged", ckpt.CheckpointDamagedError,
         ("all 2 checkpoint(s)", "could not be read", "step 20:", "step 10:", "backup"),
         _eval_all_damaged),
    Case("train_all_checkpoints_damaged", ckpt.CheckpointDamagedError,
         ("could not be read", "move the directory away"), _train_all_damaged),
]


def _snapshot(path):
  if not path or not os.path.lexists(path):
    return None
  if os.path.isfile(path):
    return ("file", os.path.getsize(path), os.stat(path).st_mtime_ns)
  out = []
  for root, dirs, files in os.walk(path):
    for name in sorted(dirs + files):
      p = os.path.join(root, name)
      st = os.lstat(p)
      out.append((os.path.relpath(p, path), st.st_size if os.path.isfile(p) else -1,
                  st.st_mtime_ns))
  return sorted(out)


def _check_case(case, ctx):
  fn = case.make(ctx)
  before = _snapshot(ctx.watch)
  with pytest.raises(Exception) as info:
    fn()
  err = info.value
  assert type(err) is case.error, f"{case.id}: got {type(err).__name__}: {err}"
  message = str(err)
  for fragment in case.fragments:
    assert fragment in message, f"{case.id}: {fragment!r} not in message:\n{message}"
  if isinstance(err, LaunchExit):
    assert err.code == 1 and "Traceback" not in message
  assert _snapshot(ctx.watch) == before, f"{case.id} changed {ctx.watch}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, tmp_path, tiny_run, monkeypatch):
  _check_case(case, Ctx(tmp=str(tmp_path), run_dir=tiny_run[0], monkeypatch=monkeypatch))


def test_planted_bug_workdir_made_before_validation_is_caught(tmp_path, tiny_run, monkeypatch):
  """The twin of the table's workdir check: a trainer that creates the workdir before it
  validates the config leaves an empty experiment behind its error, and the check fails."""
  ctx = Ctx(tmp=str(tmp_path), run_dir=tiny_run[0], monkeypatch=monkeypatch)
  real = config_lib.validate

  def validate_after_mkdir(config):
    os.makedirs(ctx.watch, exist_ok=True)
    return real(config)

  monkeypatch.setattr(config_lib, "validate", validate_after_mkdir)
  case = next(c for c in CASES if c.id == "lr_zero")
  with pytest.raises(AssertionError, match="lr_zero changed"):
    _check_case(case, ctx)


def test_disk_full_during_save_keeps_previous(tmp_path, monkeypatch):
  """A simulated ENOSPC while writing step 20 leaves step 10 intact, complete and usable,
  no partial step behind, and a rerun resumes from step 10."""
  wd = str(tmp_path / "wd")
  handler = ckpt.ocp.handlers.JsonCheckpointHandler
  real = handler._save_fn

  async def full_disk(self, x, directory):
    if f"{os.sep}checkpoints{os.sep}20" in str(directory):
      raise OSError(errno.ENOSPC, "No space left on device", str(directory))
    return await real(self, x, directory)

  monkeypatch.setattr(handler, "_save_fn", full_disk)
  config = tiny_config(**{"train.keep_checkpoints": 1})
  with pytest.raises(ckpt.CheckpointSaveError) as info:
    train.train_and_evaluate(config, wd)
  msg = str(info.value)
  assert info.value.errno == errno.ENOSPC
  for fragment in ("saving checkpoint step 20", "No space left on device",
                   "previous checkpoint (step 10) is intact", "rerun the same command"):
    assert fragment in msg, msg
  ckdir = os.path.join(wd, ckpt.CKPT_DIR)
  assert sorted(os.listdir(ckdir)) == ["10"], os.listdir(ckdir)   # keep=1 did not drop 10
  assert not glob.glob(os.path.join(wd, "**", "*" + ckpt.TMP_SUFFIX + "*"), recursive=True)
  assert not os.path.exists(os.path.join(wd, "results.json"))
  assert evaluation.evaluate_checkpoint(wd)["step"] == 10
  monkeypatch.setattr(handler, "_save_fn", real)
  results = train.train_and_evaluate(config, wd)
  assert results["step"] == 20 and sorted(os.listdir(ckdir)) == ["20"]
  with open(os.path.join(wd, workdir_lib.CONFIG_FILE)) as f:
    assert json.load(f)["train"]["keep_checkpoints"] == 1
