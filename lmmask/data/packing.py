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

Two row-assembly policies share that row layout (`fill_rows`) and shift
(`batching.batch_from_segments`), both chosen by the one knob ``data.packing``:
  * `first_fit` (verbs): whole documents drawn for a step, longest first, each into
    the first row with room; what fits nowhere is skipped for that step;
  * `text.row_starts` (text): windows in stream order, a new row whenever the next one
    does not fit (or always, without packing), so every window is used once.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from lmmask.batching import Batch, _check_ids, batch_from_segments
from lmmask.data.pipeline import batch_indices


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


def fill_rows(rows, *, length: int, pad_id: int, pad_side: str = "right", dtype=np.int32,
              with_mask: bool = False):
  """(ids, segment_ids, token_mask) arrays (R, length) from rows of pieces.

  Each row is a list of token arrays, or of (tokens, mask) pairs with `with_mask`;
  piece s of a row gets segment id s (1-based), padding 0. Rows are right-padded,
  or left-padded (the pieces end at the row's end) with pad_side="left". The
  token mask (uint8, 0 on padding) is None without `with_mask`.
  """
  ids = np.full((len(rows), length), pad_id, dtype)
  seg = np.zeros((len(rows), length), np.int32)
  tlm = np.zeros((len(rows), length), np.uint8) if with_mask else None
  for r, pieces in enumerate(rows):
    toks = [p[0] if with_mask else p for p in pieces]
    at = length - sum(len(t) for t in toks) if pad_side == "left" else 0
    for s, (t, p) in enumerate(zip(toks, pieces), start=1):
      n = len(t)
      ids[r, at:at + n] = t
      seg[r, at:at + n] = s
      if with_mask:
        tlm[r, at:at + n] = p[1]
      at += n
  return ids, seg, tlm


def pack_documents(docs: Sequence[Sequence[int]], *, length: int, pad_id: int,
                   rows: int | None = None):
  """(ids, segment_ids, dropped): (R, length) int32 arrays of packed documents."""
  if len(docs) == 0:
    raise ValueError("no documents to pack")
  for i, d in enumerate(docs):
    if pad_id in d:
      raise ValueError(f"document {i} contains pad_id={pad_id}; pass unpadded documents")
  assignment, dropped = first_fit([len(d) for d in docs], length, rows)
  if rows is not None:  # rows left empty are all padding
    assignment = assignment + [[]] * (rows - len(assignment))
  ids, seg, _ = fill_rows([[docs[i] for i in r] for r in assignment], length=length,
                          pad_id=pad_id)
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
  # batching.batch_from_segments, shared with the text corpus's rows.
  return batch_from_segments(ids, seg, vocab_size=vocab_size)


def pack_batch(docs, *, length: int, pad_id: int, rows: int | None = None,
               vocab_size: int | None = None):
  """(Batch, dropped doc indices) for documents packed into `rows` rows."""
  ids, seg, dropped = pack_documents(docs, length=length, pad_id=pad_id, rows=rows)
  return batch_from_packed(ids, seg, pad_id=pad_id, vocab_size=vocab_size), dropped


def train_batch(split, *, step: int, batch_size: int, seed: int, pad_id: int,
                docs_per_row: int):
  """A packed verbs training batch of `batch_size` rows, a pure function of (seed, step).

  Step s takes the next batch_size * docs_per_row documents of the per-epoch
  shuffled stream (the unpacked pipeline's order) and packs them; documents that
  do not fit are skipped this epoch (returned as a count).
  """
  idx = batch_indices(len(split), batch_size * docs_per_row, step, seed)
  docs = [list(split.examples[i].ids) for i in idx]
  batch, dropped = pack_batch(docs, length=split.ids.shape[1], pad_id=pad_id, rows=batch_size)
  return batch, len(dropped)
