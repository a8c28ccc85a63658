"""Preparing a text corpus (data/corpus.py, data/inputs.py): every input format gives the
same shards, 1 and 2 workers the same bytes, a kill -9 and a rerun the same bytes, bad
records clear errors that leave the workdir as it was, uint16/uint32 by vocabulary,
duplicates dropped, and a split that does not depend on the order of the files."""
import gzip
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO, load_config

from lmmask import config as config_lib
from lmmask.data import corpus, inputs, registry, shards, text
from lmmask.data import tokenizer as K

WORDS = ("alpha beta gamma delta river stone cloud quick slow red blue green small large "
         "near far under over and then").split()


def make_docs(n, seed=0):
  rng = np.random.default_rng(seed)
  return [f"{i} " + " ".join(rng.choice(WORDS, size=rng.integers(3, 25))) + "."
          for i in range(n)]


def config(path, **kw):
  return load_config("text.py", "tiny", **{"data.path": str(path), "data.workers": 1, **kw})


def data_files(wd):
  """{relative path: bytes} of a prepared dataset, meta.json aside (it names the inputs)."""
  out = {}
  root = os.path.join(wd, "data")
  for dirpath, _, names in os.walk(root):
    for n in names:
      if n != shards.META_FILE:
        p = os.path.join(dirpath, n)
        out[os.path.relpath(p, root)] = open(p, "rb").read()
  return out


def split_docs(wd, name):
  s = shards.ShardSplit(os.path.join(wd, "data"), name, use_loss_mask=False)
  return [s.doc(i)[0].tolist() for i in range(len(s))]


@pytest.fixture(scope="module")
def tok_file(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
  K.save_atomic(K.train_bpe(make_docs(200, seed=9), 300, K.TEXT_SPECIALS), path)
  return path


# ---------------------------------------------------------------------------
# Formats.

def write_formats(root, docs, tok):
  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  zstd = pytest.importorskip("zstandard")
  jsonl = "".join(json.dumps({"body": d}) + "\n" for d in docs).encode()

  os.makedirs(root)
  paths = {n: os.path.join(root, n) for n in ("corpus.txt", "corpus.jsonl", "gz.jsonl.gz",
                                               "zst.jsonl.zst", "pq.parquet", "t.arrow",
                                               "ids.npy", "ids.bin")}

  def put(name, data):
    with open(paths[name], "wb") as f:
      f.write(data)
  put("corpus.txt", ("\n\n".join(docs) + "\n").encode())
  put("corpus.jsonl", jsonl)
  put("gz.jsonl.gz", gzip.compress(jsonl))
  put("zst.jsonl.zst", zstd.ZstdCompressor().compress(jsonl))
  pq.write_table(pa.table({"id": list(range(len(docs))), "body": docs}), paths["pq.parquet"],
                 row_group_size=7)
  table = pa.table({"body": docs})
  with pa.ipc.new_file(paths["t.arrow"], table.schema) as w:
    for b in table.to_batches(max_chunksize=9):
      w.write_batch(b)
  ids = np.concatenate([np.asarray(tok.encode(d) + [tok.eos_id]) for d in docs])
  np.save(paths["ids.npy"], ids.astype(np.uint16))
  put("ids.bin", ids.astype("<u4").tobytes())
  with open(paths["ids.bin"] + ".json", "w") as f:
    json.dump({"dtype": "uint32"}, f)
  return paths


def test_every_format_gives_the_same_shards(tmp_path, tok_file):
  docs = make_docs(60)
  tok = K.Tokenizer.load(tok_file)
  paths = write_formats(str(tmp_path / "in"), docs, tok)
  got = {}
  for name, path in paths.items():
    c = config(path, **{"data.tokenizer": tok_file, "data.text_key": "body", "data.chunk_bytes": 700})
    meta = corpus.build(c, str(tmp_path / name))
    assert meta["token_dtype"] == "uint16" and meta["summary"]["bad_records"] == 0, name
    got[name] = data_files(str(tmp_path / name))
  c = config(paths["gz.jsonl.gz"], **{"data.chunk_bytes": 700})  # compressed: several chunks too
  assert len(inputs.plan(inputs.list_inputs(paths["gz.jsonl.gz"]), c.data)) > 3
  want = got.pop("corpus.txt")
  assert {n: f == want for n, f in got.items()} == {n: True for n in got}
  # Independent check: the documents are <bos> encode(doc) <eos>, each exactly once.
  wd = str(tmp_path / "corpus.txt")
  read = split_docs(wd, "train") + split_docs(wd, "val")
  assert sorted(read) == sorted([tok.bos_id, *tok.encode(d), tok.eos_id] for d in docs)
  assert split_docs(wd, "val") and len(split_docs(wd, "val")) < len(docs) // 3


def test_chunks_of_one_file_end_at_record_boundaries(tmp_path):
  docs = make_docs(80)
  path = tmp_path / "c.txt"
  path.write_text("\n\n".join(docs))
  c = config(path, **{"data.chunk_bytes": 300})
  files = inputs.list_inputs(str(path))
  chunks = inputs.plan(files, c.data)
  assert len(chunks) > 5 and chunks[0].start == 0 and chunks[-1].end == path.stat().st_size
  assert all(a.end == b.start for a, b in zip(chunks, chunks[1:]))
  read = [r for ch in chunks for r, _ in inputs.read_chunk(files[0], ch, c.data)]
  assert read == docs
  # Twin: cutting at the raw byte offsets splits documents.
  raw = path.read_bytes()
  cut = [raw[i:i + 300].decode(errors="ignore") for i in range(0, len(raw), 300)]
  assert [p.strip() for part in cut for p in part.split("\n\n") if p.strip()] != docs


# ---------------------------------------------------------------------------
# Workers, resume.

def two_files(root, n=160):
  docs = make_docs(n)
  os.makedirs(root)
  with open(os.path.join(root, "a.jsonl"), "w") as f:
    f.writelines(json.dumps({"text": d}) + "\n" for d in docs[:n // 2])
  with open(os.path.join(root, "b.txt"), "w") as f:
    f.write("\n\n".join(docs[n // 2:]))
  return root


def test_one_and_two_workers_write_the_same_bytes(tmp_path):
  src = two_files(str(tmp_path / "in"))
  out = {}
  for w in (1, 2):
    wd = str(tmp_path / f"w{w}")
    corpus.build(config(src, **{"data.workers": w, "data.chunk_bytes": 500}), wd)
    out[w] = data_files(wd)
    out[w]["tokenizer"] = open(os.path.join(wd, "tokenizer.json"), "rb").read()
  assert len(out[1]) > 4 and out[1] == out[2]


def test_kill_during_preparation_then_rerun_gives_the_same_bytes(tmp_path):
  docs = make_docs(400)
  path = tmp_path / "big.txt"  # one file, many byte-range chunks
  path.write_text("\n\n".join(docs))
  c = config(path, **{"data.chunk_bytes": 400, "data.shard_tokens": 1500})
  ref = str(tmp_path / "ref")
  corpus.build(c, ref)
  cfg_file = tmp_path / "c.json"
  cfg_file.write_text(json.dumps(config_lib.to_dict(c)))
  wd = str(tmp_path / "wd")
  code = ("import json, sys; from ml_collections import ConfigDict; "
          "from lmmask.data import corpus; "
          f"corpus.build(ConfigDict(json.load(open({str(cfg_file)!r}))), {wd!r})")
  proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stderr=subprocess.DEVNULL)
  ledger = os.path.join(wd, corpus.PARTIAL, corpus.LEDGER)
  deadline = time.time() + 120
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(ledger) and open(ledger).read().count("\n") >= 3:
      break
    time.sleep(0.005)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not os.path.exists(os.path.join(wd, "data")), "killed too late to test a resume"
  # A damaged shard of the killed run is found and its chunk redone.
  first = os.path.join(wd, corpus.PARTIAL, "train", "shard_000.bin")
  first = first if os.path.exists(first) else first + ".open"
  with open(first, "r+b") as f:
    f.write(b"\xff\xff")
  corpus.build(c, wd)
  assert data_files(wd) == data_files(ref)
  assert open(os.path.join(wd, "tokenizer.json"), "rb").read() == \
      open(os.path.join(ref, "tokenizer.json"), "rb").read()
  assert not os.path.exists(os.path.join(wd, corpus.PARTIAL))
  # A truncated shard of a finished dataset is refused on open.
  with open(os.path.join(wd, "data", "train", "shard_000.bin"), "r+b") as f:
    f.truncate(10)
  with pytest.raises(ValueError, match="damaged"):
    text.build(c, wd)


# ---------------------------------------------------------------------------
# Bad inputs.

def _bad_inputs(root):
  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  good = "\n".join(json.dumps({"text": d}) for d in make_docs(30)) + "\n"
  gz = gzip.compress(good.encode())
  return {
      "corrupt gzip": ("x.jsonl.gz", gz[:40] + b"\x00" * 30 + gz[70:],
                       r"x\.jsonl\.gz: cannot be read as gzip"),
      "not JSON": ("x.jsonl", (good + "{oops\n").encode(), r"x\.jsonl:31: not valid JSON"),
      "no text key": ("x.jsonl", (good + '{"body": "b"}\n').encode(),
                      r"x\.jsonl:31: no 'text' field \(data\.text_key='text'; the record has \['body'\]"),
      "not UTF-8": ("x.txt", b"fine text\n\nbad \xff byte\n", r"x\.txt:3: not UTF-8 \(byte 0xff\)"),
      "empty file": ("x.txt", b"", r"x\.txt: empty file"),
      "parquet column": ("x.parquet", pa.table({"text": [1, 2, 3]}),
                         r"x\.parquet: column 'text' is int64, not text"),
  }, pq, good


@pytest.mark.parametrize("case", ["corrupt gzip", "not JSON", "no text key", "not UTF-8",
                                  "empty file", "parquet column"])
def test_bad_records_are_named_and_leave_the_workdir_as_it_was(tmp_path, case):
  cases, pq, good = _bad_inputs(tmp_path)
  name, data, message = cases[case]
  src = tmp_path / "in"
  src.mkdir()
  (src / "good.jsonl").write_text(good)
  if isinstance(data, bytes):
    (src / name).write_bytes(data)
  else:
    pq.write_table(data, str(src / name))
  wd = tmp_path / "wd"
  wd.mkdir()
  (wd / "notes.txt").write_text("mine")
  with pytest.raises(corpus.BadInput, match=message) as e:
    corpus.build(config(src), str(wd))
  assert "max_bad_fraction" in str(e.value)
  assert sorted(os.listdir(wd)) == ["notes.txt"]
  assert not os.path.exists(tmp_path / "fresh")
  with pytest.raises(corpus.BadInput):
    corpus.build(config(src), str(tmp_path / "fresh"))
  assert not os.path.exists(tmp_path / "fresh")  # a workdir it created is removed again
  meta = corpus.build(config(src, **{"data.max_bad_fraction": 0.5}), str(wd))
  assert meta["summary"]["bad_records"] >= 1 and meta["summary"]["documents"] >= 20


# ---------------------------------------------------------------------------
# Token dtype, duplicates, the split.

def test_token_dtype_follows_the_vocabulary(tmp_path):
  assert shards.token_dtype_name(1 << 16) == "uint16"
  assert shards.token_dtype_name((1 << 16) + 1) == "uint32"
  tk = K.tokenizers_module()
  vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
  vocab.update({f"w{i}": i + 4 for i in range(70000)})
  big = tk.Tokenizer(tk.models.WordLevel(vocab, unk_token="<unk>"))
  big.pre_tokenizer = tk.pre_tokenizers.WhitespaceSplit()
  tok_path = str(tmp_path / "big.json")
  big.save(tok_path)
  rng = np.random.default_rng(0)
  docs = [" ".join(f"w{i}" for i in rng.integers(0, 70000, size=8)) for _ in range(40)]
  (tmp_path / "c.txt").write_text("\n\n".join(docs))
  wd = str(tmp_path / "wd")
  meta = corpus.build(config(tmp_path / "c.txt", **{"data.tokenizer": tok_path}), wd)
  assert meta["token_dtype"] == "uint32"
  n = meta["splits"]["train"]["num_tokens"]
  assert os.path.getsize(os.path.join(wd, "data", "train", "shard_000.bin")) == 4 * n
  read = split_docs(wd, "train") + split_docs(wd, "val")
  assert max(max(d) for d in read) >= 1 << 16
  assert sorted(read) == sorted([1, *[vocab[w] for w in d.split()], 2] for d in docs)


def test_duplicates_are_counted_and_dropped(tmp_path, tok_file):
  docs = make_docs(50)
  src = tmp_path / "in"
  src.mkdir()
  (src / "a.txt").write_text("\n\n".join(docs + docs[:5]))
  (src / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[10:17]))
  meta = corpus.build(config(src, **{"data.tokenizer": tok_file}), str(tmp_path / "wd"))
  assert meta["summary"]["duplicates"] == 12 and meta["summary"]["documents"] == 50
  read = split_docs(str(tmp_path / "wd"), "train") + split_docs(str(tmp_path / "wd"), "val")
  assert len({tuple(d) for d in read}) == len(read) == 50


def test_split_is_stable_when_files_come_in_another_order(tmp_path, tok_file):
  docs = make_docs(120)
  parts = [docs[:40], docs[40:80], docs[80:]]
  vals = []
  for order, names in ((0, "abc"), (1, "cab")):
    src = tmp_path / f"in{order}"
    src.mkdir()
    for name, part in zip(names, parts):
      (src / f"{name}.txt").write_text("\n\n".join(part))
    wd = str(tmp_path / f"wd{order}")
    corpus.build(config(src, **{"data.tokenizer": tok_file}), wd)
    vals.append(sorted(split_docs(wd, "val")))
  assert vals[0] == vals[1] and 0 < len(vals[0]) < 40
  # Another split_seed holds out other documents.
  wd = str(tmp_path / "seed1")
  corpus.build(config(tmp_path / "in0", **{"data.tokenizer": tok_file, "data.split_seed": 1}), wd)
  assert sorted(split_docs(wd, "val")) != vals[0]


# ---------------------------------------------------------------------------
# --mode=prepare, reuse, a missing extra.

def test_prepare_mode_builds_what_training_reuses(tmp_path, tok_file):
  (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in make_docs(40)))
  c = config(tmp_path / "c.jsonl", **{"data.tokenizer": tok_file})
  with pytest.raises(ValueError, match="pass --workdir"):
    registry.prepare(c, None)
  wd = str(tmp_path / "wd")
  meta = registry.prepare(c, wd)
  stamp = os.stat(os.path.join(wd, "data", shards.META_FILE)).st_mtime_ns
  tok, splits = text.build(c, wd)  # what training calls: reused, not rebuilt
  assert os.stat(os.path.join(wd, "data", shards.META_FILE)).st_mtime_ns == stamp
  assert len(splits["train"]) + len(splits["val"]) == meta["summary"]["documents"]
  c.data.split_seed = 1  # another split is another dataset: refused by name
  with pytest.raises(ValueError, match="differs: split_seed"):
    text.build(c, wd)
  c.data.split_seed = 0
  shard = os.path.join(wd, "data", "train", "shard_000.bin")
  with open(shard, "r+b") as f:
    f.write(b"\x07\x07")
  with pytest.raises(ValueError, match="damaged"):  # prepare checks every sha256
    registry.prepare(c, wd)
  with pytest.raises(ValueError, match="nothing to prepare"):
    registry.prepare(load_config("verbs.py", "tiny"), wd)


def test_a_missing_extra_says_what_to_install():
  with pytest.raises(ImportError, match=r"pip install 'lmmask\[data\]'"):
    inputs._module("lmmask_no_such_module", "pyarrow")


def test_upgrade_moves_the_old_prepare_knobs_under_data():
  old = {"prepare": {"vocab_size": 270, "tokenizer": "base/tokenizer.json", "shard_tokens": 99}}
  chat = config_lib.upgrade({"data": {"corpus": "shards", "vocab_size": 512}, **old})
  assert (chat.data.vocab_size, chat.data.tokenizer, chat.data.shard_tokens) == \
      (270, "base/tokenizer.json", 99)  # what a shards corpus's dataset was prepared with
  assert "vocab_size" not in chat.prepare and "tokenizer" not in chat.prepare
  txt = config_lib.upgrade({"data": {"corpus": "text", "vocab_size": 300}, **old})
  assert txt.data.vocab_size == 300 and txt.data.tokenizer == ""  # prepare.* never read
