"""What a preparation worker does with one chunk of input (data/corpus.py drives it).

Workers are spawned processes (never forked: a fork after the `tokenizers` thread pool
started can deadlock), each with TOKENIZERS_PARALLELISM=false, so one core runs one
worker; this module imports nothing heavier than numpy so that they start fast.

Per document, from its text (UTF-8; for already tokenized input, the text its ids decode
to), a 16-byte BLAKE2b digest gives
  * the de-duplication key: its first 8 bytes (exact duplicates share it);
  * the split: the document is held out when a hash of the digest keyed by
    `data.split_seed`, read as a number in [0, 1), is below `data.val_fraction`: a
    per-document decision, the same whatever the file order or number of workers;
  * the tokenizer sample: likewise, with another key, below the sampling rate.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import types

import numpy as np

from lmmask.data import inputs, tokenizer

ENCODE_BATCH_CHARS = 1 << 20   # text per encode_batch call: bounds a worker's transient memory
MAX_MESSAGES = 5               # bad-record messages a chunk reports (all are counted)
_STATE = {}                    # per process: the tokenizer a worker encodes with


def digest(text: str) -> bytes:
  return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def unit(dig: bytes, salt: bytes) -> float:
  """A number in [0, 1) drawn from a document digest and a salt."""
  h = hashlib.blake2b(dig, digest_size=8, key=salt).digest()
  return int.from_bytes(h, "little") / 2.0**64


def split_salt(seed: int) -> bytes:
  return b"split:%d" % seed


def sample_salt(seed: int) -> bytes:
  return b"sample:%d" % seed


@contextlib.contextmanager
def single_threaded():
  """TOKENIZERS_PARALLELISM=false for the block (the in-process worker of data.workers=1)."""
  old = os.environ.get("TOKENIZERS_PARALLELISM")
  os.environ["TOKENIZERS_PARALLELISM"] = "false"
  try:
    yield
  finally:
    if old is None:
      os.environ.pop("TOKENIZERS_PARALLELISM", None)
    else:
      os.environ["TOKENIZERS_PARALLELISM"] = old


def init_worker() -> None:
  """Pool initializer: the tokenizers library single-threaded in this worker process."""
  os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _tokenizer(path: str):
  """The job's tokenizer, loaded once per worker."""
  if _STATE.get("path") != path:
    _STATE["tok"] = tokenizer.tokenizers_module().Tokenizer.from_file(path)
    _STATE["path"] = path
  return _STATE["tok"]


def _records(job):
  """(documents, bad messages, bad count) of a job's chunk."""
  s = types.SimpleNamespace(**job["settings"])
  docs, bad, n_bad = [], [], 0
  for rec, err in inputs.read_chunk(job["input"], job["chunk"], s, s.eos_id, job["data"]):
    if err is not None:
      n_bad += 1
      if len(bad) < MAX_MESSAGES:
        bad.append(err)
    else:
      docs.append(rec)
  return docs, bad, n_bad


def _texts_of_ids(tok, docs, vocab_size: int, where: str, bad: list):
  """Texts of already tokenized documents (for their digests), or None for bad ones."""
  out = []
  for i, ids in enumerate(docs):
    if ids.size and (ids.max() >= vocab_size):
      bad.append(f"{where}: document {i}: id {int(ids.max())} >= the tokenizer's vocabulary "
                 f"size {vocab_size}; data.tokenizer must be the tokenizer of these ids")
      out.append(None)
      continue
    out.append(tok.decode(ids.tolist(), skip_special_tokens=False))
  return out


def sample(job) -> dict:
  """The chunk's training documents drawn for the tokenizer sample."""
  s = job["settings"]
  docs, bad, n_bad = _records(job)
  texts, keys = [], []
  ssalt, vsalt = sample_salt(s["split_seed"]), split_salt(s["split_seed"])
  for t in docs:
    dig = digest(t)
    if unit(dig, vsalt) < s["val_fraction"] or unit(dig, ssalt) >= job["rate"]:
      continue
    texts.append(t)
    keys.append(int.from_bytes(dig[:8], "little"))
  return {"texts": texts, "keys": keys, "bad": bad, "n_bad": n_bad}


def _encode_texts(tok, texts):
  """(flat uint32 ids, per-document counts) of `texts`, in batches."""
  ids, counts = [], []
  for batch in _batches(texts):
    encs = tok.encode_batch_fast(batch, add_special_tokens=False)
    lists = [e.ids for e in encs]
    n = np.fromiter(map(len, lists), np.int64, count=len(lists))
    ids.append(np.fromiter(itertools.chain.from_iterable(lists), np.uint32, count=int(n.sum())))
    counts.append(n)
  if not ids:
    return np.zeros(0, np.uint32), np.zeros(0, np.int64)
  return np.concatenate(ids), np.concatenate(counts)


def _batches(texts):
  batch, size = [], 0
  for t in texts:
    batch.append(t)
    size += len(t)
    if size >= ENCODE_BATCH_CHARS:
      yield batch
      batch, size = [], 0
  if batch:
    yield batch


def with_specials(ids: np.ndarray, counts: np.ndarray, bos: int, eos: int):
  """<bos> ids <eos> for every document: (flat ids, lengths)."""
  lengths = counts + 2
  total = int(lengths.sum())
  out = np.empty(total, np.uint32)
  starts = np.zeros(len(lengths), np.int64)
  np.cumsum(lengths[:-1], out=starts[1:])
  inner = np.ones(total, bool)
  inner[starts] = False
  inner[starts + lengths - 1] = False
  out[starts] = bos
  out[starts + lengths - 1] = eos
  out[inner] = ids
  return out, lengths


def encode(job) -> dict:
  """Tokens, lengths, de-duplication keys and split of every document of the chunk."""
  s = job["settings"]
  tok = _tokenizer(job["tokenizer"])
  docs, bad, n_bad = _records(job)
  if job["input"].fmt in ("npy", "bin"):
    before = len(bad)
    texts = _texts_of_ids(tok, docs, s["vocab_size"], job["input"].path, bad)
    n_bad += len(bad) - before
    del bad[MAX_MESSAGES:]
    keep = [i for i, t in enumerate(texts) if t is not None]
    texts = [texts[i] for i in keep]
    counts = np.fromiter((docs[i].size for i in keep), np.int64, count=len(keep))
    ids = (np.concatenate([docs[i] for i in keep]).astype(np.uint32) if keep
           else np.zeros(0, np.uint32))
  else:
    texts = docs
    ids, counts = _encode_texts(tok, texts)
  digests = [digest(t) for t in texts]
  vsalt = split_salt(s["split_seed"])
  keys = np.fromiter((int.from_bytes(g[:8], "little") for g in digests), np.uint64,
                     count=len(digests))
  val = np.fromiter((unit(g, vsalt) < s["val_fraction"] for g in digests), bool,
                    count=len(digests))
  tokens, lengths = with_specials(ids, counts, s["bos_id"], s["eos_id"])
  return {"tokens": tokens, "lengths": lengths, "keys": keys, "val": val, "bad": bad,
          "n_bad": n_bad, "chars": sum(map(len, texts))}


def run(job) -> dict:
  """Entry point of a pool task."""
  return sample(job) if job["mode"] == "sample" else encode(job)
