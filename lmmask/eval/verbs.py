"""Evaluation extras of the verbs corpus.

* exact match of greedy KV-cache completions on the held-out split ("<bos> spanish /"
  -> the English side, or the reverse with eval.direction="en_es"), overall, for
  regular and irregular verbs, with a count of over-regularised answers
  ("I eat ed": the regular rule applied where the reference differs);
* teacher-forced loss / PPL / accuracy per sequence length;
* the "inference-mode" loss: every prefix recomputed on its own, so position t sees
  tokens <= t whatever mask the model was trained with. For a causal model it equals
  the teacher-forced loss; for a model trained without the causal mask it does not;
* the add-k n-gram baseline and the entropy floor, side by side with the model.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from lmmask import decode, losses
from lmmask import step as step_lib
from lmmask.data import pipeline, verbs, verbs_source
from lmmask.eval import floor as floor_lib
from lmmask.eval import ngram

DIRECTIONS = ("es_en", "en_es")


# ---------------------------------------------------------------------------
# Exact match.

def _sides(example):
  spanish, english = example.text.split(f" {verbs.SEP} ")
  return spanish, english


def exact_match(state, corpus, *, direction: str, max_new_tokens: int, num_examples: int,
                examples=None, temperature: float = 0.0, rng=None) -> dict:
  """Greedy (or sampled with `rng`) completions of the held-out forms (or of
  `examples`), scored by exact match. direction, max_new_tokens, num_examples: the
  config's eval.direction, eval.max_new_tokens, eval.num_examples (0: results only)."""
  if direction not in DIRECTIONS:
    raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
  vocab = corpus.vocab
  examples = [e for e in (corpus.val if examples is None else examples) if e.kind == "form"]
  if not examples:
    raise ValueError("exact match needs held-out forms; the split has none")
  prompts, refs = [], []
  for e in examples:
    es, en = _sides(e)
    src, tgt = (es, en) if direction == "es_en" else (en, es)
    prompts.append([vocab.bos_id] + vocab.encode(src, add_bos=False, add_eos=False)
                   + [vocab.sep_id])
    refs.append(tgt)
  gen = decode.generate(state, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                        rng=rng, eos_id=vocab.eos_id, pad_id=vocab.pad_id)
  rows = []
  counts = {"all": [0, 0], "regular": [0, 0], "irregular": [0, 0]}
  over, eligible, frames = 0, 0, 0
  for e, prompt, ref, toks in zip(examples, prompts, refs, gen.tokens):
    ids = decode.strip_after_eos(toks, eos_id=vocab.eos_id, pad_id=vocab.pad_id)
    out = vocab.decode(ids, strip_special=False)
    finished = vocab.eos_id in toks.tolist()
    ok = finished and out == ref
    kind = "regular" if e.regular else "irregular"
    for key in ("all", kind):
      counts[key][0] += ok
      counts[key][1] += 1
    over_reg = frame = None
    if direction == "es_en":
      frame = finished and verbs.frame_match(out, e.verb, e.tense, e.person)
      frames += frame
      regular_form = verbs.regular_english(e.verb, e.tense, e.person)
      if regular_form != ref:
        eligible += 1
        over_reg = out == regular_form
        over += over_reg
    # strip(): a character-level prompt ends in the separator's trailing space
    rows.append({"prompt": vocab.decode(prompt).strip(), "reference": ref, "completion": out,
                 "correct": bool(ok), "finished": bool(finished), "regular": bool(e.regular),
                 "verb": e.verb, "tense": e.tense, "person": e.person,
                 "over_regularised": over_reg, "frame_correct": frame})
  res = {"direction": direction, "num_prompts": len(rows),
         "exact_match": counts["all"][0] / counts["all"][1]}
  # Per tense: at word level the one tense whose English side the lexicon lines
  # already teach (going_to) can be right without any rule, so the total hides
  # whether the other four were learned.
  tenses = [t for t in verbs.TENSES if any(r["tense"] == t for r in rows)]
  res["exact_match_by_tense"] = {
      t: sum(r["correct"] for r in rows if r["tense"] == t)
      / sum(r["tense"] == t for r in rows) for t in tenses}
  for key in ("regular", "irregular"):
    hit, tot = counts[key]
    res[f"exact_match_{key}"] = hit / tot if tot else None
    res[f"num_{key}"] = tot
  # Tense and person right, whatever verb was written (verbs.frame_match).
  res["frame_match"] = frames / len(rows) if direction == "es_en" else None
  res["over_regularised"] = over if direction == "es_en" else None
  res["over_regularisable"] = eligible if direction == "es_en" else None
  # Wrong answers first (over-regularised ones before other errors), then up to a
  # third of the slots for correct ones, so both kinds show up.
  wrong = sorted((i for i, r in enumerate(rows) if not r["correct"]),
                 key=lambda i: (not rows[i]["over_regularised"], i))
  right = [i for i, r in enumerate(rows) if r["correct"]]
  n_right = min(len(right), num_examples // 3) if wrong else min(len(right), num_examples)
  picked = wrong[:num_examples - n_right] + right[:n_right]
  picked += [i for i in right[n_right:]][:num_examples - len(picked)]
  res["examples"] = [rows[i] for i in picked]
  res["rows"] = rows
  return res


def char_counts(corpus) -> dict:
  """Targets, characters and lines of the val split, for `per_character`."""
  val = corpus.val
  return {"num_seqs": len(val),
          "val_targets": sum(len(e.ids) - 1 for e in val),
          "val_english_targets": sum(len(e.ids) - e.english_start for e in val),
          "val_chars": sum(len(e.text) + 1 for e in val),
          "val_english_chars": sum(len(_sides(e)[1]) + 1 for e in val)}


def per_character(counts: dict, metrics: dict, prefix: str = "") -> dict:
  """Val losses in bits per character and per sequence, from token-mean losses.

  Per-token PPL depends on what a token is, so word and char runs cannot compare
  it. Both tokenizations give a probability to the same strings, so the total NLL
  of the val lines is comparable; it is divided by the lines' characters (the
  text plus one for <eos>, whatever the tokens) or by the number of lines. The
  English side counts the characters after the separator plus <eos>.
  `counts` comes from `char_counts`; `prefix` reads e.g. "baseline_" losses.
  """
  out = {}
  for name in ("val", "val_english"):
    loss = metrics.get(f"{prefix}{name}_loss")
    if loss is None:
      continue
    bits = loss * counts[f"{name}_targets"] / math.log(2)
    out[f"{prefix}{name}_bits_per_char"] = bits / counts[f"{name}_chars"]
    out[f"{prefix}{name}_bits_per_seq"] = bits / counts["num_seqs"]
  return out


# ---------------------------------------------------------------------------
# Teacher-forced per-length and inference-mode (prefix recompute) losses.

@jax.jit
def _prefix_nll(state, batch, col):
  logits = step_lib.forward(state, state.params, batch, upto=col)
  cols = jnp.arange(batch.inputs.shape[1])[None, :]
  sel = (cols == col).astype(jnp.float32) * batch.loss_mask
  nll, _, _ = losses.per_token_nll(logits, batch.targets, sel)
  correct = ((jnp.argmax(logits, -1) == batch.targets) * sel).sum()
  return nll.sum(), sel.sum(), correct


def prefix_recompute_eval(state, batches) -> dict:
  """Token-mean loss where each target is predicted from its prefix alone."""
  nll = tokens = correct = 0.0
  for b in batches:
    for col in range(b.inputs.shape[1]):
      n, t, c = jax.device_get(_prefix_nll(state, b, col))
      nll, tokens, correct = nll + float(n), tokens + float(t), correct + float(c)
  loss = nll / tokens if tokens else 0.0
  return {"loss": loss, "ppl": math.exp(loss), "accuracy": correct / tokens if tokens else 0.0,
          "num_tokens": tokens}


def length_buckets(state, split, *, pad_id: int, batch_size: int) -> dict:
  """Teacher-forced loss/PPL/accuracy per sequence length (tokens incl. bos/eos)."""
  lengths = (split.ids != pad_id).sum(axis=1)
  out = {}
  for n in sorted(set(lengths.tolist())):
    rows = np.nonzero(lengths == n)[0]
    sub = pipeline.Split(ids=split.ids[rows], english=split.english[rows],
                         examples=tuple(split.examples[i] for i in rows))
    m = step_lib.evaluate(state, pipeline.eval_batches(sub, batch_size=batch_size, pad_id=pad_id))
    out[str(n)] = {"num_seqs": int(len(rows)), **m}
  return out




# ---------------------------------------------------------------------------
# The corpus's hooks (called through lmmask/eval/evaluate.py).

def results_extras(config, state, data) -> dict:
  """n-gram baseline and (eval.exact_match_at_end) greedy exact match for results.json."""
  del data  # the forms and their metadata come from the verbs corpus itself
  corpus = verbs_source.corpus(config)
  out = dict(ngram.baseline_results(config, corpus))
  ev = config.eval
  if ev.exact_match_at_end:
    em = exact_match(state, corpus, direction=ev.direction, max_new_tokens=ev.max_new_tokens,
                     num_examples=0)
    for k in ("exact_match", "exact_match_regular", "exact_match_irregular",
              "over_regularised", "over_regularisable"):
      out[f"val_{k}"] = em[k]
  return out


def checkpoint_extras(config, state, data, *, temperature=0.0, sample_seed=0) -> dict:
  """Everything `launch.py --mode=eval` adds for a verbs workdir."""
  del temperature, sample_seed, data  # exact match is greedy by definition
  corpus = verbs_source.corpus(config)
  ev = config.eval
  pad = corpus.vocab.pad_id
  bs = config.data.eval_batch_size
  kw = dict(length=config.data.length, pad_id=pad, pad_side=config.data.pad_side)
  val_split = pipeline.pad_split(corpus.val, **kw)
  out = {"entropy_floor": floor_lib.entropy_floor([e.ids for e in corpus.train]),
         "floor_tolerance": ev.floor_tolerance}
  out.update(ngram.baseline_results(config, corpus))
  out["char_counts"] = char_counts(corpus)
  out["val_by_length"] = length_buckets(state, val_split, pad_id=pad, batch_size=bs)
  inf = prefix_recompute_eval(state, pipeline.eval_batches(val_split, batch_size=bs,
                                                           pad_id=pad))
  out.update({f"val_inference_mode_{k}": v for k, v in inf.items() if k != "num_tokens"})
  out["exact_match"] = exact_match(state, corpus, direction=ev.direction,
                                   max_new_tokens=ev.max_new_tokens,
                                   num_examples=ev.num_examples)
  out["exact_match"].pop("rows")
  return out


def format_extras(metrics: dict, extras: dict) -> str:
  """Model vs baseline table, floor, length buckets, exact match and examples."""
  lines = ["", f"{'':22s} {'model':>10s} {'ngram':>10s}"]
  for split in ("train", "val", "val_english"):
    for kind in ("loss", "ppl"):
      m = metrics.get(f"{split}_{kind}")
      b = extras.get(f"baseline_{split}_{kind}")
      if m is not None and b is not None:
        lines.append(f"  {split + '_' + kind:20s} {m:10.4f} {b:10.4f}")
  lines.append(f"  (n-gram: n={extras.get('baseline_ngram_n')}, "
               f"k={extras.get('baseline_ngram_k')}, same counted tokens)")
  if "char_counts" in extras:
    # Per-token PPL changes meaning with the tokenization; bits per character do not.
    m = per_character(extras["char_counts"], metrics)
    b = per_character(extras["char_counts"], extras, prefix="baseline_")
    for key in m:
      if f"baseline_{key}" in b:
        lines.append(f"  {key:20s} {m[key]:10.4f} {b['baseline_' + key]:10.4f}")
  if "entropy_floor" in extras:
    tl = metrics.get("train_loss")
    note = ""
    if tl is not None:
      note = ("   BELOW THE FLOOR: the model sees the future" if tl < extras["entropy_floor"]
              - extras["floor_tolerance"] else
              "   (train_loss - floor = %.4f)" % (tl - extras["entropy_floor"]))
    lines.append(f"  entropy floor (train) {extras['entropy_floor']:.4f}{note}")
  if "val_inference_mode_loss" in extras:
    lines.append(f"  val loss, each prefix recomputed (inference mode): "
                 f"{extras['val_inference_mode_loss']:.4f} "
                 f"(PPL {extras['val_inference_mode_ppl']:.3f})")
  if "val_by_length" in extras:
    lines.append("  val by sequence length:  len  n   loss    ppl   acc")
    for n, m in extras["val_by_length"].items():
      lines.append(f"  {'':24s}{n:>3s} {m['num_seqs']:3d} {m['loss']:6.3f} {m['ppl']:6.3f} "
                   f"{m['accuracy']:5.3f}")
  em = extras.get("exact_match")
  if em:
    def pct(x):
      return "n/a" if x is None else f"{100 * x:.1f}%"
    lines.append(f"  exact match ({em['direction']}, greedy, {em['num_prompts']} prompts): "
                 f"{pct(em['exact_match'])}  regular {pct(em['exact_match_regular'])} "
                 f"(n={em['num_regular']})  irregular {pct(em['exact_match_irregular'])} "
                 f"(n={em['num_irregular']})")
    if em["over_regularised"] is not None:
      lines.append(f"  over-regularised answers: {em['over_regularised']} of "
                   f"{em['over_regularisable']} forms where the regular rule is wrong")
    if em.get("frame_match") is not None:
      lines.append(f"  tense and person right, any verb (frame): {pct(em['frame_match'])}")
    if em.get("exact_match_by_tense"):
      lines.append("  exact match by tense: " + "  ".join(
          f"{t} {pct(x)}" for t, x in em["exact_match_by_tense"].items()))
    lines.append("  examples (wrong ones first, then correct ones):")
    for r in em["examples"]:
      mark = "ok " if r["correct"] else ("OVR" if r["over_regularised"] else "BAD")
      lines.append(f"    [{mark}] {r['prompt']:28s} -> {r['completion']!r:28s} "
                   f"ref {r['reference']!r}")
  return "\n".join(lines)


