"""Does the SFT loss mask help? Pre-train once, fine-tune with the mask on and off.

One command (about 10-15 minutes on 2 busy CPU cores):

  PYTHONPATH=. python experiments/sft_loss_mask/run.py [ROOT] [VARIANT]
  PYTHONPATH=. python experiments/sft_loss_mask/run.py tiny   # smoke run, seconds

ROOT (default runs/sft_loss_mask) receives the datasets and workdirs; VARIANT is
appended to the configs/chat.py argument (e.g. "tiny" for a smoke run). The single
argument `tiny` means ROOT = a fresh temporary directory and VARIANT = tiny. Steps:

  1. prepare the plain-text corpus (trains the byte-level BPE) and the chat set
     (with the same tokenizer), both from lmmask.data.synthetic_chat;
  2. pre-train a base model on the text (configs/chat.py:pretrain);
  3. fine-tune it twice from the base checkpoint -- data.use_loss_mask True and
     False -- with the same seed, steps and everything else, for each seed;
  4. evaluate on the validation conversations: assistant-token loss (NLL over
     the mask-1 tokens), non-assistant-token loss, assistant-turn exact match
     with greedy decoding, and how often replies start with / contain a role
     tag or are followed by a self-written <|user|> turn;
  5. write REPORT.md (ROOT/REPORT.md; with the default ROOT also
     experiments/sft_loss_mask/REPORT.md) with the numbers and example
     conversations.

Reruns reuse finished datasets and runs (training resumes or is a no-op).
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(HERE))

import common  # noqa: E402  (experiments/common.py)

from lmmask import config as config_lib
from lmmask import step as step_lib
from lmmask import train
from lmmask import workdir as workdir_lib
from lmmask.batching import batch_from_ids
from lmmask.data import prepare, shards, tokenizer
from lmmask.eval import chat as eval_chat

SEEDS = (0, 1, 2)


def chat_config(arg):
  c = config_lib.load_file(os.path.join(REPO, "configs", "chat.py") + ":" + arg)
  c.train.progress_bar = False
  return c


def restore(workdir):
  """(config, state) of a workdir's latest checkpoint (the one restore)."""
  config, _, state, _ = workdir_lib.restore_state(workdir)
  return config, state


def token_losses(state, split, length, pad_id, batch_size=64):
  """Token-mean NLL over assistant targets (mask 1) and over the other real targets."""
  out = {}
  for name, pick in (("assistant", 1), ("non_assistant", 0)):
    batches = []
    for start in range(0, len(split), batch_size):
      ids = np.full((batch_size, length), pad_id, np.int64)
      tlm = np.zeros((batch_size, length), np.uint8)
      for r, d in enumerate(range(start, min(start + batch_size, len(split)))):
        t, m = split.doc(d)
        ids[r, :t.size] = t
        tlm[r, :t.size] = (m == pick)
      batches.append(batch_from_ids(ids, pad_id=pad_id, token_loss_mask=tlm))
    out[f"{name}_loss"] = step_lib.evaluate(state, batches)["loss"]
  return out


def evaluate_model(state, config, chat_path, tok, num_examples=0):
  split = shards.ShardSplit(chat_path, "val", use_loss_mask=True)
  length = config.data.length
  m = token_losses(state, split, length, tok.pad_id)
  docs = [split.doc(d)[0] for d in range(len(split))]
  turns, examples = eval_chat.evaluate_turns(state, docs, tok, max_new=12,
                                             max_len=config.model.max_len,
                                             num_examples=num_examples)
  return {**m, **turns}, examples


def main(root="runs/sft_loss_mask", variant=""):
  t0 = time.time()
  v = f",{variant}" if variant else ""
  root = os.path.abspath(root)
  text_path, chat_path = os.path.join(root, "data", "text"), os.path.join(root, "data", "chat")
  pre = chat_config(f"pretrain,data={text_path}{v}")
  sft_on = chat_config(f"sft,data={chat_path}{v}")
  if not os.path.exists(text_path):
    prepare.prepare(pre)
  sft_on.data.tokenizer = os.path.join(text_path, shards.TOKENIZER_FILE)
  if not os.path.exists(chat_path):
    prepare.prepare(sft_on)
  tok = tokenizer.Tokenizer.load_chat(chat_path)
  base_dir = os.path.join(root, "base")
  reused = []  # runs finished by an earlier invocation (then only evaluated here)

  def run(config, wd):
    if os.path.exists(os.path.join(wd, "results.json")):
      reused.append(os.path.basename(wd))
    return train.train_and_evaluate(config, wd)
  print("pre-training", base_dir, flush=True)
  base_res = run(pre, base_dir)
  seeds = SEEDS if not variant else (0,)
  runs = {}
  for seed in seeds:
    for mask in (True, False):
      c = chat_config(f"sft,data={chat_path},mask={str(mask).lower()},seed={seed}{v}")
      c.data.tokenizer = sft_on.data.tokenizer
      c.train.init_from = base_dir
      wd = os.path.join(root, f"sft_mask_{'on' if mask else 'off'}_seed{seed}")
      print("fine-tuning", wd, flush=True)
      run(c, wd)
      runs[(mask, seed)] = wd

  results, examples = {}, {}
  bcfg, bstate = restore(base_dir)
  results["base"], examples["base"] = evaluate_model(bstate, sft_on, chat_path, tok, 4)
  for (mask, seed), wd in runs.items():
    cfg, st = restore(wd)
    r, ex = evaluate_model(st, cfg, chat_path, tok, 4 if seed == seeds[0] else 0)
    results[f"mask_{'on' if mask else 'off'}_seed{seed}"] = r
    if ex:
      examples[f"mask_{'on' if mask else 'off'}"] = ex
  meta = shards.read_meta(chat_path)
  summary = {"results": results, "seeds": list(seeds), "base": base_res,
             "sft_steps": sft_on.train.steps, "pretrain_steps": pre.train.steps,
             "chat_meta": {k: meta["splits"][k]["mask_density"] for k in meta["splits"]},
             "variant": variant, "minutes": (time.time() - t0) / 60, "reused": reused}
  workdir_lib.atomic_write_json(os.path.join(root, "summary.json"), summary)
  report = write_report(summary, examples, pre, sft_on, meta)
  paths = [os.path.join(root, "REPORT.md")]
  if root == os.path.abspath("runs/sft_loss_mask") and not variant:
    paths.append(os.path.join(HERE, "REPORT.md"))
  for p in paths:
    with open(p, "w") as f:
      f.write(report)
  print(report)
  return summary


def _mean_std(results, prefix, key, seeds):
  xs = np.array([results[f"{prefix}_seed{s}"][key] for s in seeds])
  return xs.mean(), xs.std(), xs


def write_report(summary, examples, pre, sft, meta) -> str:
  R, seeds = summary["results"], summary["seeds"]
  keys = [("assistant_loss", "assistant-token loss (nats, val)", "{:.4f}"),
          ("non_assistant_loss", "non-assistant-token loss (nats, val)", "{:.4f}"),
          ("exact_match", "assistant-turn exact match (greedy)", "{:.3f}"),
          ("starts_with_role_tag", "replies starting with a role tag", "{:.3f}"),
          ("contains_role_tag", "replies containing a role tag", "{:.3f}"),
          ("stopped", "replies ending with the end tag", "{:.3f}"),
          ("continues_with_user_turn", "user tag predicted right after the reply", "{:.3f}")]
  lines = [
      "# SFT with and without the loss mask", "",
      "Produced by `PYTHONPATH=. python experiments/sft_loss_mask/run.py`; every number "
      "below comes from that script (`summary.json` next to the workdirs). Wall time of "
      f"the invocation that wrote this file: {summary['minutes']:.1f} min on CPU"
      + (f"; it reused the finished runs {', '.join(summary['reused'])} of an earlier "
         "invocation and only evaluated them." if summary["reused"] else ".")
      + " Any rerun reuses finished datasets and runs.", "",
      "## Setup", "",
      f"* Base model: configs/chat.py:pretrain, {summary['pretrain_steps']} steps on the "
      f"plain-text corpus (val loss {summary['base']['val_loss']:.3f}), "
      f"{summary['base']['num_params']} parameters "
      f"(d_model {pre.model.d_model}, {pre.model.n_layers} layers).",
      f"* Fine-tuning: configs/chat.py:sft from the base checkpoint (`train.init_from`), "
      f"{summary['sft_steps']} steps, lr {sft.optim.lr}, batch {sft.data.batch_size} "
      f"conversations, fresh AdamW; mask on = `data.use_loss_mask=True` (only assistant "
      f"content + its closing `<|end|>` count), mask off = every real token counts. Same "
      f"seed, steps and data for each on/off pair; seeds {seeds}.",
      f"* Chat data: {meta['splits']['train']['num_docs']} train / "
      f"{meta['splits']['val']['num_docs']} val conversations (conjugate a verb, add two "
      f"numbers; ~40% with a system prompt, ~30% two exchanges); mask density "
      f"{meta['splits']['train']['mask_density']:.3f} (train). Tokenizer: byte-level BPE, "
      f"{meta['vocab_size']} tokens, trained on the pre-training text.",
      "* Evaluation on the val conversations: losses are token means over the val set; "
      "exact match prompts with the gold history up to the opening `<|assistant|>` of each "
      "assistant turn and decodes greedily until `<|end|>` (max 12 tokens). The end tag "
      "is `<|end|>`, the user tag `<|user|>`; \"user tag predicted right after the reply\" "
      "is the greedy token after a reply's `<|end|>`, i.e. the model would write the "
      "user's next turn itself without the stop rule.", "",
      "## Results", "",
      "| metric | base (no SFT) | mask on | mask off |", "| --- | --- | --- | --- |"]
  for key, label, fmt in keys:
    row = [label, fmt.format(R["base"][key])]
    for prefix in ("mask_on", "mask_off"):
      m, s, _ = _mean_std(R, prefix, key, seeds)
      row.append(fmt.format(m) + (f" ± {fmt.format(s)}" if len(seeds) > 1 else ""))
    lines.append("| " + " | ".join(row) + " |")
  lines += ["", f"Mean ± std over seeds {seeds}; per seed:", "",
            "| seed | exact match on | exact match off | assistant loss on | assistant loss off |",
            "| --- | --- | --- | --- | --- |"]
  for s in seeds:
    on, off = R[f"mask_on_seed{s}"], R[f"mask_off_seed{s}"]
    lines.append(f"| {s} | {on['exact_match']:.3f} | {off['exact_match']:.3f} | "
                 f"{on['assistant_loss']:.4f} | {off['assistant_loss']:.4f} |")
  d_em = [R[f"mask_on_seed{s}"]["exact_match"] - R[f"mask_off_seed{s}"]["exact_match"]
          for s in seeds]
  d_al = [R[f"mask_on_seed{s}"]["assistant_loss"] - R[f"mask_off_seed{s}"]["assistant_loss"]
          for s in seeds]
  lines += ["", "Mask on minus mask off, per seed: exact match "
            + ", ".join(f"{d:+.3f}" for d in d_em)
            + f" (on higher in {sum(d > 0 for d in d_em)} of {len(seeds)} seeds); "
            "assistant-token loss " + ", ".join(f"{d:+.4f}" for d in d_al)
            + f" (on lower in {sum(d < 0 for d in d_al)} of {len(seeds)} seeds).",
            "", f"Assistant turns evaluated per model: {R['base']['turns']}. \"nan\": no reply "
            "ended with the end tag (the base model never saw role tags).", "",
            "Caveats: validation conversations are drawn independently of the training ones "
            "but from the same facts (300 conjugation cells, sums of 0..20), so exact match "
            "measures answering in the chat format, not generalisation to unseen facts. "
            "Records longer than data.length tokens are dropped at prepare time "
            f"({meta.get('dropped_too_long')}). One base model is shared by all fine-tuning "
            "runs; the seed varies the fine-tuning only.", "",
            "## Example conversations (val, seed=0)", ""]
  for name, exs in examples.items():
    lines.append(f"### {name}")
    lines.append("")
    for e in exs:
      lines.append(f"* prompt: `{e['prompt']}`")
      lines.append(f"  * reference: `{e['reference']}` -> reply: `{e['reply']}` "
                   f"({'exact' if e['exact'] else 'wrong'})")
    lines.append("")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  if sys.argv[1:] == [common.TINY]:
    main(os.path.join(common.tiny_root(), "sft_loss_mask"), common.TINY)
  else:
    main(*sys.argv[1:3])
