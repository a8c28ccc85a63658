"""Generation from a checkpoint: prompts encoded with the workdir's tokenizer (a chat
model's user turn rendered with its chat template), completed by `decode.generate`
(the one generation path), decoded back to text."""
from __future__ import annotations

import jax

from lmmask import decode
from lmmask import workdir as wd
from lmmask.data import chat_template, hf_tokenizer


def is_chat(tok) -> bool:
  return bool(getattr(tok, "role_id", None))


def template_tokenizer(tok):
  """The tokenizer as an `HFTokenizer` with a chat template, or None: a pretrained
  model's own, or lmmask's chat tokenizer with `LMMASK_CHAT_TEMPLATE` (its role
  tags), so every chat prompt is rendered by `chat_template` the same way."""
  if isinstance(tok, hf_tokenizer.HFTokenizer):
    return tok if tok.chat_template else None
  if not is_chat(tok):
    return None
  if getattr(tok, "_as_template", None) is None:  # choose_pad_id renders probes: once
    tok._as_template = hf_tokenizer.from_chat_tokenizer(tok)
  return tok._as_template


def chat_prompt(tok, text: str) -> list[int]:
  """`text` as one user turn, then the generation prompt (lmmask's format: the
  opening assistant tag), rendered with the tokenizer's chat template."""
  t = template_tokenizer(tok)
  if t is None:
    raise ValueError("--chat needs a chat model: a workdir trained on chat shards or "
                     "imported with a chat template; this one has neither: drop --chat")
  ids, _ = chat_template.encode_chat(t, [{"role": "user", "content": text}],
                                     add_generation_prompt=True)
  return ids


def end_of_turn_id(tok) -> int:
  """The token that ends an assistant turn (generation stops there)."""
  return chat_template.end_of_turn_id(template_tokenizer(tok))


def prompt_ids(data, prompt: str, *, chat: bool = False) -> list[int]:
  """A prompt's ids: <bos> + the workdir tokenizer's encoding (a pretrained
  tokenizer: its own special tokens), or for chat models a user turn rendered with
  the chat template and its generation prompt."""
  tok = data.tokenizer
  if tok is None:
    raise ValueError("this workdir has no tokenizer (imported without one), so text "
                     "prompts cannot be encoded; import a checkpoint that has a tokenizer")
  if chat:
    return chat_prompt(tok, prompt)
  if isinstance(tok, hf_tokenizer.HFTokenizer):
    ids = tok.encode(prompt, add_special_tokens=True)
    if not ids:
      raise ValueError(f"prompt {prompt!r} is empty after encoding; give some text")
    return ids
  text = prompt.strip()
  bos = getattr(tok, "bos_token", "<bos>")
  if text.startswith(bos):
    text = text[len(bos):]
  ids = tok.encode(text.strip())
  if not ids:
    raise ValueError(f"prompt {prompt!r} is empty after encoding; give some text, e.g. "
                     f"'yo como /' for the verbs corpus")
  return [tok.bos_id] + ids


def generate_text(workdir: str, prompts, *, step=None, which: str = "latest",
                  max_new_tokens: int | None = None, temperature: float = 0.0, top_k=None,
                  top_p=None, seed: int = 0, chat: bool = False):
  """[(prompt, completion)] from a workdir's checkpoint, encoded with its own tokenizer.
  max_new_tokens=None: the run's eval.max_new_tokens (sized for its tokenization; a
  character-level reply needs several times the word budget)."""
  config, data, state, _ = wd.restore_state(workdir, which, step)
  if max_new_tokens is None:
    max_new_tokens = config.eval.max_new_tokens
  tok = data.tokenizer
  ids = [prompt_ids(data, p, chat=chat) for p in prompts]
  stop = end_of_turn_id(tok) if chat else tok.eos_id
  rng = jax.random.PRNGKey(seed) if temperature > 0 else None
  gen = decode.generate(state, ids, max_new_tokens=max_new_tokens, temperature=temperature,
                        top_k=top_k, top_p=top_p, rng=rng, eos_id=stop, pad_id=tok.pad_id)
  out = []
  for p, toks in zip(prompts, gen.tokens):
    text = tok.decode(decode.strip_after_eos(toks, eos_id=stop, pad_id=tok.pad_id))
    if stop not in toks.tolist():
      text += f"  [no end token within {max_new_tokens} tokens]"
    out.append((p, text))
  return out
