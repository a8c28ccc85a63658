"""The one token/mask shard format: writer, memory-mapped reader, validation.

On-disk layout of a dataset directory (format version 1)::

    <path>/meta.json            vocab size, pad id, tokenizer file + sha256, kind,
                                format version, per-split token/doc counts and shards
    <path>/tokenizer.json       the tokenizer the ids come from (see data/prepare.py)
    <path>/<split>/shard_000.bin        token ids, little-endian, flat: uint16 when the
                                        vocabulary fits (meta "token_dtype"), else uint32
    <path>/<split>/shard_000_mask.bin   uint8, same length: 1 = this token may count
                                        as a target, 0 = context only; absent (meta
                                        "mask": null) for text, where every token counts
    <path>/<split>/docs.npy     int64 (num_docs, 3): (shard, start, length) of every
                                document (one conversation, or one plain-text doc)

A document never straddles two shards. A text corpus prepared by data/corpus.py
has no mask shards; datasets of ``--mode=prepare`` keep all-ones ones for text.
Every shard written by data/corpus.py carries its sha256 in meta.json, checked when
preparation resumes (`verify`); its size is checked on every open. This is the one
token/mask format: chat and text datasets
made by ``--mode=prepare`` and the shards a text run writes into
``<workdir>/data`` (kind "text"). Text workdirs written before that used one
meta.json per split (``<path>/<split>/meta.json``, format
"lmmask-token-shards-v1") over the same binaries; `read_meta` still reads them.

The corpus "shards" (`source`) turns whole documents into rows: every row is
ONE document from its first token, right-padded to ``data.length`` -- never a
window that crosses a document boundary or starts mid-turn, so no token can
attend to another conversation. The token mask is shifted exactly like the
targets (``loss_mask[:, t]`` is the mask of ``targets[:, t] = ids[:, t + 1]``).
The batch of training step ``k`` is a pure function of (seed, k)
(`pipeline.batch_indices`), so a resumed run continues with batch ``k``.
(The corpus "text", data/text.py, cuts the same shards into windows instead.)
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import warnings
from typing import Iterable, Sequence

import numpy as np

from lmmask.batching import Batch, batch_from_ids
from lmmask.data import hf_tokenizer, pipeline, tokenizer
from lmmask.data.source import SPLITS, DataSource
from lmmask.data.tokenizer import TOKENIZER_FILE, sha256_file

FORMAT_VERSION = 1
META_FILE = "meta.json"
LEGACY_SPLIT_FORMAT = "lmmask-token-shards-v1"  # per-split meta.json of older text workdirs
INDEX_FILE = "docs.npy"
TOKEN_DTYPE = np.dtype("<u4")      # what write_dataset writes and older datasets hold
TOKEN_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
MASK_DTYPE = np.dtype("u1")
DENSITY_RANGE = (0.1, 0.9)   # a loss-mask density outside this range earns a warning


def token_dtype_name(vocab_size: int) -> str:
  """uint16 when every id of the vocabulary fits, else uint32."""
  return "uint16" if vocab_size <= 1 << 16 else "uint32"


def shard_file(i: int) -> str:
  return f"shard_{i:03d}.bin"


def mask_file(i: int) -> str:
  return f"shard_{i:03d}_mask.bin"


# ---------------------------------------------------------------------------
# Writing.

def _check_doc(i, toks, mask):
  toks = np.asarray(toks)
  if toks.ndim != 1 or toks.size == 0:
    raise ValueError(f"document {i} must be a non-empty 1-D list of token ids, got shape "
                     f"{toks.shape}")
  if not np.issubdtype(toks.dtype, np.integer) or toks.min() < 0 or toks.max() >= 2**32:
    raise ValueError(f"document {i}: token ids must be integers in [0, 2**32)")
  if mask is None:
    mask = np.ones(toks.shape, MASK_DTYPE)
  mask = np.asarray(mask)
  if mask.shape != toks.shape:
    raise ValueError(f"document {i}: mask has {mask.size} entries for {toks.size} tokens")
  if not np.isin(mask, (0, 1)).all():
    raise ValueError(f"document {i}: mask values must be 0 or 1, found "
                     f"{sorted(set(np.unique(mask).tolist()) - {0, 1})[:5]}")
  return toks.astype(TOKEN_DTYPE), mask.astype(MASK_DTYPE)


def write_split(split_dir: str, docs: Iterable[Sequence[int]],
                masks: Iterable[Sequence[int]] | None = None, *,
                shard_tokens: int = 1 << 24) -> dict:
  """Write documents (and aligned 0/1 masks; None = all ones) as shards + index.

  A new shard starts when the next document would push the current one past
  ``shard_tokens`` tokens (a longer document gets a shard of its own).
  Returns the split's summary for meta.json.
  """
  if shard_tokens < 1:
    raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
  os.makedirs(split_dir, exist_ok=True)
  docs = list(docs)
  masks = [None] * len(docs) if masks is None else list(masks)
  if len(masks) != len(docs):
    raise ValueError(f"{len(masks)} masks for {len(docs)} documents; they must be aligned")
  if not docs:
    raise ValueError(f"no documents to write into {split_dir}")
  index, shards = [], []
  cur_t, cur_m, cur_len = [], [], 0
  counted = 0

  def flush():
    nonlocal cur_t, cur_m, cur_len
    i = len(shards)
    t, m = np.concatenate(cur_t), np.concatenate(cur_m)
    t.tofile(os.path.join(split_dir, shard_file(i)))
    m.tofile(os.path.join(split_dir, mask_file(i)))
    shards.append({"tokens": shard_file(i), "mask": mask_file(i), "num_tokens": int(t.size)})
    cur_t, cur_m, cur_len = [], [], 0

  for i, (d, m) in enumerate(zip(docs, masks)):
    t, m = _check_doc(i, d, m)
    if cur_len and cur_len + t.size > shard_tokens:
      flush()
    index.append((len(shards), cur_len, t.size))
    cur_t.append(t)
    cur_m.append(m)
    cur_len += t.size
    counted += int(m.sum())
  flush()
  np.save(os.path.join(split_dir, INDEX_FILE), np.asarray(index, dtype=np.int64))
  total = sum(s["num_tokens"] for s in shards)
  return {"num_docs": len(docs), "num_tokens": total, "num_mask_tokens": counted,
          "mask_density": counted / total, "shards": shards,
          "max_doc_tokens": int(max(r[2] for r in index))}


def write_dataset(path: str, splits: dict, *, vocab_size: int, pad_id: int, kind: str,
                  tokenizer_file: str | None = None, extra: dict | None = None,
                  shard_tokens: int = 1 << 24, overwrite: bool = False) -> dict:
  """Write a whole dataset directory atomically.

  ``splits`` maps a split name to ``(docs, masks)``. Everything is written into
  a temporary sibling directory that is renamed into place at the end, so a
  crash never leaves a half-written dataset at ``path``. An existing ``path`` is
  refused unless ``overwrite``.
  """
  path = os.path.abspath(path)
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"dataset directory {path} already exists; choose another path "
                          f"or delete it first (it is never overwritten silently)")
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.tmp-")
  try:
    meta = {"format_version": FORMAT_VERSION, "kind": kind, "vocab_size": int(vocab_size),
            "pad_id": int(pad_id), "token_dtype": "uint32", "mask_dtype": "uint8",
            "index_file": INDEX_FILE, "tokenizer": None, "tokenizer_sha256": None,
            "splits": {}, **(extra or {})}
    if tokenizer_file is not None:
      shutil.copyfile(tokenizer_file, os.path.join(tmp, TOKENIZER_FILE))
      meta["tokenizer"] = TOKENIZER_FILE
      meta["tokenizer_sha256"] = sha256_file(tokenizer_file)
    for name, (docs, masks) in splits.items():
      meta["splits"][name] = write_split(os.path.join(tmp, name), docs, masks,
                                         shard_tokens=shard_tokens)
    with open(os.path.join(tmp, META_FILE), "w") as f:
      json.dump(meta, f, indent=2, sort_keys=True)
      f.write("\n")
    if os.path.exists(path):
      shutil.rmtree(path)
    os.replace(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return meta


# ---------------------------------------------------------------------------
# Reading and validation.

def _legacy_split_meta(path: str) -> dict | None:
  """The root meta of an older text workdir's `<path>/data` (one meta.json per split,
  same binaries), or None when `path` is not laid out that way."""
  names = sorted(n for n in os.listdir(path) if os.path.exists(os.path.join(path, n, META_FILE)))
  if not names:
    return None
  splits, first = {}, None
  for name in names:
    with open(os.path.join(path, name, META_FILE)) as fh:
      m = json.load(fh)
    if m.get("format") != LEGACY_SPLIT_FORMAT:
      raise ValueError(f"{path}/{name}/{META_FILE} has format {m.get('format')!r}, expected "
                       f"{LEGACY_SPLIT_FORMAT!r}; this is not an lmmask token-shard directory")
    if first is not None and m["fingerprint"] != first["fingerprint"]:
      raise ValueError(f"the splits in {path} were built from different inputs; use a new "
                       f"--workdir")
    first = first or m
    shard_list = [{"tokens": s + ".bin", "mask": s + "_mask.bin",
                   "num_tokens": _file_len(os.path.join(path, name, s + ".bin"), TOKEN_DTYPE)}
                  for s in m["shards"]]
    splits[name] = {"num_docs": m["num_docs"], "num_tokens": m["num_tokens"],
                    "shards": shard_list}
  return {"format_version": FORMAT_VERSION, "kind": "text", "vocab_size": first["vocab_size"],
          "pad_id": first["pad_id"], "bos_id": first["bos_id"], "eos_id": first["eos_id"],
          "token_dtype": "uint32", "mask_dtype": "uint8", "index_file": INDEX_FILE,
          "tokenizer": None, "tokenizer_sha256": first["fingerprint"]["tokenizer_sha256"],
          "fingerprint": first["fingerprint"], "source": first["source"],
          "layout": "per-split meta.json", "splits": splits}


def read_meta(path: str) -> dict:
  """A dataset's meta.json (older per-split text layouts are converted in memory)."""
  f = os.path.join(path, META_FILE)
  if not os.path.exists(f) and os.path.isdir(path):
    legacy = _legacy_split_meta(path)
    if legacy is not None:
      return legacy
  if not os.path.exists(f):
    raise FileNotFoundError(f"no {META_FILE} in {path}: not a shard dataset. Create one with "
                            f"`python launch.py --mode=prepare --config=...`")
  with open(f) as fh:
    meta = json.load(fh)
  if meta.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{f}: format_version={meta.get('format_version')!r}, this code reads "
                     f"version {FORMAT_VERSION}; re-run prepare")
  return meta


def _file_len(path: str, dtype: np.dtype) -> int:
  size = os.path.getsize(path)
  if size % dtype.itemsize:
    raise ValueError(f"{path}: {size} bytes is not a whole number of {dtype} values "
                     f"(truncated write?); re-run prepare")
  return size // dtype.itemsize


class ShardSplit:
  """One split of a dataset, memory-mapped and validated on open.

  Validation (each a clear error or warning):
    * a mask shard whose length differs from its token shard -> ValueError naming
      the shard and both lengths (whether or not the masks are used);
    * mask values other than 0/1 -> ValueError;
    * ``use_loss_mask=True`` with missing mask shards -> ValueError listing every
      expected file;
    * ``use_loss_mask=True`` and a mask density outside 0.1-0.9 -> UserWarning
      with the measured density.
  """

  def __init__(self, path: str, split: str, *, use_loss_mask: bool):
    self.path, self.split, self.use_loss_mask = path, split, bool(use_loss_mask)
    self.meta = read_meta(path)
    if split not in self.meta["splits"]:
      raise ValueError(f"split {split!r} not in {path}; it has "
                       f"{sorted(self.meta['splits'])}")
    info = self.meta["splits"][split]
    d = os.path.join(path, split)
    self.tokens, masks, missing = [], [], []
    dtype = TOKEN_DTYPES[self.meta.get("token_dtype", "uint32")]
    for i, s in enumerate(info["shards"]):
      tpath = os.path.join(d, s["tokens"])
      mpath = os.path.join(d, s["mask"]) if s.get("mask") else None
      if not os.path.exists(tpath):
        raise FileNotFoundError(f"token shard {tpath} listed in {META_FILE} is missing")
      n_tok = _file_len(tpath, dtype)
      if n_tok != s["num_tokens"]:
        raise ValueError(f"{tpath} holds {n_tok} tokens but {META_FILE} says "
                         f"{s['num_tokens']}; the dataset is damaged, re-run prepare")
      self.tokens.append(np.memmap(tpath, dtype=dtype, mode="r", shape=(n_tok,)) if n_tok
                         else np.zeros(0, dtype))
      if mpath is None:
        masks.append(None)
        continue
      if not os.path.exists(mpath):
        missing.append(mpath)
        masks.append(None)
        continue
      n_mask = _file_len(mpath, MASK_DTYPE)
      if n_mask != n_tok:
        raise ValueError(f"mask shard {mpath} has {n_mask} entries but its token shard "
                         f"{tpath} has {n_tok} tokens; they must be aligned one to one. "
                         f"Regenerate the masks with prepare.")
      m = np.memmap(mpath, dtype=MASK_DTYPE, mode="r", shape=(n_mask,))
      if n_mask and int(m.max()) > 1:
        bad = np.unique(m[m > 1])[:5].tolist()
        first = int(np.argmax(m > 1))
        raise ValueError(f"mask shard {mpath} holds values {bad} (first at position "
                         f"{first}); a loss mask must be 0 (context) or 1 (target)")
      masks.append(m)
    if self.use_loss_mask and missing:
      raise ValueError(f"data.use_loss_mask=True but {len(missing)} of {len(masks)} mask "
                       f"shard(s) are missing; expected: {missing}. Create them with prepare, "
                       f"or set data.use_loss_mask=False to count every token.")
    if self.use_loss_mask and info["shards"] and not info["shards"][0].get("mask"):
      raise ValueError(f"data.use_loss_mask=True but {path}/{split} has no mask shards (a "
                       f"text corpus: every token counts); set data.use_loss_mask=False")
    self.masks = None if missing or any(m is None for m in masks) else masks
    self.index = np.load(os.path.join(d, INDEX_FILE), mmap_mode="r")
    if self.index.ndim != 2 or self.index.shape[1] != 3 or len(self.index) != info["num_docs"]:
      raise ValueError(f"{os.path.join(d, INDEX_FILE)} has shape {self.index.shape}, expected "
                       f"({info['num_docs']}, 3); re-run prepare")
    ends = self.index[:, 1] + self.index[:, 2]
    sizes = np.array([t.size for t in self.tokens], np.int64)[self.index[:, 0]]
    if (self.index[:, 2] < 1).any() or (ends > sizes).any():
      raise ValueError(f"{INDEX_FILE} of {path}/{split} points outside its shards; "
                       f"re-run prepare")
    self.density = None
    if self.masks is not None:
      total = sum(t.size for t in self.tokens)
      self.density = sum(int(m.sum(dtype=np.int64)) for m in self.masks) / max(total, 1)
      lo, hi = DENSITY_RANGE
      if self.use_loss_mask and not lo <= self.density <= hi:
        warnings.warn(f"{path}/{split}: loss-mask density is {self.density:.3f}, outside "
                      f"{lo}-{hi}: {'almost no' if self.density < lo else 'almost every'} "
                      f"token counts as a target. Check the mask rules (or use "
                      f"data.use_loss_mask=False for plain text).", UserWarning, stacklevel=2)

  def __len__(self) -> int:
    return len(self.index)

  @property
  def num_tokens(self) -> int:
    return int(sum(t.size for t in self.tokens))

  def doc(self, i: int, offset: int = 0, n: int | None = None):
    """(tokens int64, mask uint8 or None) of document ``i``, or of its ``n`` tokens
    from ``offset`` (a window: only those are read from the shard)."""
    s, start, size = (int(x) for x in self.index[i])
    start, n = start + offset, size - offset if n is None else n
    toks = np.asarray(self.tokens[s][start:start + n], dtype=np.int64)
    mask = None if self.masks is None else np.asarray(self.masks[s][start:start + n])
    return toks, mask

  def doc_lengths(self) -> np.ndarray:
    return self.index[:, 2]


def verify(path: str) -> list[str]:
  """Every shard of a dataset whose size or sha256 differs from its meta.json entry
  (shards written without a sha256 are checked by size only)."""
  meta = read_meta(path)
  dtype = TOKEN_DTYPES[meta.get("token_dtype", "uint32")]
  bad = []
  for name, info in meta["splits"].items():
    for s in info["shards"]:
      f = os.path.join(path, name, s["tokens"])
      if not os.path.exists(f) or os.path.getsize(f) != s["num_tokens"] * dtype.itemsize:
        bad.append(f)
      elif s.get("sha256") and sha256_file(f) != s["sha256"]:
        bad.append(f)
  return bad


# ---------------------------------------------------------------------------
# Batches.

@dataclasses.dataclass
class ShardLoader:
  """Whole-document rows, right-padded to ``length``; batch ``k`` = f(seed, k)."""
  split: ShardSplit
  length: int
  batch_size: int
  seed: int
  use_loss_mask: bool
  pad_id: int
  vocab_size: int | None = None

  def __post_init__(self):
    if self.use_loss_mask and self.split.masks is None:
      raise ValueError("use_loss_mask=True needs the split's mask shards (open the split "
                       "with use_loss_mask=True to see which are missing)")
    lengths = self.split.doc_lengths()
    long = lengths > self.length
    if long.any():
      raise ValueError(f"{int(long.sum())} document(s) of {self.split.path}/{self.split.split} "
                       f"have more than data.length={self.length} tokens (longest "
                       f"{int(lengths.max())}); rows are whole documents, never cut. Raise "
                       f"data.length (and model.max_len) or drop long documents with "
                       f"prepare.max_tokens.")
    if (lengths < 2).any():
      raise ValueError("documents need >= 2 tokens (an input and a target)")

  def rows(self, doc_ids, num_rows: int | None = None) -> Batch:
    """One row per document, right-padded; ``num_rows`` > len(doc_ids) adds pad rows
    (which count nothing)."""
    n = len(doc_ids) if num_rows is None else num_rows
    ids = np.full((n, self.length), self.pad_id, dtype=np.int64)
    tlm = np.zeros((n, self.length), dtype=np.uint8)
    for r, i in enumerate(doc_ids):
      toks, mask = self.split.doc(int(i))
      if (toks == self.pad_id).any():
        raise ValueError(f"document {i} contains pad_id={self.pad_id}; it would be read as "
                         f"padding. Re-run prepare with a tokenizer that reserves the pad id")
      ids[r, :toks.size] = toks
      tlm[r, :toks.size] = 1 if mask is None else mask
    return batch_from_ids(ids, pad_id=self.pad_id,
                          token_loss_mask=tlm if self.use_loss_mask else None,
                          vocab_size=self.vocab_size)

  def doc_ids(self, step: int) -> np.ndarray:
    return pipeline.batch_indices(len(self.split), self.batch_size, step, self.seed)

  def batch(self, step: int, rows=None) -> Batch:
    """The training batch of 0-based step ``step`` (independent of any earlier call);
    rows=(lo, hi) builds only those rows of it."""
    return self.rows(self.doc_ids(step)[slice(*(rows or (None, None)))])

  def eval_batches(self, batch_size: int, max_docs: int | None = None):
    """Fixed-shape batches covering the first ``max_docs`` documents once; the last
    one is filled with pad rows, which count nothing."""
    n = len(self.split) if not max_docs else min(max_docs, len(self.split))
    return [self.rows(range(start, min(start + batch_size, n)), num_rows=batch_size)
            for start in range(0, n, batch_size)]


# ---------------------------------------------------------------------------
# The corpus "shards" (lmmask/data/registry.py): a dataset made by --mode=prepare.

def source(config, workdir: str | None = None) -> DataSource:
  """Whole-document rows of the dataset at config.data.path (`workdir` is unused:
  the data lives where prepare wrote it)."""
  del workdir
  d = config.data
  if not d.path:
    raise ValueError("config.data.path is empty: point it at a dataset directory made by "
                     "`launch.py --mode=prepare`")
  meta = read_meta(d.path)
  use = bool(d.use_loss_mask)
  train = ShardSplit(d.path, d.train_split, use_loss_mask=use)
  val = ShardSplit(d.path, d.val_split, use_loss_mask=use)
  kw = dict(length=d.length, batch_size=d.batch_size, seed=config.seed,
            pad_id=meta["pad_id"], vocab_size=meta["vocab_size"])
  train_loader = ShardLoader(train, use_loss_mask=use, **kw)
  val_loader = ShardLoader(val, use_loss_mask=use, **kw)
  bs, cap = d.eval_batch_size, d.max_eval_docs

  def eval_sets():
    sets = {"train": train_loader.eval_batches(bs, cap),
            "val": val_loader.eval_batches(bs, cap)}
    if val.masks is not None:
      # The dataset's own target tokens (assistant turns for chat data), whatever
      # use_loss_mask says: the number to compare mask-on and mask-off runs by.
      sets["val_masked"] = ShardLoader(val, use_loss_mask=True, **kw).eval_batches(bs, cap)
    return sets
  # Exactly the dict model.json has always recorded for this corpus, so the
  # tokenizer comparison of train.init_from matches runs written before.
  identity = {"data_path": os.path.abspath(d.path), "kind": meta["kind"],
              "tokenizer_sha256": meta.get("tokenizer_sha256"),
              "vocab_size": meta["vocab_size"], "pad_id": meta["pad_id"],
              "train_mask_density": train.density}
  splits = {"train": train, "val": val}

  def documents(split: str) -> ShardSplit:
    if split not in splits:
      raise ValueError(f"split {split!r}: a shards corpus has {', '.join(SPLITS)} (data.train_split "
                       f"and data.val_split name their directories)")
    return splits[split]
  tok = None  # a dataset written without a tokenizer (tests) has no text side
  if meta.get("hf_tokenizer"):  # a pretrained model's (data/chat_jsonl.py), with its pad
    tok = hf_tokenizer.load_tokenizer_dir(d.path, pad_token=meta["pad_token"])
  elif meta.get("tokenizer"):  # prepare's tokenizers have the chat tags (text data too)
    chat = tokenizer.CHAT_END in meta.get("special_tokens", ())
    load = tokenizer.Tokenizer.load_chat if chat else tokenizer.Tokenizer.load
    tok = load(os.path.join(d.path, meta["tokenizer"]))
  return DataSource(name="shards", vocab_size=meta["vocab_size"], pad_id=meta["pad_id"],
                    train_batch=train_loader.batch, eval_sets=eval_sets, tokenizer=tok,
                    identity=identity, documents=documents,
                    # every row is one document from its first token, right-padded
                    # (config.validate refuses data.packing for this corpus)
                    keys_are_prefix=d.pad_side == "right",
                    # eval sets stop at data.max_eval_docs and may count masked targets only
                    train_eval_whole=False)
