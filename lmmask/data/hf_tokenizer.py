"""Pretrained tokenizers (a Hugging Face tokenizer.json, or one converted from a
GGUF file) with their chat template and lmmask's pad id.

The pad id. lmmask derives everything from ``is_real = ids != pad_id``, so the
pad must be a token real data never contains. Many chat models declare pad =
eos (SmolLM2: `<|im_end|>`, which ends every turn), which would hide every
end-of-turn token from the loss. `choose_pad_id` keeps the declared pad only when
it is neither bos, eos nor a token the chat template writes, and otherwise takes
the lowest-id special token that none of those is (SmolLM2: `<|endoftext|>`,
id 0). Content may not spell special tokens (`chat_template.encode_chat` refuses
it), so an unused special token never occurs in real data.
"""
from __future__ import annotations

import dataclasses
import json
import os

from lmmask.data import chat_template
from lmmask.data.tokenizer import tokenizers_module

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
_NAMED = ("bos_token", "eos_token", "unk_token", "pad_token")


@dataclasses.dataclass
class HFTokenizer:
  """A `tokenizers.Tokenizer` with its special tokens, chat template and pad id.

  Duck-compatible with `lmmask.data.text.Tokenizer` (pad_id, bos_id, eos_id,
  vocab_size, encode, decode). ``pad_id`` is lmmask's pad (`choose_pad_id`);
  ``special_tokens`` is the source's own map, given to the chat template.
  """
  tok: object
  special_tokens: dict             # {"bos_token": str | None, "eos_token": ..., ...}
  chat_template: str | None
  pad_id: int
  # The source's add_bos_token / add_eos_token when it states them (None: it does not,
  # and its post-processor alone decides); the post-processor already applies them.
  add_bos_token: bool | None = None
  add_eos_token: bool | None = None

  def _id(self, name):
    s = self.special_tokens.get(name)
    return None if s is None else self.tok.token_to_id(s)

  @property
  def bos_id(self) -> int | None:
    return self._id("bos_token")

  @property
  def eos_id(self) -> int | None:
    return self._id("eos_token")

  @property
  def pad_token(self) -> str:
    return self.tok.id_to_token(self.pad_id)

  @property
  def vocab_size(self) -> int:
    return self.tok.get_vocab_size(with_added_tokens=True)

  def special_token_strings(self) -> list[str]:
    return [t.content for t in self.tok.get_added_tokens_decoder().values() if t.special]

  def special_ids(self) -> set[int]:
    return {i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}

  def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
    """Ids of `text`; add_special_tokens applies the tokenizer's post-processor
    (e.g. a leading <bos>), as `tokenizer(text)` does in transformers."""
    return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

  def decode(self, ids, skip_special_tokens: bool = True, *,
             skip_special: bool | None = None) -> str:
    # skip_special: the spelling of lmmask's own tokenizers (data/source.py
    # TokenizerLike), so evaluation and the audit decode either kind alike.
    skip = skip_special_tokens if skip_special is None else skip_special
    return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip)

  def encode_chat(self, messages, *, add_generation_prompt: bool = False):
    """(ids, assistant_mask): see `chat_template.encode_chat`."""
    return chat_template.encode_chat(self, messages,
                                     add_generation_prompt=add_generation_prompt)

  def save(self, out_dir: str, *, model_max_length: int | None = None) -> None:
    """tokenizer.json + tokenizer_config.json (pad = lmmask's pad) into out_dir,
    loadable by `transformers.AutoTokenizer.from_pretrained(out_dir)`."""
    os.makedirs(out_dir, exist_ok=True)
    self.tok.save(os.path.join(out_dir, TOKENIZER_FILE))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast",
           **{k: v for k, v in self.special_tokens.items() if v is not None},
           "pad_token": self.pad_token, "clean_up_tokenization_spaces": False}
    # Only stated flags: transformers rewrites the post-processor when either is given.
    for name in ("add_bos_token", "add_eos_token"):
      if getattr(self, name) is not None:
        cfg[name] = bool(getattr(self, name))
    if model_max_length is not None:
      cfg["model_max_length"] = int(model_max_length)
    if self.chat_template:
      cfg["chat_template"] = self.chat_template
    with open(os.path.join(out_dir, TOKENIZER_CONFIG_FILE), "w", encoding="utf-8") as f:
      json.dump(cfg, f, indent=2, ensure_ascii=False)


def _can_emit_unk(tok) -> bool:
  """False when every byte sequence has a spelling (byte-level BPE or byte
  fallback), so the unk token never occurs in encoded text."""
  j = json.loads(tok.to_str())
  model, pre = j.get("model") or {}, json.dumps(j.get("pre_tokenizer"))
  return not (model.get("byte_fallback") or '"ByteLevel"' in pre)


def choose_pad_id(tok, special_tokens: dict, template: str | None, *,
                  pad_token: str | None = None) -> int:
  """lmmask's pad id (see the module docstring). pad_token: an explicit choice
  (e.g. data.pad_token), checked the same way."""
  probe = HFTokenizer(tok=tok, special_tokens=special_tokens, chat_template=template,
                      pad_id=0)
  used = chat_template.emitted_token_ids(probe, template)
  for name in ("bos_token", "eos_token"):
    i = probe._id(name)
    if i is not None:
      used.add(i)
  if not _can_emit_unk(tok) or probe._id("unk_token") is None:
    unk = None
  else:
    unk = probe._id("unk_token")
  used |= {unk} - {None}
  if pad_token is not None:
    i = tok.token_to_id(pad_token)
    if i is None:
      raise ValueError(f"pad_token {pad_token!r} is not in the tokenizer; set "
                       f"data.pad_token to one of its special tokens")
    if i in used:
      raise ValueError(f"pad_token {pad_token!r} (id {i}) occurs in real data (it is bos, "
                       f"eos, unk or written by the chat template); choose an unused "
                       f"special token for data.pad_token")
    return i
  declared = probe._id("pad_token")
  if declared is not None and declared not in used:
    return declared
  for i, t in sorted(tok.get_added_tokens_decoder().items()):
    if t.special and i not in used:
      return i
  raise ValueError("the tokenizer has no special token that real data never contains "
                   "(its pad is eos or a chat-template token, and every other special "
                   "token is used); add one to the tokenizer (e.g. '<pad>') and set "
                   "data.pad_token to it")


def _token_str(v):
  if isinstance(v, dict):
    return v.get("content")
  return v


def _read_json(path):
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _template_of(path, cfg) -> str | None:
  jinja = os.path.join(path, "chat_template.jinja")
  if os.path.exists(jinja):
    with open(jinja, encoding="utf-8") as f:
      return f.read()
  t = cfg.get("chat_template") or _read_json(
      os.path.join(path, "chat_template.json")).get("chat_template")
  if isinstance(t, list):  # named templates: transformers uses "default"
    named = {d.get("name"): d.get("template") for d in t}
    t = named.get("default")
  return t


def set_post_processor(tok, special_tokens, add_bos: bool, add_eos: bool) -> None:
  """bos/eos added around single sequences, as transformers' update_post_processor."""
  tk = tokenizers_module()
  bos, eos = special_tokens.get("bos_token"), special_tokens.get("eos_token")
  add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
  single = f"{(bos + ':0 ') if add_bos else ''}$A:0{(' ' + eos + ':0') if add_eos else ''}"
  pair = (f"{single}{(' ' + bos + ':1') if add_bos else ''} $B:1"
          f"{(' ' + eos + ':1') if add_eos else ''}")
  specials = ([(bos, tok.token_to_id(bos))] if add_bos else []) + \
             ([(eos, tok.token_to_id(eos))] if add_eos else [])
  tok.post_processor = tk.processors.TemplateProcessing(single=single, pair=pair,
                                                        special_tokens=specials)


def load_tokenizer_dir(path: str, *, config: dict | None = None,
                       pad_token: str | None = None) -> HFTokenizer | None:
  """The tokenizer of a Hugging Face model directory, or None if it has no
  tokenizer.json. config: its config.json (fallback special-token ids)."""
  file = os.path.join(path, TOKENIZER_FILE)
  if not os.path.exists(file):
    return None
  tok = tokenizers_module().Tokenizer.from_file(file)
  cfg = _read_json(os.path.join(path, TOKENIZER_CONFIG_FILE))
  smap = _read_json(os.path.join(path, "special_tokens_map.json"))
  special = {}
  for name in _NAMED:
    s = _token_str(cfg.get(name, smap.get(name)))
    if s is None and config and config.get(f"{name}_id") is not None:
      # config.json ids may lie outside the tokenizer; then the token is unknown here
      s = tok.id_to_token(int(config[f"{name}_id"]))
    special[name] = s
  template = _template_of(path, cfg)
  add_bos, add_eos = cfg.get("add_bos_token"), cfg.get("add_eos_token")
  if add_bos is not None or add_eos is not None or tok.post_processor is None:
    set_post_processor(tok, special, bool(add_bos), bool(add_eos))
  pad = choose_pad_id(tok, special, template, pad_token=pad_token)
  return HFTokenizer(tok=tok, special_tokens=special, chat_template=template, pad_id=pad,
                     add_bos_token=add_bos, add_eos_token=add_eos)


def from_chat_tokenizer(chat_tok) -> HFTokenizer:
  """lmmask's own chat tokenizer (from `data.prepare.train_tokenizer`: `.tok` and the
  fixed <pad>/<bos>/<eos> and role tags) with `LMMASK_CHAT_TEMPLATE`, so its
  conversations go through the same renderer (and can be exported)."""
  special = {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": None,
             "pad_token": "<pad>"}
  template = chat_template.LMMASK_CHAT_TEMPLATE
  return HFTokenizer(tok=chat_tok.tok, special_tokens=special, chat_template=template,
                     pad_id=choose_pad_id(chat_tok.tok, special, template))
