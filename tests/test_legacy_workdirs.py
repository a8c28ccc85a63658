"""Workdirs written before the redesign (tests/fixtures/legacy) resume and evaluate."""
import json
import os

from conftest import copy_legacy, pinned_config  # noqa: F401

from lmmask import train
from lmmask import workdir as workdir_lib
from lmmask.eval import evaluate as evaluation


def _saved_results(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


def test_legacy_workdirs_evaluate_to_their_recorded_val_loss(legacy):
  for name in ("verbs", "text", "chat_sft"):
    workdir = os.path.join(legacy, name)
    got = evaluation.evaluate_checkpoint(workdir)
    want = _saved_results(workdir)
    assert got["step"] == want["step"], name
    assert got["val_loss"] == want["val_loss"], name


def test_legacy_workdirs_resume(tmp_path):
  root = copy_legacy(tmp_path / "legacy")
  for name, more in (("verbs", 4), ("text", 2), ("chat_sft", 2)):
    workdir = os.path.join(root, name)
    config = workdir_lib.load_config(workdir)
    config.train.steps += more
    config.train.progress_bar = False
    results = train.train_and_evaluate(config, workdir)
    assert results["step"] == config.train.steps, name
