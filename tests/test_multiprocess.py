"""Multi-process training for real: 2 processes x 4 XLA:CPU devices on this machine.

One set of runs is shared by every check (each run costs a JAX start per process):
  * 1 device (this pytest process), 1 process x 8 devices (a subprocess) and
    2 processes x 4 devices (`launch.py --processes=2`), tiny verbs and tiny text,
    SGD without dropout on a 4 x 2 mesh: the same losses (1e-5 vs 8 devices, 1e-4 vs
    1 device);
  * the 2-process runs: only process 0 writes the workdir's files, each process
    builds its own disjoint rows, keep-last-N pruning (keep 1, best and latest)
    completes;
  * kill -9 of one of two processes after a committed checkpoint: the other exits
    non-zero within 60 s; both rerun (new port) resume and end bit-identical to the
    uninterrupted run;
  * a 2-process checkpoint restores on 1 process; a 1-process one is evaluated by
    `--mode=eval` on 2 processes.
Every wait has a timeout, and the launcher (or `finally`) kills the process groups.
"""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import _CACHE, REPO, load_config

from lmmask import multiprocess, train
from lmmask import workdir as wd
from lmmask.data import registry

TIMEOUT = 240  # per command; the launcher kills its children when it is killed
CONFIGS = {"verbs": "configs/verbs.py:tiny", "text": "configs/text.py:tiny"}
EXACT = {"data.batch_size": 16, "optim.name": "sgd", "model.dropout": 0.0,
         "train.steps": 8, "train.ckpt_every": 4, "train.eval_every": 4, "train.log_every": 4,
         "train.keep_checkpoints": 1, "train.progress_bar": False, "train.jax_cache_dir": _CACHE,
         "data.max_eval_batches": 2,  # text: 2 eval batches per split (verbs ignores it)
         "distributed.heartbeat_timeout_s": 10, "distributed.shutdown_timeout_s": 10,
         "distributed.barrier_timeout_s": 60}
MESH = {"mesh.data": 4, "mesh.fsdp": 2}


def _flag(v):
  return str(v).lower() if isinstance(v, bool) else str(v)


def flags(name, workdir, **extra):
  over = {**EXACT, **MESH, **extra}
  return [f"--config={CONFIGS[name]}", f"--workdir={workdir}",
          *(f"--config.{k}={_flag(v)}" for k, v in over.items())]


def env(devices=None):
  e = dict(os.environ, JAX_PLATFORMS="cpu",
           PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  e.pop("XLA_FLAGS", None)
  if devices:
    e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return e


def run(args, devices=None, timeout=TIMEOUT):
  p = subprocess.run([sys.executable, *args], cwd=REPO, env=env(devices), capture_output=True,
                     text=True, timeout=timeout)
  return p.returncode, p.stdout, p.stderr


NOISE = ("[Gloo]", "WARNING", "I0000", "W0000", "W1", "E1")


def tail(text, n=60):
  """The last `n` lines of a run's output without the collectives' chatter."""
  return "\n".join([l for l in text.splitlines() if not l.startswith(NOISE)][-n:])


def check(rc, text, what):
  if rc != 0:
    pytest.fail(f"{what} exited {rc}:\n{tail(text)}", pytrace=False)


def results(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


def rel(a, b):
  return abs(a - b) / max(abs(b), 1e-12)


def start(args, devices=None):
  """A subprocess in its own session, its output in a temporary file (no pipe to fill)."""
  out = open(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"lmmask_mp_{time.time_ns()}.log"),
             "w+")
  p = subprocess.Popen([sys.executable, *args], cwd=REPO, env=env(devices), stdout=out,
                       stderr=subprocess.STDOUT, text=True, start_new_session=True)
  return p, out


def finish(p, out, what, timeout=TIMEOUT):
  try:
    rc = p.wait(timeout=timeout)
  finally:
    if p.poll() is None:
      os.killpg(p.pid, signal.SIGKILL)  # the launcher's children die with it (PDEATHSIG)
      p.wait(timeout=30)
  out.seek(0)
  text = out.read()
  check(rc, text, what)
  return text


@pytest.fixture(scope="module")
def runs(tmp_path_factory, eight_devices):
  base = tmp_path_factory.mktemp("mp")
  out = {"base": base, "timing": {}}
  t = time.perf_counter()
  # The 8-device runs (in the suite's one 8-device process, tests/mesh_worker.py, maybe
  # done already) and the first 2-process run go together (much of a multi-process run is
  # waiting); the 1-device runs go meanwhile in this process.
  two = start(["launch.py", "--processes=2",
               *flags("verbs", base / "verbs_2proc", **{"mesh.cpu_devices": 4})])
  try:
    for name in CONFIGS:
      c = load_config(CONFIGS[name].split("/")[1].split(":")[0], "tiny", **EXACT)
      train.train_and_evaluate(c, str(base / f"{name}_1dev"))
  finally:
    out["verbs_log"] = finish(*two, "2-process verbs run")
  for name, workdir in eight_devices.result()["runs"].items():
    os.symlink(workdir, base / f"{name}_8dev")
  rc, so, se = run(["launch.py", "--processes=2",
                    *flags("text", base / "text_2proc", **{"mesh.cpu_devices": 4})])
  check(rc, so + se, "2-process text run")
  out["text_log"] = so + se
  out["timing"]["all"] = time.perf_counter() - t
  return out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_processes_equal_one_process_and_one_device(runs, name):
  two, eight, one = (results(runs["base"] / f"{name}_{k}") for k in ("2proc", "8dev", "1dev"))
  assert two["step"] == eight["step"] == one["step"] == 8
  for key in ("train_loss", "val_loss"):
    assert rel(two[key], eight[key]) < 1e-5, (key, two[key], eight[key])
    assert rel(two[key], one[key]) < 1e-4, (key, two[key], one[key])
  print(f"{name}: val_loss rel diff 2proc-8dev {rel(two['val_loss'], eight['val_loss']):.2e}, "
        f"2proc-1dev {rel(two['val_loss'], one['val_loss']):.2e}, train_loss 2proc-1dev "
        f"{rel(two['train_loss'], one['train_loss']):.2e}; timing {runs['timing']}")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_only_process_zero_writes_and_rows_are_disjoint(runs, name):
  workdir = runs["base"] / f"{name}_2proc"
  saved = json.load(open(workdir / "config.json"))
  assert saved["distributed"]["process_id"] == 0 and saved["distributed"]["num_processes"] == 2
  assert saved["mesh"]["cpu_devices"] == 4  # the resolved count is recorded
  assert "--config.distributed.process_id=0" in json.load(open(workdir / "provenance.json"))["argv"]
  rows = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  keys = [(r["step"], r["kind"]) for r in rows]
  assert len(keys) == len(set(keys)) and (8, "eval") in keys  # one writer, in-loop eval ran
  lines = [l for l in runs[f"{name}_log"].splitlines() if "builds rows" in l]
  got = sorted(l.split("builds rows ")[1].split(" of each")[0] for l in lines)
  assert got == ["[0, 8)", "[8, 16)"], lines  # disjoint, their union is the batch of 16
  # keep-last-N pruning (keep 1) of both directories, coordinated: one step left in each
  assert os.listdir(workdir / "checkpoints") == ["8"] and os.listdir(workdir / "best") == ["8"]
  if name == "text":  # process 0 trained the tokenizer and wrote the shards
    assert (workdir / "tokenizer.json").exists() and (workdir / "data").is_dir()


def test_each_process_builds_only_its_rows(tmp_path):
  for path, over in (("verbs.py", {}), ("verbs.py", {"data.packing": True}),
                     ("text.py", {"data.packing": True})):
    c = load_config(path, "tiny", **{"data.batch_size": 16, **over})
    data = registry.load(c, str(tmp_path / path))
    full = data.train_batch(3)
    parts = [data.train_batch(3, rows=r) for r in ((0, 8), (8, 16))]
    for f in ("inputs", "targets", "loss_mask", "key_mask", "positions", "segment_ids"):
      joined = np.concatenate([getattr(p, f) for p in parts])
      assert np.array_equal(joined, getattr(full, f)), (path, over, f)


def _params(workdir):
  config, _, state, step = wd.restore_state(str(workdir))
  return step, jax.device_get(state.checkpoint_tree())


@pytest.mark.slow
def test_kill_one_process_then_resume_bit_identical(runs):
  workdir = runs["base"] / "verbs_killed"
  # Long enough to be killed mid-run; train.steps may change on resume.
  args = flags("verbs", workdir, **{"train.steps": 400})
  addr = f"127.0.0.1:{multiprocess.free_port()}"
  procs = []
  try:
    for i in range(2):
      log = open(runs["base"] / f"killed_p{i}.log", "w")
      procs.append(subprocess.Popen(
          [sys.executable, "launch.py", *multiprocess.child_args(args, i, 2, addr, True)],
          env=multiprocess.child_env(i, 2, 4, env()), cwd=REPO, stdout=log,
          stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.monotonic() + TIMEOUT
    while not (workdir / "checkpoints" / "4").is_dir():  # committed: renamed into place
      assert time.monotonic() < deadline and procs[0].poll() is None, "no checkpoint"
      time.sleep(0.05)
    os.killpg(procs[1].pid, signal.SIGKILL)
    t = time.monotonic()
    rc = procs[0].wait(timeout=60)
    assert rc != 0 and time.monotonic() - t < 60
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
      p.wait(timeout=30)
  steps = sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
  assert steps and steps[-1] <= 8, steps  # killed before the uninterrupted run's end
  rc, so, se = run(["launch.py", "--processes=2",
                    *flags("verbs", workdir, **{"mesh.cpu_devices": 4})])
  check(rc, so + se, "resumed 2-process run")
  assert "resumed from step" in so + se
  a, b = _params(workdir), _params(runs["base"] / "verbs_2proc")  # 2 processes -> 1
  assert a[0] == b[0] == 8
  for x, y in zip(jax.tree.leaves(a[1]), jax.tree.leaves(b[1])):
    assert np.array_equal(x, y)
  assert results(workdir)["val_loss"] == results(runs["base"] / "verbs_2proc")["val_loss"]


@pytest.mark.slow
def test_one_process_checkpoint_evaluates_on_two(runs):
  workdir = runs["base"] / "verbs_1dev"
  rc, so, se = run(["launch.py", "--processes=2", "--mode=eval", f"--workdir={workdir}"])
  check(rc, so + se, "2-process eval")
  line = [l for l in so.splitlines() if l.startswith("val PPL")]
  assert len(line) == 1, so  # printed by process 0 only
  val_loss = float(line[0].split("val loss ")[1].rstrip(")"))
  assert rel(val_loss, results(workdir)["val_loss"]) < 1e-5


FAKE = r"""
import os, sys, time
if os.environ["LMMASK_PROCESS_ID"] == "1":
  time.sleep(0.5)
  sys.exit(3)
time.sleep(120)  # process 0 would wait forever for its dead peer
"""


# JAX (imported by this pytest process) warns about any fork; the launcher's children
# exec at once.
@pytest.mark.filterwarnings("ignore:os.fork")
def test_launcher_names_the_dead_process_and_stops_the_others(tmp_path):
  script = tmp_path / "child.py"
  script.write_text(FAKE)
  log = []
  t = time.monotonic()
  rc = multiprocess.run(str(script), ["--processes=3", "--mode=train"], 3, train=True,
                        cpu_devices=2, workdir="W", log=log.append)
  assert rc == 3 and time.monotonic() - t < 30
  assert "process 1 of 3" in log[-1] and "exited with code 3" in log[-1], log
  assert "stopped the other 2" in log[-1] and "rerun the same command" in log[-1]
  pids = [int(p) for p in log[0].split("pids ")[1].rstrip(")").split(", ")]
  for pid in pids:  # every child is gone (reaped by the launcher)
    with pytest.raises(ProcessLookupError):
      os.kill(pid, 0)


def test_child_environment_and_arguments():
  e = multiprocess.child_env(1, 2, 4, env={"XLA_FLAGS": "--xla_foo=1"}, gpus=0)
  assert e["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=4"
  assert multiprocess.child_env(1, 2, 4, env={}, gpus=2)["CUDA_VISIBLE_DEVICES"] == "1"
  args = multiprocess.child_args(["--processes=2", "--config=c.py", "--config.distributed."
                                  "process_id=7", "--workdir=W"], 1, 2, "h:1", train=True)
  assert args[:2] == ["--config=c.py", "--workdir=W"]
  assert "--config.distributed.process_id=1" in args and "--config.distributed.mode=manual" in args
