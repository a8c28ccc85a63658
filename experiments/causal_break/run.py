"""The forgotten-causal-mask break, measured: one command, two runs, one report.

  PYTHONPATH=. python experiments/causal_break/run.py
  PYTHONPATH=. python experiments/causal_break/run.py tiny   # smoke run, seconds

Trains configs/verbs.py twice with the same seed and steps, once as is and once
with causal=false, then evaluates both (teacher-forced and inference-mode loss,
greedy and sampled exact match, the n-gram baseline, the entropy floor, the
attention audit) and writes experiments/causal_break/REPORT.md, results.json and
figures/*.png. Workdirs go to $LMMASK_CAUSAL_BREAK_DIR (default
/tmp/lmmask/causal_break); a rerun resumes them (a finished run is only
re-evaluated), and a workdir holding another experiment is refused, never
overwritten. No flags: launch.py is the only file that defines them. `tiny`: the
same two runs on configs/verbs.py:tiny, with workdirs, report and figures in a
temporary directory.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(HERE))

import common  # noqa: E402  (experiments/common.py)
import jax  # noqa: E402
import numpy as np  # noqa: E402

from lmmask import config as config_lib
from lmmask import losses, train  # noqa: E402
from lmmask import step as step_lib  # noqa: E402
from lmmask import workdir as workdir_lib  # noqa: E402
from lmmask.data import pipeline, verbs_source  # noqa: E402
from lmmask.eval import (
  audit,  # noqa: E402
  ngram,  # noqa: E402
)
from lmmask.eval import verbs as eval_verbs  # noqa: E402

TINY = common.is_tiny()
OUT = common.output_dir(HERE)  # REPORT.md, results.json, figures/
# name -> configs/verbs.py argument
RUNS = ({"causal": "tiny", "no_causal": "tiny,causal=false"} if TINY else
        {"causal": "", "no_causal": "causal=false"})
LOG_EVERY, EVAL_EVERY = 1, 10  # resumable fields: fine-grained curves near the start
SAMPLE_TEMPERATURE, SAMPLE_SEEDS = 1.0, (0, 1, 2)


def get_config(arg):
  c = config_lib.load_file(os.path.join(REPO, "configs", "verbs.py") + (f":{arg}" if arg else ""))
  c.train.log_every = LOG_EVERY
  c.train.eval_every = EVAL_EVERY
  c.train.progress_bar = False
  return c


def read_metrics(workdir):
  rows = {"train": [], "eval": []}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      rows.setdefault(r["kind"], []).append(r)
  # a resumed run appends; keep the last row per step
  return {k: sorted({r["step"]: r for r in v}.values(), key=lambda r: r["step"])
          for k, v in rows.items()}


def collapse_stats(rows, vocab):
  """How degenerate are the completions (repeated tokens, <bos> collapse)?"""
  n = len(rows)
  outs = [r["completion"].split() for r in rows]
  first = [o[0] if o else "" for o in outs]
  top_first, top_count = max(((t, first.count(t)) for t in set(first)), key=lambda x: x[1])
  return {"num": n,
          "no_eos": sum(not r["finished"] for r in rows) / n,
          "contains_bos": sum("<bos>" in o for o in outs) / n,
          "immediate_repeat": sum(any(a == b for a, b in zip(o, o[1:])) for o in outs) / n,
          "distinct_completions": len({r["completion"] for r in rows}),
          "most_common_first_token": top_first, "most_common_first_share": top_count / n}


@jax.jit  # once per batch shape: run op by op, this dispatches hundreds of kernels
def _token_nll(state, batch):
  logits = step_lib.forward(state, state.params, batch, deterministic=True)
  return losses.per_token_nll(logits, batch.targets, batch.loss_mask)[0]


def val_loss_by_seen_target(state, corpus, val_split, batch_size):
  """Teacher-forced val loss split by whether the target token occurs in training."""
  seen = np.zeros(len(corpus.vocab), bool)
  for e in corpus.train:
    seen[list(e.ids)] = True
  sums = {True: [0.0, 0], False: [0.0, 0]}
  for b in pipeline.eval_batches(val_split, batch_size=batch_size, pad_id=corpus.vocab.pad_id):
    nll = np.asarray(_token_nll(state, b))
    mask = np.asarray(b.loss_mask) > 0
    tgt_seen = seen[np.asarray(b.targets)]
    for flag in (True, False):
      sel = mask & (tgt_seen == flag)
      sums[flag][0] += float(nll[sel].sum())
      sums[flag][1] += int(sel.sum())
  return {("seen" if k else "unseen"): {"loss": v[0] / v[1] if v[1] else None, "tokens": v[1]}
          for k, v in sums.items()}


def evaluate_run(name, workdir, config):
  config_, data, state, step = workdir_lib.restore_state(workdir)
  corpus, train_split, val_split = verbs_source.splits(config)
  pad, bs = corpus.vocab.pad_id, config.data.eval_batch_size
  out = {"step": step}
  sets = data.eval_sets()
  out.update(step_lib.run_evals(state, sets))
  for split_name, split in (("train", train_split), ("val", val_split)):
    inf = eval_verbs.prefix_recompute_eval(
        state, pipeline.eval_batches(split, batch_size=bs, pad_id=pad))
    out.update({f"{split_name}_inference_loss": inf["loss"],
                f"{split_name}_inference_ppl": inf["ppl"],
                f"{split_name}_inference_accuracy": inf["accuracy"]})
  out["val_by_seen_target"] = val_loss_by_seen_target(state, corpus, val_split, bs)
  greedy = eval_verbs.exact_match(state, corpus, direction=config.eval.direction,
                                  max_new_tokens=config.eval.max_new_tokens,
                                  num_examples=12)
  out["greedy"] = {k: v for k, v in greedy.items() if k != "rows"}
  out["greedy_collapse"] = collapse_stats(greedy["rows"], corpus.vocab)
  sampled = []
  for s in SAMPLE_SEEDS:
    em = eval_verbs.exact_match(state, corpus, direction=config.eval.direction,
                                max_new_tokens=config.eval.max_new_tokens, num_examples=6,
                                temperature=SAMPLE_TEMPERATURE,
                                rng=jax.random.PRNGKey(s))
    sampled.append(em)
  out["sampled_exact_match"] = float(np.mean([e["exact_match"] for e in sampled]))
  out["sampled_examples"] = sampled[0]["examples"]
  out["sampled_collapse"] = collapse_stats(sampled[0]["rows"], corpus.vocab)
  # the best-by-val-loss checkpoint (kept by train.py), for comparison with the final one
  _, _, best, best_step = workdir_lib.restore_state(workdir, "best")
  bev = step_lib.evaluate(best, sets["val"])
  bem = eval_verbs.exact_match(best, corpus, direction=config.eval.direction,
                               max_new_tokens=config.eval.max_new_tokens,
                               num_examples=0)
  out["best"] = {"step": best_step, "val_loss": bev["loss"], "val_ppl": bev["ppl"],
                 "exact_match": bem["exact_match"],
                 "exact_match_regular": bem["exact_match_regular"],
                 "exact_match_irregular": bem["exact_match_irregular"],
                 "over_regularised": bem["over_regularised"]}
  res = audit.run_audit(state, config_, data, outdir=os.path.join(workdir, "audit"))
  out["audit"] = {k: res[k] for k in ("passed", "checks", "future_max_logit_change",
                                      "pad_max_logit_change", "max_mass_above_diagonal",
                                      "max_mass_on_pad_keys", "mass_above_diagonal",
                                      "mass_on_pad_keys")}
  figdir = os.path.join(OUT, "figures")
  os.makedirs(figdir, exist_ok=True)
  out["heatmaps"] = []
  for i, path in enumerate(res.get("heatmaps", [])[:2]):
    dst = os.path.join(figdir, f"attention_{name}_{i}.png")
    shutil.copyfile(path, dst)
    out["heatmaps"].append(os.path.relpath(dst, OUT))
  return out


def plot_curves(metrics, floor, log_v, path_train, path_val):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  colors = {"causal": "tab:blue", "no_causal": "tab:red"}
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, xmax in zip(axes, (None, 300)):
    for name, m in metrics.items():
      # losses that underflow to exactly 0 are drawn at 1e-10 (log axis)
      tr = [(r["step"], max(r["loss"], 1e-10)) for r in m["train"]
            if xmax is None or r["step"] <= xmax]
      ev = [(r["step"], max(r["train_loss"], 1e-10)) for r in m["eval"]
            if xmax is None or r["step"] <= xmax]
      ax.plot(*zip(*tr), color=colors[name], alpha=0.35, lw=0.8,
              label=f"{name}: batch loss (dropout on)")
      ax.plot(*zip(*ev), color=colors[name], lw=2, marker="o" if xmax else None, ms=3,
              label=f"{name}: full train set, token mean, dropout off")
    ax.axhline(floor, color="k", ls="--", label=f"entropy floor {floor:.3f}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (nats/token)")
    ax.set_title("all steps" if xmax is None else f"first {xmax} steps")
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path_train, dpi=110)
  plt.close(fig)
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, m in metrics.items():
    ev = [(r["step"], r["val_loss"]) for r in m["eval"]]
    ax.plot(*zip(*ev), color=colors[name], lw=2, label=f"{name}: val loss (teacher forced)")
  ax.axhline(log_v, color="gray", ls=":", label=f"log V = {log_v:.2f} (uniform)")
  ax.set_yscale("log")
  ax.set_xlabel("step")
  ax.set_ylabel("val loss (nats/token)")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path_val, dpi=110)
  plt.close(fig)


def first_step_below(rows, key, floor):
  for r in rows:
    if r[key] < floor:
      return r["step"]
  return None


def fmt(x, nd=4):
  if x is None:
    return "n/a"
  if isinstance(x, bool):
    return str(x)
  if isinstance(x, float):
    if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e4):
      return f"{x:.2e}"
    return f"{x:.{nd}f}"
  return str(x)


def pct(x):
  return "n/a" if x is None else f"{100 * x:.1f}%"


def write_report(summary, path):
  c, b = summary["runs"]["causal"], summary["runs"]["no_causal"]
  floor = summary["entropy_floor"]
  L = []
  L.append("# The forgotten causal mask, measured\n")
  L.append(f"Generated by `PYTHONPATH=. python experiments/causal_break/run.py` on "
           f"{summary['time']} (git {summary['git_commit'] or 'unknown'}, "
           f"{summary['device']}, {summary['wall_seconds']:.0f} s). Every number below is "
           f"read from that run; rerunning the command regenerates this file.\n")
  L.append(f"Two runs of `configs/verbs.py` (split `verbs`: look/like/see/eat held out), "
           f"identical except `model.causal`: seed {summary['seed']}, "
           f"{summary['steps']} steps, {summary['num_params']} parameters. "
           f"`causal` is `configs/verbs.py`, `no_causal` is `configs/verbs.py:causal=false`."
           f" Workdirs: `{summary['root']}`.\n")
  L.append("## Numbers\n")
  rows = [
      ("entropy floor of the train set (nats/token)", floor, floor),
      ("final train loss (full train set, token mean, dropout off)", c["train_loss"],
       b["train_loss"]),
      ("final val loss (teacher forced)", c["val_loss"], b["val_loss"]),
      ("final val PPL (teacher forced)", c["val_ppl"], b["val_ppl"]),
      ("final val loss, English side only", c["val_english_loss"], b["val_english_loss"]),
      ("val token accuracy (teacher forced)", c["val_accuracy"], b["val_accuracy"]),
      ("val loss, inference mode (each prefix recomputed)", c["val_inference_loss"],
       b["val_inference_loss"]),
      ("val PPL, inference mode", c["val_inference_ppl"], b["val_inference_ppl"]),
      ("val token accuracy, inference mode", c["val_inference_accuracy"],
       b["val_inference_accuracy"]),
      ("train loss, inference mode", c["train_inference_loss"], b["train_inference_loss"]),
      ("n-gram baseline val loss / PPL (same tokens)",
       f"{summary['baseline']['baseline_val_loss']:.4f} / "
       f"{summary['baseline']['baseline_val_ppl']:.2f}", "same"),
  ]
  L.append("| | causal | no_causal |\n|---|---|---|")
  for name, x, y in rows:
    L.append(f"| {name} | {fmt(x)} | {fmt(y)} |")
  L.append("")
  L.append("Exact match on the 60 held-out forms (prompt `<bos> spanish /`, the model writes "
           "the English side; a completion counts only if it ends with `<eos>`):\n")
  L.append("| | causal | no_causal |\n|---|---|---|")
  for key, label in (("exact_match", "greedy exact match, all"),
                     ("exact_match_regular", "greedy, regular verbs (look, like)"),
                     ("exact_match_irregular", "greedy, irregular verbs (see, eat)")):
    L.append(f"| {label} | {pct(c['greedy'][key])} | {pct(b['greedy'][key])} |")
  L.append(f"| over-regularised answers (of {c['greedy']['over_regularisable']} past forms "
           f"of see/eat) | {c['greedy']['over_regularised']} | {b['greedy']['over_regularised']} |")
  L.append(f"| sampled exact match (T={SAMPLE_TEMPERATURE}, mean of {len(SAMPLE_SEEDS)} "
           f"seeds) | {pct(c['sampled_exact_match'])} | {pct(b['sampled_exact_match'])} |")
  for key, label in (("no_eos", "greedy: no `<eos>` within the budget"),
                     ("contains_bos", "greedy: completion contains `<bos>`"),
                     ("immediate_repeat", "greedy: a token repeated back to back")):
    L.append(f"| {label} | {pct(c['greedy_collapse'][key])} | {pct(b['greedy_collapse'][key])} |")
  L.append(f"| greedy: distinct completions (of 60) | {c['greedy_collapse']['distinct_completions']}"
           f" | {b['greedy_collapse']['distinct_completions']} |")
  L.append(f"| greedy: most common first token (share) | "
           f"`{c['greedy_collapse']['most_common_first_token']}` "
           f"({pct(c['greedy_collapse']['most_common_first_share'])}) | "
           f"`{b['greedy_collapse']['most_common_first_token']}` "
           f"({pct(b['greedy_collapse']['most_common_first_share'])}) |")
  L.append("")
  L.append("## Training curves against the floor\n")
  L.append("![train loss](figures/train_loss.png)\n")
  L.append("![val loss](figures/val_loss.png)\n")
  L.append(f"- Full-train-set evaluation (every {EVAL_EVERY} steps) first below the floor: "
           f"causal: {fmt(c['first_eval_below_floor'])}, no_causal: "
           f"{fmt(b['first_eval_below_floor'])}. Floor alarm (floor - "
           f"{summary['floor_tolerance']}) first raised at step: causal: "
           f"{fmt(c['floor_alarm_step'])}, no_causal: {fmt(b['floor_alarm_step'])}.")
  L.append(f"- Single training batch (dropout on) first below the floor: causal: "
           f"{fmt(c['first_batch_below_floor'])}, no_causal: {fmt(b['first_batch_below_floor'])}"
           f" (a batch may dip below legitimately; the alarm does not use it).")
  L.append(f"- no_causal batch loss at step 10: {fmt(b['batch_loss_at_10'])}; at step 100: "
           f"{fmt(b['batch_loss_at_100'])}; first batch below 1e-4 at step "
           f"{fmt(b['first_batch_below_1e-4'])}; lowest batch loss: {fmt(b['min_batch_loss'])} "
           f"(causal lowest: {fmt(c['min_batch_loss'])}). The learning rate warms up "
           f"linearly over the first {summary['warmup_steps']} steps.\n")
  L.append("Best-by-val-loss checkpoints (kept apart by train.py; the numbers above are for "
           "the final step):\n")
  L.append("| | causal | no_causal |\n|---|---|---|")
  L.append(f"| step | {c['best']['step']} | {b['best']['step']} |")
  L.append(f"| val loss (teacher forced) / PPL | {c['best']['val_loss']:.4f} / "
           f"{c['best']['val_ppl']:.2f} | {b['best']['val_loss']:.4f} / {b['best']['val_ppl']:.2f} |")
  for key, label in (("exact_match", "greedy exact match, all"),
                     ("exact_match_regular", "greedy, regular"),
                     ("exact_match_irregular", "greedy, irregular")):
    L.append(f"| {label} | {pct(c['best'][key])} | {pct(b['best'][key])} |")
  L.append(f"| over-regularised | {c['best']['over_regularised']} | "
           f"{b['best']['over_regularised']} |\n")
  L.append("## Audit (`launch.py --mode=audit` on the final checkpoints)\n")
  L.append("| | causal | no_causal |\n|---|---|---|")
  for key, label in (("future_max_logit_change", "future probe: max logit change"),
                     ("pad_max_logit_change", "pad probe: max logit change"),
                     ("max_mass_above_diagonal", "max attention mass above the diagonal"),
                     ("max_mass_on_pad_keys", "max attention mass on pad keys")):
    L.append(f"| {label} | {fmt(c['audit'][key])} | {fmt(b['audit'][key])} |")
  L.append(f"| verdict | {'PASS' if c['audit']['passed'] else 'FAIL (leak)'} | "
           f"{'PASS' if b['audit']['passed'] else 'FAIL (leak)'} |\n")
  for name, r in (("no_causal", b), ("causal", c)):
    L.append(f"Mean attention mass above the diagonal per layer (rows) and head, {name}: "
             + "; ".join("[" + ", ".join(f"{x:.3f}" for x in row) + "]"
                         for row in r["audit"]["mass_above_diagonal"]) + "\n")
  for name, r in (("causal", c), ("no_causal", b)):
    for p in r["heatmaps"]:
      L.append(f"![{name} attention]({p})\n")
  L.append("## Example completions (greedy; wrong ones first, then correct ones)\n")
  for name, r in (("causal", c), ("no_causal", b)):
    L.append(f"{name}:\n\n| prompt | completion | reference |\n|---|---|---|")
    for e in r["greedy"]["examples"]:
      L.append(f"| `{e['prompt']}` | `{e['completion']}` | `{e['reference']}` |")
    L.append("")
  L.append(f"no_causal, sampled (T={SAMPLE_TEMPERATURE}):\n\n| prompt | completion | reference |"
           "\n|---|---|---|")
  for e in b["sampled_examples"][:6]:
    L.append(f"| `{e['prompt']}` | `{e['completion']}` | `{e['reference']}` |")
  L.append("")
  L.append("## The predictions: which held\n")
  L.append("| prediction | measured | held? |\n|---|---|---|")
  for pred, measured, held in summary["predictions"]:
    L.append(f"| {pred} | {measured} | {held} |")
  L.append("")
  L.append("## Reading\n")
  L.extend(summary["reading"])
  with open(path, "w") as f:
    f.write("\n".join(L) + "\n")


def judge(summary):
  c, b = summary["runs"]["causal"], summary["runs"]["no_causal"]
  floor, log_v = summary["entropy_floor"], summary["log_vocab"]
  P = []
  b10 = b["batch_loss_at_10"]
  b4 = b["first_batch_below_1e-4"]
  P.append(("Train loss drops to ~1e-4 in under 10 steps",
            f"no_causal batch loss at step 10: {fmt(b10)}; first batch below 1e-4 at step "
            f"{fmt(b4)}; lowest {fmt(b['min_batch_loss'])}; final full-train loss "
            f"{fmt(b['train_loss'])}",
            "held" if b10 is not None and b10 < 1e-3 else
            (f"partly: it reaches 1e-4 and far below, but at step {b4}, not within 10 steps "
             f"(the learning rate is still warming up then)" if b4 is not None else "no")))
  P.append(("Val loss computed with the future visible also drops to near 0",
            f"no_causal teacher-forced val loss {fmt(b['val_loss'])} (causal "
            f"{fmt(c['val_loss'])})",
            "held" if b["val_loss"] < 0.1 else
            ("partly: far lower than the causal model's, not near 0" if
             b["val_loss"] < c["val_loss"] else "no")))
  P.append((f"Val loss in true autoregressive mode stays at log V = {log_v:.2f} or worse",
            f"no_causal inference-mode val loss {fmt(b['val_inference_loss'])} (causal "
            f"{fmt(c['val_inference_loss'])})",
            "held" if b["val_inference_loss"] >= log_v else
            ("partly: much worse than the causal model, but below log V" if
             b["val_inference_loss"] > c["val_inference_loss"] else "no")))
  bc = b["greedy_collapse"]
  P.append(("Sampling collapses: the same token repeated, or <bos> collapse",
            f"no_causal: greedy exact match {pct(b['greedy']['exact_match'])} (causal "
            f"{pct(c['greedy']['exact_match'])}); sampled {pct(b['sampled_exact_match'])}; "
            f"{pct(bc['immediate_repeat'])} of greedy completions repeat a token back to back, "
            f"{pct(bc['contains_bos'])} contain <bos>, {pct(bc['no_eos'])} never emit <eos>, "
            f"{bc['distinct_completions']} distinct completions",
            "held" if (bc["immediate_repeat"] > 0.5 or bc["contains_bos"] > 0.5)
            else ("partly: generation fails, but not as repeats/<bos>" if
                  b["greedy"]["exact_match"] < c["greedy"]["exact_match"] else "no")))
  P.append(("Attention is not triangular",
            f"max mean attention mass above the diagonal: no_causal "
            f"{fmt(b['audit']['max_mass_above_diagonal'])}, causal "
            f"{fmt(c['audit']['max_mass_above_diagonal'])}",
            "held" if b["audit"]["max_mass_above_diagonal"] > 0.1 else "no"))
  P.append(("Train loss goes below the entropy floor",
            f"floor {floor:.4f}; no_causal final {fmt(b['train_loss'])}, first below at step "
            f"{fmt(b['first_eval_below_floor'])}; causal final {fmt(c['train_loss'])} "
            f"(never below: {c['first_eval_below_floor'] is None})",
            "held" if b["first_eval_below_floor"] is not None else "no"))
  return P


def main():
  t0 = time.time()
  root = (os.path.join(common.tiny_root(), "runs") if TINY else
          os.environ.get("LMMASK_CAUSAL_BREAK_DIR", "/tmp/lmmask/causal_break"))
  os.makedirs(os.path.join(OUT, "figures"), exist_ok=True)
  metrics, runs, configs = {}, {}, {}
  for name, arg in RUNS.items():
    config = get_config(arg)
    configs[name] = config
    workdir = os.path.join(root, name)
    print(f"== {name}: training in {workdir}", flush=True)
    res = train.train_and_evaluate(config, workdir)
    m = read_metrics(workdir)
    metrics[name] = m
    print(f"== {name}: evaluating", flush=True)
    r = evaluate_run(name, workdir, config)
    r.update({k: res[k] for k in ("floor_alarm", "floor_alarm_step", "num_params",
                                  "train_seconds")})
    floor = res["entropy_floor"]
    r["first_eval_below_floor"] = first_step_below(m["eval"], "train_loss", floor)
    r["first_batch_below_floor"] = first_step_below(m["train"], "loss", floor)
    by_step = {row["step"]: row["loss"] for row in m["train"]}
    r["batch_loss_at_10"] = by_step.get(10)
    r["batch_loss_at_100"] = by_step.get(100)
    r["min_batch_loss"] = min(by_step.values())
    r["first_batch_below_1e-4"] = first_step_below(m["train"], "loss", 1e-4)
    runs[name] = r
  corpus = verbs_source.splits(configs["causal"])[0]
  summary = {
      "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
      "git_commit": workdir_lib.provenance()["git_commit"], "device": jax.devices()[0].device_kind,
      "root": root, "seed": configs["causal"].seed, "steps": configs["causal"].train.steps,
      "num_params": runs["causal"]["num_params"],
      "entropy_floor": floor, "log_vocab": math.log(len(corpus.vocab)),
      "floor_tolerance": configs["causal"].eval.floor_tolerance,
      "warmup_steps": configs["causal"].optim.warmup_steps,
      "baseline": ngram.baseline_results(configs["causal"], corpus),
      "runs": runs,
  }
  plot_curves(metrics, floor, summary["log_vocab"], os.path.join(OUT, "figures",
                                                                 "train_loss.png"),
              os.path.join(OUT, "figures", "val_loss.png"))
  summary["predictions"] = judge(summary)
  summary["wall_seconds"] = time.time() - t0
  summary["reading"] = reading(summary)
  write_report(summary, os.path.join(OUT, "REPORT.md"))
  workdir_lib.atomic_write_json(os.path.join(OUT, "results.json"), summary)
  print(f"wrote {os.path.join(OUT, 'REPORT.md')}")
  c, b = runs["causal"], runs["no_causal"]
  print(f"floor {floor:.4f} | causal train {c['train_loss']:.4f} val {c['val_loss']:.4f} "
        f"EM {c['greedy']['exact_match']:.3f} | no_causal train {b['train_loss']:.4f} "
        f"val {b['val_loss']:.4f} EM {b['greedy']['exact_match']:.3f}")


def _seen_note(b, c):
  bs, bu = b["val_by_seen_target"]["seen"], b["val_by_seen_target"]["unseen"]
  total = bs["tokens"] + bu["tokens"]
  share = bu["loss"] * bu["tokens"] / total
  return (f"- Why the broken model's teacher-forced val loss ({b['val_loss']:.4f}) is not near "
          f"0: {bu['tokens']} of the {total} counted val targets are tokens that never occur in "
          f"the training sequences (conjugated forms of the held-out verbs, e.g. `miro`, `saw`). "
          f"Its loss on them is {bu['loss']:.2f} nats, which contributes {share:.2f} of the "
          f"{b['val_loss']:.2f} nats/token mean; on the other targets its loss is "
          f"{bs['loss']:.3f}, lower than the causal model's "
          f"{c['val_by_seen_target']['seen']['loss']:.3f} but not near 0 either (the causal "
          f"model's loss on the unseen targets: {c['val_by_seen_target']['unseen']['loss']:.2f}).")


def reading(summary):
  """Short factual notes derived from the numbers (no hand-written results)."""
  c, b = summary["runs"]["causal"], summary["runs"]["no_causal"]
  floor = summary["entropy_floor"]
  out = [
      f"- The causal model ends {c['train_loss'] - floor:+.4f} nats/token from the floor on "
      f"the training set; the broken one ends {b['train_loss'] - floor:+.4f}. Only a model "
      f"that sees later tokens can be below it."
      + (" The broken model's final train loss is exactly 0.0 in float32: every target "
         "gets probability 1 to within float32 rounding." if b["train_loss"] == 0.0 else ""),
      f"- Teacher-forced numbers flatter the broken model (val loss {b['val_loss']:.4f} vs "
      f"{c['val_loss']:.4f}); recomputing each prefix on its own, as generation does, gives "
      f"{b['val_inference_loss']:.4f} vs {c['val_inference_loss']:.4f}. For the causal model "
      f"the two agree (difference {abs(c['val_inference_loss'] - c['val_loss']):.1e}), as they "
      f"must.",
      _seen_note(b, c),
      f"- Greedy exact match on the held-out verbs: causal {pct(c['greedy']['exact_match'])}, "
      f"no_causal {pct(b['greedy']['exact_match'])}.",
      f"- The audit flags the broken checkpoint (future-probe logit change "
      f"{b['audit']['future_max_logit_change']:.3g}) and passes the causal one "
      f"({c['audit']['future_max_logit_change']:.3g}).",
  ]
  return out


if __name__ == "__main__":
  main()
