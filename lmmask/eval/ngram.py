"""The add-k smoothed n-gram baseline, scored on exactly the model's counted tokens.

    p(w | c) = (count(c, w) + k) / (count(c) + k * |S|)

c is the previous n-1 tokens (left-filled with <bos> near the start), counted over
the training sequences; S, the support, is every vocabulary token except <pad> and
<bos>, which are never targets, so p sums to 1 over S for every context. Targets
are the tokens after <bos> in each sequence (the transformer's loss mask counts
exactly these), optionally restricted by a per-token mask (the English side).
"""
from __future__ import annotations

import collections
import math
from typing import Iterable, Sequence

import numpy as np


class AddKNgram:

  def __init__(self, sequences: Iterable[Sequence[int]], *, n: int, k: float, vocab_size: int,
               bos_id: int = 1, pad_id: int = 0):
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
      raise ValueError(f"ngram n must be an int >= 1 (1 = unigram), got {n!r}")
    if not k > 0:
      raise ValueError(f"ngram k must be > 0 (add-k smoothing; k = 0 gives held-out tokens "
                       f"probability 0 and an infinite loss), got {k!r}")
    self.n, self.k, self.vocab_size = int(n), float(k), int(vocab_size)
    self.bos_id, self.pad_id = bos_id, pad_id
    self.support = self.vocab_size - len({bos_id, pad_id})
    self.joint = collections.Counter()
    self.ctx = collections.Counter()
    for seq in sequences:
      seq = [int(t) for t in seq]
      for t in range(1, len(seq)):
        c = self.context(seq, t)
        self.joint[c + (seq[t],)] += 1
        self.ctx[c] += 1

  def context(self, seq, t):
    start = t - (self.n - 1)
    head = [self.bos_id] * max(0, -start)
    return tuple(head + list(seq[max(0, start):t]))

  def prob(self, context: tuple, token: int) -> float:
    if token in (self.bos_id, self.pad_id):
      return 0.0
    return ((self.joint[tuple(context) + (int(token),)] + self.k)
            / (self.ctx[tuple(context)] + self.k * self.support))

  def nll(self, sequences, token_masks=None):
    """(sum of -log p, number of counted targets); token_masks like the sequences."""
    total, count = 0.0, 0
    for i, seq in enumerate(sequences):
      seq = [int(t) for t in seq]
      for t in range(1, len(seq)):
        if token_masks is not None and not token_masks[i][t]:
          continue
        total -= math.log(self.prob(self.context(seq, t), seq[t]))
        count += 1
    return total, count


def _english_masks(examples):
  return [[int(i >= e.english_start) for i in range(len(e.ids))] for e in examples]


def baseline_results(config, corpus) -> dict:
  """Baseline loss/PPL on train, val and val_english, keyed like the model's results."""
  n, k = config.baseline.ngram_n, config.baseline.ngram_k
  v = corpus.vocab
  model = AddKNgram([e.ids for e in corpus.train], n=n, k=k, vocab_size=len(v),
                    bos_id=v.bos_id, pad_id=v.pad_id)
  out = {"baseline_ngram_n": n, "baseline_ngram_k": k}
  sets = {"train": (corpus.train, None), "val": (corpus.val, None),
          "val_english": (corpus.val, _english_masks(corpus.val))}
  for name, (examples, tm) in sets.items():
    total, count = model.nll([e.ids for e in examples], tm)
    loss = total / count
    out[f"baseline_{name}_loss"] = loss
    out[f"baseline_{name}_ppl"] = math.exp(loss)
  return out
