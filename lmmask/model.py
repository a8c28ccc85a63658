"""A pre-LayerNorm transformer decoder in flax.nnx.

Masks come from `lmmask.masks` as one boolean (B, 1, T, T) array, turned into one
additive bias, added to float32 attention logits before a float32 softmax. Rows
with no allowed key (e.g. a left-pad query) get zero attention output, so they
stay finite. Dropout RNGs are passed at call time, so the module holds only
parameters (no RNG counters to thread through jit or checkpoints).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from lmmask import masks

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ATTENTION_IMPLS = ("einsum", "xla", "cudnn")


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
  # issue 7 (speed): attention kernel, rematerialisation, scan over layers.
  attention: str = "einsum"       # einsum (reference) | xla | cudnn (jax.nn.dot_product_attention)
  remat: bool = False             # recompute each block's activations in the backward pass
  scan_layers: bool = False       # lax.scan over blocks (compile time on accelerators)

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
    need(self.attention in ATTENTION_IMPLS,
         f"attention must be one of {', '.join(ATTENTION_IMPLS)}, got {self.attention!r}")

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


@jax.custom_vjp
def gelu_exact(x):
  """Exact (erf) GELU, x * Phi(x), with a hand-written backward.

  Same values as jax.nn.gelu(x, approximate=False); the backward reuses the saved
  Phi(x) and needs one exp, where autodiff of the erf form re-evaluated erf inside
  XLA:CPU fusions (the MLP's forward + backward ran ~2x faster this way).
  """
  return x * _phi(x)


def _phi(x):
  return 0.5 * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))


def _gelu_fwd(x):
  cdf = _phi(x)
  return x * cdf, (x, cdf)


def _gelu_bwd(res, g):
  x, cdf = res
  pdf = jnp.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))
  return (g * (cdf + x * pdf),)


gelu_exact.defvjp(_gelu_fwd, _gelu_bwd)


def gelu(x, approximate: bool):
  return jax.nn.gelu(x, approximate=True) if approximate else gelu_exact(x)


class Attention(nnx.Module):

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.qkv = _linear(cfg, cfg.d_model, 3 * cfg.d_model, rngs)
    self.out = _linear(cfg, cfg.d_model, cfg.d_model, rngs,
                       std=cfg.init_std / math.sqrt(2 * cfg.n_layers))

  def __call__(self, x, bias, has_key, head_mask=None):
    b, t, _ = x.shape
    h = self.cfg.n_heads
    d = self.cfg.d_model // h
    # Dense layers see 2-D (B*T, features) inputs: on XLA:CPU a 3-D dot fused with its
    # neighbours made the backward pass ~2x slower (issue 7, benchmarks/).
    q, k, v = jnp.split(self.qkv(x.reshape(b * t, -1)).reshape(b, t, -1), 3, axis=-1)
    if isinstance(bias, masks.AttentionStructure):  # fused path: (B, T, H, D) layout
      if head_mask is not None:
        raise ValueError("head_mask needs the attention probabilities; use "
                         "model.attention='einsum'")
      q, k, v = (a.reshape(b, t, h, d) for a in (q, k, v))
      out = jax.nn.dot_product_attention(
          q, k, v, mask=bias.mask, is_causal=bias.is_causal,
          key_value_seq_lengths=bias.key_value_seq_lengths, implementation=self.cfg.attention)
      out = out * has_key.transpose(0, 2, 1, 3).astype(out.dtype)  # rows with no key -> 0
      return self.out(out.reshape(b * t, h * d)).reshape(b, t, -1), None
    q, k, v = (a.reshape(b, t, h, d).transpose(0, 2, 1, 3) for a in (q, k, v))
    # Scale q (B,H,T,D), not the (B,H,T,T) logits: one pass less over the largest
    # tensor in forward and backward (the attention backward ran ~1.6x faster on CPU).
    q = q.astype(jnp.float32) * (1.0 / math.sqrt(d))
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k.astype(jnp.float32)) + bias
    probs = jax.nn.softmax(logits, axis=-1)
    probs = probs * has_key  # rows with no allowed key: zero, not uniform
    if head_mask is not None:
      probs = masks.apply_head_mask(probs, head_mask)
    out = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(v.dtype), v)
    out = out.transpose(0, 2, 1, 3).reshape(b * t, h * d)
    return self.out(out).reshape(b, t, -1), probs


class Block(nnx.Module):

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.ln1 = nnx.LayerNorm(cfg.d_model, rngs=rngs, dtype=cfg.compute_dtype)
    self.attn = Attention(cfg, rngs=rngs)
    self.ln2 = nnx.LayerNorm(cfg.d_model, rngs=rngs, dtype=cfg.compute_dtype)
    self.fc1 = _linear(cfg, cfg.d_model, cfg.d_ff, rngs)
    self.fc2 = _linear(cfg, cfg.d_ff, cfg.d_model, rngs,
                       std=cfg.init_std / math.sqrt(2 * cfg.n_layers))
    self.drop = nnx.Dropout(cfg.dropout)

  def __call__(self, x, bias, has_key, head_mask, deterministic, rngs):
    a, probs = self.attn(self.ln1(x), bias, has_key, head_mask)
    x = x + self.drop(a, deterministic=deterministic, rngs=rngs)
    b, t, dm = x.shape
    m = self.fc2(gelu(self.fc1(self.ln2(x).reshape(b * t, dm)),
                      self.cfg.gelu_approximate)).reshape(b, t, dm)
    x = x + self.drop(m, deterministic=deterministic, rngs=rngs)
    return x, probs


class Decoder(nnx.Module):
  """Decoder-only LM: token + learned position embeddings, pre-LN blocks, LM head."""

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    init = nnx.initializers.normal(cfg.init_std)
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, rngs=rngs, embedding_init=init,
                           dtype=cfg.compute_dtype)
    self.pos_embed = nnx.Embed(cfg.max_len, cfg.d_model, rngs=rngs, embedding_init=init,
                               dtype=cfg.compute_dtype)
    self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
    self.ln_f = nnx.LayerNorm(cfg.d_model, rngs=rngs, dtype=cfg.compute_dtype)
    self.head = _linear(cfg, cfg.d_model, cfg.vocab_size, rngs)
    self.drop = nnx.Dropout(cfg.dropout)

  def __call__(self, inputs, *, key_mask=None, positions=None, segment_ids=None,
               head_mask=None, causal: bool = True, return_attention: bool = False,
               deterministic: bool = True, rngs: nnx.Rngs | None = None,
               keys_are_prefix: bool = False):
    """inputs (B, T) int -> logits (B, T, V) float32 [, list of (B, H, T, T) probs].

    key_mask: (B, T) True on real tokens (default: all real).
    positions: (B, T) int; default: a running count of real tokens, so left and
      right padding give the same positions.
    head_mask: (H,) or (B, H) for every layer, or a list of n_layers such masks.
    deterministic / rngs: dropout off, or on with ``rngs.dropout``.
    keys_are_prefix: static promise that real keys are a prefix of each row (right
      padding); lets the fused attention paths use sequence lengths.
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
    fused = self.cfg.attention != "einsum" and not return_attention
    if fused:
      bias = masks.attention_structure(key_mask, segment_ids=segment_ids, causal=causal,
                                       keys_are_prefix=keys_are_prefix)
      has_key = masks.rows_with_key(key_mask, segment_ids=segment_ids, causal=causal)
    else:
      allowed = masks.attention_mask(key_mask, segment_ids=segment_ids, causal=causal)
      bias = masks.to_bias(allowed, jnp.float32)
      has_key = allowed.any(axis=-1, keepdims=True).astype(jnp.float32)
    x = self.embed(inputs) + self.pos_embed(positions)
    x = self.drop(x, deterministic=deterministic, rngs=rngs)
    all_probs = []
    per_layer = isinstance(head_mask, (list, tuple))
    if per_layer and len(head_mask) != self.cfg.n_layers:
      raise ValueError(f"a per-layer head_mask needs {self.cfg.n_layers} entries, "
                       f"got {len(head_mask)}")
    if self.cfg.scan_layers and not return_attention and not per_layer:
      x = _scan_blocks(self.blocks, x, bias, has_key, head_mask, deterministic, rngs,
                       remat=self.cfg.remat)
    else:
      for i, block in enumerate(self.blocks):
        hm = head_mask[i] if per_layer else head_mask
        if self.cfg.remat and not return_attention:
          x, probs = _remat_block(block, x, bias, has_key, hm, deterministic, rngs)
        else:
          x, probs = block(x, bias, has_key, hm, deterministic, rngs)
        if return_attention:
          all_probs.append(probs)
    logits = self.head(self.ln_f(x).reshape(b * t, -1)).reshape(b, t, -1).astype(jnp.float32)
    if return_attention:
      return logits, all_probs
    return logits


def _remat_block(block, x, bias, has_key, head_mask, deterministic, rngs):
  """block(...) with its activations recomputed in the backward pass."""
  if block.cfg.dropout > 0 and not deterministic:
    raise ValueError("model.remat with dropout is not supported; set model.dropout=0")
  gd, st = nnx.split(block)

  @jax.checkpoint
  def run(st, x):  # masks are closed over (the structure holds a static bool)
    return nnx.merge(gd, st)(x, bias, has_key, head_mask, True, None)[0]
  return run(st, x), None


def _scan_blocks(blocks, x, bias, has_key, head_mask, deterministic, rngs, *, remat):
  """lax.scan over the blocks. Parameters stay per layer (checkpoints and shardings do
  not change); they are stacked inside the step, which XLA fuses into the scan."""
  if blocks[0].cfg.dropout > 0 and not deterministic:
    raise ValueError("model.scan_layers with dropout is not supported; set model.dropout=0")
  gd, _ = nnx.split(blocks[0])
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *[nnx.state(b) for b in blocks])

  def body(x, st):
    return nnx.merge(gd, st)(x, bias, has_key, head_mask, True, None)[0], None
  if remat:
    body = jax.checkpoint(body)
  x, _ = jax.lax.scan(body, x, stacked)
  return x


def count_params(model: nnx.Module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
