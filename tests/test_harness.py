"""lmmask's lm-evaluation-harness model (lmmask/eval/harness.py) against lm-eval's own
`hf` backend with transformers, on a tiny random Llama built from a config and the
local tasks in tasks/ (offline)."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO

os.environ["HF_DATASETS_OFFLINE"] = "1"  # before `datasets` is imported: no network
os.environ["HF_HUB_OFFLINE"] = "1"

from lmmask import batching  # noqa: E402
from lmmask import checkpoint as ckpt  # noqa: E402
from lmmask import step as step_lib  # noqa: E402
from lmmask import workdir as workdir_lib  # noqa: E402
from lmmask.eval import harness  # noqa: E402
from lmmask.interop import convert as interop  # noqa: E402

lm_eval = pytest.importorskip("lm_eval")  # the eval extra (the test extra includes it)
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
torch.set_num_threads(2)

TASKS = os.path.join(REPO, "tasks")
MC, PPL, GEN = (os.path.join(TASKS, f"{t}.yaml") for t in ("mc", "ppl", "gen"))
MAX_LEN = 40  # short enough that three-shot contexts are truncated from the left


def _tokenizer(out):
  """A byte-level BPE with <s> prepended by its post-processor (as Llama's)."""
  import tokenizers as tk
  texts = []
  for name in ("mc", "ppl", "gen"):
    with open(os.path.join(TASKS, "data", f"{name}.jsonl")) as f:
      texts += [json.dumps(json.loads(line)) for line in f]
  tok = tk.Tokenizer(tk.models.BPE())
  tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tk.decoders.ByteLevel()
  tok.train_from_iterator(texts * 2, tk.trainers.BpeTrainer(
      vocab_size=320, special_tokens=["<s>", "</s>", "<pad>"], show_progress=False,
      initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet()))
  tok.post_processor = tk.processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                        special_tokens=[("<s>", 0)])
  tok.save(os.path.join(out, "tokenizer.json"))
  with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
               "eos_token": "</s>", "pad_token": "<pad>",
               "model_max_length": MAX_LEN}, f)
  return tok.get_vocab_size()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  """(HF directory, imported lmmask workdir) of a tiny random Llama."""
  d = str(tmp_path_factory.mktemp("llama_hf"))
  vocab = _tokenizer(d)
  cfg = transformers.LlamaConfig(
      vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_LEN,
      bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=False)
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(cfg)
  g = torch.Generator().manual_seed(0)
  with torch.no_grad():  # weights large enough for confident, non-trivial predictions
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      p.copy_(1 + 0.3 * noise if "norm" in name else 0.2 * noise)
  model.eval().save_pretrained(d)
  workdir = str(tmp_path_factory.mktemp("llama_lmmask") / "w")
  interop.import_checkpoint(d, workdir)
  return d, workdir


def _evaluate(model, tasks, **kw):
  return harness.evaluate(model, tasks, log_samples=True, **kw)


class Runs:
  pass


@pytest.fixture(scope="module")
def runs(llama):
  """Both backends on the local tasks: multiple choice and generation three-shot (the
  contexts exceed the model's length: left truncation), rolling perplexity."""
  from lm_eval.models.huggingface import HFLM
  hf_dir, workdir = llama
  r = Runs()
  r.ours = harness.LmmaskLM(workdir)
  r.ref = HFLM(pretrained=hf_dir, device="cpu", dtype="float32", batch_size=8)
  for name, lm in (("ours", r.ours), ("ref", r.ref)):
    few = _evaluate(lm, [MC, GEN], num_fewshot=3)
    ppl = _evaluate(lm, [PPL])
    setattr(r, name, lm)
    setattr(r, name + "_results", {"results": {**few["results"], **ppl["results"]},
                                   "samples": {**few["samples"], **ppl["samples"]}})
  return r


def _by_doc(samples):
  return sorted(samples, key=lambda s: s["doc_id"])


def test_parity_with_the_hf_backend(runs):
  ours, ref = runs.ours_results, runs.ref_results
  for task in ("lmmask_mc", "lmmask_ppl", "lmmask_gen"):
    a, b = _by_doc(ours["samples"][task]), _by_doc(ref["samples"][task])
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
      assert x["arguments"] == y["arguments"]
      for ra, rb in zip(x["resps"], y["resps"]):
        ra, rb = ra[0], rb[0]
        if task == "lmmask_gen":
          assert ra == rb  # identical greedy generations
        elif task == "lmmask_ppl":
          assert abs(ra - rb) < 1e-3
        else:
          assert abs(ra[0] - rb[0]) < 1e-3 and ra[1] == rb[1]
  for task, metric in (("lmmask_mc", "acc,none"), ("lmmask_mc", "acc_norm,none"),
                       ("lmmask_gen", "exact_match,strip")):
    assert ours["results"][task][metric] == ref["results"][task][metric]
  # The three-shot contexts really were longer than the model (left truncation).
  longest = max(len(runs.ours.tok_encode(s["arguments"][0][0] + s["arguments"][0][1]))
                for s in ours["samples"]["lmmask_mc"])
  assert longest > MAX_LEN + 1


def test_is_greedy_matches_on_greedy_continuations(runs):
  """Continuations the model itself chose greedily: is_greedy True in both backends;
  with the last token changed, False in both."""
  from lmmask import decode
  lm = runs.ours
  prompts = [lm.tok_encode(f"Question: What is {a} plus {a}?\nAnswer:") for a in range(4)]
  gen = decode.generate(lm.state, prompts, max_new_tokens=6, eos_id=None, pad_id=lm.data.pad_id)
  reqs = []
  for p, g in zip(prompts, gen.tokens):
    cont = [int(t) for t in g]
    reqs.append((None, p, cont))
    reqs.append((None, p, cont[:-1] + [(cont[-1] + 1) % lm.cfg.vocab_size]))
  ours = lm._loglikelihood_tokens(reqs)
  ref = runs.ref._loglikelihood_tokens(reqs)
  assert [g for _, g in ours] == [g for _, g in ref] == [True, False] * len(prompts)
  assert np.allclose([x for x, _ in ours], [x for x, _ in ref], atol=1e-3)


def _token_requests(lm):
  """Multiple-choice pairs (a context shared by four choices) and rolling windows."""
  reqs = []
  with open(os.path.join(TASKS, "data", "mc.jsonl")) as f:
    for line in f:
      d = json.loads(line)
      ctx = lm.tok_encode(f"Question: {d['question']}\nAnswer:")
      reqs += [(ctx, lm.tok_encode(" " + c, add_special_tokens=False)) for c in d["choices"]]
  with open(os.path.join(TASKS, "data", "ppl.jsonl")) as f:
    text = " ".join(json.loads(line)["text"] for line in f)
  reqs += harness.rolling_windows(lm.tok_encode(text), lm.prefix_token_id, lm.max_length)
  return reqs


def test_packed_equals_unpacked_and_segments_matter(runs):
  lm = runs.ours
  reqs = _token_requests(lm)
  opts = harness.options_from(lm.config, {"row_tokens": MAX_LEN})
  packed = harness.Scorer(lm.state, lm.data, lm.max_length, opts)
  single = harness.Scorer(lm.state, lm.data, lm.max_length,
                          harness.options_from(lm.config, {"packing": False}))
  rows = list(packed._rows([len(s) for s, _ in packed.sequences(reqs)]))
  assert sum(len(r) for _, chunk in rows for r in chunk) > sum(len(c) for _, c in rows)
  a, b = packed.loglikelihoods(reqs), single.loglikelihoods(reqs)
  assert np.allclose([x for x, _ in a], [x for x, _ in b], atol=1e-4, rtol=0)
  assert [g for _, g in a] == [g for _, g in b]
  # Planted bug: packed rows without their segment ids (attention across requests).
  leaky = harness.Scorer(lm.state, lm.data, lm.max_length, opts)
  leaky.state = leaky.state.replace(options=dataclasses.replace(leaky.state.options,
                                                                keys_are_prefix=True))
  c = leaky.loglikelihoods(reqs)
  assert np.max(np.abs(np.array([x for x, _ in c]) - [x for x, _ in b])) > 1e-2


def test_rolling_equals_a_direct_sum_over_windows(runs):
  from lm_eval.api.instance import Instance
  lm = runs.ours
  with open(os.path.join(TASKS, "data", "ppl.jsonl")) as f:
    text = " ".join(json.loads(line)["text"] for line in f)
  tokens = lm.tok_encode(text)
  windows = harness.rolling_windows(tokens, lm.prefix_token_id, lm.max_length)
  assert len(windows) >= 3 and windows[0][0] == [lm.data.tokenizer.bos_id]
  assert lm.prefix_token_id == 0 != lm.eot_token_id  # BOS, not lm-eval's EOS default
  direct = 0.0
  forward = jax.jit(step_lib.forward)
  for ctx, pred in windows:  # each window alone, right-padded (one compilation)
    seq = ctx + pred
    batch = batching.make_batch([seq], pad_id=lm.data.pad_id, length=MAX_LEN + 1)
    logp = jax.nn.log_softmax(forward(lm.state, lm.state.params, batch)[0], axis=-1)
    targets = np.asarray(seq[1:])
    direct += float(np.asarray(logp)[np.arange(len(targets)), targets][-len(pred):].sum())
  req = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)
  (ours,) = lm.loglikelihood_rolling([req])
  assert abs(ours - direct) < 1e-3
  assert sum(len(p) for _, p in windows) == len(tokens)


def _launch(*args):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, os.path.join(REPO, "launch.py"), *args],
                        capture_output=True, text=True, env=env, timeout=600)


def _second_checkpoint(workdir):
  """Step 1 of the workdir: the step-0 weights scaled (other answers)."""
  config, _, state, _ = workdir_lib.restore_state(workdir)
  mngr = ckpt.manager(workdir, ckpt.CKPT_DIR, config.train.keep_checkpoints,
                      barrier_timeout_s=config.distributed.barrier_timeout_s)
  params = jax.tree.map(lambda x: x * 1.2, state.params)
  ckpt.save(mngr, 1, state.replace(params=params).checkpoint_tree(), {})
  ckpt.finish(mngr)
  mngr.close()


def test_one_cache_per_checkpoint(llama, tmp_path, monkeypatch):
  w = str(tmp_path / "w")
  shutil.copytree(llama[1], w)
  _second_checkpoint(w)
  path, _ = harness.run_workdir(w, "lmmask_mc,lmmask_ppl", step=0, include_path=TASKS,
                                limit=6)
  first = json.load(open(path))
  assert path == os.path.join(w, "harness", "0.json")
  assert first["lm_eval_version"] == harness.LM_EVAL_VERSION == lm_eval.__version__
  assert set(first["task_hashes"]) == {"lmmask_mc", "lmmask_ppl"}
  _, second = harness.run_workdir(w, "lmmask_mc,lmmask_ppl", step=1, include_path=TASKS,
                                  limit=6)
  caches = sorted(os.listdir(os.path.join(w, "harness", "cache")))
  assert caches == ["latest_step0_rank0.db", "latest_step1_rank0.db"]
  # One cache per checkpoint: step 1 was scored by its own weights, not read from
  # step 0's answers (lm-eval's cache keys ignore the model).
  key = "lmmask_ppl_word_perplexity"
  assert abs(second["metrics"][key] - first["metrics"][key]) > 1e-3 * first["metrics"][key]
  # Step 0 again: every answer from its cache, the model is not run.
  def refuse(*a, **k):
    raise AssertionError("the model ran although every answer is cached")
  monkeypatch.setattr(harness.Scorer, "loglikelihoods", refuse)
  _, again = harness.run_workdir(w, "lmmask_mc,lmmask_ppl", step=0, include_path=TASKS,
                                 limit=6)
  assert again["metrics"] == first["metrics"]


VERBS_MC = """task: verbs_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: verbs_mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{context}}"
doc_to_choice: "{{choices}}"
doc_to_target: 0
metric_list:
  - metric: acc
"""


def test_in_loop_logging_equals_the_checkpoint(tmp_path):
  """eval.harness_tasks during training: metrics.jsonl and TensorBoard rows at every
  eval, on the live weights (the last equal to the saved final checkpoint's)."""
  from conftest import tiny_config

  from lmmask import train
  from lmmask.data import verbs
  lines = [e.text for e in verbs.build_corpus("verbs").train[:8]]
  with open(tmp_path / "verbs_mc.jsonl", "w") as f:
    for a, b in zip(lines, lines[1:] + lines[:1]):
      ctx, ans = a.split(" / ")
      f.write(json.dumps({"context": ctx + " /", "choices": [ans, b.split(" / ")[1]]}) + "\n")
  (tmp_path / "verbs_mc.yaml").write_text(VERBS_MC)
  task = str(tmp_path / "verbs_mc.yaml")
  config = tiny_config(**{"eval.harness_tasks": task, "train.steps": 4, "train.eval_every": 2,
                          "eval.exact_match_at_end": False})
  w = str(tmp_path / "run")
  train.train_and_evaluate(config, w)
  rows = [json.loads(line) for line in open(os.path.join(w, "metrics.jsonl"))]
  logged = [r for r in rows if r["kind"] == "harness"]
  assert [r["step"] for r in logged] == [2, 4]
  assert all(0.0 <= r["verbs_mc_acc"] <= 1.0 for r in logged)
  assert any(f.startswith("events") for f in os.listdir(os.path.join(w, "tb")))
  _, rec = harness.run_workdir(w, task)
  assert rec["step"] == 4 and rec["metrics"]["verbs_mc_acc"] == logged[-1]["verbs_mc_acc"]


def _listing(d):
  return sorted((os.path.relpath(os.path.join(r, f), d), os.path.getsize(os.path.join(r, f)))
                for r, _, files in os.walk(d) for f in files)


ROLLING = ("output_type: loglikelihood_rolling\ntest_split: test\ndoc_to_text: ''\n"
           "doc_to_target: '{{text}}'\n")
BAD = {
    "unknown task": (None, "no_such_task_anywhere", ValueError, "unknown task"),
    "bad yaml": ("task: [unclosed\n  dataset_path: json", None, ValueError, "does not parse"),
    "local file missing": ("task: t1\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                           "    test: nowhere.jsonl\n" + ROLLING, None, ValueError,
                           "cannot be found offline.*dataset_path: json"),
    "hub dataset offline": ("task: t2\ndataset_path: lmmask-tests/no-such-dataset\n" + ROLLING,
                            None, ValueError, "cannot be found offline.*data_files"),
    "too long, truncation off": (None, MC, ValueError, "harness_truncation"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_inputs_are_refused_leaving_the_workdir_as_it_was(llama, tmp_path, case):
  text, task, error, message = BAD[case]
  if text is not None:
    (tmp_path / "task.yaml").write_text(text)
    task = str(tmp_path / "task.yaml")
  w = llama[1]
  before = _listing(w)
  with pytest.raises(error, match=message):
    harness.run_workdir(w, task, num_fewshot=3, model_args={"truncation": False})
  assert _listing(w) == before


def test_workdir_without_checkpoint_and_the_cli(llama, tmp_path):
  w = str(tmp_path / "w")
  shutil.copytree(llama[1], w, ignore=shutil.ignore_patterns(ckpt.CKPT_DIR))
  before = _listing(w)
  with pytest.raises(FileNotFoundError, match="no checkpoints"):
    harness.run_workdir(w, MC)
  r = _launch("--mode=harness", f"--workdir={w}", f"--tasks={MC}")
  assert r.returncode != 0 and "no checkpoints" in r.stderr
  assert _listing(w) == before


def test_chat_template_renders_as_transformers(runs, llama, monkeypatch):
  """lm-eval's apply_chat_template (generation prompt, and a prefilled assistant turn
  left open) renders as transformers' tokenizer does."""
  from test_chat_template import CHATML
  ref = transformers.AutoTokenizer.from_pretrained(llama[0])
  ref.chat_template = CHATML
  monkeypatch.setattr(runs.ours.tok, "chat_template", CHATML)
  msgs = [{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "4"},
          {"role": "user", "content": "And 3 plus 3?"}]
  assert runs.ours.apply_chat_template(msgs) == ref.apply_chat_template(
      msgs, tokenize=False, add_generation_prompt=True)
  open_turn = msgs + [{"role": "assistant", "content": "The answer is"}]
  assert runs.ours.apply_chat_template(open_turn, add_generation_prompt=False) == \
      ref.apply_chat_template(open_turn, tokenize=False, add_generation_prompt=False,
                              continue_final_message=True)
