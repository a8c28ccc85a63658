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

from typing import Callable, NamedTuple

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


def _sums(nll, mask, pred, safe_targets):
  """The metrics that add up exactly across micro-batches and devices, from (B, T)
  masked NLL, mask, predictions and targets. The one place they are derived."""
  return {
      "nll_sum": nll.sum(),
      "num_tokens": mask.sum(),
      "num_seqs": (mask.sum(axis=1) > 0).sum().astype(jnp.float32),
      "num_correct": ((pred == safe_targets) * mask).sum(),
  }


def token_sums(logits, targets, loss_mask):
  """(B, T) masked NLL, the mask, and the summed metrics (`_sums`): nll_sum,
  num_tokens, num_seqs, num_correct."""
  nll, safe_targets, mask = per_token_nll(logits, targets, loss_mask)
  pred = jnp.argmax(logits, axis=-1)
  return nll, mask, _sums(nll, mask, pred, safe_targets)


class ChunkedLogits(NamedTuple):
  """Logits given as the final hidden states (B, T, D) and the head that maps a
  (B, C, D) slice of them to float32 (B, C, V) logits, applied `chunk` positions at
  a time (loss.logits_chunk)."""
  hidden: jnp.ndarray
  head: Callable
  chunk: int


def chunked_token_sums(logits: ChunkedLogits, targets, loss_mask):
  """`token_sums` plus the (B, T) log-normaliser, the head applied `chunk` positions
  at a time under jax.checkpoint: only one chunk's (B, C, V) logits exist at once, in
  the forward and (recomputed) in the backward, instead of several whole float32
  (B, T, V) arrays. Per token the same arithmetic; the gradients of the head sum
  over chunks in another order (equal up to float rounding)."""
  hidden, head, chunk = logits
  b, t = targets.shape
  n = -(-t // chunk)

  def split(x):  # (B, T, ...) -> (n, B, chunk, ...); padded positions get mask 0
    x = jnp.pad(x, [(0, 0), (0, n * chunk - t)] + [(0, 0)] * (x.ndim - 2))
    return x.reshape((b, n, chunk) + x.shape[2:]).swapaxes(0, 1)

  @jax.checkpoint
  def one(xs):
    h, tg, m = xs
    lg = head(h).astype(jnp.float32)
    nll, safe, mk = per_token_nll(lg, tg, m)
    return nll, jnp.argmax(lg, axis=-1), safe, jax.nn.logsumexp(lg, axis=-1)

  out = jax.lax.map(one, (split(hidden), split(jnp.asarray(targets)),
                          split(jnp.asarray(loss_mask).astype(jnp.float32))))
  nll, pred, safe, logz = (x.swapaxes(0, 1).reshape(b, n * chunk)[:, :t] for x in out)
  mask = jnp.asarray(loss_mask).astype(jnp.float32)
  return nll, mask, _sums(nll, mask, pred, safe), logz


def masked_cross_entropy(logits, targets, loss_mask, *, reduction: str = "token_mean"):
  """Returns (loss, metrics) for (B, T, V) logits, (B, T) targets and mask."""
  check_reduction(reduction)
  nll, mask, sums = token_sums(logits, jnp.asarray(targets), loss_mask)
  loss = reduce_loss(nll, mask, reduction)
  return loss, {"loss": loss, **sums,
                "accuracy": _safe_div(sums["num_correct"], sums["num_tokens"])}


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


# Exact loss and gradients over micro-batches (gradient accumulation).
#
# The per-token weights of the loss reduction are computed ONCE from the loss
# mask of the whole global batch (`token_weights`); each micro-batch then
# contributes ``sum(w * nll)`` and its gradient, and these are summed. The result
# is the loss and gradient of the single big batch for every reduction
# (token_mean, seq_mean, seq_mean_of_means, sum), however unevenly the real tokens
# fall into micro-batches or device shards. Under jit with a sharded batch the
# global sums are global all-reduces inserted by XLA, so the same holds across
# devices and hosts.
#
# Micro-batch i holds rows i, i + A, i + 2A, ... (A = number of micro-batches):
# with the batch split in contiguous blocks over devices, every device then holds
# B / (A * n_devices) rows of every micro-batch, so all devices work on every
# micro-batch.
#
# An optional z-loss (``loss.z_loss``) is reduced with the same weights
# and added to the objective that is differentiated; the reported ``loss`` metric
# stays the cross-entropy and the z-loss term is its own ``z_loss`` metric, as in
# `z_loss`.

_SUM_KEYS = ("nll_sum", "num_tokens", "num_seqs", "num_correct")


def split_micro_batches(batch, steps: int):
  """(B, ...) leaves -> (steps, B // steps, ...); micro-batch i = rows i::steps."""
  def one(x):
    b = x.shape[0]
    if b % steps:
      raise ValueError(f"batch of {b} rows cannot be split into optim.grad_accum_steps="
                       f"{steps} equal micro-batches; make data.batch_size a multiple of it")
    return x.reshape((b // steps, steps) + x.shape[1:]).swapaxes(0, 1)
  return jax.tree.map(one, batch)


def _micro(logits_fn, params, mb, weights, rng, z_loss):
  logits = logits_fn(params, mb, rng)
  if isinstance(logits, ChunkedLogits):
    nll, mask, sums, logz = chunked_token_sums(logits, mb.targets, mb.loss_mask)
  else:
    nll, mask, sums = token_sums(logits, mb.targets, mb.loss_mask)
    logz = None
  # A zero-weight token adds exactly nothing (as reduce_loss's zero guard: a NaN or
  # inf loss mask gives weights 0 and a finite loss; its gradients stay NaN).
  counted = weights != 0
  sums["ce"] = jnp.where(counted, weights * nll, 0.0).sum()
  objective = sums["ce"]
  if z_loss > 0:  # static: coefficient * reduce(logsumexp(logits)**2), same weights as the CE
    if logz is None:
      logz = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    sums["z_loss"] = z_loss * jnp.where(counted, weights * jnp.square(logz) * mask, 0.0).sum()
    objective = objective + sums["z_loss"]
  return objective, sums


def loss_and_grads(logits_fn, params, batch, *, reduction: str, steps: int = 1, rng=None,
                   z_loss: float = 0.0):
  """Objective, gradients and summed metrics of `batch` under `reduction`.

  The objective (first result, the differentiated quantity) is the cross-entropy
  plus, with z_loss > 0, the z-loss term; metrics["loss"] is the cross-entropy
  alone and metrics["z_loss"] the z-loss term.

  logits_fn(params, micro_batch, rng) -> (b, T, V) logits, or `ChunkedLogits`. With steps > 1 the
  micro-batches run one after another inside a lax.scan (one compiled body,
  activations of one micro-batch alive at a time); micro-batch i gets the
  dropout key fold_in(rng, i).
  """
  if not isinstance(steps, int) or steps < 1:
    raise ValueError(f"optim.grad_accum_steps must be a positive int, got {steps!r}")
  if z_loss < 0:
    raise ValueError(f"z-loss coefficient must be >= 0, got {z_loss}")
  keys = _SUM_KEYS + ("ce",) + (("z_loss",) if z_loss > 0 else ())
  weights = token_weights(batch.loss_mask, reduction)
  grad_fn = jax.value_and_grad(lambda p, mb, w, r: _micro(logits_fn, p, mb, w, r, z_loss),
                               has_aux=True)
  if steps == 1:
    (objective, sums), grads = grad_fn(params, batch, weights, rng)
  else:
    micro = split_micro_batches(batch, steps)
    micro_w = split_micro_batches(weights, steps)
    zeros = jax.tree.map(jnp.zeros_like, params)
    init = (zeros, jnp.zeros((), jnp.float32), {k: jnp.zeros((), jnp.float32) for k in keys})

    def body(carry, xs):
      g_acc, obj_acc, sums_acc = carry
      i, mb, w = xs
      r = None if rng is None else jax.random.fold_in(rng, i)
      (obj, sums), g = grad_fn(params, mb, w, r)
      g_acc = jax.tree.map(jnp.add, g_acc, g)
      sums_acc = {k: sums_acc[k] + sums[k] for k in keys}
      return (g_acc, obj_acc + obj, sums_acc), None

    (grads, objective, sums), _ = jax.lax.scan(
        body, init, (jnp.arange(steps), micro, micro_w))
  metrics = {k: v for k, v in sums.items() if k != "ce"}
  metrics.update(loss=sums["ce"],
                 accuracy=_safe_div(sums["num_correct"], sums["num_tokens"]))
  return objective, grads, metrics
