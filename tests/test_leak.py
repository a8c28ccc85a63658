"""The causal break is caught: entropy-floor alarm, audit probes, launch.py modes."""
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, tiny_config

from lmmask import step as step_lib
from lmmask import train
from lmmask import workdir as workdir_lib
from lmmask.data import verbs, verbs_source
from lmmask.eval import audit, generate
from lmmask.eval import verbs as eval_verbs

STEPS = 80  # the alarm must fire within this many steps without the causal mask


def leak_config(causal):
  # Tiny model, a higher learning rate and no dropout so the leak is learned quickly.
  return tiny_config(**{"model.causal": causal, "model.dropout": 0.0, "optim.lr": 2e-2,
                        "train.steps": STEPS, "optim.decay_steps": 2 * STEPS,
                        "train.eval_every": 10, "train.ckpt_every": STEPS,
                        "eval.exact_match_at_end": True})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  out = {}
  for causal in (True, False):
    workdir = str(tmp_path_factory.mktemp(f"leak_causal_{causal}"))
    out[causal] = (workdir, train.train_and_evaluate(leak_config(causal), workdir))
  return out


def eval_rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["kind"] == "eval"]


def test_floor_alarm_fires_without_causal_mask(runs, capfd):
  workdir, res = runs[False]
  assert res["floor_alarm"] is True
  assert res["floor_alarm_step"] is not None and res["floor_alarm_step"] <= STEPS
  assert res["train_loss"] < res["entropy_floor"] - 0.01
  rows = eval_rows(workdir)
  assert any(r["floor_alarm"] == 1.0 for r in rows)
  first = min(r["step"] for r in rows if r["floor_alarm"] == 1.0)
  assert first == res["floor_alarm_step"]
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f)["floor_alarm"] is True


def test_floor_alarm_survives_a_resume_with_no_new_steps(runs):
  workdir, res = runs[False]
  again = train.train_and_evaluate(leak_config(False), workdir)
  assert again["floor_alarm"] is True
  assert again["floor_alarm_step"] == res["floor_alarm_step"]


def test_floor_alarm_silent_with_causal_mask(runs):
  workdir, res = runs[True]
  assert res["floor_alarm"] is False and res["floor_alarm_step"] is None
  assert res["train_loss"] >= res["entropy_floor"]
  assert all(r["floor_alarm"] == 0.0 for r in eval_rows(workdir))


def test_results_carry_baseline_and_exact_match(runs):
  for _, res in runs.values():
    for k in ("baseline_val_ppl", "baseline_train_ppl", "val_exact_match",
              "val_exact_match_regular", "val_exact_match_irregular", "val_over_regularised"):
      assert k in res
    assert 0.0 <= res["val_exact_match"] <= 1.0
    assert res["val_over_regularisable"] == 6  # see/eat past: 2 verbs x 3 persons


def test_audit_passes_correct_model_and_fails_broken_one(runs):
  results = {}
  for causal, (workdir, _) in runs.items():
    config, data, state, _ = workdir_lib.restore_state(workdir)
    results[causal] = audit.run_audit(state, config, data)
  good, bad = results[True], results[False]
  assert good["passed"] and all(good["checks"].values())
  assert good["future_max_logit_change"] == 0.0 and good["max_mass_above_diagonal"] == 0.0
  assert not bad["passed"]
  assert bad["future_max_logit_change"] > 1.0
  assert bad["max_mass_above_diagonal"] > 0.1
  assert bad["checks"]["pad_probe"]  # the broken model still masks padding


def _one_batch(corpus, side="left"):
  from lmmask.data import pipeline
  split = pipeline.pad_split(corpus.val, length=14, pad_id=0, pad_side=side)
  return pipeline.eval_batches(split, batch_size=64, pad_id=0)[:1]


def _load(workdir, step=None, which="latest"):
  """(config, corpus, train split, val split, state, step) of a verbs workdir."""
  config, data, state, restored = workdir_lib.restore_state(workdir, which, step)
  corpus, train_split, val_split = verbs_source.splits(config)
  return config, corpus, train_split, val_split, state, restored


def clear_probe_caches():
  # the twins monkeypatch helpers that the jitted probes trace; drop their compiled code
  audit._future_change.clear_cache()
  audit._pad_change.clear_cache()


def test_planted_probe_and_pad_leak_twins(runs, monkeypatch):
  _, corpus, _, _, good, _ = _load(runs[True][0])
  _, _, _, _, bad, _ = _load(runs[False][0])
  batches = _one_batch(corpus)
  kw = dict(vocab_size=len(corpus.vocab), pad_id=0)
  assert audit.future_probe(good, batches, **kw) == 0.0
  assert audit.future_probe(bad, batches, **kw) > 1.0
  # Twin 1a: a future probe that also perturbs the cut position flags a correct model.
  with monkeypatch.context() as m:
    m.setattr(audit, "future_region", lambda length, t: jnp.arange(length) >= t)
    clear_probe_caches()
    assert audit.future_probe(good, batches, **kw) > 1e-3
  # Twin 1b: a future probe that perturbs nothing misses the broken model's leak.
  with monkeypatch.context() as m:
    m.setattr(audit, "future_region", lambda length, t: jnp.arange(length) > t + length)
    clear_probe_caches()
    assert audit.future_probe(bad, batches, **kw) == 0.0
  clear_probe_caches()
  # Twin 2: the same model run without its key-padding mask is caught by the pad probe.
  real_forward = audit._forward

  def no_pad_mask(spec, params, b, **kw):
    return real_forward(spec, params, b.replace(
        key_mask=jnp.ones_like(b.key_mask), segment_ids=jnp.ones_like(b.segment_ids)), **kw)

  assert audit.pad_probe(good, batches, **kw) == 0.0
  with monkeypatch.context() as m:
    m.setattr(audit, "_forward", no_pad_mask)
    clear_probe_caches()
    assert audit.pad_probe(good, batches, **kw) > 1e-3
  clear_probe_caches()


def test_length_buckets_add_up_to_the_val_loss(runs):
  _, corpus, _, val_split, state, _ = _load(runs[True][0])
  from lmmask.data import pipeline
  whole = step_lib.evaluate(state, pipeline.eval_batches(val_split, batch_size=64, pad_id=0))
  buckets = eval_verbs.length_buckets(state, val_split, pad_id=0, batch_size=64)
  assert sum(b["num_seqs"] for b in buckets.values()) == len(val_split)
  tokens = sum(b["num_tokens"] for b in buckets.values())
  assert tokens == whole["num_tokens"]
  mean = sum(b["loss"] * b["num_tokens"] for b in buckets.values()) / tokens
  assert mean == pytest.approx(whole["loss"], abs=1e-5)


def test_inference_mode_loss_equals_teacher_forcing_only_when_causal(runs):
  from lmmask.data import pipeline
  for causal, (workdir, _) in runs.items():
    config, corpus, _, val_split, state, _ = _load(workdir)
    batches = pipeline.eval_batches(val_split, batch_size=64, pad_id=0)
    tf = step_lib.evaluate(state, batches)
    inf = eval_verbs.prefix_recompute_eval(state, batches)
    assert inf["num_tokens"] == tf["num_tokens"]
    if causal:
      assert abs(inf["loss"] - tf["loss"]) < 1e-5
    else:
      assert inf["loss"] > tf["loss"] + 0.5


def test_exact_match_scoring_against_hand_counts(monkeypatch):
  """Feed chosen completions through the scorer; compare with counts done by hand."""
  from lmmask import decode
  corpus = verbs.build_corpus("verbs")
  v = corpus.vocab
  forms = [e for e in corpus.val if e.kind == "form"]
  answers = []
  for i, e in enumerate(forms):
    ref = e.text.split(" / ")[1]
    over = verbs.regular_english(e.verb, e.tense, e.person)
    if i % 3 == 0:
      answers.append(ref)            # correct
    elif over != ref:
      answers.append(over)           # over-regularised
    else:
      answers.append("I will")       # wrong
  want_ok = sum(a == e.text.split(" / ")[1] for a, e in zip(answers, forms))
  want_reg = sum(a == e.text.split(" / ")[1] for a, e in zip(answers, forms) if e.regular)
  want_over = sum(a == verbs.regular_english(e.verb, e.tense, e.person)
                  and a != e.text.split(" / ")[1] for a, e in zip(answers, forms))

  def fake_generate(state, prompts, *, max_new_tokens, eos_id, pad_id, **kw):
    toks = np.full((len(prompts), max_new_tokens), pad_id, np.int32)
    for r, a in enumerate(answers):
      ids = v.encode(a, add_bos=False, add_eos=True)
      toks[r, :len(ids)] = ids
    return decode.Generation(tokens=toks, lengths=None, prompt_ids=None, logits=None)

  monkeypatch.setattr(decode, "generate", fake_generate)
  res = eval_verbs.exact_match(None, corpus, direction="es_en", max_new_tokens=8, num_examples=5)
  assert res["exact_match"] == pytest.approx(want_ok / len(forms))
  assert res["exact_match_regular"] == pytest.approx(want_reg / res["num_regular"])
  assert res["over_regularised"] == want_over > 0
  assert res["num_regular"] + res["num_irregular"] == len(forms) == 60
  assert len(res["examples"]) == 5 and not res["examples"][0]["correct"]
  rows = res["rows"]
  assert rows[0]["prompt"] == forms[0].text.split(" / ")[0] + " /"


@pytest.mark.slow
def test_launch_audit_exits_nonzero_on_a_leak(runs):
  env = dict(os.environ, PYTHONPATH=REPO)
  workdir = runs[False][0]
  p = subprocess.run([sys.executable, os.path.join(REPO, "launch.py"), "--mode=audit",
                      f"--workdir={workdir}"], capture_output=True, text=True, env=env,
                     timeout=300)
  assert p.returncode == 1, p.stdout + p.stderr
  assert "FAILED" in p.stdout and "future-perturbation" in p.stdout
  assert os.path.exists(os.path.join(workdir, "audit", "attention_0.png"))


def test_audit_workdir_passes_the_correct_checkpoint(runs):
  # the function launch.py --mode=audit calls (exit status 0 when res["passed"])
  workdir = runs[True][0]
  res = audit.audit_workdir(workdir)
  assert res["passed"] and res["source"].startswith("checkpoint step")
  with open(os.path.join(workdir, "audit", "audit.json")) as f:
    assert json.load(f)["passed"] is True
  assert "PASSED" in audit.format_audit(res)


def test_generate_text_from_checkpoint(runs):
  out = generate.generate_text(runs[True][0], ["yo como /", "<bos> él ve /"])
  assert [p for p, _ in out] == ["yo como /", "<bos> él ve /"]
  assert all(isinstance(c, str) and c for _, c in out)
  sampled = generate.generate_text(runs[True][0], ["yo como /"], temperature=1.0, top_k=5,
                                     seed=3)
  assert sampled == generate.generate_text(runs[True][0], ["yo como /"], temperature=1.0,
                                             top_k=5, seed=3)
  with pytest.raises(ValueError, match="not in the verbs vocabulary"):
    generate.generate_text(runs[True][0], ["yo xyzzy /"])


def test_exact_match_reverse_direction_runs(runs):
  _, corpus, _, _, state, _ = _load(runs[True][0])
  res = eval_verbs.exact_match(state, corpus, direction="en_es", max_new_tokens=8, num_examples=3)
  assert res["num_prompts"] == 60 and res["over_regularised"] is None
  assert res["rows"][0]["prompt"].endswith("/") and res["rows"][0]["prompt"].startswith("I ")
  assert res["rows"][0]["reference"].startswith("yo ")
  with pytest.raises(ValueError, match="direction"):
    eval_verbs.exact_match(state, corpus, direction="fr_en", max_new_tokens=8, num_examples=0)
