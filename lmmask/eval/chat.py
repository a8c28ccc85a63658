"""Evaluation extras of chat (shards) data: the model's own assistant replies.

Each assistant turn of a held-out conversation is prompted with the gold history
up to and including its opening ``<|assistant|>`` tag (teacher-forced history);
the reply is generated greedily by `decode.generate` (the one generation path)
until ``<|end|>``, and scored:
  * exact_match: the reply, decoded, equals the reference content and ended with
    <|end|> (compared as text, so another tokenization of the same string counts);
  * starts_with_role_tag / contains_role_tag: the reply writes role tags itself;
  * stopped: the reply ended with <|end|> within the budget;
  * continues_with_user_turn: among stopped replies, the greedy token after <|end|>
    is <|user|>, i.e. without the stop rule the model would write the user's turn.
The assistant-token loss is the `val_masked` eval set (the dataset's own mask,
whatever data.use_loss_mask says). Plain-text shards (no role tags) get none of this.

A pretrained model's chat data (data/chat_jsonl.py) is scored the same way through
its `ChatFormat`: its turns are the runs of the SFT mask (content + end-of-turn
token), its end token is the template's (`<|im_end|>`), the role tags are its other
special tokens, and "writes the user turn" means the greedy tokens after the end
of turn are the template's user-turn opener (SmolLM2: `\n<|im_start|>user\n`).
"""
from __future__ import annotations

import dataclasses
import math

from lmmask import decode
from lmmask.data import chat_template
from lmmask.eval.generate import is_chat, template_tokenizer


def assistant_turns(ids, tok):
  """(prompt ids, reference content ids) for every assistant turn of a conversation."""
  ids = [int(i) for i in ids]
  a, end = tok.role_id["assistant"], tok.end_id
  turns = []
  for i, t in enumerate(ids):
    if t == a and end in ids[i + 1:]:
      j = ids.index(end, i + 1)
      turns.append((ids[:i + 1], ids[i + 1:j]))
  return turns


@dataclasses.dataclass(frozen=True)
class ChatFormat:
  """What scoring replies needs from a chat tokenizer (lmmask's or a pretrained one)."""
  end_id: int                 # ends an assistant turn (generation stops there)
  pad_id: int
  user_opener: tuple          # ids that open a user turn right after an end of turn
  tags: frozenset             # structure tokens a reply should never write itself
  tok: object                 # the tokenizer (decode)
  role_tags: bool             # True: lmmask's role tags (turns found by tag), else by mask


def _user_opener(t, end: int) -> tuple:
  """The ids the template writes between an assistant's end of turn and the next user
  message's content."""
  conv = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"},
          {"role": "user", "content": "\u00a7"}]
  kw = dict(add_generation_prompt=False, special_tokens=t.special_tokens)
  text = chat_template.render(t.chat_template, conv, **kw)
  # The assistant's end of turn is the last one of the render up to its message.
  upto = chat_template.render(t.chat_template, conv[:2], **kw)
  start = upto.rindex(t.tok.id_to_token(end)) + len(t.tok.id_to_token(end))
  return tuple(t.tok.encode(text[start:text.index("\u00a7", start)],
                            add_special_tokens=False).ids)


def chat_format(tok) -> ChatFormat | None:
  """The ChatFormat of a tokenizer, or None when it has no chat structure."""
  if is_chat(tok):
    return ChatFormat(tok.end_id, tok.pad_id, (tok.role_id["user"],),
                      frozenset(tok.role_id.values()), tok, True)
  t = template_tokenizer(tok)
  if t is None:
    return None
  end = chat_template.end_of_turn_id(t)
  return ChatFormat(end, t.pad_id, _user_opener(t, end), frozenset(t.special_ids() - {end}),
                    t, False)


def mask_turns(ids, mask, end_id: int):
  """(prompt ids, reference content ids) for every run of the SFT mask that ends with
  the end-of-turn token (a pretrained template's assistant turns)."""
  ids, mask = [int(i) for i in ids], [int(m) for m in mask]
  turns, i = [], 0
  while i < len(ids):
    if not mask[i]:
      i += 1
      continue
    j = i
    while j < len(ids) and mask[j]:
      j += 1
    if ids[j - 1] == end_id:
      turns.append((ids[:i], ids[i:j - 1]))
    i = j
  return turns


def generate_replies(state, prompts, tok, *, max_new: int, batch_size: int, max_len: int):
  """Greedy replies (generated ids, <|end|> included when reached) for id prompts.

  Prompts are batched by length so each batch's budget is the most the model's
  positions allow, up to `max_new`; a prompt with no room left gets [].
  """
  order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
  out = [[] for _ in prompts]
  for start in range(0, len(order), batch_size):
    idx = order[start:start + batch_size]
    budget = min(max_new, max_len + 1 - max(len(prompts[i]) for i in idx))
    if budget < 1:
      continue
    gen = decode.generate(state, [prompts[i] for i in idx], max_new_tokens=budget,
                          eos_id=tok.end_id, pad_id=tok.pad_id)
    for i, row, n in zip(idx, gen.tokens, gen.lengths):
      out[i] = [int(t) for t in row[:int(n)]]
  return out


def evaluate_turns(state, docs, tok, *, max_new: int, max_len: int, batch_size: int = 64,
                   num_examples: int = 0):
  """Assistant-turn metrics over `docs`: token-id lists of whole conversations, or
  (ids, mask) pairs (needed for a pretrained template, whose turns are the mask's)."""
  fmt = chat_format(tok)
  prompts, refs, owner = [], [], []
  for d, doc in enumerate(docs):
    ids, mask = doc if isinstance(doc, tuple) else (doc, None)
    if fmt.role_tags:
      turns = assistant_turns(ids, tok)
    elif mask is None:
      raise ValueError("a pretrained chat template's turns are found by the SFT mask: "
                       "pass (ids, mask) documents")
    else:
      turns = mask_turns(ids, mask, fmt.end_id)
    for p, r in turns:
      prompts.append(p)
      refs.append(r)
      owner.append(d)
  gens = generate_replies(state, prompts, fmt, max_new=max_new, batch_size=batch_size,
                          max_len=max_len)
  tags, opener = fmt.tags, list(fmt.user_opener)
  ended_idx = [i for i, g in enumerate(gens) if g and g[-1] == fmt.end_id
               and len(prompts[i]) + len(g) + len(opener) <= max_len]  # room for the opener
  after = generate_replies(state, [prompts[i] + gens[i] for i in ended_idx], fmt,
                           max_new=len(opener), batch_size=batch_size,
                           max_len=max_len) if ended_idx else []
  user_next = sum(list(a[:len(opener)]) == opener for a in after)
  dec = fmt.tok.decode
  exact = starts = contains = stopped = 0
  examples = []
  for p, r, g, d in zip(prompts, refs, gens, owner):
    ended = bool(g) and g[-1] == fmt.end_id
    reply = g[:-1] if ended else g
    ok = ended and dec(reply, skip_special=False) == dec(r, skip_special=False)
    exact += ok
    starts += bool(reply) and reply[0] in tags
    contains += any(t in tags for t in reply)
    stopped += ended
    if len(examples) < num_examples:
      examples.append({"doc": d, "prompt": dec(p, skip_special=False),
                       "reference": dec(r, skip_special=False),
                       "reply": dec(g, skip_special=False), "exact": bool(ok)})
  n = max(len(prompts), 1)
  return {"turns": len(prompts), "exact_match": exact / n, "starts_with_role_tag": starts / n,
          "contains_role_tag": contains / n, "stopped": stopped / n,
          "continues_with_user_turn": user_next / len(ended_idx) if ended_idx else math.nan
          }, examples


def _val_docs(config, data):
  val = data.documents("val")
  n = len(val) if not config.data.max_eval_docs else min(config.data.max_eval_docs, len(val))
  docs = [val.doc(i) for i in range(n)]
  # (ids, mask) where the dataset has masks: a pretrained template's turns are the mask's
  return [ids if mask is None else (ids, mask) for ids, mask in docs]


def _turns(config, state, data, num_examples):
  return evaluate_turns(state, _val_docs(config, data), data.tokenizer,
                        max_new=config.eval.max_new_tokens, max_len=config.model.max_len,
                        batch_size=config.data.eval_batch_size, num_examples=num_examples)


def results_extras(config, state, data) -> dict:
  if chat_format(data.tokenizer) is None or not config.eval.exact_match_at_end:
    return {}
  m, _ = _turns(config, state, data, 0)
  return {"val_exact_match": m["exact_match"],
          "val_continues_with_user_turn": m["continues_with_user_turn"]}


def checkpoint_extras(config, state, data, *, temperature=0.0, sample_seed=0) -> dict:
  del temperature, sample_seed  # replies are scored greedily
  if chat_format(data.tokenizer) is None:
    return {"chat": "not a chat dataset (no role tags): no assistant replies to score"}
  m, examples = _turns(config, state, data, config.eval.num_examples)
  return {"assistant_turns": m, "examples": examples}


def format_extras(metrics: dict, extras: dict) -> str:
  lines = [""]
  if "val_masked_loss" in metrics:
    lines.append(f"  assistant-token val loss {metrics['val_masked_loss']:.4f} "
                 f"(PPL {metrics['val_masked_ppl']:.4f})")
  m = extras.get("assistant_turns")
  if m is None:
    lines.append(f"  {extras.get('chat', '')}")
    return "\n".join(lines)
  lines.append(f"  assistant replies ({m['turns']} turns, greedy): exact match "
               f"{100 * m['exact_match']:.1f}%, stopped {100 * m['stopped']:.1f}%, "
               f"role tag written {100 * m['contains_role_tag']:.1f}%, would write the user "
               f"turn {m['continues_with_user_turn']:.3f}")
  for ex in extras.get("examples", []):
    lines.append(f"    [{'ok ' if ex['exact'] else 'BAD'}] ref {ex['reference']!r} -> "
                 f"{ex['reply']!r}")
  return "\n".join(lines)
