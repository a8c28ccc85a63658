"""Crash, preemption, damaged checkpoints and non-finite steps (README.md, "Resuming and failures").

Exactness is checked bit for bit: final parameters are compared as raw bytes
with those of an uninterrupted run of the same config on the same machine.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import REPO, tiny_config

from lmmask import checkpoint as ckpt
from lmmask import preempt, train
from lmmask import step as step_lib
from lmmask.data import pipeline, verbs, verbs_source
from lmmask.eval import evaluate as evaluation


def _params_at(workdir, step=None, config=None):
  """Raw parameter arrays of a workdir's checkpoint (default: latest readable)."""
  config = config or tiny_config()
  state = step_lib.create_train_state(config, jax.random.PRNGKey(0),
                                   vocab_size=len(verbs.build_vocab()), keys_are_prefix=True)
  mngr = ckpt.manager(workdir, ckpt.CKPT_DIR, 100, create=False,
                      barrier_timeout_s=config.distributed.barrier_timeout_s)
  got, tree, meta = ckpt.restore(mngr, step, state.checkpoint_tree())
  mngr.close()
  return got, [np.asarray(x) for x in jax.tree.leaves(tree["params"])], meta


def _same_bits(a, b) -> bool:
  return len(a) == len(b) and all(x.dtype == y.dtype and x.shape == y.shape and
                                  x.tobytes() == y.tobytes() for x, y in zip(a, b))


def _copy(src, dst):
  shutil.copytree(src, dst)
  return str(dst)


# --- non-finite policy ---------------------------------------------------------------------

def _poison(batch, value=np.inf):
  """One bad loss-mask entry. inf: the loss is inf/inf = NaN and so are the gradients;
  NaN: the token-mean's zero-guard returns a loss of 0.0, but the gradients are NaN."""
  mask = np.array(batch.loss_mask, dtype=np.float32, copy=True)
  mask[0, 0] = value
  return batch.replace(loss_mask=mask)


def _state_and_batch(nonfinite):
  config = tiny_config(**{"train.nonfinite": nonfinite})
  corpus, split, _ = verbs_source.splits(config)
  state = step_lib.create_train_state(config, jax.random.PRNGKey(0), vocab_size=len(corpus.vocab),
                                      keys_are_prefix=True)
  batch = pipeline.train_batch(split, step=0, batch_size=config.data.batch_size, seed=0,
                               pad_id=corpus.vocab.pad_id)
  return state, batch


def _bits(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_skip_keeps_params_and_opt_state_inside_the_jitted_step():
  step = jax.jit(step_lib.train_step)  # no donation: the inputs are compared afterwards
  state0, batch = _state_and_batch("skip")
  state, _ = step(state0, batch)  # one real step: the warmup lr is 0 at optimizer step 0
  for value, loss_finite in ((np.inf, False), (np.nan, True)):  # loss+grads, grads only
    new, metrics = step(state, _poison(batch, value))
    assert float(metrics["skipped"]) == 1.0
    assert np.isfinite(float(metrics["loss"])) == loss_finite
    assert not np.isfinite(float(metrics["grad_norm"]))
    assert int(new.step) == int(state.step) + 1  # the batch is consumed, the update is not
    assert _same_bits(_bits(new.params), _bits(state.params))
    assert _same_bits(_bits(new.opt_state), _bits(state.opt_state))
  # A finite batch: the guard changes nothing, bit for bit, against the "stop" step.
  good, m_skip = step(state, batch)
  stop_step = jax.jit(step_lib.train_step)
  ref, m_stop = stop_step(stop_step(_state_and_batch("stop")[0], batch)[0], batch)
  assert float(m_skip["skipped"]) == 0.0 and "skipped" not in m_stop
  assert _same_bits(_bits(good.params), _bits(ref.params))
  assert not _same_bits(_bits(good.params), _bits(state.params))


def test_without_the_guard_a_poisoned_step_corrupts_params():
  """The planted-bug twin: with the "stop" policy (no guard) the same batch writes NaN
  into the parameters, so the test above would catch a missing or broken guard."""
  state, batch = _state_and_batch("stop")
  new, _ = jax.jit(step_lib.train_step)(state, _poison(batch))
  assert any(np.isnan(x).any() for x in _bits(new.params))


def _poison_steps(monkeypatch, steps):
  real = pipeline.train_batch

  def batch_fn(split, *, step, **kw):
    b = real(split, step=step, **kw)
    return _poison(b) if step in steps else b
  monkeypatch.setattr(pipeline, "train_batch", batch_fn)


def test_nonfinite_stop_then_resume_with_skip(tmp_path, monkeypatch, capsys):
  wd = str(tmp_path / "wd")
  _poison_steps(monkeypatch, {12})  # 0-based index: optimizer step 13
  with pytest.raises(FloatingPointError) as info:
    train.train_and_evaluate(tiny_config(), wd)
  msg = str(info.value)
  for fragment in ("non-finite loss and gradient norm at step 13", "loss=nan",
                   "last good checkpoint is kept", "train.nonfinite=skip"):
    assert fragment in msg, msg
  assert ckpt.committed_steps(wd) == [10]
  assert not os.path.exists(os.path.join(wd, "results.json"))
  assert _params_at(wd)[0] == 10
  # The documented way on: rerun with the skip policy (a resumable field).
  results = train.train_and_evaluate(tiny_config(**{"train.nonfinite": "skip"}), wd)
  assert results["step"] == 20 and results["nonfinite_skips"] == 1
  assert np.isfinite(results["val_loss"])
  assert "update skipped" in capsys.readouterr().err
  _, _, meta = _params_at(wd)
  assert meta["nonfinite_skips"] == 1


def test_nonfinite_skip_counts_and_persists_across_resume(tmp_path, monkeypatch):
  wd = str(tmp_path / "wd")
  _poison_steps(monkeypatch, {3, 7, 14})
  config = tiny_config(**{"train.nonfinite": "skip", "train.steps": 12})
  assert train.train_and_evaluate(config, wd)["nonfinite_skips"] == 2
  config = tiny_config(**{"train.nonfinite": "skip", "train.steps": 20})
  results = train.train_and_evaluate(config, wd)
  assert results["nonfinite_skips"] == 3 and np.isfinite(results["train_loss"])
  # keep_checkpoints=2 pruned step 10 once 20 was complete; best/ keeps one
  assert ckpt.committed_steps(wd) == [12, 20]
  assert len(ckpt.committed_steps(wd, ckpt.BEST_DIR)) == 1
  rows = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
  assert max(r.get("nonfinite_skips", 0) for r in rows) == 3


# --- checkpoints: keep-last-N, interrupted saves, damage -----------------------------------

def test_the_drain_reaches_the_background_writes_of_a_save(tmp_path, monkeypatch):
  """The drain after a failed save waits for every background write of it; orbax has
  no public call for that, so `commit_futures` reads orbax's internals, without a
  fallback: this fails when an orbax release moves them."""
  mngr = ckpt.manager(str(tmp_path), ckpt.CKPT_DIR, 2, barrier_timeout_s=60)
  assert ckpt.commit_futures(mngr.orbax) == []  # no save yet
  tree = {"a": np.arange(6.0), "b": np.ones((2, 3), np.float32)}
  ckpt.save(mngr, 1, tree, {"note": "x"})
  futures = ckpt.commit_futures(mngr.orbax)
  assert len(futures) >= 2  # the arrays and the JSON meta are written apart
  ckpt.finish(mngr)
  for f in futures:
    f.result(timeout=5)  # all done: finish waited for every one
  assert mngr.all_steps() == [1] and mngr.pending is None
  assert not [k for k in vars(mngr.orbax) if k.startswith("lmmask")]  # orbax's object untouched
  mngr.close()
  # Twin: orbax moving the futures is an error, not a drain that silently waits for nothing.
  monkeypatch.setattr(mngr.orbax._checkpointer, "_async_manager", object())  # noqa: SLF001
  with pytest.raises(AttributeError, match="_commit_futures"):
    ckpt.commit_futures(mngr.orbax)


def test_interrupted_save_is_never_a_step(tiny_run, tmp_path):
  wd = _copy(tiny_run[0], tmp_path / "wd")
  tmp = os.path.join(wd, ckpt.CKPT_DIR, "30" + ckpt.TMP_SUFFIX)
  shutil.copytree(os.path.join(wd, ckpt.CKPT_DIR, "20"), tmp)  # a save killed before rename
  assert ckpt.committed_steps(wd) == [10, 20]
  assert evaluation.evaluate_checkpoint(wd)["step"] == 20 and os.path.isdir(tmp)  # eval: read-only
  assert train.train_and_evaluate(tiny_config(), wd)["step"] == 20
  assert not os.path.exists(tmp)  # a training run removes the leftover


def _truncate_biggest_array_file(step_dir):
  f = max(glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True),
          key=os.path.getsize)
  with open(f, "r+b") as fh:
    fh.truncate(os.path.getsize(f) // 2)


def _remove_meta(step_dir):
  os.remove(os.path.join(step_dir, "meta", "metadata"))


@pytest.mark.parametrize("damage", [_truncate_biggest_array_file, _remove_meta],
                         ids=["truncated_array_file", "missing_meta_file"])
def test_damaged_latest_falls_back_and_resumes_exactly(damage, tiny_run, tmp_path, capsys):
  wd = _copy(tiny_run[0], tmp_path / "wd")
  _, before, _ = _params_at(wd, 20)
  damage(os.path.join(wd, ckpt.CKPT_DIR, "20"))
  # eval reports it and uses step 10, moving nothing
  assert evaluation.evaluate_checkpoint(wd)["step"] == 10
  err = capsys.readouterr().err
  assert "checkpoint step 20" in err and "damaged" in err and "step 10" in err
  assert ckpt.committed_steps(wd) == [10, 20]
  # training moves it aside, resumes from 10 and recomputes step 20 bit for bit
  results = train.train_and_evaluate(tiny_config(), wd)
  err = capsys.readouterr().err
  assert "moved it to" in err and "using the previous complete checkpoint, step 10" in err
  assert results["step"] == 20 and ckpt.committed_steps(wd) == [10, 20]
  assert len(os.listdir(os.path.join(wd, ckpt.DAMAGED_DIR))) == 1
  _, after, _ = _params_at(wd, 20)
  assert _same_bits(before, after)


def test_explicit_damaged_step_is_not_replaced(tiny_run, tmp_path):
  wd = _copy(tiny_run[0], tmp_path / "wd")
  _truncate_biggest_array_file(os.path.join(wd, ckpt.CKPT_DIR, "20"))
  with pytest.raises(ckpt.CheckpointDamagedError, match="checkpoint step 20 in .* could not"):
    evaluation.evaluate_checkpoint(wd, step=20)
  assert evaluation.evaluate_checkpoint(wd, step=10)["step"] == 10


# --- SIGINT / SIGTERM / SIGKILL --------------------------------------------------------------

def test_sigint_finishes_step_saves_and_resumes_exactly(tiny_run, tmp_path, monkeypatch, capsys):
  wd = str(tmp_path / "wd")
  real = pipeline.train_batch

  def batch_fn(split, *, step, **kw):
    if step == 12:  # Ctrl-C arrives while step 13 is being prepared
      os.kill(os.getpid(), signal.SIGINT)
    return real(split, step=step, **kw)
  monkeypatch.setattr(pipeline, "train_batch", batch_fn)
  handler_before = signal.getsignal(signal.SIGINT)
  with pytest.raises(preempt.Interrupted) as info:
    train.train_and_evaluate(tiny_config(), wd)
  assert info.value.code == 130 and info.value.step == 13
  err = capsys.readouterr().err
  assert "received SIGINT" in err and "stopped by SIGINT after step 13 of 20" in err
  assert "Rerun the same command" in err
  assert signal.getsignal(signal.SIGINT) is handler_before  # handler restored
  assert ckpt.committed_steps(wd) == [10, 13]
  assert not glob.glob(os.path.join(wd, "**", "*" + ckpt.TMP_SUFFIX + "*"), recursive=True)
  monkeypatch.setattr(pipeline, "train_batch", real)
  assert train.train_and_evaluate(tiny_config(), wd)["step"] == 20
  assert "resumed from step 13" in capsys.readouterr().out
  assert ckpt.committed_steps(wd) == [13, 20]  # keep 2: step 10 went once 20 was complete
  assert _same_bits(_params_at(wd, 20)[1], _params_at(tiny_run[0], 20)[1])


# The subprocess runs launch.py unchanged (flags, config, app.run) with one test-only
# wrapper: a sleep before each step, which leaves the results untouched but gives a
# wide window to send a signal after the first checkpoint. The command is the tiny
# config that the session's `tiny_run` trained in-process: that run is the reference.
_WRAPPER = """
import os, runpy, sys, time
from lmmask.data import pipeline
_real, _pause = pipeline.train_batch, float(os.environ["LMMASK_TEST_STEP_SLEEP"])
def _slow(*args, **kwargs):
  time.sleep(_pause)
  return _real(*args, **kwargs)
pipeline.train_batch = _slow
sys.argv[0] = os.path.join(os.environ["PYTHONPATH"], "launch.py")
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _launch_cmd(workdir):
  cache = os.environ.get("LMMASK_TEST_JAX_CACHE", "")
  return [sys.executable, "-c", _WRAPPER, "--config=configs/verbs.py:tiny",
          f"--workdir={workdir}", "--config.train.progress_bar=False",
          f"--config.train.jax_cache_dir={cache}",
          # one device, as the in-process run it is compared with bit for bit (the
          # default, auto, would use every core)
          "--config.mesh.cpu_devices=1"]


def _env():
  return dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", LMMASK_TEST_STEP_SLEEP="0.05")


def _start_and_wait_for_checkpoint(workdir, timeout=120):
  proc = subprocess.Popen(_launch_cmd(workdir), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=_env(), cwd=REPO)
  t0 = time.time()
  while not ckpt.committed_steps(workdir):
    if proc.poll() is not None or time.time() - t0 > timeout:
      proc.kill()
      out, err = proc.communicate()
      pytest.fail(f"no checkpoint appeared (rc={proc.returncode}):\n{err[-3000:]}")
    time.sleep(0.005)
  return proc


def _no_tmp_dirs(workdir):
  return not glob.glob(os.path.join(workdir, "**", "*" + ckpt.TMP_SUFFIX + "*"), recursive=True)


@pytest.mark.slow
def test_sigkill_then_same_command_is_bit_identical(tiny_run, tmp_path):
  wd = str(tmp_path / "wd")
  proc = _start_and_wait_for_checkpoint(wd)
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  killed_at = max(ckpt.committed_steps(wd))
  assert killed_at < 20, "the run finished before it could be killed"
  again = subprocess.run(_launch_cmd(wd), capture_output=True, text=True, env=_env(), cwd=REPO,
                         timeout=300)
  assert again.returncode == 0, again.stderr[-3000:]
  resumed = int(again.stdout.split("resumed from step ")[1].split()[0])
  assert 10 <= resumed < 20 and _no_tmp_dirs(wd)
  assert ckpt.committed_steps(wd) == [10, 20]
  assert _same_bits(_params_at(wd, 20)[1], _params_at(tiny_run[0], 20)[1])


@pytest.mark.slow
def test_sigterm_saves_waits_and_exits_143(tmp_path):
  wd = str(tmp_path / "wd")
  proc = _start_and_wait_for_checkpoint(wd)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 143, err[-3000:]
  assert "received SIGTERM" in err and "stopped by SIGTERM after step" in err
  assert "Traceback" not in err
  stopped = int(err.split("stopped by SIGTERM after step ")[1].split()[0])
  assert 10 <= stopped < 20 and max(ckpt.committed_steps(wd)) == stopped
  assert _no_tmp_dirs(wd) and not os.path.exists(os.path.join(wd, "results.json"))
  assert _params_at(wd)[0] == stopped  # complete and readable
