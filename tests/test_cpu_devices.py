"""config.mesh.cpu_devices (launch.py): N XLA:CPU devices, so mesh.data=-1 is data parallel.

A subprocess: the device count is fixed once JAX starts, and the pytest process has 1.
"""
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

SCRIPT = r"""
import importlib.util, json, sys
import launch
from absl import app
spec = importlib.util.spec_from_file_location("verbs_config", "configs/verbs.py")
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
bad = {}
for v in (0, -1):
  c = mod.get_config("tiny"); c.mesh.cpu_devices = v
  try:
    launch._set_cpu_devices(c); bad[repr(v)] = "accepted"
  except app.UsageError as e:
    bad[repr(v)] = str(e)
c = mod.get_config("tiny"); c.mesh.cpu_devices = int(sys.argv[1])
launch._set_cpu_devices(c)
from lmmask import parallel
mesh = parallel.mesh_from_config(c)
import jax
print("RESULT " + json.dumps({"devices": jax.device_count(), "mesh": dict(mesh.shape),
                              "bad": bad}))
"""


def _run(n):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("XLA_FLAGS", None)
  p = subprocess.run([sys.executable, "-c", SCRIPT, str(n)], env=env, cwd=REPO,
                     capture_output=True, text=True, timeout=300)
  lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
  assert p.returncode == 0 and lines, p.stderr[-3000:]
  return json.loads(lines[-1][len("RESULT "):])


def test_cpu_devices_gives_a_data_parallel_mesh():
  two, one = _run(2), _run(1)
  assert two["devices"] == 2 and two["mesh"] == {"data": 2, "fsdp": 1}
  assert one["devices"] == 1 and one["mesh"] == {"data": 1, "fsdp": 1}  # the default is off
  for v in ("0", "-1"):
    assert "mesh.cpu_devices must be a positive int" in two["bad"][v], two["bad"]
