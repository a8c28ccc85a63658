"""Text pre-training: a corpus -> byte-level BPE -> token shards -> windows.

Preparation (data/corpus.py, from the inputs of data/inputs.py): documents are read
from `data.path` (plain text cut at `data.doc_separator`, JSONL, Parquet, Arrow,
compressed or already tokenized), exact duplicates are dropped, each document is held
out for validation by a hash of its content and `data.split_seed`, a byte-level BPE is
trained on a bounded sample of the training documents into `<workdir>/tokenizer.json`
(or `data.tokenizer` names one), and the tokens are written to `<workdir>/data` in the
one shard format (data/shards.py, kind "text": uint16 or uint32 ids, no mask), with a
fingerprint of the inputs and settings: a later run reuses them while it matches and
refuses other inputs. Workdirs written before (uint32 ids with all-ones masks, one
meta.json per split) are read as they are.

Windows: a document of n tokens gives windows of at most `data.length` tokens
starting every length-1 tokens, so each next-token pair is a target exactly once
and no window holds two documents. A full window fills a row; shorter windows
are packed several to a row (consecutive windows while they fit; segment ids keep
them apart and restart their positions) or, with `data.packing=False`, padded one to
a row. Windows and rows are numpy arrays computed without a Python loop over documents.
"""
from __future__ import annotations

import os
from array import array

import numpy as np

from lmmask import batching
from lmmask.data import corpus, pipeline, shards
from lmmask.data import packing as packing_lib
from lmmask.data.source import SPLITS, DataSource

DATA_DIR = corpus.DATA_DIR  # <workdir>/data: the run's token shards


# ---------------------------------------------------------------------------
# Windows and rows.

def make_windows(doc_lengths, length: int) -> np.ndarray:
  """(W, 3) int64 rows (doc, start, n): windows of <= length tokens, stride length-1.

  Consecutive windows of a document overlap by one token (the last input of one
  is the first of the next), so every (input, target) pair occurs exactly once.
  Documents of fewer than 2 tokens have no target and give no window.
  """
  if length < 2:
    raise ValueError(f"data.length must be >= 2, got {length}")
  n = np.asarray(doc_lengths, np.int64)
  stride = length - 1
  count = np.where(n >= 2, (n - 2) // stride + 1, 0)
  doc = np.repeat(np.arange(n.size, dtype=np.int64), count)
  first = np.zeros(n.size, np.int64)
  np.cumsum(count[:-1], out=first[1:])
  start = (np.arange(doc.size, dtype=np.int64) - first[doc]) * stride
  return np.stack([doc, start, np.minimum(length, n[doc] - start)], 1).reshape(-1, 3)


def row_starts(lengths, length: int, pack: bool) -> np.ndarray:
  """(R + 1,) int64: row r holds windows [starts[r], starts[r+1]): consecutive windows
  while they fit in `length` tokens when packing, else one window a row."""
  n = np.asarray(lengths, np.int64)
  if not pack or n.size == 0:
    return np.arange(n.size + 1, dtype=np.int64)
  ends = np.zeros(n.size + 1, np.int64)
  np.cumsum(n, out=ends[1:])
  # A row starting at window i ends before the first window that would overflow it.
  nxt = np.searchsorted(ends, ends[:-1] + length, side="right") - 1
  nxt = np.maximum(nxt, np.arange(1, n.size + 1))
  hop = array("q", nxt.tobytes())
  out = array("q")
  i = 0
  while i < n.size:
    out.append(i)
    i = hop[i]
  out.append(n.size)
  return np.frombuffer(out, np.int64)


class TextSplit:
  """One split: shards + windows + rows, and (B, L) batches of given rows."""

  def __init__(self, split: shards.ShardSplit, *, length: int, packing: bool, pad_id: int,
               pad_side: str = "right"):
    if packing and pad_side != "right":
      raise ValueError("packed rows are right-padded; set data.pad_side='right' or "
                       "data.packing=False")
    self.shards, self.length, self.pad_id, self.pad_side = split, length, pad_id, pad_side
    self.windows = make_windows(split.doc_lengths(), length)
    self.starts = row_starts(self.windows[:, 2], length, packing)
    if not len(self):
      raise ValueError("this split has no window with a target (all documents shorter "
                       "than 2 tokens)")

  def __len__(self):
    return len(self.starts) - 1

  def row(self, r: int) -> range:
    """The window indices of row `r`."""
    return range(int(self.starts[r]), int(self.starts[r + 1]))

  def window(self, w: int):
    """(tokens, mask) of window `w`; the mask is all ones where the shards have none."""
    toks, mask = self.shards.doc(*(int(v) for v in self.windows[w]))
    return toks, np.ones(toks.shape, np.uint8) if mask is None else mask

  def row_arrays(self, rows):
    """ids, token loss mask and segment ids, each (len(rows), length)."""
    pieces = [[self.window(w) for w in self.row(int(r))] for r in rows]
    ids, seg, tlm = packing_lib.fill_rows(pieces, length=self.length, pad_id=self.pad_id,
                                          pad_side=self.pad_side, dtype=np.int64,
                                          with_mask=True)
    return ids, tlm, seg

  def batch(self, rows) -> batching.Batch:
    ids, tlm, seg = self.row_arrays(rows)
    b = batching.batch_from_segments(ids, seg)
    # The mask shards gate targets (all ones for pre-training).
    return b.replace(loss_mask=b.loss_mask * tlm[:, 1:].astype(np.float32))

  def eval_batches(self, batch_size: int, max_batches: int = 0):
    """Fixed-shape batches covering the rows once (the last padded with empty rows)."""
    out = []
    for start in range(0, len(self), batch_size):
      if max_batches and len(out) >= max_batches:
        break
      rows = list(range(start, min(start + batch_size, len(self))))
      b = self.batch(rows + [rows[0]] * (batch_size - len(rows)))
      if len(rows) < batch_size:  # repeated filler rows count no targets
        keep = (np.arange(batch_size) < len(rows))[:, None]
        b = b.replace(loss_mask=b.loss_mask * keep)
      out.append(b)
    return out


# ---------------------------------------------------------------------------
# The corpus "text" (lmmask/data/registry.py).

def build(config, workdir: str):
  """(tokenizer, {split: ShardSplit}) for `config`: the tokenizer and token shards are
  prepared once in `workdir` (data/corpus.py) and reused while the inputs match."""
  d = config.data
  meta = corpus.build(config, workdir)
  tok = corpus.load_tokenizer(d, corpus.tokenizer_path(d, workdir))
  if tok.sha256 != meta["tokenizer_sha256"]:
    raise ValueError(f"{workdir}/{DATA_DIR} was tokenized by another tokenizer than "
                     f"{tok.path}; use a new --workdir")
  out = os.path.join(workdir, DATA_DIR)
  splits = {name: shards.ShardSplit(out, name, use_loss_mask=False) for name in ("train", "val")}
  return tok, splits


def source(config, workdir: str | None) -> DataSource:
  d = config.data
  if not workdir:
    raise ValueError("corpus 'text' needs a workdir: its tokenizer and token shards are "
                     "built there (pass --workdir)")
  tok, splits = build(config, workdir)
  kw = dict(length=d.length, packing=d.packing, pad_id=tok.pad_id, pad_side=d.pad_side)
  train, val = TextSplit(splits["train"], **kw), TextSplit(splits["val"], **kw)

  def train_batch(step: int, rows=None):
    windows = pipeline.batch_indices(len(train), d.batch_size, step, config.seed)
    return train.batch(windows[slice(*(rows or (None, None)))])

  def eval_sets():
    bs, mx = d.eval_batch_size, d.max_eval_batches
    return {"train": train.eval_batches(bs, mx), "val": val.eval_batches(bs, mx)}

  def documents(split: str) -> shards.ShardSplit:
    if split not in splits:
      raise ValueError(f"split {split!r}: a text corpus has {', '.join(SPLITS)}")
    return splits[split]

  identity = {"kind": "text", "tokenizer_sha256": tok.sha256,
              "data_path": os.path.abspath(os.path.expanduser(d.path)),
              "vocab_size": tok.vocab_size, "pad_id": tok.pad_id}
  # Rows are windows, and the "train" eval set scores windows (a window after a
  # document's first sees only its own part of it), so the entropy floor bounds nothing.
  return DataSource(name="text", vocab_size=tok.vocab_size, pad_id=tok.pad_id,
                    train_batch=train_batch, eval_sets=eval_sets, tokenizer=tok,
                    identity=identity, documents=documents, keys_are_prefix=False,
                    train_eval_whole=False)
