"""From a corpus to batches: fixed-length padding, step-derived sampling, eval batches.

Training batches are a pure function of (seed, step): example order is a fresh
permutation per epoch, drawn from `seed` and the epoch number. A resumed run
therefore sees exactly the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from lmmask.batching import Batch, batch_from_ids, pad_sequences


@dataclasses.dataclass(frozen=True)
class Split:
  """A split padded to one length: ids (N, L) and a per-token English mask (N, L)."""
  ids: np.ndarray
  english: np.ndarray
  examples: tuple

  def __len__(self):
    return self.ids.shape[0]


def pad_split(examples, *, length: int, pad_id: int, pad_side: str) -> Split:
  if len(examples) == 0:
    raise ValueError("the split is empty; check data.split and the held-out settings")
  seqs = [list(e.ids) for e in examples]
  too_long = [e.text for e in examples if len(e.ids) > length]
  if too_long:
    raise ValueError(f"{len(too_long)} sequence(s) exceed data.length={length} tokens "
                     f"(e.g. {too_long[0]!r}); raise data.length")
  ids = pad_sequences(seqs, pad_id=pad_id, length=length, pad_side=pad_side)
  eng = [[int(i >= e.english_start) for i in range(len(e.ids))] for e in examples]
  english = pad_sequences(eng, pad_id=0, length=length, pad_side=pad_side)
  return Split(ids=ids, english=english, examples=tuple(examples))


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(n)


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
  """Rows for training step `step` (0-based): consecutive slots of per-epoch shuffles."""
  slots = np.arange(step * batch_size, (step + 1) * batch_size)
  epochs, offsets = np.divmod(slots, n)
  out = np.empty(batch_size, dtype=np.int64)
  for epoch in np.unique(epochs):
    sel = epochs == epoch
    out[sel] = epoch_permutation(n, seed, int(epoch))[offsets[sel]]
  return out


def train_batch(split: Split, *, step: int, batch_size: int, seed: int, pad_id: int,
                rows=None) -> Batch:
  """The batch of `step`; rows=(lo, hi) builds only those rows of it."""
  rows = batch_indices(len(split), batch_size, step, seed)[slice(*(rows or (None, None)))]
  return batch_from_ids(split.ids[rows], pad_id=pad_id)


def eval_batches(split: Split, *, batch_size: int, pad_id: int, english_only: bool = False):
  """Fixed-shape batches covering the split once; the last one is padded with pad rows
  (which count no targets)."""
  n, length = split.ids.shape
  out = []
  for start in range(0, n, batch_size):
    ids = np.full((batch_size, length), pad_id, dtype=np.int32)
    tlm = np.zeros((batch_size, length), dtype=np.int32)
    chunk = split.ids[start:start + batch_size]
    ids[:len(chunk)] = chunk
    tlm[:len(chunk)] = split.english[start:start + batch_size]
    out.append(batch_from_ids(ids, pad_id=pad_id, token_loss_mask=tlm if english_only else None))
  return out
