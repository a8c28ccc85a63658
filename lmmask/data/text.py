"""Plain-text pre-training: documents -> byte-level BPE -> token shards -> windows.

Documents: every file under `data.path` (a file or a directory, read in sorted
order, symlinked and identical files once) is cut into documents at
`data.doc_separator` (default: blank lines, i.e. paragraphs; "" keeps each file
whole). Exact duplicate documents are dropped, then a seeded fraction of the
documents is held out for validation: the split is by document, never by line.

Tokenizer: a byte-level BPE trained with the `tokenizers` library on the
training documents only (vocabulary size from the config) and saved as
`<workdir>/tokenizer.json`, or an existing tokenizer.json named in the config.

Token shards (written once per workdir, into a temporary directory renamed into
place, then only memory-mapped):

  <workdir>/data/<split>/
    meta.json            format, vocab size, special ids, counts, shard names,
                         fingerprint of the inputs (text, tokenizer, settings)
    shard_000.bin        uint32 token ids, documents back to back, each one
                         <bos> tokens <eos>
    shard_000_mask.bin   uint8 per-token loss mask, aligned with the tokens
                         (all ones for pre-training; chat data would zero some)
    docs.npy             int64 (num_docs, 3): shard index, start, length

Windows: a document of n tokens gives windows of at most `data.length` tokens
starting every length-1 tokens, so each next-token pair is a target exactly once
and no window holds two documents. A full window fills a row; shorter windows
are packed several to a row (segment ids keep them apart and restart their
positions) or, with `data.pack=False`, padded one to a row.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile

import numpy as np

from lmmask import batching
from lmmask.data import pipeline
from lmmask.data.source import DataSource

FORMAT = "lmmask-token-shards-v1"
TOKENIZER_FILE = "tokenizer.json"
DATA_DIR = "data"


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
# Tokenizer.

@dataclasses.dataclass(frozen=True)
class Tokenizer:
  """A `tokenizers.Tokenizer` with the three ids lmmask uses."""
  tok: object
  pad_id: int
  bos_id: int
  eos_id: int
  path: str
  sha256: str

  @property
  def vocab_size(self) -> int:
    return self.tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    return self.tok.encode(text, add_special_tokens=False).ids

  def encode_document(self, text: str) -> list[int]:
    return [self.bos_id, *self.encode(text), self.eos_id]

  def decode(self, ids) -> str:
    return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)


def _sha256_file(path):
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def train_bpe(texts, vocab_size: int, path: str, special_tokens=("<pad>", "<bos>", "<eos>")):
  """Train a byte-level BPE on `texts` and save it (atomically) to `path`."""
  from tokenizers import Tokenizer as HFTokenizer
  from tokenizers import decoders, models, pre_tokenizers, trainers
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  if vocab_size < len(alphabet) + len(special_tokens):
    raise ValueError(f"data.vocab_size={vocab_size} is below the {len(alphabet)} byte "
                     f"symbols + {len(special_tokens)} special tokens a byte-level BPE needs")
  tok = HFTokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                initial_alphabet=alphabet, show_progress=False)
  tok.train_from_iterator(list(texts), trainer)
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp_tok_", suffix=".json")
  os.close(fd)
  try:
    tok.save(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


def load_tokenizer(path: str, *, pad_token: str, bos_token: str, eos_token: str) -> Tokenizer:
  from tokenizers import Tokenizer as HFTokenizer
  if not os.path.isfile(path):
    raise ValueError(f"tokenizer file {path!r} does not exist; set data.tokenizer to a "
                     f"tokenizer.json, or to '' to train one")
  tok = HFTokenizer.from_file(path)
  ids = {}
  for role, token in (("pad", pad_token), ("bos", bos_token), ("eos", eos_token)):
    i = tok.token_to_id(token)
    if i is None:
      raise ValueError(f"tokenizer {path} has no {role} token {token!r}; set "
                       f"data.{role}_token to one of its special tokens")
    ids[role] = i
  return Tokenizer(tok=tok, pad_id=ids["pad"], bos_id=ids["bos"], eos_id=ids["eos"],
                   path=path, sha256=_sha256_file(path))


# ---------------------------------------------------------------------------
# Token shards.

def write_shards(out_dir: str, docs_ids, *, meta: dict, shard_tokens: int = 1 << 26,
                 masks=None) -> None:
  """Write token/mask shards, docs.npy and meta.json into `out_dir` (must not exist)."""
  if os.path.exists(out_dir):
    raise ValueError(f"{out_dir} already exists; token shards are written once")
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp_shards_")
  try:
    shards, index = [], []
    buf, mbuf, count = [], [], 0

    def flush():
      nonlocal buf, mbuf, count
      name = f"shard_{len(shards):03d}"
      np.concatenate(buf).astype(np.uint32).tofile(os.path.join(tmp, name + ".bin"))
      np.concatenate(mbuf).astype(np.uint8).tofile(os.path.join(tmp, name + "_mask.bin"))
      shards.append(name)
      buf, mbuf, count = [], [], 0

    for i, ids in enumerate(docs_ids):
      ids = np.asarray(ids, np.uint32)
      m = np.ones(len(ids), np.uint8) if masks is None else np.asarray(masks[i], np.uint8)
      if m.shape != ids.shape:
        raise ValueError(f"mask of document {i} has {m.shape[0]} entries for {len(ids)} tokens")
      if count and count + len(ids) > shard_tokens:
        flush()
      index.append((len(shards), count, len(ids)))
      buf.append(ids)
      mbuf.append(m)
      count += len(ids)
    if buf:
      flush()
    np.save(os.path.join(tmp, "docs.npy"), np.asarray(index, np.int64).reshape(-1, 3))
    full = dict(meta, format=FORMAT, shards=shards, num_docs=len(index),
                num_tokens=int(sum(n for _, _, n in index)))
    with open(os.path.join(tmp, "meta.json"), "w") as f:
      json.dump(full, f, indent=2, sort_keys=True)
    os.replace(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


class TokenShards:
  """Memory-mapped shards: `doc(i)` -> uint32 tokens, `doc_mask(i)` -> uint8 mask."""

  def __init__(self, directory: str):
    path = os.path.join(directory, "meta.json")
    if not os.path.exists(path):
      raise FileNotFoundError(f"no meta.json in {directory}: not a token-shard directory")
    with open(path) as f:
      self.meta = json.load(f)
    if self.meta.get("format") != FORMAT:
      raise ValueError(f"{directory} has format {self.meta.get('format')!r}, expected {FORMAT}")
    self.tokens = [np.memmap(os.path.join(directory, s + ".bin"), dtype=np.uint32, mode="r")
                   for s in self.meta["shards"]]
    self.masks = [np.memmap(os.path.join(directory, s + "_mask.bin"), dtype=np.uint8, mode="r")
                  for s in self.meta["shards"]]
    self.docs = np.load(os.path.join(directory, "docs.npy"), mmap_mode="r")

  def __len__(self):
    return self.docs.shape[0]

  def doc(self, i):
    s, start, n = (int(v) for v in self.docs[i])
    return self.tokens[s][start:start + n]

  def doc_mask(self, i):
    s, start, n = (int(v) for v in self.docs[i])
    return self.masks[s][start:start + n]


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


def pack_rows(window_lengths, length: int, pack: bool) -> list[list[int]]:
  """Rows of window indices: greedy in order, several short windows per row if `pack`."""
  rows, cur, used = [], [], 0
  for w, n in enumerate(window_lengths):
    if cur and (not pack or used + n > length):
      rows.append(cur)
      cur, used = [], 0
    cur.append(w)
    used += int(n)
  if cur:
    rows.append(cur)
  return rows


class TextSplit:
  """One split: shards + windows + rows, and (B, L) batches of given rows."""

  def __init__(self, shards: TokenShards, *, length: int, pack: bool, pad_id: int,
               pad_side: str = "right"):
    if pack and pad_side != "right":
      raise ValueError("packed rows are right-padded; set data.pad_side='right' or "
                       "data.pack=False")
    self.shards, self.length, self.pad_id, self.pad_side = shards, length, pad_id, pad_side
    lengths = [int(n) for n in shards.docs[:, 2]]
    self.windows = make_windows(lengths, length)
    self.rows = pack_rows(self.windows[:, 2], length, pack)
    if not self.rows:
      raise ValueError("this split has no window with a target (all documents shorter "
                       "than 2 tokens)")

  def __len__(self):
    return len(self.rows)

  @property
  def num_targets(self) -> int:
    return int((self.windows[:, 2] - 1).sum())

  def row_arrays(self, rows):
    """ids, token loss mask and segment ids, each (len(rows), length)."""
    b, L = len(rows), self.length
    ids = np.full((b, L), self.pad_id, np.int64)
    tlm = np.zeros((b, L), np.uint8)
    seg = np.zeros((b, L), np.int32)
    for r, row in enumerate(rows):
      used = sum(int(self.windows[w, 2]) for w in self.rows[row])
      at = L - used if self.pad_side == "left" else 0
      for s, w in enumerate(self.rows[row], start=1):
        d, start, n = (int(v) for v in self.windows[w])
        ids[r, at:at + n] = self.shards.doc(d)[start:start + n]
        tlm[r, at:at + n] = self.shards.doc_mask(d)[start:start + n]
        seg[r, at:at + n] = s
        at += n
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
# From the config to a DataSource.

def prepare(config, workdir: str):
  """Tokenizer and token shards for `config`, built once in `workdir` and reused."""
  d = config.data
  docs, text_hash = read_documents(d.path, d.doc_separator)
  train_docs, val_docs = split_documents(docs, d.val_fraction, d.split_seed)
  specials = dict(pad_token=d.pad_token, bos_token=d.bos_token, eos_token=d.eos_token)
  if d.tokenizer:
    tok_path = os.path.expanduser(d.tokenizer)
  else:
    tok_path = os.path.join(workdir, TOKENIZER_FILE)
    if not os.path.exists(tok_path):
      train_bpe(train_docs, d.vocab_size, tok_path,
                special_tokens=(d.pad_token, d.bos_token, d.eos_token))
  tok = load_tokenizer(tok_path, **specials)
  fingerprint = {"text_sha256": text_hash, "tokenizer_sha256": tok.sha256,
                 "doc_separator": d.doc_separator, "val_fraction": d.val_fraction,
                 "split_seed": d.split_seed}
  splits = {}
  for name, texts in (("train", train_docs), ("val", val_docs)):
    out = os.path.join(workdir, DATA_DIR, name)
    if not os.path.exists(out):
      write_shards(out, [tok.encode_document(t) for t in texts],
                   meta={"fingerprint": fingerprint, "vocab_size": tok.vocab_size,
                         "pad_id": tok.pad_id, "bos_id": tok.bos_id, "eos_id": tok.eos_id,
                         "source": os.path.abspath(os.path.expanduser(d.path)),
                         "split": name},
                   shard_tokens=d.shard_tokens)
    shards = TokenShards(out)
    if shards.meta["fingerprint"] != fingerprint:
      diff = sorted(k for k in fingerprint if shards.meta["fingerprint"].get(k) != fingerprint[k])
      raise ValueError(f"the token shards in {out} were built from other inputs (differs: "
                       f"{', '.join(diff)}); the text or tokenizer changed since. Use a new "
                       f"--workdir")
    splits[name] = shards
  return tok, splits


def load_text_data(config, workdir: str) -> DataSource:
  d = config.data
  tok, shards = prepare(config, workdir)
  kw = dict(length=d.length, pack=d.pack, pad_id=tok.pad_id, pad_side=d.pad_side)
  train, val = TextSplit(shards["train"], **kw), TextSplit(shards["val"], **kw)

  def train_batch(step: int):
    rows = pipeline.batch_indices(len(train), d.batch_size, step, config.seed)
    return train.batch(rows)

  def eval_sets():
    bs, mx = d.eval_batch_size, d.max_eval_batches
    return {"train": train.eval_batches(bs, mx), "val": val.eval_batches(bs, mx)}

  info = {"tokenizer": tok, "train": train, "val": val}
  return DataSource(vocab_size=tok.vocab_size, pad_id=tok.pad_id, train_batch=train_batch,
                    eval_sets=eval_sets, info=info)
