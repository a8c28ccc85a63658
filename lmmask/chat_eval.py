"""Checking a chat model's answers: a simple greedy loop and assistant-turn metrics.

`greedy_generate` is deliberately simple (no KV cache): each step runs the whole
fixed-size (B, T) buffer through the model and reads the logits at each row's
last real token. The buffer is right-padded, so padding only ever sits AFTER a
row's tokens, where the causal mask hides it; one compiled program serves every
step.

`evaluate_turns` prompts the model with the gold conversation up to and
including the opening ``<|assistant|>`` tag of each assistant turn (teacher-forced
history), generates until ``<|end|>``, and reports
  * exact_match: the reply, decoded, equals the reference content exactly and
    ends with <|end|> (compared as text, so a different tokenization of the
    same string still counts);
  * starts_with_role_tag: the reply's first token is a role tag
    (<|system|>, <|user|> or <|assistant|>);
  * contains_role_tag: a role tag appears anywhere in the reply;
  * stopped: the reply ended with <|end|> within max_new tokens;
  * continues_with_user_turn: among stopped replies (with room for one more
    token in ``length``), the greedy token after
    <|end|> is <|user|>, i.e. without the stop rule the model would go on to
    write the user's next turn itself.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@functools.partial(jax.jit, static_argnums=(0, 4))
def _next_tokens(graphdef, params, buf, n, causal=True):
  model = nnx.merge(graphdef, params)
  t = buf.shape[1]
  key_mask = jnp.arange(t)[None, :] < n[:, None]
  logits = model(buf, key_mask=key_mask, causal=causal, deterministic=True)
  last = jnp.take_along_axis(logits, (n - 1)[:, None, None], axis=1)[:, 0]
  return jnp.argmax(last, axis=-1).astype(jnp.int32)


def greedy_generate(graphdef, params, prompts, *, max_new: int, stop_id: int, pad_id: int,
                    length: int, batch_size: int = 64, causal: bool = True):
  """Greedy continuations of token-id ``prompts`` (lists), each at most ``max_new``
  tokens and ending at ``stop_id`` (included) or at ``length`` total tokens.
  Returns a list of lists of generated ids."""
  if max_new < 1:
    raise ValueError(f"max_new must be >= 1, got {max_new}")
  out = []
  for start in range(0, len(prompts), batch_size):
    chunk = prompts[start:start + batch_size]
    if any(len(p) < 1 or len(p) >= length for p in chunk):
      raise ValueError(f"every prompt needs 1 <= len < length={length} tokens; raise length "
                       f"(<= model.max_len) or shorten the prompts")
    buf = np.full((batch_size, length), pad_id, dtype=np.int32)
    n = np.ones(batch_size, dtype=np.int32)  # unused rows: one pad token, ignored
    for r, p in enumerate(chunk):
      buf[r, :len(p)] = p
      n[r] = len(p)
    gen = [[] for _ in chunk]
    done = np.zeros(len(chunk), bool)
    for _ in range(max_new):
      nxt = np.asarray(_next_tokens(graphdef, params, jnp.asarray(buf), jnp.asarray(n), causal))
      for r in range(len(chunk)):
        if done[r]:
          continue
        gen[r].append(int(nxt[r]))
        buf[r, n[r]] = nxt[r]
        n[r] += 1
        if nxt[r] == stop_id or n[r] >= length:
          done[r] = True
      if done.all():
        break
    out.extend(gen)
  return out


def assistant_turns(ids, tok):
  """(prompt ids, reference content ids) for every assistant turn of a conversation."""
  ids = [int(i) for i in ids]
  a, end = tok.role_id["assistant"], tok.end_id
  turns = []
  for i, t in enumerate(ids):
    if t == a:
      j = ids.index(end, i + 1)
      turns.append((ids[:i + 1], ids[i + 1:j]))
  return turns


def evaluate_turns(graphdef, params, split, tok, *, length: int, max_new: int = 16,
                   max_docs: int | None = None, num_examples: int = 0, causal: bool = True):
  """Assistant-turn metrics over the first ``max_docs`` conversations of a ShardSplit."""
  n_docs = len(split) if not max_docs else min(max_docs, len(split))
  prompts, refs, owner = [], [], []
  for d in range(n_docs):
    for p, r in assistant_turns(split.doc(d)[0], tok):
      prompts.append(p)
      refs.append(r)
      owner.append(d)
  gens = greedy_generate(graphdef, params, prompts, max_new=max_new, stop_id=tok.end_id,
                         pad_id=tok.pad_id, length=length, causal=causal)
  tags = tok.tag_ids
  ended_idx = [i for i, g in enumerate(gens) if g and g[-1] == tok.end_id
               and len(prompts[i]) + len(g) < length]  # room left for one more token
  after = greedy_generate(graphdef, params, [prompts[i] + gens[i] for i in ended_idx],
                          max_new=1, stop_id=tok.end_id, pad_id=tok.pad_id, length=length,
                          causal=causal) if ended_idx else []
  user_next = sum(a[0] == tok.role_id["user"] for a in after)
  exact = starts = contains = stopped = 0
  examples = []
  for p, r, g, d in zip(prompts, refs, gens, owner):
    ended = bool(g) and g[-1] == tok.end_id
    reply = g[:-1] if ended else g
    ok = ended and tok.decode(reply, skip_special=False) == tok.decode(r, skip_special=False)
    exact += ok
    starts += bool(reply) and reply[0] in tags
    contains += any(t in tags for t in reply)
    stopped += ended
    if len(examples) < num_examples:
      examples.append({"doc": d, "prompt": tok.decode(p, skip_special=False),
                       "reference": tok.decode(r, skip_special=False),
                       "reply": tok.decode(g, skip_special=False), "exact": bool(ok)})
  n = max(len(prompts), 1)
  return {"turns": len(prompts), "exact_match": exact / n, "starts_with_role_tag": starts / n,
          "contains_role_tag": contains / n, "stopped": stopped / n,
          "continues_with_user_turn": user_next / len(ended_idx) if ended_idx else float("nan")
          }, examples
