"""Token ids -> a training `Batch`, by pure functions.

One fact drives everything: ``is_real = ids != pad_id``. From it:
  * ``key_mask``  = is_real on the inputs (what attention may look at);
  * ``loss_mask`` = is_real on the input AND on the target after the shift, so a
    target counts only when it and the token it is predicted from are both real.
    Left and right padding therefore count exactly the same targets.
An optional per-token loss mask (e.g. assistant tokens only) is aligned with
``ids`` and shifted exactly like the targets.
"""
from __future__ import annotations

from typing import Sequence

import flax.struct
import numpy as np


@flax.struct.dataclass
class Batch:
  """All fields are (B, T) with T = L - 1."""
  inputs: np.ndarray       # int32, ids[:, :-1]
  targets: np.ndarray      # int32, ids[:, 1:]
  loss_mask: np.ndarray    # float32, 1 where the target is counted
  key_mask: np.ndarray     # bool, True where the input is a real token
  positions: np.ndarray    # int32, 0, 1, 2, ... over the real input tokens
  segment_ids: np.ndarray  # int32, 1 on real inputs, 0 on padding

  @property
  def shape(self):
    return self.inputs.shape

  def take_rows(self, lo: int, hi: int) -> "Batch":
    """Rows [lo, hi) of every field."""
    return Batch(*(getattr(self, f)[lo:hi] for f in ("inputs", "targets", "loss_mask",
                                                      "key_mask", "positions", "segment_ids")))


def _check_ids(ids, pad_id, vocab_size):
  if not isinstance(ids, np.ndarray):
    try:
      ids = np.asarray(ids)
    except ValueError as e:  # ragged nested lists
      raise ValueError(f"ids must be a rectangular (B, L) array; pad sequences first "
                       f"(make_batch does this): {e}") from None
  if ids.dtype == object:
    raise ValueError("ids must be a rectangular (B, L) integer array; got ragged rows. "
                     "Use make_batch(sequences, pad_id=...) to pad Python lists.")
  if not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"ids must hold integer token ids, got dtype {ids.dtype}; "
                     f"convert with ids.astype(np.int32)")
  if ids.ndim != 2:
    raise ValueError(f"ids must be 2-D (B, L), got shape {ids.shape}; "
                     f"wrap a single sequence as ids[None]")
  if ids.shape[0] < 1:
    raise ValueError("ids has no rows (B = 0); a batch needs at least one sequence")
  if ids.shape[1] < 2:
    raise ValueError(f"ids must have length L >= 2 for the input/target shift, "
                     f"got L = {ids.shape[1]}")
  if not isinstance(pad_id, (int, np.integer)) or isinstance(pad_id, bool):
    raise ValueError(f"pad_id must be an int, got {pad_id!r}")
  if vocab_size is not None:
    if not 0 <= pad_id < vocab_size:
      raise ValueError(f"pad_id={pad_id} is outside the vocabulary [0, {vocab_size}); "
                       f"use the tokenizer's pad id")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
      raise ValueError(f"token ids must lie in [0, {vocab_size}), found range "
                       f"[{ids.min()}, {ids.max()}]")
  elif pad_id < 0:
    raise ValueError(f"pad_id={pad_id} is negative; token ids are >= 0")
  return ids


def batch_from_ids(ids, *, pad_id: int, token_loss_mask=None,
                   vocab_size: int | None = None) -> Batch:
  """Shift a padded (B, L) id array into a `Batch` of (B, L - 1) arrays.

  Args:
    ids: (B, L) integer token ids, padded with ``pad_id`` on either side.
    pad_id: the padding token id.
    token_loss_mask: optional (B, L) 0/1 (or bool) mask aligned with ``ids``: 1 on
      tokens that may count as targets. It is shifted like the targets.
    vocab_size: if given, ``pad_id`` and all ids are checked against it.
  """
  ids = _check_ids(ids, pad_id, vocab_size)
  is_real = ids != pad_id
  inputs = ids[:, :-1].astype(np.int32)
  targets = ids[:, 1:].astype(np.int32)
  in_real = is_real[:, :-1]
  loss_mask = in_real & is_real[:, 1:]
  if token_loss_mask is not None:
    tlm = np.asarray(token_loss_mask)
    if tlm.shape != ids.shape:
      raise ValueError(f"token_loss_mask must have the shape of ids {ids.shape}, "
                       f"got {tlm.shape}; it is aligned with ids and shifted here")
    if tlm.dtype != bool and not np.isin(tlm, (0, 1)).all():
      raise ValueError("token_loss_mask must hold only 0/1 (or bool) values; "
                       f"found {sorted(set(np.unique(tlm).tolist()) - {0, 1})[:5]}")
    loss_mask = loss_mask & tlm[:, 1:].astype(bool)
  positions = np.maximum(np.cumsum(in_real, axis=1) - 1, 0).astype(np.int32)
  return Batch(
      inputs=inputs,
      targets=targets,
      loss_mask=loss_mask.astype(np.float32),
      key_mask=in_real,
      positions=positions,
      segment_ids=in_real.astype(np.int32),
  )


def pad_sequences(sequences: Sequence[Sequence[int]], *, pad_id: int, length=None,
                  pad_side: str = "right", dtype=np.int32) -> np.ndarray:
  """Pad Python lists into a (B, length) array (length defaults to the longest)."""
  if pad_side not in ("left", "right"):
    raise ValueError(f"pad_side must be 'left' or 'right', got {pad_side!r}")
  if len(sequences) == 0:
    raise ValueError("sequences is empty; a batch needs at least one sequence")
  lengths = [len(s) for s in sequences]
  longest = max(lengths)
  if length is None:
    length = longest
  elif longest > length:
    raise ValueError(f"a sequence has {longest} tokens but length={length}; raise length "
                     f"(or the model's max_len) or shorten the data")
  out = np.full((len(sequences), length), pad_id, dtype=dtype)
  for row, seq in enumerate(sequences):
    if len(seq) == 0:
      continue
    if pad_side == "right":
      out[row, :len(seq)] = seq
    else:
      out[row, length - len(seq):] = seq
  return out


def make_batch(sequences: Sequence[Sequence[int]], *, pad_id: int, length: int | None = None,
               token_loss_masks=None, pad_side: str = "right",
               vocab_size: int | None = None) -> Batch:
  """Pad lists of token ids (left or right) and build the shifted `Batch`."""
  if not isinstance(sequences, (list, tuple)) or len(sequences) == 0:
    raise ValueError("sequences must be a non-empty list of token-id lists")
  for i, seq in enumerate(sequences):
    if len(seq) < 2:
      raise ValueError(f"sequence {i} has {len(seq)} token(s); each needs at least 2 "
                       f"(an input and a target)")
    if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in seq):
      raise ValueError(f"sequence {i} holds non-integer tokens; pass token ids, not text")
    if pad_id in seq:
      raise ValueError(f"sequence {i} already contains pad_id={pad_id}; pass unpadded "
                       f"sequences (padding is added here)")
  ids = pad_sequences(sequences, pad_id=pad_id, length=length, pad_side=pad_side)
  tlm = None
  if token_loss_masks is not None:
    if len(token_loss_masks) != len(sequences):
      raise ValueError(f"token_loss_masks has {len(token_loss_masks)} rows for "
                       f"{len(sequences)} sequences")
    for i, (m, s) in enumerate(zip(token_loss_masks, sequences)):
      if len(m) != len(s):
        raise ValueError(f"token_loss_masks[{i}] has {len(m)} entries for a sequence of "
                         f"{len(s)} tokens")
    tlm = pad_sequences(token_loss_masks, pad_id=0, length=ids.shape[1],
                        pad_side=pad_side, dtype=np.int32)
  return batch_from_ids(ids, pad_id=pad_id, token_loss_mask=tlm, vocab_size=vocab_size)


def batch_from_segments(ids, segment_ids, *, vocab_size: int | None = None) -> Batch:
  """Shift packed (B, L) rows holding several documents into a `Batch`.

  segment_ids (B, L): each document's tokens carry one id > 0 (one contiguous run
  per id), padding carries 0. Positions restart at 0 in every segment, attention
  stays inside a segment (masks.attention_mask with segment_ids), and a target
  counts only when it lies in the same segment as its input, so no loss crosses
  a document boundary.
  """
  seg = np.asarray(segment_ids)
  ids = _check_ids(ids, 0, vocab_size)
  if seg.shape != ids.shape or not np.issubdtype(seg.dtype, np.integer):
    raise ValueError(f"segment_ids must be an integer array of the shape of ids {ids.shape}, "
                     f"got {seg.dtype} {seg.shape}")
  if (seg < 0).any():
    raise ValueError("segment_ids must be >= 0 (0 marks padding)")
  idx = np.broadcast_to(np.arange(seg.shape[1]), seg.shape)
  starts = np.ones(seg.shape, bool)
  starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
  runs = (starts & (seg > 0)).sum(axis=1)
  distinct = np.array([len(set(r[r > 0].tolist())) for r in seg])
  if (runs != distinct).any():
    raise ValueError("each segment id must occupy one contiguous run of a row; renumber "
                     "the packed documents")
  pos = idx - np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
  seg_in, seg_tg = seg[:, :-1], seg[:, 1:]
  real = seg_in > 0
  return Batch(
      inputs=ids[:, :-1].astype(np.int32),
      targets=ids[:, 1:].astype(np.int32),
      loss_mask=(real & (seg_in == seg_tg)).astype(np.float32),
      key_mask=real,
      positions=np.where(real, pos[:, :-1], 0).astype(np.int32),
      segment_ids=seg_in.astype(np.int32),
  )
