"""The corpus registry: the same batches, bit for bit, as the pre-registry loader
(hashes recorded by tests/fixtures/pinned/record.py), legacy workdirs and
datasets read back, and the DataSource fields every corpus fills."""
import hashlib
import json
import os
import warnings

import numpy as np
import pytest
from conftest import load_config
from ml_collections import ConfigDict

from lmmask import batching, train
from lmmask import config as config_lib
from lmmask import workdir as workdir_lib
from lmmask.data import pipeline, prepare, registry, shards, text, tokenizer, verbs_source
from lmmask.data.source import DataSource
from lmmask.eval import evaluate as evaluation
from lmmask.eval import floor as floor_lib
from lmmask.eval import text as eval_text

HERE = os.path.dirname(os.path.abspath(__file__))
PINNED = os.path.join(HERE, "fixtures", "pinned")
LEGACY = os.path.join(HERE, "fixtures", "legacy")
LEGACY_PREFIX = "/tmp/fx/legacy"  # the absolute root the legacy fixtures were written under
FIELDS = ("inputs", "targets", "loss_mask", "key_mask", "positions", "segment_ids")
TRAIN_STEPS = (0, 1, 2, 7, 40)


def batch_hash(b) -> str:
  """The hash tests/fixtures/pinned/record.py writes (field names, dtypes, shapes and bytes)."""
  h = hashlib.sha256()
  for f in FIELDS:
    a = np.ascontiguousarray(np.asarray(getattr(b, f)))
    h.update(f"{f}:{a.dtype.str}:{a.shape};".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def upgrade(cfg: dict) -> dict:
  """A saved config as every reader sees it (`config.upgrade`: data.pack is now
  data.packing, fields added since are filled)."""
  return config_lib.to_dict(config_lib.upgrade(cfg))


def _json(path):
  with open(path) as f:
    return json.load(f)


def pinned_cases(tmp, legacy_root):
  verbs = upgrade(_json(os.path.join(PINNED, "verbs_config.json")))
  text = upgrade(_json(os.path.join(PINNED, "text_config.json")))
  packed = json.loads(json.dumps(verbs))
  packed["data"]["packing"] = True
  unpacked_text = json.loads(json.dumps(text))
  unpacked_text["data"]["packing"] = False
  out = {"verbs": (verbs, None), "verbs_packed": (packed, None),
         "text": (text, os.path.join(tmp, "text")),
         "text_unpacked": (unpacked_text, os.path.join(tmp, "text_unpacked")),
         "legacy_text": (upgrade(_json(os.path.join(legacy_root, "text", "config.json"))),
                         os.path.join(legacy_root, "text"))}
  for name in ("chat_sft", "chat_base"):
    out[name] = (upgrade(_json(os.path.join(legacy_root, name, "config.json"))), None)
  return out


def test_registry_batches_are_bit_identical_to_the_recorded_ones(tmp_path, legacy):
  want = _json(os.path.join(PINNED, "batch_hashes.json"))
  cases = pinned_cases(str(tmp_path), legacy)
  assert set(cases) == set(want)
  for name, (cfg, workdir) in cases.items():
    with warnings.catch_warnings():  # the tiny chat val split has a low mask density
      warnings.simplefilter("ignore", UserWarning)
      data = registry.load(ConfigDict(cfg), workdir)
    w = want[name]
    assert (data.vocab_size, data.pad_id) == (w["vocab_size"], w["pad_id"]), name
    got_train = {str(s): batch_hash(data.train_batch(s)) for s in TRAIN_STEPS}
    assert got_train == w["train"], name
    got_eval = {k: [batch_hash(b) for b in v] for k, v in data.eval_sets().items()}
    assert got_eval == w["eval"], name
    if "tokenizer_sha256" in w:  # the text run's trained tokenizer.json, byte for byte
      assert tokenizer.sha256_file(os.path.join(workdir, "tokenizer.json")) == \
          w["tokenizer_sha256"], name


# ---------------------------------------------------------------------------
# Workdirs and datasets written before the one shard format still read back.

def _docs(split):
  return [split.doc(i) for i in range(len(split))]


def _old_split(path, separator, val_fraction, seed):
  """The documents and seeded split of the code that wrote the legacy text workdir
  (every paragraph once, a permutation of the document count), as it did it."""
  with open(path, encoding="utf-8") as f:
    docs = list(dict.fromkeys(p.strip() for p in f.read().split(separator) if p.strip()))
  n = len(docs)
  n_val = min(n - 1, max(1, round(val_fraction * n)))
  val = set(np.random.default_rng([seed, n]).permutation(n)[:n_val].tolist())
  return {"train": [d for i, d in enumerate(docs) if i not in val],
          "val": [d for i, d in enumerate(docs) if i in val]}


def test_legacy_text_workdir_reads_back_as_written(tmp_path, legacy):
  cfg = ConfigDict(upgrade(_json(os.path.join(legacy, "text", "config.json"))))
  data_dir = os.path.join(legacy, "text", "data")
  meta = shards.read_meta(data_dir)  # per-split meta.json files, converted in memory
  assert meta["kind"] == "text" and set(meta["splits"]) == {"train", "val"}
  tok = tokenizer.Tokenizer.load(os.path.join(legacy, "text", "tokenizer.json"))
  assert meta["tokenizer_sha256"] == tok.sha256
  by_split = _old_split(cfg.data.path, cfg.data.doc_separator, cfg.data.val_fraction,
                        cfg.data.split_seed)
  for name, texts in by_split.items():
    got = _docs(shards.ShardSplit(data_dir, name, use_loss_mask=False))
    assert [t.tolist() for t, _ in got] == [tok.encode_document(t) for t in texts]
    assert all(m.all() for _, m in got)
  # The text corpus reuses it as it is (old uint32 ids and all-ones masks, nothing rewritten).
  before = sorted(os.listdir(os.path.join(data_dir, "train")))
  tok2, splits = text.build(cfg, os.path.join(legacy, "text"))
  assert tok2.sha256 == tok.sha256 and splits["train"].tokens[0].dtype == np.uint32
  assert sorted(os.listdir(os.path.join(data_dir, "train"))) == before
  # A fresh workdir from the same config prepares today's layout: uint16 ids, no masks.
  fresh = str(tmp_path / "fresh")
  text.build(cfg, fresh)
  new = shards.read_meta(os.path.join(fresh, "data"))
  assert new["token_dtype"] == "uint16" and new["splits"]["train"]["shards"][0]["mask"] is None
  assert not os.path.exists(os.path.join(fresh, "data", "train", "shard_000_mask.bin"))


def _same_file(a, b):
  with open(a, "rb") as fa, open(b, "rb") as fb:
    return fa.read() == fb.read()


@pytest.mark.parametrize("kind", ["text", "chat"])
def test_legacy_chat_datasets_read_back_and_rebuild_byte_identically(tmp_path, legacy, kind):
  old = os.path.join(legacy, "chat_data", kind)
  old_meta = shards.read_meta(old)
  tok = tokenizer.Tokenizer.load_chat(old)
  src = os.path.join(legacy, "chat_data", f"{kind}_source")
  for name in ("train", "val"):
    records = prepare.read_jsonl(os.path.join(src, f"{name}.jsonl"), kind)
    want = [e for e in prepare.encode_records(tok, records, kind)
            if len(e[0]) <= old_meta["max_tokens"]]
    got = _docs(shards.ShardSplit(old, name, use_loss_mask=False))
    assert [(t.tolist(), m.tolist()) for t, m in got] == [(i, m) for i, m in want]
  # prepare today, on the same records (and, for chat, the same tokenizer).
  phase = "pretrain" if kind == "text" else "sft"
  c = load_config("chat.py", f"{phase},tiny,data={tmp_path / kind}")
  c.prepare.source = "jsonl"
  c.prepare.train_file = os.path.join(src, "train.jsonl")
  c.prepare.val_file = os.path.join(src, "val.jsonl")
  c.data.vocab_size = 270
  c.data.tokenizer = "" if kind == "text" else os.path.join(legacy, "chat_data", "text")
  with warnings.catch_warnings():  # tiny sizes drop a few long records, with a warning
    warnings.simplefilter("ignore", UserWarning)
    meta = prepare.prepare(c)
  new = str(tmp_path / kind)
  assert _same_file(os.path.join(new, "tokenizer.json"), os.path.join(old, "tokenizer.json"))
  assert meta["splits"] == old_meta["splits"]
  for name in ("train", "val"):
    for f in ("shard_000.bin", "shard_000_mask.bin"):
      assert _same_file(os.path.join(new, name, f), os.path.join(old, name, f))


# ---------------------------------------------------------------------------
# What every DataSource carries.

def test_datasource_fields_for_every_corpus(tmp_path, legacy):
  assert registry.CORPORA == ("verbs", "text", "shards", "pretrained")
  cases = pinned_cases(str(tmp_path), legacy)
  # (corpus, keys_are_prefix, train_eval_whole): only unpacked verbs rows and shards
  # documents are right-padded from a row's start; only verbs evaluates whole documents.
  want = {"verbs": ("verbs", True, True), "verbs_packed": ("verbs", False, True),
          "text": ("text", False, False), "chat_sft": ("shards", True, False)}
  for name, (corpus, prefix, whole) in want.items():
    cfg, workdir = cases[name]
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", UserWarning)
      data = registry.load(ConfigDict(cfg), workdir)
    assert isinstance(data, DataSource) and data.name == corpus
    assert (data.keys_are_prefix, data.train_eval_whole) == (prefix, whole), name
    for split in ("train", "val"):
      docs = data.documents(split)
      lengths = docs.doc_lengths()
      assert len(lengths) == len(docs) > 0 and [len(docs.doc(i)[0]) for i in (0, -1)] == \
          [lengths[0], lengths[-1]]
    with pytest.raises(ValueError, match="'test'.*train, val"):
      data.documents("test")
    if name == "verbs_packed":
      continue
    tok = data.tokenizer
    assert (tok.vocab_size, tok.pad_id) == (data.vocab_size, data.pad_id)
    assert json.loads(json.dumps(data.identity)) == data.identity  # JSON-able as is
    sample = {"verbs": "yo trabajo / I work", "text": "the GNU General Public License",
              "chat_sft": "what is 3 + 4?"}[name]
    ids = tok.encode(sample)
    assert tok.bos_id not in ids and tok.eos_id not in ids and tok.decode(ids) == sample
    assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == sample  # specials skipped
  # model.json files written before the registry compare equal to the identity.
  verbs = registry.load(ConfigDict(cases["verbs"][0]))
  assert verbs.identity == _json(os.path.join(legacy, "verbs", "model.json"))["data"]
  corpus = verbs_source.corpus(ConfigDict(cases["verbs"][0]))
  assert corpus.vocab is verbs.tokenizer.vocab
  train_docs = verbs.documents("train")
  assert [tuple(train_docs.doc(i)[0]) for i in range(len(train_docs))] == \
      [e.ids for e in corpus.train]
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    sft = registry.load(ConfigDict(cases["chat_sft"][0]))
  assert sft.identity == _json(os.path.join(legacy, "chat_sft", "model.json"))["data"]
  assert sft.tokenizer.role_id == {"system": 3, "user": 4, "assistant": 5}
  assert sft.tokenizer.end_id == 6 and len(sft.documents("val")) == 1
  assert sft.documents("val").doc(0)[1] is not None  # the SFT mask comes with the ids
  old_text = registry.load(ConfigDict(cases["legacy_text"][0]), cases["legacy_text"][1])
  assert old_text.identity["tokenizer_sha256"] == shards.read_meta(
      os.path.join(legacy, "text", "data"))["fingerprint"]["tokenizer_sha256"]
  assert len(old_text.documents("val")) == shards.read_meta(
      os.path.join(legacy, "text", "data"))["splits"]["val"]["num_docs"]


def test_verbs_tokenizer_names_unknown_words():
  verbs = registry.load(load_config("verbs.py", "tiny"))
  with pytest.raises(ValueError, match=r"\['quux', 'xyzzy'\]"):
    verbs.tokenizer.encode("yo xyzzy / I quux")


def test_unknown_corpus_and_missing_workdir_are_clear(tmp_path):
  c = load_config("verbs.py", "tiny")
  c.data.corpus = "wiki"
  with pytest.raises(ValueError, match="unknown corpus 'wiki'; valid: verbs, text, shards"):
    registry.load(c)
  with pytest.raises(ValueError, match="needs a workdir"):
    registry.load(load_config("text.py", "tiny"))


# ---------------------------------------------------------------------------
# The contract is all the loop and the evaluators use.

class _Docs:
  """Nothing but `source.Documents`."""

  def __init__(self, docs):
    self._docs = [np.asarray(d, np.int64) for d in docs]

  def __len__(self):
    return len(self._docs)

  def doc_lengths(self):
    return np.asarray([len(d) for d in self._docs], np.int64)

  def doc(self, i):
    return self._docs[i], None


class _CharTokenizer:
  pad_id, bos_id, eos_id, vocab_size = 0, 1, 2, 3 + 8
  LETTERS = "abcdefgh"

  def encode(self, text):
    return [3 + self.LETTERS.index(ch) for ch in text]

  def decode(self, ids, skip_special=True):
    return "".join(self.LETTERS[int(i) - 3] if int(i) >= 3 else ("" if skip_special else "|")
                   for i in ids)


def _fake_source(config, workdir=None):
  """A corpus that exists only as the DataSource contract: words over 8 letters."""
  del workdir
  d, tok = config.data, _CharTokenizer()
  rng = np.random.default_rng(0)
  words = {s: [[1, *rng.integers(3, 11, size=int(rng.integers(2, d.length - 1))), 2]
               for _ in range(n)] for s, n in (("train", 40), ("val", 12))}
  docs = {s: _Docs(w) for s, w in words.items()}
  padded = {s: batching.pad_sequences(w, pad_id=0, length=d.length, pad_side="right")
            for s, w in words.items()}

  def train_batch(step, rows=None):
    idx = pipeline.batch_indices(len(words["train"]), d.batch_size, step, config.seed)
    return batching.batch_from_ids(padded["train"][idx[slice(*(rows or (None, None)))]], pad_id=0)

  def eval_sets():
    out = {}
    for s, ids in padded.items():
      rows = np.zeros((-(-len(ids) // d.eval_batch_size) * d.eval_batch_size, d.length), np.int64)
      rows[:len(ids)] = ids
      out[s] = [batching.batch_from_ids(rows[i:i + d.eval_batch_size], pad_id=0)
                for i in range(0, len(rows), d.eval_batch_size)]
    return out
  return DataSource(name="fake", vocab_size=tok.vocab_size, pad_id=0, train_batch=train_batch,
                    eval_sets=eval_sets, tokenizer=tok, identity={"kind": "fake"},
                    documents=docs.__getitem__, keys_are_prefix=True, train_eval_whole=True)


def test_a_corpus_with_only_the_contract_trains_and_evaluates(tmp_path, monkeypatch, tiny):
  monkeypatch.setitem(registry._SOURCES, "fake", _fake_source)
  monkeypatch.setattr(config_lib, "CORPORA", config_lib.CORPORA + ("fake",))
  tiny.data.corpus = "fake"
  tiny.train.steps, tiny.train.eval_every = 4, 2
  tiny.eval.prompt_tokens = 3  # the words are short
  workdir = str(tmp_path / "fake")
  results = train.train_and_evaluate(tiny, workdir)
  data = _fake_source(tiny)
  train_docs = data.documents("train")
  floor = floor_lib.entropy_floor([train_docs.doc(i)[0] for i in range(len(train_docs))])
  assert results["entropy_floor"] == floor and results["floor_alarm"] is False
  out = evaluation.evaluate_checkpoint(workdir, extras=True)
  assert out["corpus"] == "fake" and out["val_loss"] == results["val_loss"]
  assert out["extras"] == {"entropy_floor": floor}
  assert "entropy floor (train)" in evaluation.format_report(out)
  # The text extras read documents through the contract only.
  config, data, state, _ = workdir_lib.restore_state(workdir)
  ex = eval_text.checkpoint_extras(config, state, data)
  assert sum(m["num_docs"] for m in ex["val_by_doc_length"].values()) == 12
  assert ex["continuations"] and all(set(c["opening"]) <= set("abcdefgh")
                                     for c in ex["continuations"])
