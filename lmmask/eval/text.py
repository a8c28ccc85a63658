"""Evaluation extras of plain-text data: PPL by document length, and continuations.

* PPL by document-length bucket: each held-out document is cut into the same
  windows training uses (at most data.length tokens, overlapping by one, so every
  next-token pair is a target once), one window per row, and the token-mean loss is
  reported per bucket of document lengths (in tokens, <bos> and <eos> included).
  Long documents are where a model's context length shows.
* continuations: the first eval.prompt_tokens tokens of a few held-out documents
  are continued by `decode.generate` (greedy, or sampled with a seeded key), shown
  beside the document's real continuation.
"""
from __future__ import annotations

import jax
import numpy as np

from lmmask import decode
from lmmask import step as step_lib
from lmmask.batching import batch_from_ids

BUCKET_EDGES = (32, 64, 128, 256, 512, 1024)  # document lengths in tokens (upper bounds)


def windows(doc, length: int):
  """Windows of at most `length` tokens starting every length-1 tokens."""
  doc = list(doc)
  if len(doc) < 2:
    return []
  return [doc[s:s + length] for s in range(0, len(doc) - 1, length - 1)]


def _bucket(n: int) -> str:
  for edge in BUCKET_EDGES:
    if n <= edge:
      return f"<={edge}"
  return f">{BUCKET_EDGES[-1]}"


def _val_docs(data, cap: int):
  val = data.documents("val")
  n = len(val) if not cap else min(cap, len(val))
  return [list(map(int, val.doc(i)[0])) for i in range(n)]


def ppl_by_length(state, docs, *, length: int, pad_id: int, batch_size: int) -> dict:
  groups = {}
  for doc in docs:
    groups.setdefault(_bucket(len(doc)), []).append(doc)
  out = {}
  for name in sorted(groups, key=lambda k: (k.startswith(">"), int(k.strip("<=>")))):
    rows = [w for doc in groups[name] for w in windows(doc, length)]
    ids = np.full((len(rows), length), pad_id, np.int32)
    for r, w in enumerate(rows):
      ids[r, :len(w)] = w
    batches = [batch_from_ids(ids[s:s + batch_size], pad_id=pad_id)
               for s in range(0, len(rows), batch_size)]
    out[name] = {"num_docs": len(groups[name]), **step_lib.evaluate(state, batches)}
  return out


def continuations(state, docs, tok, *, prompt_tokens: int, max_new: int, num: int,
                  max_len: int, temperature: float = 0.0, sample_seed: int = 0) -> list[dict]:
  picked = [d for d in docs if len(d) > prompt_tokens + 1][:num]
  if not picked:
    return []
  budget = min(max_new, max_len + 1 - prompt_tokens)
  if budget < 1:
    return []
  rng = jax.random.PRNGKey(sample_seed) if temperature > 0 else None
  gen = decode.generate(state, [d[:prompt_tokens] for d in picked], max_new_tokens=budget,
                        temperature=temperature, rng=rng, eos_id=tok.eos_id, pad_id=tok.pad_id)
  out = []
  for d, row in zip(picked, gen.tokens):
    ids = decode.strip_after_eos(row, eos_id=tok.eos_id, pad_id=tok.pad_id)
    out.append({"opening": tok.decode(d[:prompt_tokens]), "continuation": tok.decode(ids),
                "reference": tok.decode(d[prompt_tokens:prompt_tokens + budget])})
  return out


def checkpoint_extras(config, state, data, *, temperature=0.0, sample_seed=0) -> dict:
  d, ev = config.data, config.eval
  docs = _val_docs(data, d.max_eval_batches * d.eval_batch_size)
  return {"val_by_doc_length": ppl_by_length(state, docs, length=d.length, pad_id=data.pad_id,
                                             batch_size=d.eval_batch_size),
          "continuations": continuations(
              state, docs, data.tokenizer, prompt_tokens=ev.prompt_tokens,
              max_new=ev.max_new_tokens, num=min(ev.num_examples, 4),
              max_len=config.model.max_len, temperature=temperature, sample_seed=sample_seed),
          "sampling": "greedy" if temperature == 0 else
                      f"temperature {temperature}, sample_seed {sample_seed}"}


def format_extras(metrics: dict, extras: dict) -> str:
  del metrics
  lines = ["", "  val by document length (tokens):  bucket  docs   loss     ppl"]
  for name, m in extras["val_by_doc_length"].items():
    lines.append(f"  {'':34s}{name:>6s} {m['num_docs']:5d} {m['loss']:6.3f} {m['ppl']:8.3f}")
  if extras["continuations"]:
    lines.append(f"  continuations of held-out openings ({extras['sampling']}):")
  for c in extras["continuations"]:
    lines.append(f"    {c['opening']!r}\n      -> {c['continuation']!r}\n      ref {c['reference']!r}")
  return "\n".join(lines)
