"""Every launch mode on every corpus, as a user runs it: eval, generate and audit on a
verbs, a text and a chat (shards) workdir, each a subprocess of launch.py.

The verbs and text workdirs are the pinned tiny runs; the chat one is the SFT
workdir committed in tests/fixtures/legacy (written before the redesign), so the
chat column also shows that old workdirs still evaluate, generate and audit.
"""
import concurrent.futures
import json
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO

PROMPTS = {"verbs": "yo como /", "text": "This License", "chat": "Conjugate comer."}


def _workdirs(pinned_runs, legacy):
  return {"verbs": pinned_runs["verbs"][0], "text": pinned_runs["text"][0],
          "chat": os.path.join(legacy, "chat_sft")}


def _command(mode, corpus, workdir):
  cmd = [sys.executable, os.path.join(REPO, "launch.py"), f"--mode={mode}", f"--workdir={workdir}"]
  if mode == "generate":
    cmd += [f"--prompt={PROMPTS[corpus]}", "--max_new_tokens=6"] + (
        ["--chat"] if corpus == "chat" else [])
  return cmd


@pytest.fixture(scope="module")
def runs(pinned_runs, legacy):
  """All nine (mode, corpus) subprocesses, three at a time: {(mode, corpus): result}."""
  dirs = _workdirs(pinned_runs, legacy)
  jobs = {(m, c): _command(m, c, dirs[c]) for m in ("eval", "generate", "audit") for c in dirs}
  env = dict(os.environ, PYTHONPATH=REPO)
  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    futures = {k: pool.submit(subprocess.run, cmd, capture_output=True, text=True, env=env,
                              timeout=240) for k, cmd in jobs.items()}
    return {k: f.result() for k, f in futures.items()}


def _results(pinned_runs, legacy, corpus):
  path = os.path.join(_workdirs(pinned_runs, legacy)[corpus], "results.json")
  with open(path) as f:
    return json.load(f)


@pytest.mark.slow
@pytest.mark.parametrize("corpus", ["verbs", "text", "chat"])
def test_eval(runs, pinned_runs, legacy, corpus):
  r = runs[("eval", corpus)]
  assert r.returncode == 0, r.stderr[-3000:]
  want = _results(pinned_runs, legacy, corpus)
  # The latest checkpoint's val PPL, to 4 decimals, is the one results.json reported.
  assert f"val PPL {want['val_ppl']:.4f}" in r.stdout
  extra = {"verbs": "exact match", "text": "val by document length",
           "chat": "assistant replies"}[corpus]
  assert extra in r.stdout
  assert "entropy floor" in r.stdout


@pytest.mark.slow
@pytest.mark.parametrize("corpus", ["verbs", "text", "chat"])
def test_generate(runs, corpus):
  r = runs[("generate", corpus)]
  assert r.returncode == 0, r.stderr[-3000:]
  line = [ln for ln in r.stdout.splitlines() if ln.startswith(PROMPTS[corpus] + " -> ")]
  assert len(line) == 1, r.stdout


@pytest.mark.slow
@pytest.mark.parametrize("corpus", ["verbs", "text", "chat"])
def test_audit(runs, corpus):
  r = runs[("audit", corpus)]
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
  assert "PASSED: no leak found" in r.stdout
  assert re.search(r"future-perturbation max \|dlogit\|\s+\S+\s+ok", r.stdout)
