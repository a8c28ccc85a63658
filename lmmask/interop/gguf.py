"""GGUF files (llama.cpp) -> a Hugging Face-style config, tensors and tokenizer.

Tensors are read and dequantised with the `gguf` package to float32 numpy arrays
in Hugging Face layout ((out, in) for linear weights) under Hugging Face names,
so `lmmask.interop.hf` converts them like a safetensors checkpoint. llama.cpp's
converter permutes the q and k rows of the `llama` architecture for its rotary
kernel; they are un-permuted here exactly as transformers does it (for the
`llama` architecture only: `qwen2` files are stored unpermuted).

The tokenizer: llama.cpp's `gpt2` tokenizer model (byte-level BPE) is rebuilt as
the `tokenizers.Tokenizer` that `transformers.AutoTokenizer.from_pretrained(dir,
gguf_file=...)` builds: the vocabulary respelled in the byte alphabet, the merges,
control tokens as special added tokens, user-defined ones as plain added tokens,
and the split regex named by `tokenizer.ggml.pre`. Other tokenizer models
(SentencePiece `llama`, `t5`, ...) are refused.
"""
from __future__ import annotations

import struct

import numpy as np

from lmmask.data import hf_tokenizer

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> split regex, as transformers maps them; names transformers
# maps to a regex not copied here are refused rather than split wrongly.
SPLITS = {**{k: _LLAMA3_SPLIT for k in ("llama3", "llama-v3", "llama-bpe", "falcon3",
                                        "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                                        "jina-v5-nano", "dbrx", "smaug-bpe")},
          **{k: _QWEN2_SPLIT for k in ("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2",
                                       "megrez")}}
_UNCOPIED_SPLITS = ("tekken", "qwen35", "gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2")
_CONTROL, _USER_DEFINED = 3, 4

_LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
              "output": "lm_head"}


def _gguf():
  try:
    import gguf
  except ImportError as e:  # declared in setup.cfg; say how to fix a stale env
    raise ImportError("reading .gguf files needs the `gguf` package: pip install gguf") from e
  return gguf


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class _Cursor:
  """Little-endian reads over the file's bytes (GGUF v2/v3 layout)."""

  def __init__(self, buf):
    self.buf, self.pos = buf, 0

  def scalar(self, fmt):
    (v,) = struct.unpack_from(fmt, self.buf, self.pos)
    self.pos += struct.calcsize(fmt)
    return v

  def string(self):
    n = self.scalar("<Q")
    self.pos += n
    return bytes(self.buf[self.pos - n:self.pos]).decode("utf-8", errors="replace")

  def value(self, kind):
    if kind == _STRING:
      return self.string()
    if kind == _ARRAY:
      elem, n = self.scalar("<I"), self.scalar("<Q")
      if elem in _SCALARS:  # one numpy read instead of n Python ones
        dt = np.dtype(_SCALARS[elem])
        out = np.frombuffer(self.buf, dt, n, self.pos)
        self.pos += n * dt.itemsize
        return out.tolist()
      return [self.value(elem) for _ in range(n)]
    return self.scalar(_SCALARS[kind])


def read_metadata(path: str):
  """(metadata dict, [(name, dims fastest-first, ggml type, absolute offset)], mmap).

  GGUFReader builds one numpy view per array element (15 s for a 49k-token
  vocabulary on a small CPU), so the header is parsed here with struct."""
  buf = np.memmap(path, np.uint8, mode="r")
  cur = _Cursor(buf)
  if bytes(buf[:4]) != b"GGUF":
    raise ValueError(f"{path} is not a GGUF file (bad magic {bytes(buf[:4])!r})")
  cur.pos = 4
  version = cur.scalar("<I")
  if version < 2:
    raise ValueError(f"{path}: GGUF version {version} is too old; re-convert with llama.cpp")
  n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
  meta = {}
  for _ in range(n_kv):
    key = cur.string()
    meta[key] = cur.value(cur.scalar("<I"))
  infos = []
  for _ in range(n_tensors):
    name = cur.string()
    dims = [cur.scalar("<Q") for _ in range(cur.scalar("<I"))]
    infos.append((name, dims, cur.scalar("<I"), cur.scalar("<Q")))
  align = int(meta.get("general.alignment", 32))
  start = -(-cur.pos // align) * align
  return meta, [(n, d, t, start + o) for n, d, t, o in infos], buf


def _tensor(gguf, buf, dims, kind, offset):
  """Dequantised float32 array in numpy order (slowest dim first)."""
  qtype = gguf.GGMLQuantizationType(kind)
  block, size = gguf.GGML_QUANT_SIZES[qtype]
  shape = [int(d) for d in reversed(dims)]
  if dims[0] % block:
    raise ValueError(f"GGUF tensor row of {dims[0]} values is not a multiple of the "
                     f"{qtype.name} block size {block}; the file is corrupt")
  row_bytes = dims[0] // block * size
  rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
  raw = np.asarray(buf[offset:offset + rows * row_bytes]).reshape(rows, row_bytes)
  if qtype == gguf.GGMLQuantizationType.F32:
    w = raw.view(np.float32)
  elif qtype == gguf.GGMLQuantizationType.F16:
    w = raw.view(np.float16)
  else:
    w = gguf.quants.dequantize(raw, qtype)
  return np.asarray(w, np.float32).reshape(shape)


def reverse_permute(w: np.ndarray, n_head: int, n_kv_heads: int) -> np.ndarray:
  """Undo llama.cpp's q/k row permutation (transformers' _reverse_permute_weights)."""
  if n_head != n_kv_heads:
    n_head = n_kv_heads
  dim = w.shape[0] // n_head // 2
  return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def hf_name(gguf_name: str) -> str:
  """GGUF tensor name -> Hugging Face Llama/Qwen2 name."""
  parts = gguf_name.split(".")
  if parts[0] == "blk" and len(parts) == 4 and parts[2] in _LAYER_NAMES:
    return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
  if len(parts) == 2 and parts[0] in _TOP_NAMES:
    return f"{_TOP_NAMES[parts[0]]}.{parts[1]}"
  raise ValueError(f"GGUF tensor {gguf_name!r} has no Llama/Qwen2 counterpart; this "
                   f"file's architecture is not one lmmask converts")


def _config(meta: dict, arch: str, tensors: dict) -> dict:
  def get(key, default=None):
    v = meta.get(f"{arch}.{key}", default)
    if v is None:
      raise ValueError(f"GGUF metadata lacks {arch}.{key}; the file is incomplete")
    return v
  hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
  for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
    if f"{arch}.{key}" in meta and int(meta[f"{arch}.{key}"]) != hidden // heads:
      raise ValueError(f"GGUF {arch}.{key}={meta[f'{arch}.{key}']} != embedding_length/"
                       f"head_count={hidden // heads}; lmmask needs head_dim = d_model / "
                       f"n_heads and full rotary dims")
  scaling = meta.get(f"{arch}.rope.scaling.type", "none")
  if scaling not in ("none", None):
    raise ValueError(f"GGUF {arch}.rope.scaling.type={scaling!r}: rope scaling is not "
                     f"implemented in lmmask; only unscaled rope is converted exactly")
  if meta.get(f"{arch}.attention.sliding_window"):
    raise ValueError(f"GGUF {arch}.attention.sliding_window is set: sliding-window "
                     f"attention is not implemented in lmmask")
  vocab = int(tensors["model.embed_tokens.weight"].shape[0])
  cfg = {
      "architectures": [ARCHITECTURES[arch]], "model_type": arch,
      "hidden_size": hidden, "num_hidden_layers": int(get("block_count")),
      "intermediate_size": int(get("feed_forward_length")),
      "num_attention_heads": heads,
      "num_key_value_heads": int(get("attention.head_count_kv", heads)),
      "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
      "rope_theta": float(get("rope.freq_base", 10000.0)),
      "max_position_embeddings": int(get("context_length")),
      "vocab_size": vocab, "hidden_act": "silu",
      "tie_word_embeddings": "lm_head.weight" not in tensors,
      "attention_bias": "model.layers.0.self_attn.q_proj.bias" in tensors,
  }
  for name in ("bos", "eos", "padding"):
    i = meta.get(f"tokenizer.ggml.{name}_token_id")
    if i is not None:
      cfg[f"{'pad' if name == 'padding' else name}_token_id"] = int(i)
  return cfg


def read_gguf(path: str):
  """(hf_style_config, {hf_name: float32 array}, metadata) of a .gguf file."""
  gguf = _gguf()
  meta, infos, buf = read_metadata(path)
  arch = meta.get("general.architecture")
  if arch not in ARCHITECTURES:
    raise ValueError(f"GGUF general.architecture={arch!r} is not converted; lmmask reads "
                     f"{sorted(ARCHITECTURES)} (use the Hugging Face directory otherwise)")
  heads = int(meta[f"{arch}.attention.head_count"])
  kv = int(meta.get(f"{arch}.attention.head_count_kv", heads))
  tensors = {}
  for name, dims, kind, offset in infos:
    w = _tensor(gguf, buf, dims, kind, offset)
    if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
      w = reverse_permute(w, heads, heads if ".attn_q." in name else kv)
    tensors[hf_name(name)] = w
  return _config(meta, arch, tensors), tensors, meta


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte -> printable character table (the byte-level BPE alphabet)."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
      list(range(ord("®"), ord("ÿ") + 1))
  cs, n = bs[:], 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


def gguf_tokenizer(meta: dict, *, pad_token: str | None = None):
  """The file's tokenizer as an `hf_tokenizer.HFTokenizer`, or None if it has none."""
  kind = meta.get("tokenizer.ggml.model")
  if kind is None:
    return None
  if kind != "gpt2":
    raise ValueError(f"GGUF tokenizer.ggml.model={kind!r} is not converted (lmmask reads "
                     f"the byte-level BPE 'gpt2' model); use the model's tokenizer.json")
  pre = meta.get("tokenizer.ggml.pre")
  if pre in _UNCOPIED_SPLITS:
    raise ValueError(f"GGUF tokenizer.ggml.pre={pre!r} needs a split regex lmmask does not "
                     f"implement; use the model's tokenizer.json")
  tk = hf_tokenizer.tokenizers_module()
  tokens = [str(t) for t in meta["tokenizer.ggml.tokens"]]
  types = list(meta.get("tokenizer.ggml.token_type") or [])
  spelling = _bytes_to_unicode()
  alphabet = set(spelling.values())
  vocab = {(t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
           for i, t in enumerate(tokens)}
  merges = [tuple(m.split(" ")) for m in meta.get("tokenizer.ggml.merges", [])]
  tok = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=merges, dropout=None,
                                   continuing_subword_prefix="", end_of_word_suffix="",
                                   fuse_unk=False))
  if pre in SPLITS:
    tok.pre_tokenizer = tk.pre_tokenizers.Sequence([
        tk.pre_tokenizers.Split(tk.Regex(SPLITS[pre]), behavior="isolated"),
        tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  else:
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tk.decoders.ByteLevel()
  # A control token spelled outside the byte alphabet is a llama.cpp mislabel that
  # transformers skips (adding it would grow the vocabulary past the model's).
  control = [tk.AddedToken(t, normalized=False, special=True)
             for t, ty in zip(tokens, types) if ty == _CONTROL and set(t) <= alphabet]
  if control:
    tok.add_special_tokens(control)
  user = [tk.AddedToken(t, normalized=False, special=False)
          for t, ty in zip(tokens, types) if ty == _USER_DEFINED and t in vocab]
  if user:
    tok.add_tokens(user)
  special = {}
  for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"),
                    ("pad_token", "padding")):
    i = meta.get(f"tokenizer.ggml.{key}_token_id")
    special[name] = tokens[int(i)] if i is not None and int(i) < len(tokens) else None
  # A GGUF tokenizer has no post-processor, so transformers always builds one from
  # these flags (absent = False).
  add_bos = meta.get("tokenizer.ggml.add_bos_token")
  add_eos = meta.get("tokenizer.ggml.add_eos_token")
  hf_tokenizer.set_post_processor(tok, special, bool(add_bos), bool(add_eos))
  template = meta.get("tokenizer.chat_template")
  pad = hf_tokenizer.choose_pad_id(tok, special, template, pad_token=pad_token)
  def flag(v):
    return None if v is None else bool(v)
  return hf_tokenizer.HFTokenizer(tok=tok, special_tokens=special, chat_template=template,
                                  pad_id=pad, add_bos_token=flag(add_bos),
                                  add_eos_token=flag(add_eos))
