"""Every attention mask in lmmask is built here, and only here.

Convention: a boolean mask is True where attending is ALLOWED. Boolean facts are
combined with logical AND first and turned into an additive bias exactly once
(`to_bias`), so two large negatives are never added together (two float32 mins
overflow to -inf, and float32's min cast to bfloat16 is -inf as well).

Shapes follow the (B, H, Tq, Tk) layout of attention logits; every builder
returns an array that broadcasts against it.
"""
from __future__ import annotations

from typing import NamedTuple

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


def keys_up_to(key_mask, last) -> jnp.ndarray:
  """(B, T) key mask with every key after column `last` hidden (`last` may be traced).

  Column `last` then sees its prefix alone, whatever the model's attention mask: the
  view of a model run on a sequence that ends there (inference mode, decoding
  without a cache).
  """
  key_mask = jnp.asarray(key_mask)
  if key_mask.ndim != 2:
    raise ValueError(f"key_mask must be (B, T), got shape {key_mask.shape}")
  return key_mask.astype(bool) & (jnp.arange(key_mask.shape[1])[None, :] <= last)


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


# ---------------------------------------------------------------------------
# The structured form of the same facts, for fused attention kernels
# (jax.nn.dot_product_attention, cuDNN flash attention), which want "causal +
# sequence lengths (+ segments)" rather than a dense (B, 1, T, T) bias.

class AttentionStructure(NamedTuple):
  """Arguments for jax.nn.dot_product_attention that allow exactly `attention_mask`.

  is_causal: static; the kernel applies the (top-left aligned, Tq == Tk) causal mask.
  key_value_seq_lengths: (B,) int32 or None; keys at positions >= length are masked.
  mask: bool (B, 1, 1|T, T) or None; whatever the two fields above cannot express.
  """
  is_causal: bool
  key_value_seq_lengths: jnp.ndarray | None
  mask: jnp.ndarray | None


def attention_structure(key_mask, *, segment_ids=None, causal: bool = True,
                        keys_are_prefix: bool = False) -> AttentionStructure:
  """The structured equivalent of ``attention_mask(key_mask, segment_ids, causal)``.

  keys_are_prefix is a static promise that every row's real keys are a prefix
  (right padding, no packing); then the key mask is sent as sequence lengths.
  Otherwise the key mask (and the segment mask, if given) go as a boolean mask,
  and only causality is structural.
  """
  key_mask = jnp.asarray(key_mask).astype(bool)
  if key_mask.ndim != 2:
    raise ValueError(f"key_mask must be (B, T), got shape {key_mask.shape}")
  if segment_ids is not None:
    mask = key_padding_mask(key_mask) & segment_mask(segment_ids)
    return AttentionStructure(bool(causal), None, mask)
  if keys_are_prefix:
    return AttentionStructure(bool(causal), key_mask.sum(axis=1).astype(jnp.int32), None)
  return AttentionStructure(bool(causal), None, key_padding_mask(key_mask))


def rows_with_key(key_mask, *, segment_ids=None, causal: bool = True) -> jnp.ndarray:
  """Float (B, 1, T, 1): 1 where the query row of ``attention_mask`` allows some key.

  Computed in O(B T) without the dense mask, for the fused attention paths (a row
  with no allowed key must give a zero output, not a uniform average).
  """
  key_mask = jnp.asarray(key_mask).astype(bool)
  if segment_ids is not None:
    seg = jnp.asarray(segment_ids)
    if causal:
      # A key in the query's segment at or before it: the segment's first real key
      # must come no later than the query.
      t = key_mask.shape[1]
      pos = jnp.arange(t)[None, :]
      same = seg[:, :, None] == seg[:, None, :]            # (B, Tq, Tk), O(T^2) bool
      ok = same & key_mask[:, None, :] & (seg[:, None, :] != 0) & (pos[:, None, :] <= pos[:, :, None])
      has = ok.any(axis=-1)
    else:
      same = seg[:, :, None] == seg[:, None, :]
      has = (same & key_mask[:, None, :] & (seg[:, None, :] != 0)).any(axis=-1)
  elif causal:
    has = jnp.cumsum(key_mask, axis=1) > 0
  else:
    has = jnp.broadcast_to(key_mask.any(axis=1, keepdims=True), key_mask.shape)
  return has[:, None, :, None].astype(jnp.float32)


# ---------------------------------------------------------------------------
# The same facts for the Pallas attention kernels (splash on TPU, Triton `mha` on
# GPU), which take only "causal" and one segment id per position: no dense mask,
# no lengths. Key padding becomes a segment of its own.

class KernelMask(NamedTuple):
  """What a segment-id kernel needs to allow exactly `attention_mask` at real queries.

  segment_ids: int32 (B, Tp), Tp = T rounded up to the kernel block. Query i may see
    key j iff their ids are equal (and j <= i when causal). Real tokens keep their
    segment's id; pad positions, and the positions added to reach Tp, share one id no
    real token has, so they see only each other: no row is empty (an empty row would
    make the kernel's softmax divide by zero) and no real query sees a pad.
  causal: static; the kernel's own (top-left aligned, Tq == Tk) causal mask.
  real: bool (B, T), the queries whose rows equal `attention_mask`'s; the outputs at
    the other positions are attention among pads and are zeroed by the caller.
  """
  segment_ids: jnp.ndarray
  causal: bool
  real: jnp.ndarray


def kernel_mask(key_mask, *, segment_ids=None, causal: bool = True, block: int) -> KernelMask:
  """The segment-id form of ``attention_mask(key_mask, segment_ids, causal)``, padded
  to a multiple of `block` positions."""
  key_mask = jnp.asarray(key_mask).astype(bool)
  if key_mask.ndim != 2:
    raise ValueError(f"key_mask must be (B, T), got shape {key_mask.shape}")
  if not isinstance(block, int) or block < 1:
    raise ValueError(f"block must be a positive int, got {block!r}")
  b, t = key_mask.shape
  if segment_ids is None:  # one document per row: every real token in segment 1
    seg = jnp.ones((b, t), jnp.int32)
  else:
    seg = jnp.asarray(segment_ids).astype(jnp.int32)
    if seg.shape != key_mask.shape:
      raise ValueError(f"segment_ids {seg.shape} and key_mask {key_mask.shape} differ in shape")
  # A key is visible iff it is real and in a segment (id != 0), as in segment_mask.
  real = key_mask & (seg != 0)
  fresh = jnp.minimum(seg.min(initial=0), 0) - 1  # below every id in use
  ids = jnp.where(real, seg, fresh)
  tp = -(-t // block) * block
  ids = jnp.pad(ids, ((0, 0), (0, tp - t)), constant_values=fresh)
  return KernelMask(ids, bool(causal), real)


def kernel_mask_to_mask(km: KernelMask) -> jnp.ndarray:
  """Expand a KernelMask back to the dense bool (B, 1, Tp, Tp) mask the kernel applies."""
  seg = jnp.asarray(km.segment_ids)
  mask = (seg[:, :, None] == seg[:, None, :])[:, None]
  if km.causal:
    mask = mask & causal_mask(seg.shape[1])
  return mask
