"""Masked next-token cross-entropy with explicit reductions.

Reductions (m = loss mask, l = per-token NLL, b = sequence, t = position):
  token_mean        sum(m * l) / sum(m)                       (default)
  seq_mean          sum_b sum_t m l / #{b : sum_t m > 0}
  seq_mean_of_means mean over counted sequences of sum_t m l / sum_t m
  sum               sum(m * l)
All are computed in float32 whatever the logits dtype. An all-zero mask gives a
loss of 0.0 (never NaN). The target value at a masked position never matters.

`metrics` holds sums (nll_sum, num_tokens, num_seqs, num_correct), which add up
exactly across micro-batches and devices, plus the loss and accuracy.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

REDUCTIONS = ("token_mean", "seq_mean", "seq_mean_of_means", "sum")


def check_reduction(reduction: str) -> str:
  if reduction not in REDUCTIONS:
    raise ValueError(f"unknown reduction {reduction!r}; valid reductions are "
                     f"{', '.join(REDUCTIONS)}")
  return reduction


def _safe_div(num, den):
  ok = den > 0
  return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def per_token_nll(logits, targets, loss_mask):
  """(B, T) float32 NLL, zero wherever the mask is zero (targets there ignored)."""
  logits = jnp.asarray(logits).astype(jnp.float32)
  mask = jnp.asarray(loss_mask).astype(jnp.float32)
  if logits.ndim != 3:
    raise ValueError(f"logits must be (B, T, V), got shape {logits.shape}")
  if targets.shape != logits.shape[:2] or mask.shape != logits.shape[:2]:
    raise ValueError(f"targets {targets.shape} and loss_mask {mask.shape} must both be "
                     f"{logits.shape[:2]} (the logits' batch and time axes)")
  safe_targets = jnp.where(mask > 0, targets, 0).astype(jnp.int32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, safe_targets[..., None], axis=-1)[..., 0]
  return (logz - picked) * mask, safe_targets, mask


def reduce_loss(nll, mask, reduction: str):
  """Reduce a masked (B, T) NLL array (already multiplied by the mask)."""
  check_reduction(reduction)
  seq_sum = nll.sum(axis=1)
  seq_tokens = mask.sum(axis=1)
  counted = (seq_tokens > 0).astype(jnp.float32)
  num_seqs = counted.sum()
  if reduction == "token_mean":
    return _safe_div(seq_sum.sum(), seq_tokens.sum())
  if reduction == "seq_mean":
    return _safe_div(seq_sum.sum(), num_seqs)
  if reduction == "seq_mean_of_means":
    return _safe_div((_safe_div(seq_sum, seq_tokens) * counted).sum(), num_seqs)
  return seq_sum.sum()


def masked_cross_entropy(logits, targets, loss_mask, *, reduction: str = "token_mean"):
  """Returns (loss, metrics) for (B, T, V) logits, (B, T) targets and mask."""
  check_reduction(reduction)
  targets = jnp.asarray(targets)
  nll, safe_targets, mask = per_token_nll(logits, targets, loss_mask)
  loss = reduce_loss(nll, mask, reduction)
  pred = jnp.argmax(logits, axis=-1)
  correct = ((pred == safe_targets) * mask).sum()
  num_tokens = mask.sum()
  metrics = {
      "loss": loss,
      "nll_sum": nll.sum(),
      "num_tokens": num_tokens,
      "num_seqs": (mask.sum(axis=1) > 0).sum().astype(jnp.float32),
      "num_correct": correct,
      "accuracy": _safe_div(correct, num_tokens),
  }
  return loss, metrics


def token_weights(loss_mask, reduction: str):
  """(B, T) float32 weights w with  reduce_loss(nll, mask, reduction) == sum(w * nll).

  The weights depend only on the mask, so they can be computed once for a whole
  (global, sharded) batch and then applied to any split of it: summing
  ``sum(w * nll)`` over micro-batches and devices gives exactly the loss, and its
  gradient, of the one big batch. Averaging per-shard means would not: it weights
  a shard with few real tokens as much as one with many.
  """
  check_reduction(reduction)
  mask = jnp.asarray(loss_mask).astype(jnp.float32)
  if mask.ndim != 2:
    raise ValueError(f"loss_mask must be (B, T), got shape {mask.shape}")
  seq_tokens = mask.sum(axis=1, keepdims=True)
  num_seqs = (seq_tokens > 0).astype(jnp.float32).sum()
  if reduction == "token_mean":
    return _safe_div(mask, mask.sum())
  if reduction == "seq_mean":
    return _safe_div(mask, num_seqs)
  if reduction == "seq_mean_of_means":
    return _safe_div(_safe_div(mask, seq_tokens), num_seqs)
  return mask


def z_loss(logits, loss_mask, *, coefficient: float, reduction: str = "token_mean"):
  """Auxiliary z-loss: coefficient * reduce(logsumexp(logits)**2) over counted targets.

  It pulls the softmax normaliser log Z towards 0 (t5x/PaLM use 1e-4). It is
  reduced exactly like the cross-entropy (same mask, same `reduction`), so adding
  it to the loss keeps the learning rate's meaning. It is a separate term: the
  cross-entropy, and the perplexity computed from it, never include it.
  """
  check_reduction(reduction)
  if coefficient < 0:
    raise ValueError(f"z-loss coefficient must be >= 0, got {coefficient}")
  logits = jnp.asarray(logits).astype(jnp.float32)
  mask = jnp.asarray(loss_mask).astype(jnp.float32)
  if logits.ndim != 3 or mask.shape != logits.shape[:2]:
    raise ValueError(f"z_loss needs logits (B, T, V) and loss_mask (B, T); got "
                     f"{logits.shape} and {mask.shape}")
  logz = jax.nn.logsumexp(logits, axis=-1)
  return coefficient * reduce_loss(jnp.square(logz) * mask, mask, reduction)
