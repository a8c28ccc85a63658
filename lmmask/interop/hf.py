"""Hugging Face checkpoints (and GGUF files) <-> lmmask Decoders, exactly.

    from lmmask.interop import hf
    model, tokenizer = hf.load("path/to/hf_dir_or_file.gguf")
    logits = model(ids, key_mask=ids != tokenizer.pad_id)   # float32 (B, T, vocab)

Families (FAMILIES), each one DecoderConfig setting, checked both ways:
  llama  LlamaForCausalLM (Llama 2/3, SmolLM2; MistralForCausalLM without sliding
         window is read as llama): rope, RMSNorm, SwiGLU, GQA, no biases (unless
         attention_bias / mlp_bias), untied head without bias.
  qwen2  Qwen2ForCausalLM: llama with a bias on q/k/v only.
  gpt2   GPT2LMHeadModel: learned positions, LayerNorm eps 1e-5, tanh GELU, biases
         everywhere, tied head; its Conv1D weights are already (in, out).
lmmask's rope pairs feature i with i + D/2 ("rotate half"), as transformers does,
so q/k weights are copied as they are. A source option lmmask does not implement
exactly (rope scaling, sliding windows, a separate head_dim, other activations)
is refused, naming the field. `family_of` refuses a DecoderConfig that matches
no family, naming the option, so an exported directory computes what lmmask does.

Params are a pure dict (`nnx.to_pure_dict` layout) of float32 numpy arrays;
`build` turns config + params into a Decoder. bf16/f16 tensors are upcast. No
torch is needed (safetensors are read with its numpy API).
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings

import numpy as np
from flax import nnx

from lmmask.data import hf_tokenizer
from lmmask.interop import gguf as gguf_io
from lmmask.model import Decoder, DecoderConfig

FAMILIES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "gpt2": "GPT2LMHeadModel"}
_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gpt2": "gpt2"}
# Class defaults of the transformers configs, for keys a saved config.json omits.
_DEFAULTS = {
    "llama": {"num_key_value_heads": None, "hidden_act": "silu", "rms_norm_eps": 1e-6,
              "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
              "max_position_embeddings": 2048},
    "mistral": {"num_key_value_heads": 8, "hidden_act": "silu", "rms_norm_eps": 1e-6,
                "tie_word_embeddings": False, "sliding_window": 4096,
                "max_position_embeddings": 4096 * 32},
    "qwen2": {"num_key_value_heads": 32, "hidden_act": "silu", "rms_norm_eps": 1e-6,
              "tie_word_embeddings": False, "use_sliding_window": False,
              "max_position_embeddings": 32768},
    "gpt2": {"n_positions": 1024, "n_inner": None, "activation_function": "gelu_new",
             "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True,
             "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
             "reorder_and_upcast_attn": False, "add_cross_attention": False},
}
# A checkpoint's decoder computes without dropout (inference): the imported config
# records 0.0 (interop/convert.py); a fine-tuning run sets its own model.dropout.
NO_DROPOUT = 0.0
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """Everything a workdir writer needs: family, source config (model.json),
  DecoderConfig, params, tokenizer (saveable as tokenizer.json) and template."""
  family: str
  source_config: dict
  config: DecoderConfig
  params: dict
  tokenizer: hf_tokenizer.HFTokenizer | None

  @property
  def chat_template(self) -> str | None:
    return self.tokenizer.chat_template if self.tokenizer is not None else None


def _refuse(field, value, why):
  raise ValueError(f"config field {field}={value!r}: {why}; lmmask converts only what it "
                   f"computes exactly")


def _rope_theta(c: dict) -> float:
  """rope_theta from transformers 5's rope_parameters or the top level; anything but
  plain (default) rope is refused."""
  rp = c.get("rope_parameters")
  if rp:
    extra = sorted(set(rp) - {"rope_type", "rope_theta"})
    if rp.get("rope_type", "default") != "default":
      _refuse("rope_parameters.rope_type", rp["rope_type"], "only default rope is implemented")
    if extra:
      _refuse("rope_parameters", {k: rp[k] for k in extra}, "rope scaling is not implemented")
  if c.get("rope_scaling") is not None:
    _refuse("rope_scaling", c["rope_scaling"], "rope scaling is not implemented")
  return float((rp or {}).get("rope_theta", c.get("rope_theta", 10000.0)))


def decoder_config(source: dict, *, vocab_size: int, max_len: int | None = None):
  """(family, DecoderConfig) for a transformers config dict. vocab_size: the
  embedding's rows (the checkpoint's exact vocabulary); max_len: default the
  checkpoint's context length."""
  mt = source.get("model_type")
  if mt not in _MODEL_TYPES:
    raise ValueError(f"config model_type={mt!r} is not converted; lmmask reads "
                     f"{sorted(_MODEL_TYPES)}")
  c = {**_DEFAULTS[mt], **source}
  family = _MODEL_TYPES[mt]
  if family == "gpt2":
    for f in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn",
              "add_cross_attention"):
      if c[f]:
        _refuse(f, c[f], "not implemented")
    if not c["scale_attn_weights"]:
      _refuse("scale_attn_weights", False, "lmmask always scales by 1/sqrt(head_dim)")
    if c["activation_function"] != "gelu_new":
      _refuse("activation_function", c["activation_function"], "GPT-2 needs gelu_new")
    d = int(c["n_embd"])
    return family, DecoderConfig(
        vocab_size=vocab_size, dropout=NO_DROPOUT, attention="einsum", d_model=d,
        n_layers=int(c["n_layer"]), n_heads=int(c["n_head"]),
        d_ff=int(c["n_inner"] or 4 * d), max_len=int(max_len or c["n_positions"]),
        gelu_approximate=True, pos_encoding="learned", norm="layernorm", mlp="gelu",
        tie_embeddings=bool(c["tie_word_embeddings"]), head_bias=False,
        norm_eps=float(c["layer_norm_epsilon"]))
  if c["hidden_act"] != "silu":
    _refuse("hidden_act", c["hidden_act"], "Llama/Qwen2 need silu (SwiGLU)")
  d, h = int(c["hidden_size"]), int(c["num_attention_heads"])
  if c.get("head_dim") not in (None, d // h):
    _refuse("head_dim", c["head_dim"], f"lmmask needs head_dim = hidden_size / heads = {d // h}")
  if mt == "mistral" and c.get("sliding_window") is not None:
    _refuse("sliding_window", c["sliding_window"], "sliding-window attention is not "
            "implemented")
  if c.get("use_sliding_window"):
    _refuse("use_sliding_window", True, "sliding-window attention is not implemented")
  if any(t != "full_attention" for t in c.get("layer_types") or ()):
    _refuse("layer_types", c["layer_types"], "sliding-window layers are not implemented")
  attn_bias = bool(c.get("attention_bias", False))
  kv = int(c["num_key_value_heads"] or h)
  return family, DecoderConfig(
      vocab_size=vocab_size, dropout=NO_DROPOUT, attention="einsum", d_model=d,
      n_layers=int(c["num_hidden_layers"]), n_heads=h,
      d_ff=int(c["intermediate_size"]), max_len=int(max_len or c["max_position_embeddings"]),
      pos_encoding="rope", rope_base=_rope_theta(c), norm="rmsnorm", mlp="swiglu",
      n_kv_heads=0 if kv == h else kv, tie_embeddings=bool(c["tie_word_embeddings"]),
      qkv_bias=True if family == "qwen2" else attn_bias,
      out_bias=False if family == "qwen2" else attn_bias,
      mlp_bias=False if family == "qwen2" else bool(c.get("mlp_bias", False)),
      head_bias=False, norm_eps=float(c["rms_norm_eps"]))


def family_of(cfg: DecoderConfig) -> str:
  """The family whose transformers model computes exactly what `cfg` does, or a
  ValueError naming the first option that no family has."""
  def need(field, want, family):
    got = getattr(cfg, field)
    if got != want:
      raise ValueError(f"DecoderConfig.{field}={got!r} has no {FAMILIES[family]} "
                       f"equivalent (it needs {want!r}); this model cannot be exported")
  if cfg.pos_encoding == "learned":
    for field, want in (("norm", "layernorm"), ("mlp", "gelu"), ("gelu_approximate", True),
                        ("kv_heads", cfg.n_heads), ("qkv_bias", True), ("out_bias", True),
                        ("mlp_bias", True)):
      need(field, want, "gpt2")
    if not cfg.tie_embeddings:  # GPT-2's untied lm_head has no bias
      need("head_bias", False, "gpt2")
    return "gpt2"
  need("norm", "rmsnorm", "llama")
  need("mlp", "swiglu", "llama")
  if not cfg.tie_embeddings:
    need("head_bias", False, "llama")
  if cfg.qkv_bias and not cfg.out_bias:  # bias on q/k/v only: Qwen2
    need("mlp_bias", False, "qwen2")
    return "qwen2"
  need("out_bias", cfg.qkv_bias, "llama")  # Llama's attention_bias covers q/k/v and o
  return "llama"


def _layout(family: str, cfg: DecoderConfig):
  """(lmmask path, [HF names], split sizes along the last axis, transpose) rows."""
  hd = cfg.head_dim
  qkv = [cfg.n_heads * hd, cfg.kv_heads * hd, cfg.kv_heads * hd]
  rows = []
  if family == "gpt2":
    p = "transformer."
    rows += [(("embed", "embedding"), [p + "wte.weight"], None, False),
             (("pos_embed", "embedding"), [p + "wpe.weight"], None, False)]
    for i in range(cfg.n_layers):
      b, h = ("blocks", i), f"{p}h.{i}."
      for lm, hn in (("ln1", "ln_1"), ("ln2", "ln_2")):
        rows += [((*b, lm, "scale"), [h + hn + ".weight"], None, False),
                 ((*b, lm, "bias"), [h + hn + ".bias"], None, False)]
      for lm, hn in ((("attn", "qkv"), "attn.c_attn"), (("attn", "out"), "attn.c_proj"),
                     (("fc1",), "mlp.c_fc"), (("fc2",), "mlp.c_proj")):
        rows += [((*b, *lm, "kernel"), [h + hn + ".weight"], None, False),
                 ((*b, *lm, "bias"), [h + hn + ".bias"], None, False)]
    rows += [(("ln_f", "scale"), [p + "ln_f.weight"], None, False),
             (("ln_f", "bias"), [p + "ln_f.bias"], None, False)]
  else:
    rows.append((("embed", "embedding"), ["model.embed_tokens.weight"], None, False))
    for i in range(cfg.n_layers):
      b, h = ("blocks", i), f"model.layers.{i}."
      a = [h + f"self_attn.{n}_proj" for n in "qkv"]
      mlp = [h + "mlp.gate_proj", h + "mlp.up_proj"]
      rows += [((*b, "ln1", "scale"), [h + "input_layernorm.weight"], None, False),
               ((*b, "ln2", "scale"), [h + "post_attention_layernorm.weight"], None, False),
               ((*b, "attn", "qkv", "kernel"), [n + ".weight" for n in a], qkv, True),
               ((*b, "attn", "out", "kernel"), [h + "self_attn.o_proj.weight"], None, True),
               ((*b, "fc1", "kernel"), [n + ".weight" for n in mlp], [cfg.d_ff] * 2, True),
               ((*b, "fc2", "kernel"), [h + "mlp.down_proj.weight"], None, True)]
      if cfg.qkv_bias:
        rows.append(((*b, "attn", "qkv", "bias"), [n + ".bias" for n in a], qkv, False))
      if cfg.out_bias:
        rows.append(((*b, "attn", "out", "bias"), [h + "self_attn.o_proj.bias"], None, False))
      if cfg.mlp_bias:
        rows += [((*b, "fc1", "bias"), [n + ".bias" for n in mlp], [cfg.d_ff] * 2, False),
                 ((*b, "fc2", "bias"), [h + "mlp.down_proj.bias"], None, False)]
    rows.append((("ln_f", "scale"), ["model.norm.weight"], None, False))
  if not cfg.tie_embeddings:
    rows.append((("head", "kernel"), ["lm_head.weight"], None, True))
  return rows


def params_from_tensors(family: str, cfg: DecoderConfig, tensors: dict) -> dict:
  """The Decoder's pure-dict params from HF-named tensors (strict: every tensor used)."""
  if family == "gpt2":  # old checkpoints lack the "transformer." prefix
    tensors = {(k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k): v
               for k, v in tensors.items()}
  used, params = set(), {}
  for path, names, _, transpose in _layout(family, cfg):
    missing = [n for n in names if n not in tensors]
    if missing:
      raise ValueError(f"the checkpoint lacks {missing[0]} (needed for {FAMILIES[family]} "
                       f"with this config); is the checkpoint complete?")
    parts = [np.asarray(tensors[n], np.float32) for n in names]
    parts = [p.T if transpose else p for p in parts]
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = np.ascontiguousarray(np.concatenate(parts, axis=-1))
    used.update(names)
  extra = sorted(k for k in set(tensors) - used
                 if not k.endswith(_IGNORED_SUFFIXES) and
                 not (k == "lm_head.weight" and cfg.tie_embeddings))
  if extra:
    raise ValueError(f"the checkpoint has tensors lmmask would ignore, e.g. {extra[:3]}; "
                     f"its config does not describe them (refusing an inexact import)")
  return params


def tensors_from_params(family: str, cfg: DecoderConfig, params: dict) -> dict:
  """HF-named float32 tensors from the Decoder's pure-dict params."""
  out = {}
  for path, names, sizes, transpose in _layout(family, cfg):
    node = params
    for key in path:
      node = node[key]
    value = np.asarray(node, np.float32)
    parts = np.split(value, np.cumsum(sizes)[:-1], axis=-1) if sizes else [value]
    for n, p in zip(names, parts):
      out[n] = np.ascontiguousarray(p.T if transpose else p)
  return out


def _read_safetensors(path: str) -> dict:
  from safetensors import safe_open
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  elif os.path.exists(os.path.join(path, "model.safetensors")):
    files = ["model.safetensors"]
  else:
    raise FileNotFoundError(f"{path} has no model.safetensors (or sharded index); convert "
                            f"pytorch_model.bin checkpoints to safetensors first")
  out = {}
  for name in files:
    with safe_open(os.path.join(path, name), framework="numpy") as f:
      names = f.keys()
      for k in names:
        out[k] = np.asarray(f.get_tensor(k), np.float32)  # bf16/f16 upcast exactly
  return out


def read(path: str, *, max_len: int | None = None, pad_token: str | None = None) -> Checkpoint:
  """A Hugging Face model directory or a .gguf file, as a `Checkpoint`.
  pad_token: an explicit lmmask pad (default: `hf_tokenizer.choose_pad_id`)."""
  if os.path.isfile(path) and path.endswith(".gguf"):
    source, tensors, meta = gguf_io.read_gguf(path)
    tok = gguf_io.gguf_tokenizer(meta, pad_token=pad_token)
  elif os.path.isdir(path):
    cfg_file = os.path.join(path, "config.json")
    if not os.path.exists(cfg_file):
      raise FileNotFoundError(f"{path} has no config.json; is it a Hugging Face model "
                              f"directory?")
    with open(cfg_file) as f:
      source = json.load(f)
    tensors = _read_safetensors(path)
    tok = hf_tokenizer.load_tokenizer_dir(path, config=source, pad_token=pad_token)
  else:
    raise FileNotFoundError(f"{path} is neither a Hugging Face model directory nor a "
                            f".gguf file")
  if tok is None:
    warnings.warn(f"{path} has no tokenizer; hf.read returns tokenizer=None")
  emb = "transformer.wte.weight" if source.get("model_type") == "gpt2" else \
      "model.embed_tokens.weight"
  emb = emb if emb in tensors else emb.replace("transformer.", "")
  if emb not in tensors:
    raise ValueError(f"{path} has no embedding tensor {emb}; not a supported checkpoint")
  family, cfg = decoder_config(source, vocab_size=int(tensors[emb].shape[0]), max_len=max_len)
  params = params_from_tensors(family, cfg, tensors)
  return Checkpoint(family=family, source_config=source, config=cfg, params=params,
                    tokenizer=tok)


def build(cfg: DecoderConfig, params: dict) -> Decoder:
  """A Decoder holding `params` (no random initialisation of the full model)."""
  abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  want = nnx.to_pure_dict(state)
  flat_want = dict(_flatten(want))
  flat_got = dict(_flatten(params))
  if set(flat_want) != set(flat_got):
    diff = sorted(set(flat_want) ^ set(flat_got), key=str)
    raise ValueError(f"params do not fit DecoderConfig: mismatched entries {diff[:4]}")
  for k, v in flat_want.items():
    if tuple(v.shape) != tuple(np.shape(flat_got[k])):
      raise ValueError(f"param {k} has shape {np.shape(flat_got[k])}, the config needs "
                       f"{tuple(v.shape)}")
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)


def _flatten(d, prefix=()):
  for k, v in d.items():
    if isinstance(v, dict):
      yield from _flatten(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def load(path: str, *, max_len: int | None = None, pad_token: str | None = None):
  """(Decoder, HFTokenizer | None) from a Hugging Face directory or a .gguf file."""
  ck = read(path, max_len=max_len, pad_token=pad_token)
  return build(ck.config, ck.params), ck.tokenizer


def hf_config(family: str, cfg: DecoderConfig, *, tokenizer=None) -> dict:
  """The transformers config.json dict of `family` for `cfg`."""
  ids = {}
  if tokenizer is not None:
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
           "pad_token_id": tokenizer.pad_id}
  common = {"architectures": [FAMILIES[family]], "model_type": family,
            "vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings,
            "torch_dtype": "float32", **ids}
  if family == "gpt2":
    return {**common, "n_embd": cfg.d_model, "n_layer": cfg.n_layers, "n_head": cfg.n_heads,
            "n_inner": cfg.d_ff, "n_positions": cfg.max_len, "n_ctx": cfg.max_len,
            "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False}
  out = {**common, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
         "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads,
         "head_dim": cfg.head_dim, "intermediate_size": cfg.d_ff,
         "max_position_embeddings": cfg.max_len, "hidden_act": "silu",
         "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_base,
         "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
         "attention_dropout": 0.0}
  if family == "llama":
    out.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
  else:
    out.update(use_sliding_window=False, max_window_layers=cfg.n_layers,
               layer_types=["full_attention"] * cfg.n_layers)
  return out


def export(out_dir: str, cfg: DecoderConfig, params: dict, *, tokenizer=None,
           dtype: str = "float32") -> str:
  """Write `cfg` + `params` as a Hugging Face directory (config.json,
  model.safetensors in `dtype`, and tokenizer.json + tokenizer_config.json with
  the chat template when there is a tokenizer). out_dir must not exist."""
  from safetensors.numpy import save_file
  if dtype not in DTYPES:
    raise ValueError(f"export dtype must be one of {DTYPES}, got {dtype!r}")
  if os.path.exists(out_dir):
    raise FileExistsError(f"{out_dir} already exists; export writes a new directory "
                          f"(delete it or choose another path)")
  family = family_of(cfg)
  tensors = tensors_from_params(family, cfg, params)
  if dtype == "bfloat16":
    import ml_dtypes
    tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
  config = hf_config(family, cfg, tokenizer=tokenizer)
  config["torch_dtype"] = dtype
  tmp = out_dir.rstrip("/") + ".tmp_export"
  if os.path.exists(tmp):
    raise FileExistsError(f"{tmp} exists (an interrupted export?); delete it")
  os.makedirs(tmp)
  with open(os.path.join(tmp, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
  if tokenizer is not None:
    tokenizer.save(tmp, model_max_length=cfg.max_len)
  os.rename(tmp, out_dir)  # a half-written export never appears under out_dir
  return out_dir
