"""Corpus preparation at scale: lmmask's `--mode=prepare` against the `tokenizers`
library's own `encode_batch` (all threads) on the same text and tokenizer, in the same
run; peak RSS of the preparation (all its processes); the time to open 10^7 documents.

  python benchmarks/prepare.py --sizes=100M,1G --repeats=3 --out=/tmp/lmmask_prepare_bench

Each size is a synthetic corpus (JSONL, and Parquet for the first size) of generated
documents (500 to 6000 characters of Zipf-distributed pseudo-words); the tokenizer is a
32k byte-level BPE trained once on a 20 MB sample and passed as data.tokenizer, so the
numbers are those of preparation with a given tokenizer. lmmask and the reference run
alternately (A, B, A, B, ...) in fresh subprocesses; medians are printed with the spread
and the machine's load average. Prints a Markdown table (docs/text.md keeps one).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from lmmask import config as config_lib  # noqa: E402
from lmmask.data import tokenizer as tok_lib  # noqa: E402

SIZES = {"100M": 100 << 20, "1G": 1 << 30, "10M": 10 << 20}


def words(seed=0, n=20000):
  rng = np.random.default_rng(seed)
  letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
  return ["".join(rng.choice(letters, size=rng.integers(2, 10))) for _ in range(n)]


def make_jsonl(path, size, seed=0):
  """Generated documents until `size` bytes of JSONL."""
  vocab = np.array(words(seed))
  p = 1.0 / np.arange(1, len(vocab) + 1)
  p /= p.sum()
  rng = np.random.default_rng(seed + 1)
  written = 0
  with open(path, "w") as f:
    while written < size:
      n_words = int(rng.integers(80, 1000))
      doc = " ".join(vocab[rng.choice(len(vocab), size=n_words, p=p)])
      line = json.dumps({"text": doc}) + "\n"
      f.write(line)
      written += len(line)
  return path


def jsonl_to_parquet(src, dst):
  import pyarrow as pa
  import pyarrow.parquet as pq
  with open(src) as f:
    texts = [json.loads(line)["text"] for line in f]
  pq.write_table(pa.table({"text": texts}), dst, row_group_size=20000)


def train_tokenizer(corpus, path):
  texts, size = [], 0
  with open(corpus) as f:
    for line in f:
      texts.append(json.loads(line)["text"])
      size += len(texts[-1])
      if size > 20 << 20:
        break
  tok_lib.save_atomic(tok_lib.train_bpe(texts, 32000, tok_lib.TEXT_SPECIALS), path)


def run_measured(cmd, timeout=None):
  """(stdout, peak RSS in bytes of the process tree, wall seconds) of `cmd`; stdout is
  None when it ran past `timeout` seconds (then killed)."""
  t0 = time.time()
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
  peak = [0]

  def poll():
    p = psutil.Process(proc.pid)
    while proc.poll() is None:
      try:
        rss = sum(c.memory_info().rss for c in [p, *p.children(recursive=True)])
        peak[0] = max(peak[0], rss)
      except psutil.Error:
        pass
      time.sleep(0.05)
  th = threading.Thread(target=poll, daemon=True)
  th.start()
  try:
    out, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    for c in psutil.Process(proc.pid).children(recursive=True):
      c.kill()
    proc.kill()
    proc.communicate()
    th.join()
    return None, peak[0], time.time() - t0
  th.join()
  if proc.returncode:
    raise RuntimeError(f"{cmd} failed:\n{err[-3000:]}")
  return out, peak[0], time.time() - t0


LMMASK = """
import json, sys, time
from ml_collections import ConfigDict
from lmmask.data import corpus
c = ConfigDict(json.load(open(sys.argv[1])))
t = time.time()
meta = corpus.build(c, sys.argv[2], progress=False)
s = meta["summary"]
print(json.dumps({"tokens": s["tokens"], "seconds": time.time() - t, "documents": s["documents"]}))
"""

REFERENCE = """
import json, os, sys, time
import tokenizers
tok = tokenizers.Tokenizer.from_file(sys.argv[1])
n, spent, batch, size = 0, 0.0, [], 0

def flush():
  global n, spent, batch, size
  t = time.time()
  n += sum(len(e.ids) for e in tok.encode_batch(batch, add_special_tokens=False))
  spent += time.time() - t
  batch, size = [], 0
with open(sys.argv[2]) as f:
  for line in f:
    batch.append(json.loads(line)["text"].strip())
    size += len(batch[-1])
    if size >= 8 << 20:
      flush()
if batch:
  flush()
print(json.dumps({"tokens": n, "seconds": spent}))
"""


def bench_lmmask(cfg_path, corpus, tok, out, timeout=None):
  c = config_lib.load_file(os.path.join(REPO, "configs", "text.py"))
  c.data.path, c.data.tokenizer, c.data.workers = corpus, tok, 0
  c.train.progress_bar = False
  with open(cfg_path, "w") as f:
    json.dump(config_lib.to_dict(c), f)
  subprocess.run(["rm", "-rf", out])
  stdout, rss, wall = run_measured([sys.executable, "-c", LMMASK, cfg_path, out], timeout)
  if stdout is None:  # stopped: how far it got (a rerun would resume from the ledger)
    ledger = os.path.join(out, ".data.partial", "ledger.jsonl")
    lines = open(ledger).read().splitlines() if os.path.exists(ledger) else []
    tokens = json.loads(lines[-1])["stats"]["tokens"] if lines else 0
    return {"tok_s": tokens / wall, "rss": rss, "tokens": tokens, "docs": None,
            "partial": f"stopped after {wall:.0f} s at chunk {len(lines)}"}
  r = json.loads(stdout.strip().splitlines()[-1])
  return {"tok_s": r["tokens"] / r["seconds"], "rss": rss, "tokens": r["tokens"],
          "docs": r["documents"]}


def bench_reference(corpus, tok):
  stdout, rss, _ = run_measured([sys.executable, "-c", REFERENCE, tok, corpus])
  r = json.loads(stdout.strip().splitlines()[-1])
  return {"tok_s": r["tokens"] / r["seconds"], "tokens": r["tokens"]}


OPEN = """
import sys, time
from lmmask.data import shards, text
t = time.time()
s = text.TextSplit(shards.ShardSplit(sys.argv[1], "train", use_loss_mask=False), length=65,
                   packing=True, pad_id=0)
print(time.time() - t, len(s))
"""


def bench_open(root, n_docs=10**7):
  """Seconds to open a prepared text corpus of n_docs documents (windows and rows)."""
  rng = np.random.default_rng(0)
  lengths = rng.integers(3, 120, size=n_docs).astype(np.int64)
  d = os.path.join(root, "train")
  os.makedirs(d, exist_ok=True)
  total = int(lengths.sum())
  with open(os.path.join(d, "shard_000.bin"), "wb") as f:
    f.truncate(2 * total)  # contents do not matter for opening (a sparse file)
  starts = np.zeros(n_docs, np.int64)
  np.cumsum(lengths[:-1], out=starts[1:])
  np.save(os.path.join(d, "docs.npy"), np.stack([np.zeros(n_docs, np.int64), starts, lengths], 1))
  meta = {"format_version": 1, "kind": "text", "vocab_size": 32003, "pad_id": 0,
          "token_dtype": "uint16", "index_file": "docs.npy", "tokenizer": None,
          "splits": {"train": {"num_docs": n_docs, "num_tokens": total,
                               "shards": [{"tokens": "shard_000.bin", "mask": None,
                                           "num_tokens": total}]}}}
  with open(os.path.join(root, "meta.json"), "w") as f:
    json.dump(meta, f)
  out, rss, _ = run_measured([sys.executable, "-c", OPEN, root])
  seconds, rows = out.split()
  return float(seconds), int(rows), rss


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--sizes", default="100M,1G")
  ap.add_argument("--repeats", type=int, default=3, help="alternating runs per side (first size)")
  ap.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "lmmask_prepare_bench"))
  ap.add_argument("--open_docs", type=int, default=10**7, help="0: skip the open benchmark")
  ap.add_argument("--lmmask_only", default="", help="sizes run without the reference")
  ap.add_argument("--timeout", type=float, default=None,
                  help="stop a preparation after this many seconds and report how far it got")
  args = ap.parse_args()
  os.makedirs(args.out, exist_ok=True)
  rows = []
  tok = os.path.join(args.out, "tokenizer.json")
  for i, name in enumerate(args.sizes.split(",")):
    corpus = os.path.join(args.out, f"corpus_{name}.jsonl")
    if not os.path.exists(corpus):
      make_jsonl(corpus, SIZES[name])
    if not os.path.exists(tok):
      train_tokenizer(corpus, tok)
    inputs = {"jsonl": corpus}
    if i == 0:
      pq_path = os.path.join(args.out, f"corpus_{name}.parquet")
      if not os.path.exists(pq_path):
        jsonl_to_parquet(corpus, pq_path)
      inputs["parquet"] = pq_path
    for fmt, path in inputs.items():
      repeats = args.repeats if i == 0 and fmt == "jsonl" else 1
      lm, ref = [], []
      for r in range(repeats):  # alternate A, B, A, B: the machine is shared
        if name not in args.lmmask_only.split(","):
          ref.append(bench_reference(corpus, tok))
          print(f"{name} {fmt} run {r}: tokenizers {ref[-1]['tok_s']:.0f} tok/s, load "
                f"{os.getloadavg()}", flush=True)
        lm.append(bench_lmmask(os.path.join(args.out, "cfg.json"), path, tok,
                               os.path.join(args.out, "wd"), args.timeout))
        print(f"{name} {fmt} run {r}: lmmask {lm[-1]['tok_s']:.0f} tok/s, RSS "
              f"{lm[-1]['rss'] / 2**20:.0f} MiB, load {os.getloadavg()} "
              f"{lm[-1].get('partial', '')}", flush=True)
      med = lambda xs: statistics.median(xs)  # noqa: E731
      lt, rt = [x["tok_s"] for x in lm], [x["tok_s"] for x in ref] or [float("nan")]
      rows.append({"size": name + (" (" + lm[0]["partial"] + ")" if "partial" in lm[0] else ""),
                   "format": fmt, "tokens": lm[0]["tokens"], "docs": lm[0]["docs"],
                   "lmmask": med(lt), "lmmask_spread": (min(lt), max(lt)),
                   "reference": med(rt), "reference_spread": (min(rt), max(rt)),
                   "ratio": med(lt) / med(rt), "rss": med([x["rss"] for x in lm]),
                   "runs": repeats})
  if args.open_docs:
    open_s, open_rows, open_rss = bench_open(os.path.join(args.out, "open"), args.open_docs)
  print(f"\nload average {os.getloadavg()} on {os.cpu_count()} cores\n")
  print("| corpus | tokens | lmmask tokens/s | tokenizers encode_batch tokens/s | ratio | "
        "peak RSS | runs |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['size']} {r['format']} | {r['tokens'] / 1e6:.1f}M | {r['lmmask'] / 1e6:.3f}M "
          f"({r['lmmask_spread'][0] / 1e6:.3f}-{r['lmmask_spread'][1] / 1e6:.3f}) | "
          f"{r['reference'] / 1e6:.3f}M ({r['reference_spread'][0] / 1e6:.3f}-"
          f"{r['reference_spread'][1] / 1e6:.3f}) | {r['ratio']:.2f}x | "
          f"{r['rss'] / 2**20:.0f} MiB | {r['runs']} |")
  if args.open_docs:
    print(f"\nopening {args.open_docs} documents (windows + packed rows, length 65): "
          f"{open_s:.2f} s, {open_rows} rows, peak RSS {open_rss / 2**20:.0f} MiB")


if __name__ == "__main__":
  main()
