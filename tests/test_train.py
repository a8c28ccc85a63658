"""Train state, steps, schedules, the run loop, workdir identity and launch.py."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO, tiny_config

from lmmask import config as config_lib
from lmmask import optim, train
from lmmask import step as step_lib
from lmmask.batching import make_batch
from lmmask.data import pipeline, verbs
from lmmask.eval import evaluate as evaluation


def small_state(config=None, vocab_size=None):
  config = config or tiny_config()
  corpus = verbs.build_corpus(config.data.split)
  return step_lib.create_train_state(config, jax.random.PRNGKey(0),
                                  vocab_size=vocab_size or len(corpus.vocab),
                                  keys_are_prefix=True), corpus


def fixed_batch(corpus, n=16):
  return make_batch([list(e.ids) for e in corpus.train[:n]], pad_id=corpus.vocab.pad_id,
                    length=14)


def test_jitted_train_step_lowers_the_loss_on_a_fixed_batch():
  state, corpus = small_state()
  batch = fixed_batch(corpus)
  step = jax.jit(step_lib.train_step, donate_argnums=0)
  first = None
  for _ in range(30):
    state, m = step(state, batch)
    first = float(m["loss"]) if first is None else first
  assert int(state.step) == 30
  assert float(m["loss"]) < 0.7 * first
  for key in ("lr", "grad_norm", "update_norm", "param_norm", "accuracy", "num_tokens"):
    assert key in m and np.isfinite(float(m[key]))


def test_train_step_uses_the_configured_reduction():
  b = None
  vals = {}
  for red in ("token_mean", "sum"):
    state, corpus = small_state(tiny_config(**{"loss.reduction": red}))
    b = b or fixed_batch(corpus)
    _, m = jax.jit(step_lib.train_step)(state, b)
    vals[red] = float(m["loss"])
  np.testing.assert_allclose(vals["sum"], vals["token_mean"] * float(b.loss_mask.sum()),
                             rtol=1e-4)


def test_dropout_rng_changes_with_the_step():
  state, corpus = small_state(tiny_config(**{"model.dropout": 0.5, "optim.lr": 1e-9}))
  b = fixed_batch(corpus)
  step = jax.jit(step_lib.train_step)
  s1, m1 = step(state, b)
  _, m2 = step(s1, b)
  assert float(m1["loss"]) != float(m2["loss"])


def test_eval_step_is_deterministic_and_token_mean():
  state, corpus = small_state(tiny_config(**{"model.dropout": 0.5, "loss.reduction": "sum"}))
  b = fixed_batch(corpus)
  m1, m2 = step_lib.eval_step(state, b), step_lib.eval_step(state, b)
  assert float(m1["loss"]) == float(m2["loss"])
  np.testing.assert_allclose(float(m1["loss"]), float(m1["nll_sum"] / m1["num_tokens"]), rtol=1e-6)


def test_schedule_warmup_then_cosine():
  c = tiny_config(**{"optim.lr": 1.0, "optim.warmup_steps": 10, "optim.decay_steps": 110,
                     "optim.end_lr_factor": 0.1})
  s = optim.make_schedule(c.optim)
  assert float(s(0)) == 0.0
  np.testing.assert_allclose(float(s(5)), 0.5, rtol=1e-6)
  np.testing.assert_allclose(float(s(10)), 1.0, rtol=1e-6)
  np.testing.assert_allclose(float(s(60)), 0.55, rtol=1e-5)   # cosine midpoint
  np.testing.assert_allclose(float(s(110)), 0.1, rtol=1e-5)
  for kind, mid in (("linear", 0.55), ("constant", 1.0)):
    c.optim.schedule = kind
    np.testing.assert_allclose(float(optim.make_schedule(c.optim)(60)), mid, rtol=1e-5)


def test_weight_decay_mask_skips_norms_and_biases():
  state, _ = small_state()
  mask = optim.decay_mask(state.params)
  flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(mask)}
  assert any(v for k, v in flat.items() if "kernel" in k)
  assert any(v for k, v in flat.items() if "embedding" in k)
  assert not any(v for k, v in flat.items() if "bias" in k or "scale" in k)


def test_step_derived_sampling_covers_each_example_once_per_epoch():
  n, bs = 37, 8
  rows = np.concatenate([pipeline.batch_indices(n, bs, s, seed=3) for s in range(37)])
  for e in range(8):
    assert sorted(rows[e * n:(e + 1) * n].tolist()) == list(range(n))
  np.testing.assert_array_equal(pipeline.batch_indices(n, bs, 5, 3),
                                pipeline.batch_indices(n, bs, 5, 3))


def test_random_split_is_refused_with_a_reason(tmp_path):
  with pytest.raises(ValueError, match="random"):
    train.train_and_evaluate(tiny_config(**{"data.split": "random"}), str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_results_and_workdir_contents(tiny_run):
  workdir, results = tiny_run
  for key in ("step", "train_loss", "train_ppl", "train_accuracy", "val_loss", "val_ppl",
              "val_accuracy", "val_english_loss"):
    assert key in results
  assert results["step"] == 20
  np.testing.assert_allclose(results["val_ppl"], np.exp(results["val_loss"]), rtol=1e-9)
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f)["val_loss"] == results["val_loss"]
  prov = json.load(open(os.path.join(workdir, "provenance.json")))
  assert {"git_commit", "git_dirty", "versions", "device_kind"} <= set(prov)
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  train_rows = [r for r in rows if r["kind"] == "train"]
  assert train_rows and all("lr" in r and "grad_norm" in r and "tokens_per_sec" in r
                            for r in train_rows)
  assert os.path.isdir(os.path.join(workdir, "tb"))
  assert os.path.isdir(os.path.join(workdir, "best"))


def test_eval_of_checkpoint_equals_end_of_training(tiny_run):
  workdir, results = tiny_run
  ev = evaluation.evaluate_checkpoint(workdir)
  for key in ("val_loss", "val_accuracy", "train_loss", "val_english_loss"):
    assert ev[key] == pytest.approx(results[key], rel=1e-6)


def test_other_experiment_in_workdir_is_refused_untouched(tiny_run):
  workdir, _ = tiny_run
  before = {p: os.path.getmtime(os.path.join(workdir, p)) for p in os.listdir(workdir)}
  with pytest.raises(ValueError, match=r"optim.lr.*\n?.*|belongs to a different experiment") as e:
    train.train_and_evaluate(tiny_config(**{"optim.lr": 0.5, "model.d_model": 16}), workdir)
  assert "optim.lr" in str(e.value) and "model.d_model" in str(e.value)
  after = {p: os.path.getmtime(os.path.join(workdir, p)) for p in os.listdir(workdir)}
  assert before == after


def test_extending_steps_resumes(tmp_path):
  wd = str(tmp_path / "run")
  train.train_and_evaluate(tiny_config(**{"train.steps": 10}), wd)
  r = train.train_and_evaluate(tiny_config(**{"train.steps": 20}), wd)
  assert r["step"] == 20
  steps = [json.loads(l)["step"] for l in open(os.path.join(wd, "metrics.jsonl"))
           if json.loads(l)["kind"] == "train"]
  assert steps == sorted(set(steps)) and max(steps) == 20   # no step trained twice
  # Bit-identical to an uninterrupted run (step-derived data and RNG).
  straight = train.train_and_evaluate(tiny_config(**{"train.steps": 20}), str(tmp_path / "b"))
  assert straight["train_loss"] == r["train_loss"] and straight["val_loss"] == r["val_loss"]


def test_eval_without_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    evaluation.evaluate_checkpoint(str(tmp_path))


@pytest.mark.slow
def test_launch_train_then_eval_end_to_end(tmp_path):
  wd = str(tmp_path / "launch")
  env = dict(os.environ, PYTHONPATH=REPO)
  cmd = [sys.executable, os.path.join(REPO, "launch.py"),
         f"--config={os.path.join(REPO, 'configs', 'verbs.py')}:tiny", f"--workdir={wd}",
         "--config.train.steps=12", "--config.train.progress_bar=false",
         f"--config.train.jax_cache_dir={os.environ['LMMASK_TEST_JAX_CACHE']}"]
  out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "val_ppl" in out.stdout
  results = json.load(open(os.path.join(wd, "results.json")))
  assert results["step"] == 12
  ev = subprocess.run([sys.executable, os.path.join(REPO, "launch.py"), "--mode=eval",
                       f"--workdir={wd}"], capture_output=True, text=True, env=env, timeout=300)
  assert ev.returncode == 0, ev.stderr[-3000:]
  got = json.loads(ev.stderr.strip().splitlines()[-1])
  assert got["val_loss"] == pytest.approx(results["val_loss"], rel=1e-6)
  assert got["step"] == 12
  # A typo in an override is refused by the config system.
  bad = subprocess.run(cmd[:3] + ["--config.optim.lrr=1"], capture_output=True, text=True,
                       env=env, timeout=300)
  assert bad.returncode != 0 and "lrr" in bad.stderr


def test_fields_added_later_match_their_absent_meaning():
  """A workdir saved before a field existed resumes when the new field keeps the old
  behaviour, and is refused when it changes it."""
  new = config_lib.to_dict(tiny_config())
  old = json.loads(json.dumps(new))
  del old["model"]["norm"], old["loss"]["z_loss"]
  assert config_lib.identity_diff(old, new) == []
  changed = json.loads(json.dumps(new))
  changed["model"]["norm"] = "rmsnorm"
  assert [d[0] for d in config_lib.identity_diff(old, changed)] == ["model.norm"]
