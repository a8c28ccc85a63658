"""Memory of one training step by component, from XLA's compiled buffer assignment.

  python benchmarks/train_memory.py workdir=DIR [batch=4] [seq=256]
  python benchmarks/train_memory.py tiny

DIR is a workdir, e.g. SmolLM2 imported with `launch.py --mode=import` (hf_compare.py
leaves one in the temp directory). Nothing is allocated or run: every function is
lowered on abstract shapes and compiled for one CPU device, and XLA reports its
argument, output, aliased (donated) and temporary bytes; peak = arguments +
outputs - aliased + temporaries. Components, each a separate program:
  forward        the logits (B, T, V) of the batch
  loss           forward + the masked cross-entropy (no gradient)
  grad           loss and gradients (`losses.loss_and_grads`, as train_step)
  train_step     `step.train_step`: gradients, AdamW, the state donated
each for the workdir's config and with loss.logits_chunk and model.remat.
Prints one JSON line per program and a table in MiB.
"""
from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from lmmask import batching, losses
from lmmask import config as config_lib
from lmmask import step as step_lib
from lmmask import workdir as wd

VARIANTS = {"as configured": {}, "logits_chunk=128": {"loss.logits_chunk": 128},
            "remat": {"model.remat": True},
            "logits_chunk=128 + remat": {"loss.logits_chunk": 128, "model.remat": True}}


def analyse(fn, *args, donate=()):
  compiled = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
  m = compiled.memory_analysis()
  out = {k: getattr(m, f"{k}_size_in_bytes") / 2**20
         for k in ("argument", "output", "alias", "temp")}
  out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  return out


def programs(config, vocab, batch):
  state = jax.eval_shape(lambda: step_lib.create_train_state(config, jax.random.PRNGKey(0),
                                                             vocab_size=vocab))
  o = state.options

  def loss_value(p, b):
    logits = step_lib.forward(state, p, b)
    return losses.masked_cross_entropy(logits, b.targets, b.loss_mask)[0]

  def grad(p, b):
    fn = lambda q, mb, r: step_lib.forward(state, q, mb)  # noqa: E731
    if o.logits_chunk:
      fn = lambda q, mb, r: losses.ChunkedLogits(  # noqa: E731
          step_lib.forward(state, q, mb, apply_head=False), state.replace(params=q).model().logits,
          o.logits_chunk)
    return losses.loss_and_grads(fn, p, b, reduction=o.reduction)[:2]
  return {
      "forward": (lambda p, b: step_lib.forward(state, p, b), (state.params, batch), ()),
      "loss": (loss_value, (state.params, batch), ()),
      "grad": (grad, (state.params, batch), ()),
      "train_step": (step_lib.train_step, (state, batch), (0,)),
  }


def main(argv):
  opts = dict(a.split("=", 1) for a in argv if "=" in a)
  tiny = argv == ["tiny"]
  if not tiny and ("workdir" not in opts or set(opts) - {"workdir", "batch", "seq"}):
    sys.exit(f"usage: python benchmarks/train_memory.py workdir=DIR [batch=4] [seq=256] | tiny; "
             f"got {argv}")
  if tiny:
    base = config_lib.defaults()
    base.model.dropout = 0.0  # model.remat needs it
    vocab = 64
  else:
    base = wd.load_config(opts["workdir"])
    vocab = base.model.vocab_size
  b, t = int(opts.get("batch", 2 if tiny else 4)), int(opts.get("seq", 16 if tiny else 256))
  ids = np.random.default_rng(0).integers(1, vocab, (b, t + 1)).astype(np.int32)
  batch = jax.tree.map(jnp.asarray, batching.batch_from_ids(ids, pad_id=0))
  table = {}
  for name, over in VARIANTS.items():
    config = config_lib.upgrade(config_lib.to_dict(base))
    config.model.max_len = max(config.model.max_len, t)
    for k, v in over.items():
      section, field = k.split(".")
      config[section][field] = v
    for comp, (fn, args, donate) in programs(config, vocab, batch).items():
      if over and comp in ("forward", "loss"):
        continue  # the same program as configured: the variants change the backward
      r = analyse(fn, *args, donate=donate)
      table[(name, comp)] = r
      print(json.dumps({"variant": name, "component": comp, **{k: round(v, 1)
                                                               for k, v in r.items()}}),
            flush=True)
  print(f"\nMiB, batch {b} x {t}, one device (peak = arguments + outputs - aliased + temporaries)")
  print("| variant | program | arguments | outputs | aliased | temporaries | peak |")
  print("|---|---|---|---|---|---|---|")
  for (name, comp), r in table.items():
    print(f"| {name} | {comp} | {r['argument']:.0f} | {r['output']:.0f} | {r['alias']:.0f} | "
          f"{r['temp']:.0f} | {r['peak']:.0f} |")


if __name__ == "__main__":
  main(sys.argv[1:])
