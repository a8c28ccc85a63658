"""config.mesh.cpu_devices (launch.py): N XLA:CPU devices, so mesh.data=-1 is data parallel;
0 (the default) = auto.

A subprocess: the device count is fixed once JAX starts, and the pytest process has 1.
"""
import concurrent.futures
import json
import os
import subprocess
import sys

from conftest import tiny_config

from lmmask import parallel

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

SCRIPT = r"""
import importlib.util, json, sys
import launch
from absl import app
spec = importlib.util.spec_from_file_location("verbs_config", "configs/verbs.py")
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
bad = {}
for v in (-1, -2):
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
  # three interpreters at once: each is mostly a single-threaded JAX import
  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    two, one, auto = pool.map(_run, (2, 1, 0))
  assert two["devices"] == 2 and two["mesh"] == {"data": 2, "fsdp": 1}
  assert one["devices"] == 1 and one["mesh"] == {"data": 1, "fsdp": 1}
  want, _ = parallel.resolve_cpu_devices(tiny_config(), env={})
  assert auto["devices"] == want  # every core here (the tiny batches divide over 2, 4, 8)
  for v in ("-1", "-2"):
    assert "mesh.cpu_devices must be an int >= 0" in two["bad"][v], two["bad"]


def test_auto_cpu_devices_rules(monkeypatch):
  monkeypatch.setattr(parallel, "_cores", lambda: 4)
  c = tiny_config()  # batch 16, eval batch 64
  flags = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  assert parallel.resolve_cpu_devices(c, env=flags)[0] == 8       # XLA_FLAGS wins
  assert parallel.resolve_cpu_devices(c, recorded=3, env={})[0] == 3  # a resume keeps its count
  assert parallel.resolve_cpu_devices(c, env={}) == (4, "all 4 cores")
  c.distributed.mode = "manual"
  assert parallel.resolve_cpu_devices(c, env={})[0] == 1
  c = tiny_config(**{"data.batch_size": 6})
  n, why = parallel.resolve_cpu_devices(c, env={})
  assert n == 1 and "do not divide" in why
  c = tiny_config(**{"mesh.cpu_devices": 2})
  assert parallel.resolve_cpu_devices(c, env=flags)[0] == 2       # explicit: as given
