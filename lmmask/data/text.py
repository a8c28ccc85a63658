"""Plain-text pre-training: documents -> byte-level BPE -> token shards -> windows.

Documents: every file under `data.path` (a file or a directory, read in sorted
order, symlinked and identical files once) is cut into documents at
`data.doc_separator` (default: blank lines, i.e. paragraphs; "" keeps each file
whole). Exact duplicate documents are dropped, then a seeded fraction of the
documents is held out for validation: the split is by document, never by line.

Tokenizer: a byte-level BPE (lmmask/data/tokenizer.py) trained on the training
documents only (vocabulary size from the config) and saved as
`<workdir>/tokenizer.json`, or an existing tokenizer.json named in the config.

Token shards: `<workdir>/data` is a dataset in the one shard format
(lmmask/data/shards.py, kind "text"): splits `train` and `val`, each
`shard_NNN.bin` (uint32 ids, documents back to back, each <bos> tokens <eos>),
`shard_NNN_mask.bin` (all ones) and `docs.npy`; the root meta.json records a
fingerprint of the inputs (text, tokenizer, settings). It is written once, into
a temporary directory renamed into place, then only memory-mapped; a later run
whose inputs differ is refused.

Windows: a document of n tokens gives windows of at most `data.length` tokens
starting every length-1 tokens, so each next-token pair is a target exactly once
and no window holds two documents. A full window fills a row; shorter windows
are packed several to a row (`packing.greedy_rows`; segment ids keep them apart
and restart their positions) or, with `data.packing=False`, padded one to a row.
"""
from __future__ import annotations

import hashlib
import os

import numpy as np

from lmmask import batching
from lmmask.data import packing as packing_lib
from lmmask.data import pipeline, shards, tokenizer
from lmmask.data.source import SPLITS, DataSource
from lmmask.data.tokenizer import TOKENIZER_FILE

DATA_DIR = "data"  # <workdir>/data: the run's token shards


# ---------------------------------------------------------------------------
# Documents.

def list_files(path: str) -> list[str]:
  """Readable files under `path` (itself if a file), sorted, each real file once."""
  path = os.path.expanduser(path)
  if not path:
    raise ValueError("config.data.path is empty; set it to a text file or a directory")
  if os.path.isfile(path):
    return [path]
  if not os.path.isdir(path):
    raise ValueError(f"config.data.path={path!r} is neither a file nor a directory")
  out, seen = [], set()
  for root, dirs, files in os.walk(path, followlinks=False):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    for name in sorted(files):
      full = os.path.join(root, name)
      real = os.path.realpath(full)
      if name.startswith(".") or real in seen or not os.path.isfile(real):
        continue
      seen.add(real)
      out.append(full)
  if not out:
    raise ValueError(f"no files under {path!r}")
  return out


def read_documents(path: str, separator: str = "\n\n") -> tuple[list[str], str]:
  """All documents (stripped, non-empty, exact duplicates once) and a content hash."""
  docs, seen = [], set()
  h = hashlib.sha256()
  skipped = []
  for f in list_files(path):
    with open(f, "rb") as fh:
      raw = fh.read()
    try:
      text = raw.decode("utf-8")
    except UnicodeDecodeError:
      skipped.append(f)
      continue
    h.update(hashlib.sha256(raw).digest())
    parts = text.split(separator) if separator else [text]
    for part in parts:
      part = part.strip()
      if part and part not in seen:
        seen.add(part)
        docs.append(part)
  if skipped and not docs:
    raise ValueError(f"no UTF-8 text under {path!r} ({len(skipped)} non-UTF-8 file(s), "
                     f"e.g. {skipped[0]})")
  return docs, h.hexdigest()


def split_documents(docs, val_fraction: float, seed: int):
  """(train, val) lists of documents; val holds round(fraction * n) >= 1 of them."""
  n = len(docs)
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
  if n < 2:
    raise ValueError(f"found {n} document(s); a held-out split by document needs at "
                     f"least 2. Use a directory of files or a data.doc_separator that "
                     f"occurs in the text (e.g. a blank line)")
  n_val = min(n - 1, max(1, round(val_fraction * n)))
  val_idx = set(np.random.default_rng([seed, n]).permutation(n)[:n_val].tolist())
  train = [d for i, d in enumerate(docs) if i not in val_idx]
  val = [d for i, d in enumerate(docs) if i in val_idx]
  return train, val


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
  out = []
  for d, n in enumerate(doc_lengths):
    start = 0
    while start + 1 < n:
      out.append((d, start, min(length, n - start)))
      start += length - 1
  return np.asarray(out, np.int64).reshape(-1, 3)


class TextSplit:
  """One split: shards + windows + rows, and (B, L) batches of given rows."""

  def __init__(self, split: shards.ShardSplit, *, length: int, packing: bool, pad_id: int,
               pad_side: str = "right"):
    if packing and pad_side != "right":
      raise ValueError("packed rows are right-padded; set data.pad_side='right' or "
                       "data.packing=False")
    self.shards, self.length, self.pad_id, self.pad_side = split, length, pad_id, pad_side
    self.windows = make_windows([int(n) for n in split.doc_lengths()], length)
    self.rows = packing_lib.greedy_rows(self.windows[:, 2], length, packing)
    if not self.rows:
      raise ValueError("this split has no window with a target (all documents shorter "
                       "than 2 tokens)")

  def __len__(self):
    return len(self.rows)

  def window(self, w: int):
    """(tokens, mask) of window `w`; the mask is all ones where the shards have none."""
    toks, mask = self.shards.doc(*(int(v) for v in self.windows[w]))
    return toks, np.ones(toks.shape, np.uint8) if mask is None else mask

  def row_arrays(self, rows):
    """ids, token loss mask and segment ids, each (len(rows), length)."""
    pieces = [[self.window(w) for w in self.rows[row]] for row in rows]
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

def _tokenizer(config, workdir: str, train_docs) -> tokenizer.Tokenizer:
  d = config.data
  specials = dict(pad_token=d.pad_token, bos_token=d.bos_token, eos_token=d.eos_token)
  if d.tokenizer:
    return tokenizer.Tokenizer.load(os.path.expanduser(d.tokenizer), **specials)
  path = os.path.join(workdir, TOKENIZER_FILE)
  if not os.path.exists(path):
    tokenizer.save_atomic(tokenizer.train_bpe(
        train_docs, d.vocab_size, (d.pad_token, d.bos_token, d.eos_token)), path)
  return tokenizer.Tokenizer.load(path, **specials)


def build(config, workdir: str):
  """(tokenizer, {split: ShardSplit}, val documents) for `config`: the tokenizer and
  token shards are built once in `workdir` and reused while the inputs match."""
  d = config.data
  docs, text_hash = read_documents(d.path, d.doc_separator)
  train_docs, val_docs = split_documents(docs, d.val_fraction, d.split_seed)
  tok = _tokenizer(config, workdir, train_docs)
  fingerprint = {"text_sha256": text_hash, "tokenizer_sha256": tok.sha256,
                 "doc_separator": d.doc_separator, "val_fraction": d.val_fraction,
                 "split_seed": d.split_seed}
  out = os.path.join(workdir, DATA_DIR)
  if not os.path.exists(out):
    shards.write_dataset(
        out, {name: ([tok.encode_document(t) for t in texts], None)
              for name, texts in (("train", train_docs), ("val", val_docs))},
        vocab_size=tok.vocab_size, pad_id=tok.pad_id, kind="text", tokenizer_file=tok.path,
        shard_tokens=d.shard_tokens,
        extra={"fingerprint": fingerprint, "bos_id": tok.bos_id, "eos_id": tok.eos_id,
               "source": os.path.abspath(os.path.expanduser(d.path))})
  saved = shards.read_meta(out).get("fingerprint") or {}
  if saved != fingerprint:
    diff = sorted(k for k in fingerprint if saved.get(k) != fingerprint[k])
    raise ValueError(f"the token shards in {out} were built from other inputs (differs: "
                     f"{', '.join(diff)}); the text or tokenizer changed since. Use a new "
                     f"--workdir")
  splits = {name: shards.ShardSplit(out, name, use_loss_mask=False) for name in ("train", "val")}
  return tok, splits, val_docs


def source(config, workdir: str | None) -> DataSource:
  d = config.data
  if not workdir:
    raise ValueError("corpus 'text' needs a workdir: its tokenizer and token shards are "
                     "built there (pass --workdir)")
  tok, splits, _ = build(config, workdir)
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
