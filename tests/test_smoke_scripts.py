"""Every experiment and benchmark script runs end to end on its `tiny` path.

Each script is started as a subprocess, the way a person runs it
(`python experiments/X/run.py tiny`), two at a time: the tiny paths are mostly
compilation and Python overhead, so two processes keep two cores busy. A script
passes when it exits 0 and prints the line that shows its report was built. The
committed reports next to the scripts must come out of the run unchanged: a tiny
run writes only under $TMPDIR, which points into pytest's tmp_path here.
"""
import concurrent.futures
import hashlib
import importlib.util
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

# script -> a fragment of its output that only a finished report prints. Longest first:
# the pool starts them in this order, so the slow ones do not start last.
SCRIPTS = {
    "benchmarks/compare.py": '"median_ratio_padded"',
    "experiments/causal_break/run.py": "wrote ",
    "experiments/reductions/run.py": "# Ablation 1 results",
    "experiments/tokens/run.py": "# Word vs character tokens",
    "benchmarks/torch_reference.py": '"impl": "torch-eager"',
    "experiments/length_bias/run.py": "# Ablation 2 results",
    "experiments/sft_loss_mask/run.py": "# SFT with and without the loss mask",
    "experiments/split_policies/run.py": "# Ablation 4 results",
    "experiments/pad_drill/run.py": "# Ablation 3 results",
    "benchmarks/throughput.py": '"real_tokens_per_s"',
    "experiments/text_decoders/run.py": "bigram baseline",
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


def _run(script, tmp_path):
  tmp = tmp_path / script.replace("/", "_")
  tmp.mkdir()
  env = {**os.environ, "PYTHONPATH": REPO, "TMPDIR": str(tmp), "MPLBACKEND": "Agg"}
  t0 = time.perf_counter()
  try:
    p = subprocess.run([sys.executable, script, "tiny"], cwd=REPO, env=env, text=True,
                       capture_output=True, timeout=TIMEOUT_S, check=False)
    rc, out = p.returncode, p.stdout + p.stderr
  except subprocess.TimeoutExpired as e:
    rc, out = "timeout", f"{e.stdout or ''}{e.stderr or ''}"
  return rc, out, time.perf_counter() - t0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Run every script once, two at a time: script -> (exit code, output, seconds)."""
  tmp_path = tmp_path_factory.mktemp("smoke")
  scripts = [s for s in SCRIPTS if HAS_TORCH or s not in NEEDS_TORCH]
  before = _committed_files()
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    futures = {s: pool.submit(_run, s, tmp_path) for s in scripts}
    results = {s: f.result() for s, f in futures.items()}
  changed = sorted(k for k, v in _committed_files().items() if before.get(k) != v)
  for s, (_, _, secs) in results.items():
    print(f"{s} tiny: {secs:.1f} s")
  return results, changed


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_script_tiny_path(runs, script):
  if script in NEEDS_TORCH and not HAS_TORCH:
    pytest.skip('needs PyTorch, part of the test extra: pip install -e ".[test]" (CI does)')
  results, _ = runs
  rc, out, _ = results[script]
  assert rc == 0, f"python {script} tiny exited {rc}:\n{out[-4000:]}"
  assert SCRIPTS[script] in out, f"python {script} tiny printed no report:\n{out[-4000:]}"


def test_tiny_runs_leave_committed_reports_alone(runs):
  _, changed = runs
  assert not changed, f"a tiny run rewrote committed files: {changed}"
