"""Exact loss and gradients over micro-batches (gradient accumulation).

The per-token weights of the loss reduction are computed ONCE from the loss
mask of the whole global batch (`losses.token_weights`); each micro-batch then
contributes ``sum(w * nll)`` and its gradient, and these are summed. The result
is the loss and gradient of the single big batch for every reduction
(token_mean, seq_mean, seq_mean_of_means, sum), however unevenly the real tokens
fall into micro-batches or device shards. Under jit with a sharded batch the
global sums are global all-reduces inserted by XLA, so the same holds across
devices and hosts.

Micro-batch i holds rows i, i + A, i + 2A, ... (A = number of micro-batches):
with the batch split in contiguous blocks over devices, every device then holds
B / (A * n_devices) rows of every micro-batch, so all devices work on every
micro-batch.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lmmask import losses

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


def _micro(logits_fn, params, mb, weights, rng):
  logits = logits_fn(params, mb, rng)
  nll, safe_targets, mask = losses.per_token_nll(logits, mb.targets, mb.loss_mask)
  objective = (weights * nll).sum()
  pred = jnp.argmax(logits, axis=-1)
  sums = {"nll_sum": nll.sum(), "num_tokens": mask.sum(),
          "num_seqs": (mask.sum(axis=1) > 0).sum().astype(jnp.float32),
          "num_correct": ((pred == safe_targets) * mask).sum()}
  return objective, sums


def loss_and_grads(logits_fn, params, batch, *, reduction: str, steps: int = 1, rng=None):
  """Loss, gradients and summed metrics of `batch` under `reduction`.

  logits_fn(params, micro_batch, rng) -> (b, T, V) logits. With steps > 1 the
  micro-batches run one after another inside a lax.scan (one compiled body,
  activations of one micro-batch alive at a time); micro-batch i gets the
  dropout key fold_in(rng, i).
  """
  if not isinstance(steps, int) or steps < 1:
    raise ValueError(f"optim.grad_accum_steps must be a positive int, got {steps!r}")
  weights = losses.token_weights(batch.loss_mask, reduction)
  grad_fn = jax.value_and_grad(lambda p, mb, w, r: _micro(logits_fn, p, mb, w, r),
                               has_aux=True)
  if steps == 1:
    (objective, sums), grads = grad_fn(params, batch, weights, rng)
  else:
    micro = split_micro_batches(batch, steps)
    micro_w = split_micro_batches(weights, steps)
    zeros = jax.tree.map(jnp.zeros_like, params)
    init = (zeros, jnp.zeros((), jnp.float32), {k: jnp.zeros((), jnp.float32) for k in _SUM_KEYS})

    def body(carry, xs):
      g_acc, obj_acc, sums_acc = carry
      i, mb, w = xs
      r = None if rng is None else jax.random.fold_in(rng, i)
      (obj, sums), g = grad_fn(params, mb, w, r)
      g_acc = jax.tree.map(jnp.add, g_acc, g)
      sums_acc = {k: sums_acc[k] + sums[k] for k in _SUM_KEYS}
      return (g_acc, obj_acc + obj, sums_acc), None

    (grads, objective, sums), _ = jax.lax.scan(
        body, init, (jnp.arange(steps), micro, micro_w))
  metrics = dict(sums, loss=objective,
                 accuracy=losses._safe_div(sums["num_correct"], sums["num_tokens"]))
  return objective, grads, metrics
