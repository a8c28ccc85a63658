"""Sweep runner: expansion and naming, dry-run commands, resumption, aggregation."""
import csv
import json
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest
from ml_collections import config_dict

from lmmask import cluster, sweep
from lmmask import config as config_lib
from tests.conftest import REPO, tiny_config

CACHE = os.environ["LMMASK_TEST_JAX_CACHE"]


def make_sweep(grid=None, points=None, steps=4, **fixed_extra):
  c = config_dict.ConfigDict()
  c.name = "t"
  c.base = "configs/verbs.py:tiny"
  c.fixed = config_dict.ConfigDict()
  c.fixed.train = {"steps": steps, "log_every": 2, "eval_every": 2, "ckpt_every": 2,
                   "progress_bar": False, "jax_cache_dir": CACHE}
  c.fixed.optim = {"decay_steps": 8, "warmup_steps": 1}
  for k, v in fixed_extra.items():
    c.fixed[k] = v
  c.grid = config_dict.ConfigDict(grid or {})
  c.points = points or []
  c.metric = "val_loss"
  c.x = "optim.lr"
  c.facet = ""
  return c


# --- expansion and naming (no training) -------------------------------------

def test_grid_expansion_names_and_configs():
  s = make_sweep(grid={"optim": {"lr": [1e-3, 3e-3]}, "seed": [0, 1],
                       "loss": {"reduction": ["sum"]}})
  pts = sweep.expand(s)
  # axes in sorted dotted-key order, last axis fastest
  assert [p.name for p in pts] == [
      "reduction=sum,lr=0.001,seed=0", "reduction=sum,lr=0.001,seed=1",
      "reduction=sum,lr=0.003,seed=0", "reduction=sum,lr=0.003,seed=1"]
  assert pts[1].overrides == {"loss.reduction": "sum", "optim.lr": 1e-3, "seed": 1}
  cfg = sweep.point_config(s, pts[3])
  assert cfg.optim.lr == 3e-3 and cfg.seed == 1 and cfg.loss.reduction == "sum"
  assert cfg.train.steps == 4 and cfg.optim.decay_steps == 8   # fixed applied
  assert cfg.model.d_model == tiny_config().model.d_model       # base kept
  # every point's config is distinct and the base file is untouched
  assert len({json.dumps(config_lib.to_dict(sweep.point_config(s, p)), sort_keys=True)
              for p in pts}) == 4


def test_list_crossed_with_grid():
  s = make_sweep(grid={"seed": [0, 1]},
                 points=[{"loss.reduction": "sum"},
                         {"loss.reduction": "token_mean", "data.batch_size": 8}])
  pts = sweep.expand(s)
  assert [p.name for p in pts] == [
      "reduction=sum,seed=0", "reduction=sum,seed=1",
      "reduction=token_mean,batch_size=8,seed=0", "reduction=token_mean,batch_size=8,seed=1"]
  assert sweep.point_config(s, pts[3]).data.batch_size == 8
  assert sweep.point_config(s, pts[0]).data.batch_size == 16  # tiny default


def test_list_only_and_empty_sweep():
  assert [p.name for p in sweep.expand(make_sweep(points=[{"optim.lr": 0.5}]))] == ["lr=0.5"]
  assert [p.name for p in sweep.expand(make_sweep())] == ["base"]


def test_short_names_disambiguate_and_sanitise():
  assert sweep._short_keys(["a.x", "b.x", "c.y"]) == {"a.x": "a.x", "b.x": "b.x", "c.y": "y"}
  assert sweep.point_name({"data.split": "a/b c", "model.causal": False}) == \
      "split=a_b_c,causal=false"


@pytest.mark.parametrize("bad, match", [
    (dict(points=[{"optim.lr": 0.1}, {"optim.lr": 0.1}]), "share the name"),
    (dict(points=[{"optim.lr": 0.1}], grid={"optim": {"lr": [0.2]}}), "both in grid"),
    (dict(grid={"optim": {"lr": []}}), "empty"),
    (dict(grid={"optim": {"lr": 0.1}}), "must be a list"),
])
def test_bad_sweeps_raise(bad, match):
  with pytest.raises(ValueError, match=match):
    sweep.expand(make_sweep(**bad))


def test_bad_overrides_raise():
  s = make_sweep(points=[{"optim.lrr": 0.1}])
  with pytest.raises(ValueError, match="no field 'lrr'"):
    sweep.point_config(s, sweep.expand(s)[0])
  s = make_sweep(points=[{"optim": 0.1}])
  with pytest.raises(ValueError, match="names a section"):
    sweep.point_config(s, sweep.expand(s)[0])
  s = make_sweep(points=[{"optim.lr": "fast"}])
  with pytest.raises(ValueError, match="wrong type"):
    sweep.point_config(s, sweep.expand(s)[0])


def _parse_command(cmd):
  """Parse a printed command with launch.py's own flag definitions (no subprocess)."""
  from absl import flags
  from ml_collections import config_flags
  argv = shlex.split(cmd)
  assert argv[:2] == ["python", "launch.py"]
  fv = flags.FlagValues()
  sys_argv = ["launch.py", *argv[2:]]
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=sys_argv)
  flags.DEFINE_string("workdir", None, "", flag_values=fv)
  fv(sys_argv)
  return fv.config, fv.workdir


def test_dry_run_commands_reproduce_each_point(tmp_path, monkeypatch):
  monkeypatch.chdir(REPO)
  s = make_sweep(grid={"optim": {"lr": [1e-3, 0.0123456789]}, "model": {"causal": [True]}},
                 points=[{"data.split": "tense"}, {"data.split": "person"}])
  cmds = sweep.commands(s, str(tmp_path / "sw"))
  pts = sweep.expand(s)
  assert len(cmds) == len(pts) == 4
  for cmd, p in zip(cmds, pts):
    cfg, wd = _parse_command(cmd)
    assert wd == str(tmp_path / "sw" / p.name)
    assert config_lib.to_dict(cfg) == config_lib.to_dict(sweep.point_config(s, p))
  # the manifest lets --mode=aggregate collect the points later
  manifest = json.load(open(tmp_path / "sw" / sweep.MANIFEST))
  assert [m["name"] for m in manifest["points"]] == [p.name for p in pts]
  rows = sweep.aggregate(str(tmp_path / "sw"), plots=False)
  assert [r["status"] for r in rows] == ["missing"] * 4


# --- running, resuming, aggregating ------------------------------------------

def test_half_finished_sweep_resumes_and_aggregates(tmp_path):
  from lmmask import train
  s = make_sweep(grid={"optim": {"lr": [1e-3, 3e-3]}})
  wd = str(tmp_path / "sw")
  calls = []

  def crash_on_second(config, workdir):
    if calls:
      raise RuntimeError("simulated crash")
    calls.append(workdir)
    return train.train_and_evaluate(config, workdir)

  with pytest.raises(RuntimeError, match="simulated crash"):
    sweep.run(s, wd, train_fn=crash_on_second, log=lambda *_: None)
  first, second = [os.path.join(wd, p.name) for p in sweep.expand(s)]
  assert os.path.exists(os.path.join(first, "results.json"))
  assert not os.path.exists(os.path.join(second, "results.json"))
  mtime = os.path.getmtime(os.path.join(first, "results.json"))

  ran = []
  rows = sweep.run(s, wd, train_fn=lambda c, w: (ran.append(w), train.train_and_evaluate(c, w)),
                   log=lambda *_: None)
  assert ran == [second]                       # the finished point was skipped
  assert os.path.getmtime(os.path.join(first, "results.json")) == mtime
  assert [r["status"] for r in rows] == ["done", "done"]

  with open(os.path.join(wd, "results.csv")) as f:
    table = list(csv.DictReader(f))
  assert [t["point"] for t in table] == ["lr=0.001", "lr=0.003"]
  for t, point_dir in zip(table, (first, second)):
    res = json.load(open(os.path.join(point_dir, "results.json")))
    assert float(t["optim.lr"]) in (1e-3, 3e-3)
    assert float(t["val_loss"]) == pytest.approx(res["val_loss"], rel=1e-12)
    assert int(t["step"]) == 4
  md = open(os.path.join(wd, "results.md")).read()
  assert "lr=0.001" in md and "val_loss" in md and "2/2 points done" in md
  plots = os.listdir(os.path.join(wd, "plots"))
  assert {"loss_curves.png", "val_loss_vs_lr.png", "curve_lr=0.001.png"} <= set(plots)

  # A finished sweep runs nothing; a longer run (resumable field) resumes every point.
  assert sweep.run(s, wd, train_fn=lambda c, w: ran.append(w), log=lambda *_: None)
  assert ran == [second]
  s.fixed.train.steps = 6
  extended = []
  sweep.run(s, wd, train_fn=lambda c, w: extended.append(w), log=lambda *_: None)
  assert extended == [first, second]

  # Another experiment's settings are refused before anything runs.
  s.fixed.optim.warmup_steps = 2
  with pytest.raises(ValueError, match="different experiment"):
    sweep.run(s, wd, train_fn=lambda c, w: pytest.fail("must not run"), log=lambda *_: None)


# What a vmapped run's results.json adds to a normal run's.
SEEDVMAP_KEYS = {"runner", "diverged", "seed"}


def _results(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


def test_seedvmap_runner_matches_train_and_evaluate(tmp_path):
  """Seeds and lrs trained together under vmap give the normal runs' results: the
  same keys (floor alarm, corpus extras, ...) and the same losses."""
  from lmmask import train
  s = make_sweep(points=[{"optim.lr": 1e-3, "seed": 0}, {"optim.lr": 1e-2, "seed": 1}],
                 steps=4)
  ref = {p.name: train.train_and_evaluate(sweep.point_config(s, p), str(tmp_path / p.name))
         for p in sweep.expand(s)}
  s.runner = "seedvmap"
  rows = sweep.run(s, str(tmp_path / "vm"), log=lambda *_: None)
  assert len(rows) == 2
  for r in rows:
    assert r["runner"] == "seedvmap x2" and r["status"] == "done"
    for key in ("train_loss", "val_loss", "val_english_loss"):
      assert r[key] == pytest.approx(ref[r["point"]][key], rel=2e-5, abs=2e-5)
    got, want = _results(tmp_path / "vm" / r["point"]), _results(tmp_path / r["point"])
    assert set(got) == set(want) | SEEDVMAP_KEYS and not SEEDVMAP_KEYS & set(want)
    with open(tmp_path / "vm" / r["point"] / "config.json") as f:
      assert (got["diverged"], got["seed"], got["step"]) == (False, json.load(f)["seed"], 4)
    losses = [k for k in want if k.endswith("_loss") or k == "floor_min_margin"]
    assert len(losses) >= 6 and got["floor_alarm"] is False
    for key in losses:
      assert got[key] == pytest.approx(want[key], rel=2e-5), key
    assert os.listdir(tmp_path / "vm" / r["point"] / "tb")  # TensorBoard, as a normal run
  # the two lrs really differ (a runner ignoring lr would make them equal)
  assert abs(rows[0]["train_loss"] - rows[1]["train_loss"]) > 1e-3
  lrs = [json.loads(line)["lr"] for line in open(tmp_path / "vm" / rows[1]["point"] /
                                                 "metrics.jsonl") if '"train"' in line]
  assert max(lrs) == pytest.approx(1e-2, rel=1e-6)


def _poison_step(monkeypatch, poisoned: int):
  """Training batch `poisoned` (0-based) of every run gets an inf in its loss mask."""
  from lmmask.data import pipeline
  real = pipeline.train_batch

  def batch_fn(split, *, step, **kw):
    b = real(split, step=step, **kw)
    if step != poisoned:
      return b
    mask = np.array(b.loss_mask, np.float32)
    mask[0, 0] = np.inf
    return b.replace(loss_mask=mask)
  monkeypatch.setattr(pipeline, "train_batch", batch_fn)


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_seedvmap_follows_the_nonfinite_policy(tmp_path, monkeypatch, policy):
  from lmmask import seedvmap
  _poison_step(monkeypatch, 2)  # optimizer step 3 of both runs
  s = make_sweep(points=[{"seed": 0}, {"seed": 1}], steps=4)
  s.fixed.train.nonfinite = policy
  configs = [sweep.point_config(s, p) for p in sweep.expand(s)]
  wds = [str(tmp_path / f"s{i}") for i in range(2)]
  out = seedvmap.train_seed_group(configs, wds, log=lambda *_: None)
  for res, w in zip(out, wds):
    assert json.dumps(res, sort_keys=True) == json.dumps(_results(w), sort_keys=True)  # NaN too
    steps = [json.loads(line)["step"] for line in open(os.path.join(w, "metrics.jsonl"))]
    if policy == "stop":  # each run stops at step 3 and the group with them: step 3, not 4
      assert res["diverged"] is True and res["step"] == 3 and max(steps) == 2
      assert np.isnan(res["val_loss"])
    else:
      assert res["diverged"] is False and res["step"] == 4 and res["nonfinite_skips"] == 1
      assert np.isfinite(res["val_loss"]) and max(steps) == 4


@pytest.mark.slow
def test_launch_dry_run_prints_commands(tmp_path):
  sweep_file = tmp_path / "sw.py"
  sweep_file.write_text(
      "from ml_collections import config_dict\n"
      "def get_config():\n"
      "  c = config_dict.ConfigDict()\n"
      "  c.name = 'cli'\n"
      "  c.base = 'configs/verbs.py:tiny'\n"
      "  c.fixed = config_dict.ConfigDict({'train': {'steps': 3}})\n"
      "  c.grid = config_dict.ConfigDict({'seed': [0, 1, 2]})\n"
      "  c.points = []\n"
      "  c.metric = 'val_loss'\n"
      "  return c\n")
  wd = tmp_path / "out"
  out = subprocess.run([sys.executable, "launch.py", f"--config={sweep_file}",
                        f"--workdir={wd}", "--mode=sweep", "--dry_run"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  lines = out.stdout.strip().splitlines()
  assert lines == [f"python launch.py --config=configs/verbs.py:tiny --workdir={wd}/seed={i} "
                   f"--config.train.steps=3 --config.seed={i}" for i in range(3)]
  assert not any(os.path.isdir(wd / f"seed={i}") for i in range(3))  # nothing trained
  out = subprocess.run([sys.executable, "launch.py", "--mode=aggregate", f"--workdir={wd}"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert "0/3 points done" in out.stdout


# --- on a cluster scheduler (submitit's local executor: jobs in parallel) ----

@pytest.mark.slow
def test_cluster_sweep_runs_points_as_parallel_jobs(tmp_path):
  s = make_sweep(points=[{"seed": 0}, {"seed": 1},
                         {"seed": 2, "train.init_from": str(tmp_path / "no_such_base")}],
                 steps=2, mesh={"cpu_devices": 1})  # one device each: 3 jobs share 2 cores
  log = []
  rows = cluster.submit(s, str(tmp_path), "local", timeout_s=300, log=log.append)
  by = {r["point"]: r for r in rows}
  ok = [n for n in by if "init_from" not in n]
  bad = [n for n in by if "init_from" in n][0]
  assert all(by[n]["status"] == "done" for n in ok), rows
  assert by[bad]["status"] == "failed" and "no_such_base" in by[bad]["error"], by[bad]
  assert any("FAILED" in line and "log:" in line for line in log), log
  jobs = json.load(open(tmp_path / "jobs.json"))
  assert all(os.path.exists(jobs[n]["stderr"]) for n in by)  # a log per job
  # the two good points ran at the same time: each started before the other ended
  start = {n: os.path.getmtime(tmp_path / n / "provenance.json") for n in ok}
  end = {n: os.path.getmtime(tmp_path / n / "results.json") for n in ok}
  assert start[ok[0]] < end[ok[1]] and start[ok[1]] < end[ok[0]]
  # --mode=aggregate collects what the jobs wrote (a rerun would submit only the failed
  # point: point_status says "done" for the others)
  again = sweep.aggregate(str(tmp_path), plots=False)
  assert sorted(r["status"] for r in again) == ["done", "done", "failed"]
  pts = {p.name: p for p in sweep.expand(s)}
  assert all(sweep.point_status(sweep.point_config(s, pts[n]), str(tmp_path / n)) == "done"
             for n in ok)
