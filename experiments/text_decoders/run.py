"""Text decoders compared: val PPL, a bigram baseline and samples for text runs.

  python launch.py --config=configs/text.py --workdir=/tmp/lmmask/gpl3
  python launch.py --config=configs/text.py:modern --workdir=/tmp/lmmask/gpl3_modern
  python experiments/text_decoders/run.py /tmp/lmmask/gpl3 /tmp/lmmask/gpl3_modern
  python experiments/text_decoders/run.py tiny   # smoke run: trains its own tiny run first

For each workdir: the best-by-val checkpoint's train/val loss and PPL, its parameter
count, and greedy / temperature samples from a few prompts. Sampling here is a
plain loop of full forward passes over a sliding window of max_len tokens, so a
sample can run longer than the context; lmmask/decode.py's KV cache stops at
max_len. The bigram
baseline is add-k smoothed on the training shards and scored on exactly the val
targets the model is scored on (k picked on val, so it is an optimistic baseline).
`tiny` writes a small generated text, trains configs/text.py:tiny,modern on it for
a few steps in a temporary directory, and reports on that workdir.
"""
from __future__ import annotations

import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, os.path.dirname(HERE))

import common  # noqa: E402  (experiments/common.py)
import jax  # noqa: E402
import numpy as np  # noqa: E402
from ml_collections import ConfigDict  # noqa: E402

from lmmask import checkpoint as ckpt  # noqa: E402
from lmmask import decode, sweep, train  # noqa: E402
from lmmask import step as step_lib  # noqa: E402
from lmmask import workdir as workdir_lib  # noqa: E402
from lmmask.data import registry  # noqa: E402
from lmmask.model import count_params  # noqa: E402

PROMPTS = ("The GNU General Public License", "You may convey", "If you", "  13. ")


def restore_best(workdir):
  config = ConfigDict(workdir_lib.load_config(workdir))
  data = registry.load(config, workdir)
  state = step_lib.create_train_state(config, jax.random.PRNGKey(config.seed),
                                   vocab_size=data.vocab_size,
                                   keys_are_prefix=data.keys_are_prefix)
  mngr = ckpt.manager(workdir, ckpt.BEST_DIR, 1, create=False,
                      barrier_timeout_s=config.distributed.barrier_timeout_s)
  step, tree, _ = ckpt.restore(mngr, None, state.checkpoint_tree())
  mngr.close()
  return config, data, state.replace_from_tree(tree), step


def bigram_baseline(data):
  v = data.tokenizer.vocab_size
  sets = data.eval_sets()  # every window once (data.max_eval_batches=0)
  counts = np.zeros((v, v))
  for b in sets["train"]:
    m = b.loss_mask > 0
    np.add.at(counts, (b.inputs[m], b.targets[m]), 1)
  val_pairs = [(b.inputs[b.loss_mask > 0], b.targets[b.loss_mask > 0])
               for b in sets["val"]]
  best = None
  for k in (0.003, 0.01, 0.03, 0.1, 0.3, 1.0):
    probs = (counts + k) / (counts.sum(1, keepdims=True) + k * v)
    nll = -sum(np.log(probs[a, t]).sum() for a, t in val_pairs)
    n = sum(len(a) for a, _ in val_pairs)
    if best is None or nll / n < best[1]:
      best = (k, nll / n)
  return best


def sample(state, tok, prompt, *, max_new=48, temperature=0.0, seed=0):
  """A continuation from the one generation path (`decode.generate`), as long as the
  model's positions allow."""
  ids = [tok.bos_id, *tok.encode(prompt)]
  budget = min(max_new, state.model().cfg.max_len + 1 - len(ids))
  rng = jax.random.PRNGKey(seed) if temperature > 0 else None
  gen = decode.generate(state, [ids], max_new_tokens=budget, temperature=temperature, rng=rng,
                        eos_id=tok.eos_id, pad_id=tok.pad_id)
  return tok.decode(ids + decode.strip_after_eos(gen.tokens[0], eos_id=tok.eos_id,
                                                 pad_id=tok.pad_id))


def tiny_workdirs():
  """Train configs/text.py:tiny,modern on a generated text; return its workdir."""
  root = common.tiny_root()
  rng = np.random.default_rng(0)
  words = ("you", "may", "convey", "a", "covered", "work", "the", "license", "of",
           "software", "and", "if", "General", "Public", "GNU", "permissions", "13.")
  docs = [" ".join(rng.choice(words, size=rng.integers(8, 40))) + "." for _ in range(60)]
  path = os.path.join(root, "text.txt")
  with open(path, "w") as f:
    f.write("\n\n".join(docs) + "\n")
  config = sweep.load_config_file(f"configs/text.py:tiny,modern,path={path}")
  config.train.progress_bar = False
  workdir = os.path.join(root, "text_modern")
  train.train_and_evaluate(config, workdir)
  return [workdir]


def main(workdirs, max_new=48):
  baseline_done = False
  for wd in workdirs:
    config, data, state, step = restore_best(wd)
    eval_sets = data.eval_sets()
    ev = step_lib.run_evals(state, eval_sets)
    m = config.model
    print(f"== {wd}: pos={m.pos_encoding} norm={m.norm} mlp={m.mlp} d_ff={m.d_ff} "
          f"n_kv_heads={m.n_kv_heads} params={count_params(state.model())} best step={step}")
    print(f"   train loss {ev['train_loss']:.4f} (PPL {ev['train_ppl']:.2f})  "
          f"val loss {ev['val_loss']:.4f} (PPL {ev['val_ppl']:.2f})  "
          f"val tokens {int(sum(b.loss_mask.sum() for b in eval_sets['val']))}")
    if not baseline_done:
      k, nll = bigram_baseline(data)
      print(f"   bigram baseline (add-{k}): val loss {nll:.4f} (PPL {math.exp(nll):.2f})")
      baseline_done = True
    tok = data.tokenizer
    for p in PROMPTS:
      print(f"   greedy  {sample(state, tok, p, max_new=max_new)!r}")
    for seed in (0, 1):
      text = sample(state, tok, PROMPTS[0], max_new=max_new, temperature=0.8, seed=seed)
      print(f"   T=0.8   {text!r}")


if __name__ == "__main__":
  if len(sys.argv) < 2:
    raise SystemExit("usage: python experiments/text_decoders/run.py WORKDIR [WORKDIR ...]"
                     " | tiny")
  if sys.argv[1:] == [common.TINY]:
    main(tiny_workdirs(), max_new=8)
  else:
    main(sys.argv[1:])
