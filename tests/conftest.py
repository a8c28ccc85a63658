"""Shared fixtures: one tiny config, one persistent compilation cache."""
import json
import os
import shutil
import subprocess
import sys

# A persistent XLA cache shared by every test process (and subprocess), so the
# suite compiles each distinct program once per machine, not once per test.
_CACHE = os.environ.setdefault(
    "LMMASK_TEST_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "lmmask", "jax-tests"))

import jax  # noqa: E402
import pytest  # noqa: E402

from lmmask import config as config_lib  # noqa: E402
from lmmask import train  # noqa: E402

jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name="verbs.py", arg="tiny", **overrides):
  """configs/<name>:<arg> for tests (no progress bar, the test cache), with dotted-key
  overrides such as ``**{"optim.lr": 1e-3}``."""
  c = config_lib.load_file(os.path.join(REPO, "configs", name) + (f":{arg}" if arg else ""))
  c.train.progress_bar = False
  c.train.jax_cache_dir = _CACHE
  return config_lib.apply_overrides(c, overrides)


def tiny_config(**overrides):
  """The tiny verbs config (configs/verbs.py:tiny), with dotted-key overrides."""
  return load_config("verbs.py", "tiny", **overrides)


@pytest.fixture
def tiny():
  """A fresh tiny config (mutable copy) for each test."""
  return tiny_config()


@pytest.fixture(scope="session")
def tiny_run(pinned_runs):
  """One tiny training run shared by every test that only needs a trained workdir (read
  only): the pinned verbs run, whose config is the tiny config's (a test checks it)."""
  return pinned_runs["verbs"]


PINNED = os.path.join(REPO, "tests", "fixtures", "pinned")


def cpu_isa() -> str:
  """The widest x86 vector extension of this host ("avx512", "avx2" or "other").
  XLA:CPU compiles for the host it runs on; the vector width sets the order in which
  long float sums are added, so the last bits of a loss summed over many tokens can
  differ between machines with the same jax."""
  try:
    with open("/proc/cpuinfo") as f:
      flags = next((line.split() for line in f if line.startswith("flags")), [])
  except OSError:
    return "other"
  return "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "other"


def pinned_results_path(name: str) -> str:
  """This host's recording of a pinned run: `<name>_results.<isa>.json` where one was
  recorded for this host's vector extension, else `<name>_results.json`."""
  own = os.path.join(PINNED, f"{name}_results.{cpu_isa()}.json")
  return own if os.path.exists(own) else os.path.join(PINNED, f"{name}_results.json")
LEGACY = os.path.join(REPO, "tests", "fixtures", "legacy")
LEGACY_PREFIX = "/tmp/fx/legacy"  # where tests/fixtures/legacy/MAKE.sh wrote the fixtures


def pinned_config(name):
  """The exact config.json of a run recorded before the redesign (every width, step
  count and device count explicit, so later default changes cannot move it)."""
  with open(os.path.join(PINNED, f"{name}_config.json")) as f:
    c = config_lib.upgrade(json.load(f))
  c.train.progress_bar = False
  c.train.jax_cache_dir = _CACHE
  return c


@pytest.fixture(scope="session")
def pinned_runs(tmp_path_factory):
  """The pinned tiny verbs and text runs, trained once: {name: (workdir, results)}."""
  out = {}
  for name in ("verbs", "text"):
    workdir = str(tmp_path_factory.mktemp(f"pinned_{name}"))
    out[name] = (workdir, train.train_and_evaluate(pinned_config(name), workdir))
  return out


def copy_legacy(dest):
  """tests/fixtures/legacy copied to `dest`, its absolute paths pointed there."""
  shutil.copytree(LEGACY, dest)
  for dirpath, _, names in os.walk(dest):
    for n in names:
      if n.endswith(".json"):
        path = os.path.join(dirpath, n)
        with open(path) as f:
          text = f.read()
        if LEGACY_PREFIX in text:
          with open(path, "w") as f:
            f.write(text.replace(LEGACY_PREFIX, str(dest)))
  return str(dest)


@pytest.fixture(scope="session")
def legacy(tmp_path_factory):
  """A session copy of the legacy workdirs (tests that write into them copy again)."""
  return copy_legacy(tmp_path_factory.mktemp("legacy_session") / "legacy")


class EightDevices:
  """tests/mesh_worker.py running in its own process with 8 XLA:CPU devices."""

  def __init__(self, base):
    self.base = str(base)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    self.log = open(os.path.join(self.base, "worker.log"), "w+")
    self.proc = subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "mesh_worker.py"),
                                  self.base], env=env, cwd=REPO, stdout=self.log,
                                 stderr=subprocess.STDOUT, text=True)
    self._result = None

  def result(self, timeout=600):
    """The worker's JSON result (waits for it; fails the test with its output if it failed)."""
    if self._result is None:
      try:
        rc = self.proc.wait(timeout=timeout)
      finally:
        self.stop()
      self.log.seek(0)
      text = self.log.read()
      lines = [l for l in text.splitlines() if l.startswith("RESULT ")]
      if rc != 0 or not lines:
        pytest.fail(f"8-device worker exited {rc}:\n{text[-8000:]}", pytrace=False)
      self._result = json.loads(lines[-1][len("RESULT "):])
    return self._result

  def stop(self):
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait(timeout=60)


@pytest.fixture(scope="session")
def eight_devices(tmp_path_factory):
  """The one process with 8 fake CPU devices, started at first use and shared: it trains
  test_multiprocess's 8-device runs and measures test_mesh's sharding checks, so the suite
  starts JAX on 8 devices once (the device count is fixed when JAX starts)."""
  worker = EightDevices(tmp_path_factory.mktemp("eight_devices"))
  yield worker
  worker.stop()
