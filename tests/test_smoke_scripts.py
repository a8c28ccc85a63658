"""Every experiment and benchmark script runs end to end on its `tiny` path.

The scripts run as `python SCRIPT tiny` would run them, but inside two worker processes
(tests/smoke_worker.py) that take the next script as soon as they are free, longest
first: a tiny path is mostly importing JAX (and PyTorch) and compiling the same tiny
programs, which a worker does once for all its scripts, and two workers keep two cores
busy. A script passes when it exits 0 and prints the line that shows its report was
built. The committed reports next to the scripts must come out of the run unchanged: a
tiny run writes only under $TMPDIR, which points into pytest's tmp_path here.
"""
import hashlib
import importlib.util
import json
import os
import queue
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

# script -> a fragment of its output that only a finished report prints. Longest first:
# the workers take them in this order, so the slow ones do not start last.
SCRIPTS = {
    "experiments/tokens/run.py": "# Word vs character tokens",
    "experiments/causal_break/run.py": "wrote ",
    "experiments/reductions/run.py": "# Ablation 1 results",
    "experiments/text_decoders/run.py": "bigram baseline",
    "experiments/sft_loss_mask/run.py": "# SFT with and without the loss mask",
    "benchmarks/compare.py": '"median_ratio_padded"',
    "experiments/pad_drill/run.py": "# Ablation 3 results",
    "experiments/length_bias/run.py": "# Ablation 2 results",
    "experiments/split_policies/run.py": "# Ablation 4 results",
    "benchmarks/throughput.py": '"real_tokens_per_s"',
    "benchmarks/torch_reference.py": '"impl": "torch-eager"',
}
NEEDS_TORCH = {"benchmarks/torch_reference.py", "benchmarks/compare.py"}  # the bench extra
HAS_TORCH = importlib.util.find_spec("torch") is not None
TIMEOUT_S = 600  # per script; a tiny path takes seconds, so this only stops a hang


def _committed_files():
  """sha256 of every generated file next to the scripts (reports, figures, CSVs).

  Sources and the hand-written README.md files are left out: no script writes them,
  and someone may be editing them while the test runs.
  """
  out = {}
  for top in ("experiments", "benchmarks"):
    for root, dirs, files in os.walk(os.path.join(REPO, top)):
      dirs[:] = [d for d in dirs if d != "__pycache__"]
      for name in files:
        if name.endswith(".py") or name == "README.md":
          continue
        path = os.path.join(root, name)
        with open(path, "rb") as f:
          out[os.path.relpath(path, REPO)] = hashlib.sha256(f.read()).hexdigest()
  return out


def _pump(stream, lines):
  """Every line of a worker's output into `lines`, then "" for its end."""
  for line in stream:
    lines.put(line)
  lines.put("")


def _worker(root, todo, results):
  """One worker process: feed it scripts from `todo` until none is left; a script that
  runs past TIMEOUT_S is recorded as "timeout" and the next one gets a fresh worker."""
  env = {**os.environ, "PYTHONPATH": REPO, "MPLBACKEND": "Agg"}
  proc = None
  try:
    while True:
      try:
        script = todo.get_nowait()
      except queue.Empty:
        return
      if proc is None:
        proc = subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "smoke_worker.py"),
                                 str(root)], cwd=REPO, env=env, text=True, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        lines = queue.Queue()
        threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
      proc.stdin.write(script + "\n")
      proc.stdin.flush()
      t0, text = time.perf_counter(), []
      while True:
        try:
          line = lines.get(timeout=max(0.0, TIMEOUT_S - (time.perf_counter() - t0)))
        except queue.Empty:
          line = None
        if line is None or line == "":  # a hang, or the worker died
          proc.kill()
          proc.wait()
          proc = None
          why = "timeout" if line is None else "worker died"
          results[script] = (why, "".join(text)[-8000:], time.perf_counter() - t0, None)
          break
        if line.startswith("RESULT "):
          name, rc, out, secs, cpu = json.loads(line[len("RESULT "):])
          results[name] = (rc, out, secs, cpu)
          break
        text.append(line)  # output that bypassed the worker's capture (C libraries)
  finally:
    if proc is not None:
      proc.stdin.close()
      proc.wait(timeout=60)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Run every script once in two workers: script -> (exit code, output, seconds, CPU s)."""
  root = tmp_path_factory.mktemp("smoke")
  todo = queue.Queue()
  for s in SCRIPTS:
    if HAS_TORCH or s not in NEEDS_TORCH:
      todo.put(s)
  before = _committed_files()
  results = {}
  workers = [threading.Thread(target=_worker, args=(root, todo, results)) for _ in range(2)]
  for w in workers:
    w.start()
  for w in workers:
    w.join()
  changed = sorted(k for k, v in _committed_files().items() if before.get(k) != v)
  for s, (_, _, secs, cpu) in results.items():
    print(f"{s} tiny: {secs:.1f} s, {cpu or 0:.1f} CPU s")
  return results, changed


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_script_tiny_path(runs, script):
  if script in NEEDS_TORCH and not HAS_TORCH:
    pytest.skip('needs PyTorch, part of the test extra: pip install -e ".[test]" (CI does)')
  results, _ = runs
  rc, out, _, _ = results[script]
  assert rc == 0, f"python {script} tiny exited {rc}:\n{out[-4000:]}"
  assert SCRIPTS[script] in out, f"python {script} tiny printed no report:\n{out[-4000:]}"


def test_tiny_runs_leave_committed_reports_alone(runs):
  _, changed = runs
  assert not changed, f"a tiny run rewrote committed files: {changed}"
