"""Every attention mask in lmmask is built here, and only here.

Convention: a boolean mask is True where attending is ALLOWED. Boolean facts are
combined with logical AND first and turned into an additive bias exactly once
(`to_bias`), so two large negatives are never added together (two float32 mins
overflow to -inf, and float32's min cast to bfloat16 is -inf as well).

Shapes follow the (B, H, Tq, Tk) layout of attention logits; every builder
returns an array that broadcasts against it.
"""
from __future__ import annotations

import jax.numpy as jnp


def causal_mask(q_len: int, kv_len: int | None = None, *, q_offset=0) -> jnp.ndarray:
  """Bool (1, 1, q_len, kv_len), or (B, 1, q_len, kv_len) for a (B,) offset.

  Query i sits at absolute position ``q_offset + i`` and may attend to keys at
  absolute positions 0 .. q_offset + i. With ``q_offset=0`` and equal lengths this
  is the usual lower triangle. A cache decoding one token at step s uses
  ``causal_mask(1, cache_len, q_offset=s)`` (bottom-right alignment, which
  ``is_causal=True`` in jax does not give).
  """
  if kv_len is None:
    kv_len = q_len
  if q_len < 1 or kv_len < 1:
    raise ValueError(f"causal_mask needs q_len >= 1 and kv_len >= 1, got {q_len}, {kv_len}")
  offset = jnp.asarray(q_offset, dtype=jnp.int32)
  q_pos = jnp.arange(q_len, dtype=jnp.int32)[:, None]
  k_pos = jnp.arange(kv_len, dtype=jnp.int32)[None, :]
  if offset.ndim == 0:
    return (q_pos + offset >= k_pos)[None, None]
  if offset.ndim == 1:
    return (q_pos[None] + offset[:, None, None] >= k_pos[None])[:, None]
  raise ValueError(f"q_offset must be a scalar or shape (B,), got shape {offset.shape}")


def key_padding_mask(key_mask) -> jnp.ndarray:
  """Bool (B, 1, 1, T) from a (B, T) mask that is True on real (non-pad) keys."""
  key_mask = jnp.asarray(key_mask)
  if key_mask.ndim != 2:
    raise ValueError(f"key_mask must be (B, T), got shape {key_mask.shape}")
  return key_mask.astype(bool)[:, None, None, :]


def segment_mask(segment_ids) -> jnp.ndarray:
  """Bool (B, 1, T, T): query and key in the same segment, key not padding (id 0)."""
  seg = jnp.asarray(segment_ids)
  if seg.ndim != 2:
    raise ValueError(f"segment_ids must be (B, T), got shape {seg.shape}")
  same = seg[:, :, None] == seg[:, None, :]
  return (same & (seg[:, None, :] != 0))[:, None]


def to_bias(mask, dtype=jnp.float32) -> jnp.ndarray:
  """Additive bias from a boolean mask: 0 where allowed, finfo(dtype).min where not."""
  mask = jnp.asarray(mask)
  if mask.dtype != jnp.bool_:
    raise ValueError(f"to_bias expects a boolean mask (True = allowed), got dtype {mask.dtype}")
  dtype = jnp.dtype(dtype)
  return jnp.where(mask, jnp.zeros((), dtype), jnp.asarray(jnp.finfo(dtype).min, dtype))


def attention_mask(key_mask, *, segment_ids=None, causal: bool = True) -> jnp.ndarray:
  """Bool (B, 1, T, T): the AND of key padding, causal and (optional) segment masks."""
  key_mask = jnp.asarray(key_mask)
  mask = key_padding_mask(key_mask)
  t = key_mask.shape[1]
  if causal:
    mask = mask & causal_mask(t)
  if segment_ids is not None:
    mask = mask & segment_mask(segment_ids)
  return jnp.broadcast_to(mask, (key_mask.shape[0], 1, t, t))


def attention_bias(key_mask, *, segment_ids=None, causal: bool = True,
                   dtype=jnp.float32) -> jnp.ndarray:
  """Additive (B, 1, T, T) bias in the dtype of the attention logits."""
  return to_bias(attention_mask(key_mask, segment_ids=segment_ids, causal=causal), dtype)


def apply_head_mask(probs, head_mask) -> jnp.ndarray:
  """Scale post-softmax probabilities (B, H, Tq, Tk) by a (H,) or (B, H) head mask."""
  probs = jnp.asarray(probs)
  head_mask = jnp.asarray(head_mask)
  n_heads = probs.shape[1]
  if head_mask.ndim == 1 and head_mask.shape[0] == n_heads:
    scale = head_mask[None, :, None, None]
  elif head_mask.ndim == 2 and head_mask.shape == probs.shape[:2]:
    scale = head_mask[:, :, None, None]
  else:
    raise ValueError(
        f"head_mask must have shape ({n_heads},) or {tuple(probs.shape[:2])}, "
        f"got {tuple(head_mask.shape)}")
  return probs * scale.astype(probs.dtype)
