"""Text pre-training data: documents, split, tokenizer, shards, windows, packing,
and a few training steps on generated text."""
import collections
import importlib.util
import json
import os

import numpy as np
import pytest
from conftest import load_config

from lmmask import batching
from lmmask.data import shards
from lmmask.data import text as T
from lmmask.data import tokenizer as K
from lmmask.eval import evaluate as evaluation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("the cat dog sees eats runs a big small red blue house tree river "
         "near under over quickly slowly and then").split()


def generated_docs(n=40, seed=0):
  rng = np.random.default_rng(seed)
  return [" ".join(rng.choice(WORDS, size=rng.integers(3, 60))) + "." for _ in range(n)]


def write_corpus(path, docs):
  with open(path, "w") as f:
    f.write("\n\n".join(docs) + "\n")
  return str(path)


def text_config(**overrides):
  return load_config("text.py", "tiny", **overrides)


# ---------------------------------------------------------------------------
# Tokenizer and shards.

def test_byte_level_bpe_roundtrip(tmp_path):
  path = str(tmp_path / "tok.json")
  K.save_atomic(K.train_bpe(generated_docs(), 300, K.TEXT_SPECIALS), path)
  tok = K.Tokenizer.load(path, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  assert 259 <= tok.vocab_size <= 300 and tok.sha256 == K.sha256_file(path)
  for s in ("the cat sees a river.", "unseen wörds ✓ 123"):  # bytes: nothing is unknown
    ids = tok.encode_document(s)
    assert ids[0] == 1 and ids[-1] == 2 and tok.decode(ids) == s
    assert tok.encode(s) == ids[1:-1]  # encode adds no specials
  assert tok.decode([1, *tok.encode("a"), 2], skip_special=False) == "<bos>a<eos>"
  with pytest.raises(ValueError, match="bos token"):
    K.Tokenizer.load(path, pad_token="<pad>", bos_token="<s>", eos_token="<eos>")
  with pytest.raises(ValueError, match="vocab_size"):
    K.train_bpe(["x"], 100, K.TEXT_SPECIALS)
  with pytest.raises(FileNotFoundError, match="no tokenizer file"):
    K.Tokenizer.load(str(tmp_path / "missing.json"))
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def test_shards_roundtrip(tmp_path):
  rng = np.random.default_rng(0)
  docs = [rng.integers(0, 2**32 - 1, size=n, dtype=np.uint64) for n in (5, 1, 9, 7, 3)]
  masks = [rng.integers(0, 2, size=len(d)) for d in docs]
  out = str(tmp_path / "shards")
  meta = shards.write_dataset(out, {"train": (docs, masks)}, vocab_size=2**32, pad_id=0,
                              kind="text", extra={"k": 1}, shard_tokens=10)
  s = shards.ShardSplit(out, "train", use_loss_mask=False)
  info = meta["splits"]["train"]
  assert len(info["shards"]) > 1 and info["num_tokens"] == 25 and meta["k"] == 1
  for i, (d, m) in enumerate(zip(docs, masks)):
    toks, mask = s.doc(i)
    np.testing.assert_array_equal(toks, d.astype(np.uint32))
    np.testing.assert_array_equal(mask, m)
  assert s.tokens[0].dtype == np.uint32 and isinstance(s.tokens[0], np.memmap)
  with pytest.raises(FileExistsError, match="already exists"):
    shards.write_dataset(out, {"train": (docs, None)}, vocab_size=2**32, pad_id=0, kind="text")
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


# ---------------------------------------------------------------------------
# Windows and packing: every in-document pair once, no pair across documents.

def windows_reference(doc_lengths, length, stride):
  out = []
  for d, n in enumerate(doc_lengths):
    for start in range(0, max(n - 1, 0), stride):
      out.append((d, start, min(length, n - start)))
  return out


def pairs_of_windows(docs, windows):
  c = collections.Counter()
  for d, start, n in windows:
    w = docs[d][start:start + n]
    c.update(zip(w[:-1], w[1:]))
  return c


def doc_pairs(docs):
  c = collections.Counter()
  for d in docs:
    c.update(zip(d[:-1], d[1:]))
  return c


def test_windows_cover_each_pair_once():
  lengths = [1, 2, 5, 8, 9, 17, 30]
  docs = [[(i, j) for j in range(n)] for i, n in enumerate(lengths)]  # unique tokens
  w = T.make_windows(lengths, 8)
  assert [tuple(r) for r in w] == windows_reference(lengths, 8, 7)
  assert (w[:, 2] <= 8).all() and (w[:, 2] >= 2).all()
  assert pairs_of_windows(docs, w) == doc_pairs(docs)
  # Twin: stride = length (no overlap) loses the pair across each window edge.
  bad = windows_reference(lengths, 8, 8)
  assert pairs_of_windows(docs, bad) != doc_pairs(docs)


def greedy_rows_reference(lengths, length, pack):
  """Rows of window indices in stream order: a new row when the next window does not fit."""
  rows, cur, used = [], [], 0
  for w, n in enumerate(lengths):
    if cur and (not pack or used + n > length):
      rows.append(cur)
      cur, used = [], 0
    cur.append(w)
    used += int(n)
  return rows + [cur] if cur else rows


@pytest.mark.parametrize("pack", [True, False])
def test_row_starts_match_the_greedy_loop(pack):
  rng = np.random.default_rng(3)
  lengths = np.concatenate([rng.integers(2, 9, size=300), [8] * 5, rng.integers(2, 4, size=50)])
  starts = T.row_starts(lengths, 8, pack)
  got = [list(range(a, b)) for a, b in zip(starts[:-1], starts[1:])]
  assert got == greedy_rows_reference(lengths, 8, pack)
  if pack:  # twin: a row rule that lets rows overflow by one token differs
    assert got != greedy_rows_reference(lengths, 9, pack)


def text_split(tmp_path, docs, masks=None, **kw):
  """A TextSplit over `docs` written as a one-split shard dataset."""
  out = str(tmp_path / "s")
  shards.write_dataset(out, {"train": (docs, masks)}, vocab_size=64, pad_id=0, kind="text")
  return T.TextSplit(shards.ShardSplit(out, "train", use_loss_mask=False), **kw)


def _packed_pairs(split):
  """Counted (input, target) pairs over all rows of a TextSplit."""
  c = collections.Counter()
  b = split.batch(list(range(len(split))))
  for r in range(b.inputs.shape[0]):
    for t in range(b.inputs.shape[1]):
      if b.loss_mask[r, t]:
        c[(int(b.inputs[r, t]), int(b.targets[r, t]))] += 1
  return c, b


@pytest.mark.parametrize("pack,pad_side", [(True, "right"), (False, "right"), (False, "left")])
def test_rows_count_exactly_the_document_pairs(tmp_path, pack, pad_side):
  rng = np.random.default_rng(2)
  docs = [rng.integers(3, 50, size=n).tolist() for n in (2, 3, 4, 11, 5, 6, 20, 3)]
  split = text_split(tmp_path, docs, length=8, packing=pack, pad_id=0, pad_side=pad_side)
  got, b = _packed_pairs(split)
  assert got == doc_pairs(docs)
  assert sum(got.values()) == sum(len(d) - 1 for d in docs)
  if pack:
    assert len(split) < len(T.make_windows([len(d) for d in docs], 8))
    # Twin: the packed rows read as one sequence each (no segments) count pairs
    # across document boundaries.
    ids, _, seg = split.row_arrays(list(range(len(split))))
    flat = batching.batch_from_ids(np.where(seg > 0, ids, 0), pad_id=0)
    bad = collections.Counter()
    for r, t in zip(*np.nonzero(flat.loss_mask)):
      bad[(int(flat.inputs[r, t]), int(flat.targets[r, t]))] += 1
    assert bad != doc_pairs(docs)
  # Positions restart at every segment start.
  starts = np.ones_like(b.segment_ids, bool)
  starts[:, 1:] = b.segment_ids[:, 1:] != b.segment_ids[:, :-1]
  assert (b.positions[starts & (b.segment_ids > 0)] == 0).all()


def test_mask_shards_gate_targets(tmp_path):
  docs = [[3, 4, 5, 6], [7, 8, 9]]
  split = text_split(tmp_path, docs, [[1, 1, 0, 1], [1, 1, 1]], length=8, packing=True,
                     pad_id=0)
  got, _ = _packed_pairs(split)
  assert (4, 5) not in got and got[(5, 6)] == 1 and got[(7, 8)] == 1


def test_eval_batches_cover_rows_once(tmp_path):
  docs = [[3] * n for n in (9, 9, 9, 9, 9)]
  split = text_split(tmp_path, docs, length=9, packing=True, pad_id=0)
  batches = split.eval_batches(3)
  assert [b.inputs.shape[0] for b in batches] == [3, 3]
  assert sum(float(b.loss_mask.sum()) for b in batches) == 5 * (9 - 1)


# ---------------------------------------------------------------------------
# End to end: a few training steps on generated text, resume, eval, guards.

def test_text_training_end_to_end(tmp_path):
  from lmmask import train
  corpus = write_corpus(tmp_path / "corpus.txt", generated_docs(60))
  cfg = text_config(**{"data.path": corpus, "model.pos_encoding": "rope",
                       "model.norm": "rmsnorm", "model.mlp": "swiglu", "model.n_kv_heads": 1})
  wd = str(tmp_path / "wd")
  res = train.train_and_evaluate(cfg, wd)
  assert res["step"] == 6 and np.isfinite(res["val_loss"])
  assert os.path.exists(os.path.join(wd, "tokenizer.json"))
  meta = json.load(open(os.path.join(wd, "data", "meta.json")))
  assert meta["splits"]["val"]["num_docs"] > 0 and meta["vocab_size"] <= 300
  assert meta["kind"] == "text" and meta["fingerprint"]["tokenizer_sha256"] == \
      K.sha256_file(os.path.join(wd, "tokenizer.json"))
  for split in ("train", "val"):  # the interface: uint16 ids, no mask shards for text
    assert os.path.getsize(os.path.join(wd, "data", split, "shard_000.bin")) == \
        2 * meta["splits"][split]["num_tokens"]
    assert not os.path.exists(os.path.join(wd, "data", split, "shard_000_mask.bin"))
  rows = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  z = [r["z_loss"] for r in rows if r["kind"] == "train"]
  assert z and all(0 < v < 0.1 for v in z)  # its own metric, not folded into "loss"
  # The val loss from a fresh load of the same shards matches the run's.
  ev = evaluation.evaluate_checkpoint(wd)
  assert ev["val_loss"] == pytest.approx(res["val_loss"], rel=1e-5)
  # The text changed under the workdir: refused, nothing rewritten.
  write_corpus(tmp_path / "corpus.txt", generated_docs(60, seed=1))
  cfg.train.steps = 8
  with pytest.raises(ValueError, match="other inputs"):
    train.train_and_evaluate(cfg, wd)


def test_text_config_sizes_match():
  from lmmask import model as M
  from lmmask.config import decoder_config
  spec = importlib.util.spec_from_file_location("text_config",
                                                os.path.join(REPO, "configs", "text.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  counts = []
  for arg in ("", "modern"):
    cfg = decoder_config(mod.get_config(arg), 512)
    abstract = M.nnx.eval_shape(lambda: M.Decoder(cfg, rngs=M.nnx.Rngs(0)))
    counts.append(M.count_params(abstract))
  a, b = counts
  assert abs(a - b) / a < 0.005, (a, b)
  with pytest.raises(ValueError, match="unknown variant"):
    mod.get_config("bogus")
