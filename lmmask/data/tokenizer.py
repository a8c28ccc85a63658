"""The one byte-level BPE: a trainer and a wrapper used by every tokenized corpus.

`train_bpe` trains a `tokenizers` byte-level BPE locally (never downloaded):
every byte is in the initial alphabet, so no text is ever unknown, and the
special tokens take ids 0, 1, 2, ... in the order given. Text pre-training
(data/text.py) gives <pad> <bos> <eos>; chat data (data/prepare.py) adds its
role tags and end tag after them.

`Tokenizer` wraps a trained or loaded tokenizer with the ids lmmask needs: pad,
bos, eos, and optionally chat role tags (`role_id`, `tag_ids`) and an end tag
(`end_id`). `encode` never adds special tokens; `decode` drops them unless told
not to.

The `tokenizers` package is imported when first needed, so code that never
tokenizes (the verbs corpus) does not pay for it.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Iterable, Mapping, Sequence

TOKENIZER_FILE = "tokenizer.json"
TEXT_SPECIALS = ("<pad>", "<bos>", "<eos>")
# Chat structure tokens (data/prepare.py); they follow the text specials, so ids
# are <pad>=0 <bos>=1 <eos>=2 <|system|>=3 <|user|>=4 <|assistant|>=5 <|end|>=6.
CHAT_ROLE_TAGS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
CHAT_END = "<|end|>"
CHAT_SPECIALS = (*TEXT_SPECIALS, *CHAT_ROLE_TAGS.values(), CHAT_END)


def tokenizers_module():
  """The `tokenizers` package, imported late (it is heavy) with a clear error if missing."""
  try:
    import tokenizers
  except ImportError as e:  # declared in setup.cfg; say how to fix a stale environment
    raise ImportError("lmmask needs the `tokenizers` package to tokenize text: "
                      "pip install 'tokenizers>=0.15'") from e
  return tokenizers


def sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def train_bpe(texts: Iterable[str], vocab_size: int, special_tokens: Sequence[str], *,
              field: str = "data.vocab_size"):
  """A `tokenizers.Tokenizer` (byte-level BPE) trained on `texts`, with
  `special_tokens` at ids 0..n-1. `field` names the config knob in errors."""
  tk = tokenizers_module()
  alphabet = tk.pre_tokenizers.ByteLevel.alphabet()
  if vocab_size < len(alphabet) + len(special_tokens):
    raise ValueError(f"{field}={vocab_size} is too small for a byte-level BPE: it needs "
                     f">= {len(alphabet) + len(special_tokens)} ({len(alphabet)} byte "
                     f"symbols + {len(special_tokens)} special tokens)")
  tok = tk.Tokenizer(tk.models.BPE())
  tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tk.decoders.ByteLevel()
  trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                   initial_alphabet=alphabet, show_progress=False)
  tok.train_from_iterator(list(texts), trainer)
  return tok


def save_atomic(tok, path: str) -> None:
  """Save a `tokenizers.Tokenizer` to `path` via a temporary file renamed into place,
  so a crash never leaves a half-written tokenizer.json."""
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp_tok_", suffix=".json")
  os.close(fd)
  try:
    tok.save(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


def _resolve(path: str) -> str:
  """`path`, or the tokenizer.json inside it when it is a directory (a dataset)."""
  if os.path.isdir(path):
    path = os.path.join(path, TOKENIZER_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no tokenizer file at {path!r}; point the config at a "
                            f"tokenizer.json (or the dataset directory holding one), or "
                            f"leave it empty to train one")
  return path


class Tokenizer:
  """A `tokenizers.Tokenizer` plus the special ids lmmask uses.

  pad/bos/eos tokens are required; `role_tokens` (role -> tag) and `end_token`
  are the chat structure tokens, absent for plain text. Every named token must
  exist in the tokenizer (a ValueError names the missing one and its knob).
  """

  def __init__(self, tok, *, pad_token: str = "<pad>", bos_token: str = "<bos>",
               eos_token: str = "<eos>", role_tokens: Mapping[str, str] | None = None,
               end_token: str | None = None, path: str | None = None,
               knob: str = "data.{role}_token"):
    self.tok, self.path = tok, path
    self.sha256 = sha256_file(path) if path else None
    named = {"pad": pad_token, "bos": bos_token, "eos": eos_token}
    for role, t in (role_tokens or {}).items():
      named[role] = t
    if end_token is not None:
      named["end"] = end_token
    ids = {}
    for role, token in named.items():
      i = tok.token_to_id(token)
      if i is None:
        where = f"tokenizer {path}" if path else "the tokenizer"
        raise ValueError(f"{where} has no {role} token {token!r}; set "
                         f"{knob.format(role=role)} to one of its special tokens, or use "
                         f"a tokenizer trained with it")
      ids[role] = i
    self.pad_id, self.bos_id, self.eos_id = ids["pad"], ids["bos"], ids["eos"]
    self.role_id = {r: ids[r] for r in (role_tokens or {})}
    self.end_id = ids.get("end")
    self.tag_ids = frozenset(self.role_id.values())
    self.special_tokens = tuple(named.values())

  @classmethod
  def load(cls, path: str, **kw) -> "Tokenizer":
    """A tokenizer.json (or a directory holding one) with the named special tokens."""
    path = _resolve(path)
    return cls(tokenizers_module().Tokenizer.from_file(path), path=path, **kw)

  @classmethod
  def chat(cls, tok, path: str | None = None) -> "Tokenizer":
    """The chat wrapper of a `tokenizers.Tokenizer`: role and end tags, every special
    at its fixed id (so a dataset's ids mean the same whichever tokenizer.json they
    came from)."""
    ids = {s: tok.token_to_id(s) for s in CHAT_SPECIALS}
    expected = {s: i for i, s in enumerate(CHAT_SPECIALS)}
    if ids != expected:
      raise ValueError(f"tokenizer {path or ''} has special tokens at {ids}, chat data "
                       f"needs the fixed ids {expected}; train it with --mode=prepare and "
                       f"data.tokenizer=''")
    return cls(tok, role_tokens=CHAT_ROLE_TAGS, end_token=CHAT_END, path=path)

  @classmethod
  def load_chat(cls, path: str) -> "Tokenizer":
    path = _resolve(path)
    return cls.chat(tokenizers_module().Tokenizer.from_file(path), path)

  def save(self, path: str) -> None:
    """Write tokenizer.json atomically; this wrapper then refers to that file."""
    save_atomic(self.tok, path)
    self.path, self.sha256 = path, sha256_file(path)

  @property
  def vocab_size(self) -> int:
    return self.tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, with no <bos>/<eos> added."""
    return self.tok.encode(text, add_special_tokens=False).ids

  def encode_document(self, text: str) -> list[int]:
    return [self.bos_id, *self.encode(text), self.eos_id]

  def encode_text(self, text: str, where: str = "text") -> list[int]:
    """`encode`, refusing text that spells a special token: for structured data
    (chat) a tag must only ever come from the structure, never from content."""
    for s in self.special_tokens:
      if s in text:
        raise ValueError(f"{where} contains the special token {s!r}; content may not spell "
                         f"special tokens (they would be read as structure). Remove or "
                         f"escape it.")
    return self.encode(text)

  def decode(self, ids, skip_special: bool = True) -> str:
    return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)
