"""Chat templates rendered as transformers renders them, and SFT masks from them.

Rendering: a jinja2 ImmutableSandboxedEnvironment(trim_blocks=True,
lstrip_blocks=True) with loop controls, `raise_exception`, a non-escaping
`tojson`, `strftime_now`, and `{% generation %}` accepted as a no-op (some Hub
templates use it to mark assistant text; lmmask finds those spans itself). The
template sees `messages`, `add_generation_prompt` and the tokenizer's special
token strings (`bos_token`, `eos_token`, ...), like `apply_chat_template`, and the
rendered text is encoded without added special tokens (the template writes any
`<bos>` itself), so the ids equal `apply_chat_template(..., tokenize=True)`.

SFT masks (`encode_chat`): assistant message i spans the text between the render
of messages[:i] with the generation prompt and the render of messages[:i + 1];
its content and its end-of-turn token (the first special token of that span)
are trained on, everything else (system, user, role headers, the newline after
the end-of-turn token) is not. Every partial render must be a prefix of the full
render, and no token may straddle a span boundary, otherwise the positions are
ambiguous and the conversation is refused.
"""
from __future__ import annotations

import datetime
import functools
import json
from typing import ClassVar

import numpy as np

# lmmask's own chat format (lmmask.data.prepare.encode_conversation) as a template:
# <bos> then <|role|> content <|end|> per message, no separators; the generation
# prompt is the opening <|assistant|> tag.
LMMASK_CHAT_TEMPLATE = (
    "{{ '<bos>' }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")

# A conversation touching every role, used to find the tokens a template emits.
_PROBE = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
          {"role": "assistant", "content": "a"}, {"role": "user", "content": "v"}]


@functools.lru_cache(maxsize=16)
def compile_template(template: str):
  """The jinja2 template object for `template`, compiled as transformers compiles it."""
  try:
    import jinja2
    from jinja2 import ext, nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment
  except ImportError as e:
    raise ImportError("chat templates need jinja2: pip install 'jinja2>=3.1'") from e

  class Generation(ext.Extension):
    # `{% generation %}...{% endgeneration %}` renders its body unchanged.
    tags: ClassVar[set] = {"generation"}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
      return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
      return caller()

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes HTML characters, which changes the rendered text.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)

  def strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[Generation, ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = strftime_now
  return env.from_string(template)


def render(template: str, messages, *, add_generation_prompt: bool,
           special_tokens: dict | None = None) -> str:
  """The conversation as text. special_tokens: e.g. {"bos_token": "<s>", ...}."""
  if not isinstance(template, str) or not template:
    raise ValueError("render needs a chat template string; the tokenizer has none "
                     "(pass one, e.g. chat_template.LMMASK_CHAT_TEMPLATE)")
  msgs = [dict(m) for m in messages]
  # transformers leaves unset special tokens out (jinja would print None as "None")
  # and passes tools and documents as None, which `is none` tests can see.
  specials = {k: v for k, v in (special_tokens or {}).items() if v is not None}
  return compile_template(template).render(
      messages=msgs, tools=None, documents=None,
      add_generation_prompt=bool(add_generation_prompt), **specials)


def _check_messages(messages, special_strings):
  if not isinstance(messages, (list, tuple)) or not messages:
    raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
  for j, m in enumerate(messages):
    if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
        or not isinstance(m.get("content"), str):
      raise TypeError(f"message {j} must be {{'role': str, 'content': str}}, got "
                       f"{str(m)[:80]!r}")
    for s in special_strings:
      if s and s in m["content"]:
        raise ValueError(f"message {j} ({m['role']}) contains the special token {s!r}; "
                         f"content may not spell structure tokens. Remove or escape it.")


def _span_tokens(offsets, start, end, where):
  """Indices of the tokens inside text[start:end]; refuses a token across an edge."""
  inside = []
  for i, (a, b) in enumerate(offsets):
    if a == b:
      continue  # empty offsets (nothing of the text) belong to no span
    if a < start < b or a < end < b:
      raise ValueError(f"{where}: a token spans the edge of the assistant text (chars "
                       f"{a}..{b}, edge at {start if a < start < b else end}); the mask "
                       f"would be ambiguous. Use a template that separates turns with "
                       f"special tokens.")
    if start <= a and b <= end:
      inside.append(i)
  return inside


def encode_chat(tokenizer, messages, *, template: str | None = None,
                add_generation_prompt: bool = False):
  """(ids, assistant_mask) lists for one conversation.

  tokenizer: an `lmmask.data.hf_tokenizer.HFTokenizer` (or anything with `tok`,
    `special_tokens` and `special_token_strings()`); template: default the
    tokenizer's own chat template. The mask is 1 on each assistant message's
    content and end-of-turn token. With add_generation_prompt (a prompt for
    generation) no mask is required and the ids end with the generation prompt.
  """
  template = template if template is not None else tokenizer.chat_template
  specials = tokenizer.special_token_strings()
  _check_messages(messages, specials)
  kw = dict(tokenizer.special_tokens)
  full = render(template, messages, add_generation_prompt=add_generation_prompt,
                special_tokens=kw)
  enc = tokenizer.tok.encode(full, add_special_tokens=False)
  ids, offsets = list(enc.ids), list(enc.offsets)
  special_ids = tokenizer.special_ids()
  mask = np.zeros(len(ids), np.int32)
  for i, m in enumerate(messages):
    if m["role"] != "assistant":
      continue
    where = f"message {i} (assistant)"
    before = render(template, messages[:i], add_generation_prompt=True, special_tokens=kw)
    upto = render(template, messages[:i + 1], add_generation_prompt=False,
                  special_tokens=kw)
    if not upto.startswith(before) or not full.startswith(upto):
      raise ValueError(f"{where}: the template's render of the conversation up to this "
                       f"message is not a prefix of the next render, so the assistant "
                       f"positions cannot be found. The template rewrites earlier turns "
                       f"(e.g. drops reasoning); it is not supported for SFT.")
    span = _span_tokens(offsets, len(before), len(upto), where)
    ends = [t for t in span if ids[t] in special_ids]
    if not ends:
      raise ValueError(f"{where}: the template emits no special end-of-turn token after "
                       f"the assistant text, so the model could not learn to stop")
    mask[[t for t in span if t <= ends[0]]] = 1
    if not span or ends[0] == span[0]:
      raise ValueError(f"{where}: the assistant content encodes to no tokens; drop the "
                       f"message or give it content")
  if not add_generation_prompt and not mask.any():
    raise ValueError("the conversation has no assistant turn, so nothing to learn from "
                     "(an all-zero mask); drop it")
  return ids, mask.tolist()


def emitted_token_ids(tokenizer, template: str | None) -> set[int]:
  """Ids the template writes itself (structure tokens), probed by rendering a
  conversation with every role, plus special tokens spelled in its source."""
  out = set()
  vocab = tokenizer.tok.get_vocab(with_added_tokens=True)
  for s in tokenizer.special_token_strings():
    if template and s in template:
      out.add(vocab[s])
  if not template:
    return out
  rendered = 0
  for probe in (_PROBE, _PROBE[1:]):  # some templates refuse a system message
    for gen in (True, False):
      try:
        text = render(template, probe, add_generation_prompt=gen,
                      special_tokens=tokenizer.special_tokens)
      except Exception as e:  # noqa: BLE001 -- a template may refuse any one probe
        last_error = e
      else:
        rendered += 1
        out.update(tokenizer.tok.encode(text, add_special_tokens=False).ids)
  if not rendered:
    raise ValueError(f"the chat template renders no user/assistant conversation "
                     f"({last_error!r}); fix the template") from last_error
  return out


def end_of_turn_id(tokenizer, template: str | None = None) -> int:
  """The special token closing an assistant turn (generation's stop token):
  SmolLM2 `<|im_end|>`, lmmask's own format `<|end|>`."""
  msgs = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
  ids, mask = encode_chat(tokenizer, msgs, template=template)
  return ids[max(i for i, m in enumerate(mask) if m)]
