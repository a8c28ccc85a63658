"""Shared fixtures: one tiny config, one persistent compilation cache."""
import os

# A persistent XLA cache shared by every test process (and subprocess), so the
# suite compiles each distinct program once per machine, not once per test.
_CACHE = os.environ.setdefault(
    "LMMASK_TEST_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "lmmask", "jax-tests"))

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name="verbs.py", arg="tiny", **overrides):
  """configs/<name>:<arg> for tests (no progress bar, the test cache), with dotted-key
  overrides such as ``**{"optim.lr": 1e-3}``."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      "config_" + name.replace(".", "_"), os.path.join(REPO, "configs", name))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config(arg)
  c.train.progress_bar = False
  c.train.jax_cache_dir = _CACHE
  for key, value in overrides.items():
    node = c
    parts = key.split(".")
    for p in parts[:-1]:
      node = node[p]
    node[parts[-1]] = value
  return c


def tiny_config(**overrides):
  """The tiny verbs config (configs/verbs.py:tiny), with dotted-key overrides."""
  return load_config("verbs.py", "tiny", **overrides)


@pytest.fixture
def tiny():
  """A fresh tiny config (mutable copy) for each test."""
  return tiny_config()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  """One tiny training run shared by every test that only needs a trained workdir."""
  from lmmask import train
  workdir = str(tmp_path_factory.mktemp("tiny_run"))
  results = train.train_and_evaluate(tiny_config(), workdir)
  return workdir, results
