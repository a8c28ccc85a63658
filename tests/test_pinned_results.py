"""results.json of the pinned tiny verbs and text runs, bit for bit as recorded (timing
keys excluded). `python tests/fixtures/pinned/record.py` re-records them; that is
legitimate only for an intended numeric change or a jax/XLA upgrade, said in the commit
(tests/fixtures/README.md). A host whose vector extension changes the last bits of the
float sums has its own recording (`conftest.pinned_results_path`)."""
import json

import pytest
from conftest import pinned_results_path

TIMING = {"steps_per_sec", "train_seconds"}


@pytest.mark.parametrize("name", ["verbs", "text"])
def test_results_are_bit_identical_to_the_recording(pinned_runs, name):
  with open(pinned_results_path(name)) as f:
    want = {k: v for k, v in json.load(f).items() if k not in TIMING}
  _, results = pinned_runs[name]
  got = {k: v for k, v in results.items() if k not in TIMING}
  assert sorted(got) == sorted(want)
  assert {k: v for k, v in got.items() if v != want[k]} == {}


def test_the_pinned_verbs_run_is_the_tiny_config():
  """tiny_run reuses the pinned verbs run: that is only sound while they are one experiment."""
  from conftest import pinned_config, tiny_config

  from lmmask import config as config_lib
  assert config_lib.identity_diff(config_lib.to_dict(pinned_config("verbs")),
                                  config_lib.to_dict(tiny_config())) == []
