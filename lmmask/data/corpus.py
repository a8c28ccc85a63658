"""Preparing a text corpus: streaming, parallel, resumable, with bounded memory.

`build(config, workdir)` makes ``<workdir>/data`` (the token shards of data/shards.py,
kind "text") and, unless `data.tokenizer` names one, ``<workdir>/tokenizer.json``; or
reuses them when their fingerprint matches the config and the inputs. Steps:

1. Plan: the inputs (data/inputs.py) cut into chunks, the unit of work and of resumption.
2. Tokenizer: a byte-level BPE trained on a deterministic sample of at most
   `data.tokenizer_sample_bytes` of training documents (each drawn by a hash of its
   content at the rate that budget allows, streamed, never the corpus in memory).
3. Encode: one spawned worker per core (`data.workers`; data/encode.py) reads and
   tokenizes chunks with `tokenizers`' batch encoding; this process takes the results in
   chunk order, drops exact duplicates (an 8-byte content hash per document, kept in a
   sorted numpy array: the only state that grows with the corpus), routes each document
   to train or val by its hash, and writes the chunk's shards atomically (temporary file,
   fsync, rename). Token ids are uint16 when the vocabulary fits, else uint32; no mask.
4. Ledger: after each chunk a line of ``ledger.jsonl`` (the one fsync per chunk: what it
   describes is checked on resume) records its shards (size, sha256), counts and the
   de-duplication state. Everything lives in ``<workdir>/.data.partial``
   until the end; killed at any point and rerun, preparation checks the recorded shards
   (a damaged one is redone from its chunk on), drops what came after the last ledger
   line and goes on, ending with the same bytes as an uninterrupted run. The output
   depends only on the inputs and the settings, never on `data.workers`.
5. Finish: the document index (docs.npy) and meta.json (fingerprint, summary), then the
   directory is renamed to ``<workdir>/data``.

A record that cannot be read is named (file and line, or row group and row) and counted;
more than `data.max_bad_fraction` of bad documents stops the run with the inputs' first
errors, and removes what this preparation wrote.
"""
from __future__ import annotations

import collections
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from concurrent import futures

import numpy as np
import tqdm

from lmmask.data import encode, inputs, shards, tokenizer
from lmmask.data.tokenizer import TOKENIZER_FILE

DATA_DIR = "data"             # <workdir>/data: the run's token shards
PARTIAL = ".data.partial"     # <workdir>/.data.partial: a preparation under way
LEDGER = "ledger.jsonl"
STATE = "state.json"
DEDUP = "dedup.u64"
INDEX_PIECES = "index"
SPLITS = ("train", "val")
LAYOUT = 2                    # settings version of this preparation (part of the fingerprint)


class BadInput(ValueError):
  """Too many records of the corpus cannot be read (data.max_bad_fraction)."""


# ---------------------------------------------------------------------------
# De-duplication keys: 8 bytes a document, in a sorted array (+ a short unsorted tail).

class KeySet:
  """Set of uint64 keys: `admit` returns which keys of a batch are new (first occurrence
  within the batch and never seen before) and remembers them."""

  MERGE = 1 << 20

  def __init__(self, keys: np.ndarray | None = None):
    self.sorted = np.sort(np.asarray(keys if keys is not None else [], np.uint64))
    self.tail: list[np.ndarray] = []
    self.tail_size = 0

  def __len__(self):
    return self.sorted.size + self.tail_size

  def _seen(self, keys: np.ndarray) -> np.ndarray:
    seen = np.zeros(keys.size, bool)
    for arr in (self.sorted, *self.tail):
      if arr.size:
        i = np.searchsorted(arr, keys).clip(max=arr.size - 1)
        seen |= arr[i] == keys
    return seen

  def admit(self, keys: np.ndarray) -> np.ndarray:
    keys = np.asarray(keys, np.uint64)
    keep = np.zeros(keys.size, bool)
    if keys.size:
      keep[np.unique(keys, return_index=True)[1]] = True
      keep &= ~self._seen(keys)
    new = np.sort(keys[keep])
    if new.size:
      self.tail.append(new)
      self.tail_size += new.size
    if self.tail_size >= self.MERGE:
      self.sorted = np.sort(np.concatenate([self.sorted, *self.tail]))
      self.tail, self.tail_size = [], 0
    elif len(self.tail) > 32:  # few arrays to search: one sorted tail
      self.tail = [np.sort(np.concatenate(self.tail))]
    return keep


# ---------------------------------------------------------------------------
# Settings, fingerprint.

def workers(d) -> int:
  """data.workers, 0 meaning one per core this process may use."""
  n = int(d.workers)
  if n < 0:
    raise ValueError(f"data.workers must be >= 0 (0 = one per core), got {n}")
  if n:
    return n
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def settings(d) -> dict:
  """Everything in the config that changes the prepared bytes."""
  s = {"layout": LAYOUT, "doc_separator": d.doc_separator, "text_key": d.text_key,
       "val_fraction": d.val_fraction, "split_seed": d.split_seed,
       "chunk_bytes": d.chunk_bytes, "shard_tokens": d.shard_tokens,
       "specials": [d.pad_token, d.bos_token, d.eos_token]}
  if not d.tokenizer:
    s.update(vocab_size=d.vocab_size, tokenizer_sample_bytes=d.tokenizer_sample_bytes)
  return s


def listing(files) -> list:
  """(path, size, mtime) of every input: a cheap test that nothing changed."""
  out = []
  for f in files:
    st = os.stat(f.path)
    out.append([os.path.abspath(f.path), st.st_size, st.st_mtime_ns])
  return out


def inputs_sha256(paths) -> str:
  """sha256 over the sha256 of every input file's bytes, in order."""
  h = hashlib.sha256()
  for p in paths:
    h.update(bytes.fromhex(tokenizer.sha256_file(p)))
  return h.hexdigest()


def _check(d, **kw):
  if not 0.0 < d.val_fraction < 1.0:
    raise ValueError(f"data.val_fraction must be in (0, 1), got {d.val_fraction}")
  if not 0.0 <= d.max_bad_fraction < 1.0:
    raise ValueError(f"data.max_bad_fraction must be in [0, 1), got {d.max_bad_fraction}")
  for f in ("chunk_bytes", "shard_tokens", "tokenizer_sample_bytes"):
    if int(d[f]) < 1:
      raise ValueError(f"data.{f} must be >= 1, got {d[f]}")


# ---------------------------------------------------------------------------
# The entry point.

def build(config, workdir: str, *, progress: bool | None = None, verify: bool = False) -> dict:
  """The meta.json of ``<workdir>/data``, prepared here if needed (module docstring).
  `verify`: check an existing dataset's shards against their sha256 too (--mode=prepare)."""
  d = config.data
  _check(d)
  files = inputs.list_inputs(d.path)
  out = os.path.join(workdir, DATA_DIR)
  tok_path = tokenizer_path(d, workdir)
  if os.path.exists(out):
    meta = _reuse(d, out, files, tok_path)
    damaged = shards.verify(out) if verify else []
    if damaged:
      raise ValueError(f"{len(damaged)} shard(s) of {out} are damaged (size or sha256 differs "
                       f"from meta.json), e.g. {damaged[0]}; delete {out} and prepare again")
    return meta
  show = config.train.progress_bar if progress is None else progress
  existed = os.path.isdir(workdir)
  partial = os.path.join(workdir, PARTIAL)
  try:
    return _prepare(d, workdir, partial, files, show)
  except BadInput:
    shutil.rmtree(partial, ignore_errors=True)
    if not existed and os.path.isdir(workdir) and not os.listdir(workdir):
      os.rmdir(workdir)
    raise


def tokenizer_path(d, workdir: str) -> str:
  return os.path.expanduser(d.tokenizer) if d.tokenizer else os.path.join(workdir, TOKENIZER_FILE)


def load_tokenizer(d, path: str) -> tokenizer.Tokenizer:
  return tokenizer.Tokenizer.load(path, pad_token=d.pad_token, bos_token=d.bos_token,
                                  eos_token=d.eos_token)


def _reuse(d, out: str, files, tok_path: str) -> dict:
  """meta.json of an existing <workdir>/data, if it was built from these inputs."""
  meta = shards.read_meta(out)
  fp = meta.get("fingerprint") or {}
  if meta.get("layout") == "per-split meta.json" or "settings" not in fp:
    return _reuse_legacy(d, out, files, meta, tok_path)
  diff = [k for k, v in settings(d).items() if fp["settings"].get(k) != v]
  if not os.path.exists(tok_path) or tokenizer.sha256_file(tok_path) != fp["tokenizer_sha256"]:
    diff.append("tokenizer")
  if fp.get("listing") != listing(files) and \
      inputs_sha256([f.path for f in files]) != fp["inputs_sha256"]:
    diff.append("inputs")
  if diff:
    raise ValueError(f"the token shards in {out} were built from other inputs (differs: "
                     f"{', '.join(sorted(diff))}); the text, tokenizer or data settings "
                     f"changed since. Use a new --workdir")
  return meta


def _reuse_legacy(d, out, files, meta, tok_path) -> dict:
  """A workdir written before the streaming preparation: reused as it is while its
  recorded fingerprint (text hash of its UTF-8 files, tokenizer, split settings) holds."""
  fp = meta.get("fingerprint") or {}
  utf8 = []
  for f in files:
    try:
      with open(f.path, "rb") as fh:
        fh.read().decode("utf-8")
      utf8.append(f.path)
    except UnicodeDecodeError:
      continue
  want = {"text_sha256": inputs_sha256(utf8),
          "tokenizer_sha256": tokenizer.sha256_file(tok_path) if os.path.exists(tok_path) else None,
          "doc_separator": d.doc_separator, "val_fraction": d.val_fraction,
          "split_seed": d.split_seed}
  diff = sorted(k for k in want if fp.get(k) != want[k])
  if diff:
    raise ValueError(f"the token shards in {out} were built from other inputs (differs: "
                     f"{', '.join(diff)}); the text or tokenizer changed since. Use a new "
                     f"--workdir")
  return meta


# ---------------------------------------------------------------------------
# Preparation.

def _write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _write_atomic(path: str, arr: np.ndarray) -> None:
  tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp")
  with open(tmp, "wb") as f:
    arr.tofile(f)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _job_settings(d, tok) -> dict:
  return {"doc_separator": d.doc_separator, "text_key": d.text_key,
          "val_fraction": float(d.val_fraction), "split_seed": int(d.split_seed),
          "chunk_bytes": int(d.chunk_bytes),
          "eos_id": tok.eos_id if tok else None, "bos_id": tok.bos_id if tok else None,
          "vocab_size": tok.vocab_size if tok else None}


class _Workers:
  """`data.workers` spawned processes (one in this process when 1), kept for the sample
  and the encode passes; `results` runs jobs in order."""

  def __init__(self, n: int):
    self.n, self.pool = n, None

  def __enter__(self):
    if self.n > 1:  # a worker that dies fails the pool loudly instead of hanging it
      self.pool = futures.ProcessPoolExecutor(
          self.n, mp_context=multiprocessing.get_context("spawn"),
          initializer=encode.init_worker)
    return self

  def __exit__(self, *exc):
    if self.pool is not None:
      self.pool.shutdown(wait=True, cancel_futures=True)

  def results(self, jobs):
    """Results of `jobs` in order, at most 2 jobs ahead per worker (bounded memory)."""
    if self.pool is None:
      with encode.single_threaded():
        for job in jobs:
          yield encode.run(job)
      return
    pool, n_workers = self.pool, self.n
    pending = collections.deque()
    it = iter(jobs)
    try:
      for job in it:
        pending.append(pool.submit(encode.run, job))
        if len(pending) >= 2 * n_workers:
          break
      while pending:
        res = pending.popleft().result()
        job = next(it, None)
        if job is not None:
          pending.append(pool.submit(encode.run, job))
        yield res
    finally:
      for f in pending:
        f.cancel()


class _Bad:
  """Bad records: counted, the first few kept, the run stopped past the allowed share."""

  def __init__(self, d, n=0, messages=()):
    self.limit, self.n, self.messages = float(d.max_bad_fraction), n, list(messages)

  def add(self, res, docs_so_far: int):
    self.n += res["n_bad"]
    self.messages += res["bad"][:max(0, 5 - len(self.messages))]
    if self.n and self.limit == 0:
      self.fail(docs_so_far)

  def fail(self, docs: int):
    total = docs + self.n
    raise BadInput(
        f"{self.n} of {total} document(s) of the corpus cannot be read (more than "
        f"data.max_bad_fraction={self.limit}); the first:\n  " + "\n  ".join(self.messages) +
        "\nFix or remove those inputs, or allow a share of bad records with "
        "--config.data.max_bad_fraction=0.01 (they are then skipped and counted).")

  def check(self, docs: int):
    if self.n and self.n / (docs + self.n) > self.limit:
      self.fail(docs)


def _prepare(d, workdir: str, partial: str, files, show: bool) -> dict:
  t0 = time.time()
  state = {"settings": settings(d), "listing": listing(files)}
  if os.path.exists(os.path.join(partial, STATE)):
    with open(os.path.join(partial, STATE)) as f:
      if json.load(f) != state:  # other inputs or settings: start over
        shutil.rmtree(partial)
  os.makedirs(partial, exist_ok=True)
  if not os.path.exists(os.path.join(partial, STATE)):
    _write_json(os.path.join(partial, STATE), state)
  plan_tok = None
  if d.tokenizer:
    plan_tok = load_tokenizer(d, tokenizer_path(d, workdir))
  if plan_tok is None and any(f.fmt in ("npy", "bin") for f in files):
    raise ValueError("already tokenized inputs (.npy, .bin) need the tokenizer of their ids: "
                     "set data.tokenizer to its tokenizer.json")
  chunks = inputs.plan(files, d, plan_tok.eos_id if plan_tok else None)
  # More workers than chunks would idle (the bytes are the same for any number).
  with _Workers(min(workers(d), len(chunks))) as pool:
    return _prepare_with(d, workdir, partial, files, show, pool, t0, plan_tok, chunks)


def _prepare_with(d, workdir, partial, files, show, pool, t0, plan_tok, chunks) -> dict:
  tok = plan_tok or _trained_tokenizer(d, workdir, partial, files, chunks, pool, show)
  dtype = shards.TOKEN_DTYPES[shards.token_dtype_name(tok.vocab_size)]
  job_settings = _job_settings(d, tok)
  ledger = _Ledger(partial, dtype, d.shard_tokens)
  stats = ledger.stats
  bad = _Bad(d, stats["bad"], stats["bad_messages"])
  keys = ledger.keys
  todo = list(range(ledger.done, len(chunks)))
  total_bytes = sum(inputs.chunk_bytes(files, c) for c in chunks)
  done_bytes = sum(inputs.chunk_bytes(files, chunks[k]) for k in range(ledger.done))
  bar = tqdm.tqdm(total=total_bytes, initial=done_bytes, unit="B", unit_scale=True,
                  disable=not show, desc="prepare", file=sys.stderr, smoothing=0.1)
  jobs = ({"mode": "encode", "input": files[chunks[k].file], "chunk": chunks[k],
           "settings": job_settings, "tokenizer": tok.path, "data": data}
          for k, data in zip(todo, inputs.chunk_data(files, chunks, todo, d)))
  t_enc = time.time()
  try:
    for k, res in zip(todo, pool.results(jobs)):
      bad.add(res, stats["documents"])
      keep = keys.admit(res["keys"])
      stats["duplicates"] += int(keep.size - keep.sum())
      ledger.commit(k, res, keep, bad)
      bar.update(inputs.chunk_bytes(files, chunks[k]))
      bar.set_postfix(docs=stats["documents"], tokens=stats["tokens"], refresh=False)
  finally:
    bar.close()
  bad.check(stats["documents"])
  meta = _finish(d, workdir, partial, files, tok, dtype, ledger, time.time() - t0,
                 time.time() - t_enc)
  s = meta["summary"]
  print(f"prepared {os.path.join(workdir, DATA_DIR)}: {s['documents']} documents "
        f"(val {s['val_documents']}), {s['tokens']} tokens, {s['bad_records']} bad records, "
        f"{s['duplicates']} duplicates dropped, {s['seconds']:.1f} s "
        f"({s['tokens_per_sec']:.0f} tokens/s)", file=sys.stderr)
  return meta


def _trained_tokenizer(d, workdir, partial, files, chunks, pool, show):
  """The BPE of this preparation: already trained (workdir, or an interrupted run's), or
  trained now on the sample."""
  for path in (os.path.join(workdir, TOKENIZER_FILE), os.path.join(partial, TOKENIZER_FILE)):
    if os.path.exists(path):
      return load_tokenizer(d, path)
  total = sum(os.path.getsize(f.path) for f in files)
  budget = int(d.tokenizer_sample_bytes)
  rate = min(1.0, budget / max(total, 1))
  job_settings = _job_settings(d, None)
  jobs = ({"mode": "sample", "input": files[c.file], "chunk": c, "settings": job_settings,
           "rate": rate, "data": data}
          for c, data in zip(chunks, inputs.chunk_data(files, chunks, range(len(chunks)), d)))
  texts, size, seen = [], 0, KeySet()
  bad = _Bad(d)
  bar = tqdm.tqdm(total=len(chunks), unit="chunk", disable=not show, desc="tokenizer sample",
                  file=sys.stderr)
  for res in pool.results(jobs):
    bar.update(1)
    bad.add(res, len(texts))
    keep = seen.admit(np.asarray(res["keys"], np.uint64))
    for t, k in zip(res["texts"], keep):
      if k and size < budget:
        texts.append(t)
        size += len(t.encode("utf-8"))
    if size >= budget:
      break
  bar.close()
  if not texts:
    raise BadInput(f"no training document to train the tokenizer on under {d.path!r}"
                   + ("; the first errors:\n  " + "\n  ".join(bad.messages) if bad.messages
                      else ""))
  path = os.path.join(partial, TOKENIZER_FILE)
  tokenizer.save_atomic(tokenizer.train_bpe(
      texts, d.vocab_size, (d.pad_token, d.bos_token, d.eos_token)), path)
  return load_tokenizer(d, path)


class _Ledger:
  """The chunks done so far and the state after each: per split the closed shards (size,
  sha256) and the open one (its length and the sha256 of every chunk's segment of it),
  the counters and the number of de-duplication keys. Reloaded on resume: the newest
  state whose files verify is restored (files after it are cut off or removed)."""

  def __init__(self, partial: str, dtype: np.dtype, shard_tokens: int):
    self.partial, self.dtype, self.shard_tokens = partial, dtype, int(shard_tokens)
    self.path = os.path.join(partial, LEDGER)
    for s in SPLITS:
      os.makedirs(os.path.join(partial, s), exist_ok=True)
    os.makedirs(os.path.join(partial, INDEX_PIECES), exist_ok=True)
    entries = []
    if os.path.exists(self.path):
      with open(self.path) as f:
        entries = [json.loads(line) for line in f if line.endswith("\n")]
    self._sha = {}
    j = len(entries)
    while j and not self._restore(entries[:j]):
      j -= 1
    if j < len(entries):
      print(f"prepare: {'a shard is damaged; ' if entries else ''}going on after chunk "
            f"{entries[j - 1]['chunk'] if j else 'none'} of {len(entries)} recorded",
            file=sys.stderr)
    if not j:
      self._restore([])
    self.entries = entries[:j]
    with open(self.path + ".tmp", "w") as f:  # only the verified prefix
      f.writelines(json.dumps(e, sort_keys=True) + "\n" for e in self.entries)
    os.replace(self.path + ".tmp", self.path)
    last = self.entries[-1] if self.entries else None
    self.done = last["chunk"] + 1 if last else 0
    self.stats = dict(last["stats"]) if last else {
        "documents": 0, "val_documents": 0, "tokens": 0, "duplicates": 0, "bad": 0,
        "bad_messages": [], "chars": 0}
    self.splits = json.loads(json.dumps(last["splits"])) if last else {
        s: {"closed": [], "open_tokens": 0} for s in SPLITS}
    n_keys = last["num_keys"] if last else 0
    dedup = os.path.join(partial, DEDUP)
    with open(dedup, "ab") as f:
      f.truncate(n_keys * 8)
    self.keys = KeySet(np.fromfile(dedup, np.uint64, count=n_keys) if n_keys else None)

  def _file(self, split: str, i: int, open_: bool = False) -> str:
    return os.path.join(self.partial, split, shards.shard_file(i) + (".open" if open_ else ""))

  def _piece(self, split: str, k: int) -> str:
    return os.path.join(self.partial, INDEX_PIECES, f"{split}_{k:07d}.npy")

  def _restore(self, entries) -> bool:
    """Make the files those of the state after `entries`; False if they do not verify."""
    item = self.dtype.itemsize
    for s in SPLITS:
      st = entries[-1]["splits"][s] if entries else {"closed": [], "open_tokens": 0}
      for sh in st["closed"]:
        f = os.path.join(self.partial, s, sh["tokens"])
        if not os.path.exists(f) and os.path.exists(f + ".open"):
          os.replace(f + ".open", f)  # reopened while trying a later state
        if f not in self._sha:
          ok = os.path.exists(f) and os.path.getsize(f) == sh["num_tokens"] * item
          self._sha[f] = tokenizer.sha256_file(f) if ok else None
        if self._sha[f] != sh["sha256"]:
          return False
      i, n = len(st["closed"]), st["open_tokens"]
      op, final = self._file(s, i, True), self._file(s, i)
      if not os.path.exists(op) and os.path.exists(final):
        os.replace(final, op)  # closed after that state: open again
        self._sha.pop(final, None)
      if not os.path.exists(op):
        open(op, "wb").close()
      if os.path.getsize(op) < n * item:
        return False
      with open(op, "rb") as f:
        for e in entries:
          seg = e["segments"][s]
          if seg and seg["shard"] == i:
            f.seek(seg["start"] * item)
            data = f.read((seg["end"] - seg["start"]) * item)
            if hashlib.sha256(data).hexdigest() != seg["sha256"]:
              return False
    n_keys = entries[-1]["num_keys"] if entries else 0
    dedup = os.path.join(self.partial, DEDUP)
    if n_keys and (not os.path.exists(dedup) or os.path.getsize(dedup) < n_keys * 8):
      return False
    if not all(os.path.exists(self._piece(s, e["chunk"])) for e in entries for s in SPLITS):
      return False
    for s in SPLITS:  # the state verifies: cut off what came after it
      st = entries[-1]["splits"][s] if entries else {"closed": [], "open_tokens": 0}
      i = len(st["closed"])
      with open(self._file(s, i, True), "r+b") as f:
        f.truncate(st["open_tokens"] * item)
      for name in os.listdir(os.path.join(self.partial, s)):
        if name.startswith("shard_") and int(name[6:].split(".")[0].split("_")[0]) > i:
          os.remove(os.path.join(self.partial, s, name))
    return True

  def commit(self, k: int, res: dict, keep: np.ndarray, bad: _Bad):
    lengths, tokens = res["lengths"], res["tokens"]
    entry = {"chunk": k, "segments": {}}
    for s in SPLITS:
      sel = keep & (res["val"] if s == "val" else ~res["val"])
      lens = lengths[sel]
      toks = tokens[np.repeat(sel, lengths)].astype(self.dtype)
      entry["segments"][s] = self._append(s, lens, toks, k)
      self.stats["documents"] += int(sel.sum())
      self.stats["tokens"] += int(toks.size)
    self.stats["val_documents"] += int((keep & res["val"]).sum())
    self.stats["chars"] += int(res["chars"])
    self.stats["bad"], self.stats["bad_messages"] = bad.n, bad.messages
    with open(os.path.join(self.partial, DEDUP), "ab") as f:
      res["keys"][keep].astype(np.uint64).tofile(f)
    entry.update(stats=dict(self.stats), splits=json.loads(json.dumps(self.splits)),
                 num_keys=len(self.keys))
    with open(self.path, "a") as f:
      f.write(json.dumps(entry, sort_keys=True) + "\n")
      f.flush()
      os.fsync(f.fileno())
    self.entries.append(entry)

  def _append(self, s: str, lens: np.ndarray, toks: np.ndarray, k: int):
    """Append a chunk's documents to the split's open shard (closing it whenever the next
    document would pass data.shard_tokens); write the chunk's index piece. Returns the
    chunk's segment of the shard left open (for the resume check)."""
    st = self.splits[s]
    rows, at, seg_start = [], 0, st["open_tokens"]
    for lo, hi in _shard_ranges(lens, self.shard_tokens, st["open_tokens"]):
      if lo == "close":
        self._close(s)
        seg_start = 0
        continue
      i, n0 = len(st["closed"]), st["open_tokens"]
      part = toks[at:at + int(lens[lo:hi].sum())]
      with open(self._file(s, i, True), "ab") as f:  # the ledger's fsync orders the rest:
        part.tofile(f)  # data lost before it is found by its sha256 on resume
      offs = np.full(hi - lo, n0, np.int64)
      offs[1:] += np.cumsum(lens[lo:hi - 1])
      rows.append(np.stack([np.full(hi - lo, i, np.int64), offs, lens[lo:hi]], 1))
      st["open_tokens"] += int(part.size)
      at += part.size
    tmp = self._piece(s, k) + ".tmp.npy"
    np.save(tmp, np.concatenate(rows) if rows else np.zeros((0, 3), np.int64))
    os.replace(tmp, self._piece(s, k))
    i = len(st["closed"])
    if st["open_tokens"] == seg_start:
      return None
    with open(self._file(s, i, True), "rb") as f:
      f.seek(seg_start * self.dtype.itemsize)
      sha = hashlib.sha256(f.read()).hexdigest()
    return {"shard": i, "start": seg_start, "end": st["open_tokens"], "sha256": sha}

  def _close(self, s: str):
    st = self.splits[s]
    i = len(st["closed"])
    if not st["open_tokens"]:
      return
    op, final = self._file(s, i, True), self._file(s, i)
    sha = tokenizer.sha256_file(op)
    os.replace(op, final)
    st["closed"].append({"tokens": shards.shard_file(i), "mask": None,
                         "num_tokens": st["open_tokens"], "sha256": sha})
    st["open_tokens"] = 0

  def close_all(self):
    for s in SPLITS:
      self._close(s)
      op = self._file(s, len(self.splits[s]["closed"]), True)
      if os.path.exists(op):
        os.remove(op)


def _shard_ranges(lens: np.ndarray, shard_tokens: int, used: int):
  """Document ranges (lo, hi) that go into the open shard, with ("close", None) where it
  must be closed first: a shard holds at most shard_tokens tokens (a longer document
  alone), and no document straddles two shards."""
  n = lens.size
  if n == 0:
    return []
  if used + int(lens.sum()) <= shard_tokens:
    return [(0, n)]
  out, lo = [], 0
  for i, m in enumerate(lens.tolist()):
    if used and used + m > shard_tokens:
      if i > lo:
        out.append((lo, i))
      out.append(("close", None))
      lo, used = i, 0
    used += m
  out.append((lo, n))
  return out


def _finish(d, workdir, partial, files, tok, dtype, ledger, seconds, enc_seconds) -> dict:
  stats = ledger.stats
  if stats["val_documents"] == 0 or stats["documents"] - stats["val_documents"] == 0:
    raise BadInput(f"{stats['documents']} document(s) under {d.path!r} and "
                   f"{stats['val_documents']} of them held out: a split by document needs "
                   f"both a training and a validation document. Use more documents, a "
                   f"data.doc_separator that occurs in the text, or another data.val_fraction")
  ledger.close_all()
  splits = {}
  for s in SPLITS:
    shard_list = ledger.splits[s]["closed"]
    pieces = [ledger._piece(s, e["chunk"]) for e in ledger.entries]
    n_docs = sum(np.load(p, mmap_mode="r").shape[0] for p in pieces)
    index = np.lib.format.open_memmap(os.path.join(partial, s, shards.INDEX_FILE + ".tmp.npy"),
                                      mode="w+", dtype=np.int64, shape=(n_docs, 3))
    at, longest = 0, 0
    for p in pieces:
      piece = np.load(p)
      index[at:at + len(piece)] = piece
      at += len(piece)
      if len(piece):
        longest = max(longest, int(piece[:, 2].max()))
    index.flush()
    del index
    os.replace(os.path.join(partial, s, shards.INDEX_FILE + ".tmp.npy"),
               os.path.join(partial, s, shards.INDEX_FILE))
    total = sum(sh["num_tokens"] for sh in shard_list)
    splits[s] = {"num_docs": n_docs, "num_tokens": total, "num_mask_tokens": total,
                 "mask_density": 1.0, "shards": shard_list, "max_doc_tokens": longest}
  if os.path.abspath(tok.path) != os.path.abspath(os.path.join(partial, TOKENIZER_FILE)):
    shutil.copyfile(tok.path, os.path.join(partial, TOKENIZER_FILE))
  summary = {"documents": stats["documents"], "val_documents": stats["val_documents"],
             "tokens": stats["tokens"], "bad_records": stats["bad"],
             "duplicates": stats["duplicates"], "seconds": round(seconds, 3),
             "tokens_per_sec": stats["tokens"] / max(enc_seconds, 1e-9),
             "first_bad_records": stats["bad_messages"]}
  meta = {"format_version": shards.FORMAT_VERSION, "kind": "text",
          "vocab_size": tok.vocab_size, "pad_id": tok.pad_id, "bos_id": tok.bos_id,
          "eos_id": tok.eos_id, "token_dtype": shards.token_dtype_name(tok.vocab_size),
          "mask_dtype": None, "index_file": shards.INDEX_FILE, "tokenizer": TOKENIZER_FILE,
          "tokenizer_sha256": tok.sha256, "splits": splits,
          "source": os.path.abspath(os.path.expanduser(d.path)),
          "fingerprint": {"settings": settings(d), "tokenizer_sha256": tok.sha256,
                          "inputs_sha256": inputs_sha256([f.path for f in files]),
                          "listing": listing(files)},
          "summary": summary}
  del summary["tokens_per_sec"]  # a timing: kept out of the bytes a rerun must reproduce
  del summary["seconds"]
  _write_json(os.path.join(partial, shards.META_FILE), meta)
  # The tokenizer first (a rerun finds it and finishes), then the data directory.
  if not d.tokenizer and not os.path.exists(os.path.join(workdir, TOKENIZER_FILE)):
    shutil.copyfile(tok.path, os.path.join(workdir, TOKENIZER_FILE + ".tmp"))
    os.replace(os.path.join(workdir, TOKENIZER_FILE + ".tmp"),
               os.path.join(workdir, TOKENIZER_FILE))
  for name in (LEDGER, STATE, DEDUP):
    os.remove(os.path.join(partial, name))
  shutil.rmtree(os.path.join(partial, INDEX_PIECES))
  os.replace(partial, os.path.join(workdir, DATA_DIR))
  return dict(meta, summary=dict(summary, seconds=seconds,
                                 tokens_per_sec=stats["tokens"] / max(enc_seconds, 1e-9)))
