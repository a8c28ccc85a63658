"""Packing: several documents per row, kept apart by segment ids.

A packed row of ids carries a parallel row of segment ids: 1, 2, 3, ... for the
documents in it and 0 on padding. From these two facts (`batch_from_packed`):
  * positions restart at 0 at the start of every segment;
  * attention is causal AND within the same segment (`masks.segment_mask`,
    applied by the model from ``Batch.segment_ids``);
  * a target counts only when the input token and the target token lie in the
    same (non-padding) segment, so the last token of one document is never
    trained to predict the first token of the next.
Each document of n tokens therefore contributes exactly the n - 1 targets it has
when run alone in its own row, with the same positions and the same context,
so its logits and losses are those of the unpacked run.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from lmmask.batching import Batch, _check_ids, batch_from_segments


def first_fit(lengths: Sequence[int], length: int, rows: int | None = None):
  """Assign documents to rows of `length` tokens, longest first, each to the first row
  it fits. Returns (rows_of_doc_indices, dropped_doc_indices); with `rows` given, at
  most that many rows are opened and documents that fit nowhere are dropped."""
  for i, n in enumerate(lengths):
    if n > length:
      raise ValueError(f"document {i} has {n} tokens but a packed row holds {length}; "
                       f"raise data.length or split long documents")
    if n < 2:
      raise ValueError(f"document {i} has {n} token(s); each needs at least 2")
  order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
  free, assigned, dropped = [], [], []
  for i in order:
    for r, f in enumerate(free):
      if lengths[i] <= f:
        free[r] -= lengths[i]
        assigned[r].append(i)
        break
    else:
      if rows is None or len(free) < rows:
        free.append(length - lengths[i])
        assigned.append([i])
      else:
        dropped.append(i)
  for r in assigned:
    r.sort()  # documents keep their stream order inside a row
  return assigned, sorted(dropped)


def pack_documents(docs: Sequence[Sequence[int]], *, length: int, pad_id: int,
                   rows: int | None = None):
  """(ids, segment_ids, dropped): (R, length) int32 arrays of packed documents."""
  if len(docs) == 0:
    raise ValueError("no documents to pack")
  for i, d in enumerate(docs):
    if pad_id in d:
      raise ValueError(f"document {i} contains pad_id={pad_id}; pass unpadded documents")
  assignment, dropped = first_fit([len(d) for d in docs], length, rows)
  n_rows = len(assignment) if rows is None else rows
  ids = np.full((n_rows, length), pad_id, np.int32)
  seg = np.zeros((n_rows, length), np.int32)
  for r, doc_ids in enumerate(assignment):
    at = 0
    for s, i in enumerate(doc_ids, start=1):
      n = len(docs[i])
      ids[r, at:at + n] = docs[i]
      seg[r, at:at + n] = s
      at += n
  return ids, seg, dropped


def batch_from_packed(ids, segment_ids, *, pad_id: int, vocab_size: int | None = None) -> Batch:
  """Shift packed (B, L) ids with their (B, L) segment ids into a `Batch`."""
  ids = _check_ids(ids, pad_id, vocab_size)
  seg = np.asarray(segment_ids)
  if seg.shape != ids.shape:
    raise ValueError(f"segment_ids must have the shape of ids {ids.shape}, got {seg.shape}")
  if not np.issubdtype(seg.dtype, np.integer) or (seg < 0).any():
    raise ValueError("segment_ids must be non-negative integers (0 = padding)")
  if ((seg == 0) != (ids == pad_id)).any():
    raise ValueError("segment_ids must be 0 exactly on pad tokens (and pad_id must not "
                     "appear inside a document)")
  # The shift itself (targets, loss mask, positions restarting per segment) is
  # batching.batch_from_segments, shared with the text corpus's packing.
  return batch_from_segments(ids, seg, vocab_size=vocab_size)


def pack_batch(docs, *, length: int, pad_id: int, rows: int | None = None,
               vocab_size: int | None = None):
  """(Batch, dropped doc indices) for documents packed into `rows` rows."""
  ids, seg, dropped = pack_documents(docs, length=length, pad_id=pad_id, rows=rows)
  return batch_from_packed(ids, seg, pad_id=pad_id, vocab_size=vocab_size), dropped


def train_batch(split, *, step: int, batch_size: int, seed: int, pad_id: int,
                docs_per_row: int):
  """A packed training batch of `batch_size` rows, a pure function of (seed, step).

  Step s takes the next batch_size * docs_per_row documents of the per-epoch
  shuffled stream (the unpacked pipeline's order) and packs them; documents that
  do not fit are skipped this epoch (returned as a count).
  """
  from lmmask.data.pipeline import batch_indices
  idx = batch_indices(len(split), batch_size * docs_per_row, step, seed)
  docs = [list(split.examples[i].ids) for i in idx]
  batch, dropped = pack_batch(docs, length=split.ids.shape[1], pad_id=pad_id, rows=batch_size)
  return batch, len(dropped)
