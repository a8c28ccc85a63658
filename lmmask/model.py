"""A pre-norm transformer decoder in flax.nnx.

Masks come from `lmmask.masks` as one boolean (B, 1, T, T) array, turned into one
additive bias, added to float32 attention logits before a float32 softmax. Rows
with no allowed key (e.g. a left-pad query) get zero attention output, so they
stay finite. Dropout RNGs are passed at call time, so the module holds only
parameters (no RNG counters to thread through jit or checkpoints).

Options (DecoderConfig; the defaults are the original decoder): learned or rotary
positions, LayerNorm or RMSNorm, GELU or SwiGLU MLP, grouped-query / multi-query
attention (`n_kv_heads`) and tied input/output embeddings. Rotary embeddings are
driven by the `positions` array, never by the array index, so left padding,
packed segments (positions restart) and a cache's query offset all rotate each
token by its own position. For a KV cache: `Attention.project` returns q and the
already-rotated k, v of new tokens; `attend` takes any keys/values (e.g. cached
ones concatenated with new ones) and a (B, 1, Tq, Tk) boolean mask's bias.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from lmmask import masks

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
POS_ENCODINGS = ("learned", "rope")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  vocab_size: int
  d_model: int = 64
  n_layers: int = 2
  n_heads: int = 4
  d_ff: int = 192
  max_len: int = 16
  dropout: float = 0.0
  dtype: str = "float32"          # compute dtype of activations; params, logits of
                                  # attention, softmax and loss stay float32
  gelu_approximate: bool = False  # False: exact erf GELU; True: tanh approximation
  init_std: float = 0.02
  pos_encoding: str = "learned"   # learned: a (max_len, d_model) table; rope: rotary q/k
  rope_base: float = 10000.0      # rotary base (wavelengths up to 2*pi*base); rope only
  norm: str = "layernorm"         # layernorm | rmsnorm (no mean subtraction, no bias)
  mlp: str = "gelu"               # gelu: fc2(gelu(fc1 x)); swiglu: fc2(silu(gate) * up)
  n_kv_heads: int = 0             # key/value heads: 0 or n_heads = MHA, 1 = MQA, else GQA
  tie_embeddings: bool = False    # True: logits = x @ embed.T (no separate head, no bias)

  def __post_init__(self):
    def need(cond, msg):
      if not cond:
        raise ValueError(f"DecoderConfig: {msg}")
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_len"):
      v = getattr(self, name)
      need(isinstance(v, int) and not isinstance(v, bool) and v > 0,
           f"{name} must be a positive int, got {v!r}")
    need(self.d_model % self.n_heads == 0,
         f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
    need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
    need(self.dtype in _DTYPES, f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
    need(self.init_std > 0, f"init_std must be > 0, got {self.init_std}")
    need(self.pos_encoding in POS_ENCODINGS,
         f"pos_encoding must be one of {POS_ENCODINGS}, got {self.pos_encoding!r}")
    need(self.norm in NORMS, f"norm must be one of {NORMS}, got {self.norm!r}")
    need(self.mlp in MLPS, f"mlp must be one of {MLPS}, got {self.mlp!r}")
    need(isinstance(self.n_kv_heads, int) and not isinstance(self.n_kv_heads, bool)
         and 0 <= self.n_kv_heads <= self.n_heads and self.n_heads % self.kv_heads == 0,
         f"n_kv_heads={self.n_kv_heads!r} must be 0 (= n_heads) or a divisor of "
         f"n_heads={self.n_heads} (1 = multi-query)")
    if self.pos_encoding == "rope":
      need(self.head_dim % 2 == 0, f"rope needs an even head dim, got d_model/n_heads="
           f"{self.head_dim}; change d_model or n_heads")
      need(self.rope_base > 1.0, f"rope_base must be > 1, got {self.rope_base}")
    need(isinstance(self.tie_embeddings, bool),
         f"tie_embeddings must be a bool, got {self.tie_embeddings!r}")

  @property
  def kv_heads(self) -> int:
    return self.n_kv_heads or self.n_heads

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  @property
  def compute_dtype(self):
    return _DTYPES[self.dtype]

  @classmethod
  def from_dict(cls, d) -> "DecoderConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
      raise ValueError(f"unknown DecoderConfig field(s) {unknown}; valid: {sorted(fields)}")
    return cls(**dict(d))


def _linear(cfg, din, dout, rngs, std=None):
  return nnx.Linear(din, dout, rngs=rngs, dtype=cfg.compute_dtype, param_dtype=jnp.float32,
                    kernel_init=nnx.initializers.normal(std or cfg.init_std))


def rope_frequencies(head_dim: int, base: float) -> jnp.ndarray:
  """(head_dim // 2,) float32 angular frequencies base**(-2i / head_dim)."""
  return base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)


def apply_rope(x, positions, base: float):
  """Rotate (B, T, H, D) queries or keys by their (B, T) integer positions.

  "Rotate half" layout: feature i pairs with feature i + D/2, and the pair is
  rotated by the angle positions * base**(-2i / D). Computed in float32, returned
  in x's dtype. Only `positions` decides the angle (a cache passes its offset).
  """
  x = jnp.asarray(x)
  positions = jnp.asarray(positions)
  if x.ndim != 4 or positions.shape != x.shape[:2]:
    raise ValueError(f"apply_rope needs x (B, T, H, D) and positions (B, T); got "
                     f"{x.shape} and {positions.shape}")
  d = x.shape[-1]
  if d % 2:
    raise ValueError(f"apply_rope needs an even head dim, got {d}")
  angles = positions.astype(jnp.float32)[:, :, None, None] * rope_frequencies(d, base)
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def attend(q, k, v, bias, has_key, head_mask=None):
  """Grouped attention: q (B, Tq, H, D), k and v (B, Tk, Hkv, D), H % Hkv == 0.

  Query head h uses key/value head h // (H / Hkv). bias: additive (B, 1, Tq, Tk)
  float32; has_key: (B, 1, Tq, 1), 0 on rows with no allowed key (their output is
  zero). Returns (B, Tq, H * D) and float32 probs (B, H, Tq, Tk).
  """
  b, tq, h, d = q.shape
  tk, hkv = k.shape[1], k.shape[2]
  if h % hkv:
    raise ValueError(f"query heads {h} must be a multiple of key/value heads {hkv}")
  g = h // hkv
  qg = q.astype(jnp.float32).reshape(b, tq, hkv, g, d)
  logits = jnp.einsum("bqkgd,bskd->bkgqs", qg, k.astype(jnp.float32))
  logits = logits.reshape(b, h, tq, tk) / math.sqrt(d) + bias
  probs = jax.nn.softmax(logits, axis=-1)
  probs = probs * has_key  # rows with no allowed key: zero, not uniform
  if head_mask is not None:
    probs = masks.apply_head_mask(probs, head_mask)
  pg = probs.reshape(b, hkv, g, tq, tk).astype(v.dtype)
  out = jnp.einsum("bkgqs,bskd->bqkgd", pg, v)
  return out.reshape(b, tq, h * d), probs


class Attention(nnx.Module):

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d = cfg.head_dim
    self.qkv = _linear(cfg, cfg.d_model, (cfg.n_heads + 2 * cfg.kv_heads) * d, rngs)
    self.out = _linear(cfg, cfg.d_model, cfg.d_model, rngs,
                       std=cfg.init_std / math.sqrt(2 * cfg.n_layers))

  def project(self, x, positions):
    """(B, T, d_model) -> q (B, T, H, D), k and v (B, T, Hkv, D); with rope, q and k
    are rotated by `positions` (a cache stores k and v exactly as returned)."""
    b, t, _ = x.shape
    cfg = self.cfg
    d, h, hkv = cfg.head_dim, cfg.n_heads, cfg.kv_heads
    q, k, v = jnp.split(self.qkv(x), [h * d, (h + hkv) * d], axis=-1)
    q, k, v = q.reshape(b, t, h, d), k.reshape(b, t, hkv, d), v.reshape(b, t, hkv, d)
    if cfg.pos_encoding == "rope":
      q = apply_rope(q, positions, cfg.rope_base)
      k = apply_rope(k, positions, cfg.rope_base)
    return q, k, v

  def __call__(self, x, bias, has_key, head_mask=None, positions=None):
    if positions is None and self.cfg.pos_encoding == "rope":
      raise ValueError("rope attention needs the (B, T) positions array")
    q, k, v = self.project(x, positions)
    out, probs = attend(q, k, v, bias, has_key, head_mask)
    return self.out(out), probs


def _norm(cfg: DecoderConfig, rngs):
  if cfg.norm == "rmsnorm":
    return nnx.RMSNorm(cfg.d_model, rngs=rngs, dtype=cfg.compute_dtype)
  return nnx.LayerNorm(cfg.d_model, rngs=rngs, dtype=cfg.compute_dtype)


class Block(nnx.Module):

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.ln1 = _norm(cfg, rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.ln2 = _norm(cfg, rngs)
    width = 2 * cfg.d_ff if cfg.mlp == "swiglu" else cfg.d_ff  # swiglu: [gate | up]
    self.fc1 = _linear(cfg, cfg.d_model, width, rngs)
    self.fc2 = _linear(cfg, cfg.d_ff, cfg.d_model, rngs,
                       std=cfg.init_std / math.sqrt(2 * cfg.n_layers))
    self.drop = nnx.Dropout(cfg.dropout)

  def mlp(self, x):
    h = self.fc1(x)
    if self.cfg.mlp == "swiglu":
      gate, up = jnp.split(h, 2, axis=-1)
      h = jax.nn.silu(gate) * up
    else:
      h = jax.nn.gelu(h, approximate=self.cfg.gelu_approximate)
    return self.fc2(h)

  def __call__(self, x, bias, has_key, head_mask, deterministic, rngs, positions=None):
    a, probs = self.attn(self.ln1(x), bias, has_key, head_mask, positions)
    x = x + self.drop(a, deterministic=deterministic, rngs=rngs)
    m = self.mlp(self.ln2(x))
    x = x + self.drop(m, deterministic=deterministic, rngs=rngs)
    return x, probs


class Decoder(nnx.Module):
  """Decoder-only LM: token (+ learned position) embeddings, pre-norm blocks, LM head."""

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    init = nnx.initializers.normal(cfg.init_std)
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, rngs=rngs, embedding_init=init,
                           dtype=cfg.compute_dtype)
    if cfg.pos_encoding == "learned":
      self.pos_embed = nnx.Embed(cfg.max_len, cfg.d_model, rngs=rngs, embedding_init=init,
                                 dtype=cfg.compute_dtype)
    self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
    self.ln_f = _norm(cfg, rngs)
    if not cfg.tie_embeddings:
      self.head = _linear(cfg, cfg.d_model, cfg.vocab_size, rngs)
    self.drop = nnx.Dropout(cfg.dropout)

  def embed_inputs(self, inputs, positions):
    """(B, T) ids and positions -> (B, T, d_model) residual stream (before dropout)."""
    x = self.embed(inputs)
    if self.cfg.pos_encoding == "learned":
      x = x + self.pos_embed(positions)
    return x

  def logits(self, x):
    """Final norm and LM head (or the tied embedding): float32 (B, T, V)."""
    x = self.ln_f(x)
    out = self.embed.attend(x) if self.cfg.tie_embeddings else self.head(x)
    return out.astype(jnp.float32)

  def __call__(self, inputs, *, key_mask=None, positions=None, segment_ids=None,
               head_mask=None, causal: bool = True, return_attention: bool = False,
               deterministic: bool = True, rngs: nnx.Rngs | None = None):
    """inputs (B, T) int -> logits (B, T, V) float32 [, list of (B, H, T, T) probs].

    key_mask: (B, T) True on real tokens (default: all real).
    positions: (B, T) int; default: a running count of real tokens, so left and
      right padding give the same positions.
    head_mask: (H,) or (B, H) for every layer, or a list of n_layers such masks.
    deterministic / rngs: dropout off, or on with ``rngs.dropout``.
    """
    if inputs.ndim != 2:
      raise ValueError(f"inputs must be (B, T) token ids, got shape {inputs.shape}")
    b, t = inputs.shape
    if t > self.cfg.max_len:
      raise ValueError(f"sequence length {t} exceeds max_len={self.cfg.max_len}; raise "
                       f"model.max_len or shorten the data")
    if key_mask is None:
      key_mask = jnp.ones((b, t), bool)
    key_mask = key_mask.astype(bool)
    if positions is None:
      positions = jnp.maximum(jnp.cumsum(key_mask, axis=1) - 1, 0)
    allowed = masks.attention_mask(key_mask, segment_ids=segment_ids, causal=causal)
    bias = masks.to_bias(allowed, jnp.float32)
    has_key = allowed.any(axis=-1, keepdims=True).astype(jnp.float32)
    x = self.embed_inputs(inputs, positions)
    x = self.drop(x, deterministic=deterministic, rngs=rngs)
    all_probs = []
    per_layer = isinstance(head_mask, (list, tuple))
    if per_layer and len(head_mask) != self.cfg.n_layers:
      raise ValueError(f"a per-layer head_mask needs {self.cfg.n_layers} entries, "
                       f"got {len(head_mask)}")
    for i, block in enumerate(self.blocks):
      hm = head_mask[i] if per_layer else head_mask
      x, probs = block(x, bias, has_key, hm, deterministic, rngs, positions)
      if return_attention:
        all_probs.append(probs)
    logits = self.logits(x)
    if return_attention:
      return logits, all_probs
    return logits


def count_params(model: nnx.Module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
