"""benchmarks/gpu.sh on a machine without a GPU: it still prints one JSON object.

The GPU numbers themselves need the GPU machine; here: the failure path (a Python
that cannot even start) and the dry run's plumbing (JAX on CPU, every part skipped
by a zero time budget, nothing GPU-specific imported).
"""
import json
import os
import subprocess
import sys

from conftest import REPO


def _gpu_sh(*args, **env):
  p = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu.sh"), *args], cwd=REPO,
                     env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
  assert p.returncode == 0, p.stderr[-2000:]
  return json.loads(p.stdout.strip().splitlines()[-1])


def test_gpu_script_prints_json_when_python_fails():
  out = _gpu_sh(PYTHON="/bin/false")
  assert out["ok"] is False and "printed no result" in out["error"]


def test_gpu_script_dry_run_on_cpu():
  out = _gpu_sh("--dry-run", "budget_s=0", PYTHON=sys.executable)  # this venv's Python
  assert out["dry_run"] is True and out["backend"] == "cpu"
  assert set(out["parts"]) == {"cudnn_vs_einsum", "bf16", "kernels", "speed_gpt100m",
                               "speed_gpt100m_auto_packed", "speed_smollm135m"}
  assert all("skipped" in p for p in out["parts"].values())
