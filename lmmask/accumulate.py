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

An optional z-loss (``loss.z_loss``) is reduced with the same weights
and added to the objective that is differentiated; the reported ``loss`` metric
stays the cross-entropy and the z-loss term is its own ``z_loss`` metric, as in
`losses.z_loss`.
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


def _micro(logits_fn, params, mb, weights, rng, z_loss):
  logits = logits_fn(params, mb, rng)
  nll, safe_targets, mask = losses.per_token_nll(logits, mb.targets, mb.loss_mask)
  # A zero-weight token adds exactly nothing (as reduce_loss's zero guard: a NaN or
  # inf loss mask gives weights 0 and a finite loss; its gradients stay NaN).
  counted = weights != 0
  ce = jnp.where(counted, weights * nll, 0.0).sum()
  pred = jnp.argmax(logits, axis=-1)
  sums = {"nll_sum": nll.sum(), "num_tokens": mask.sum(),
          "num_seqs": (mask.sum(axis=1) > 0).sum().astype(jnp.float32),
          "num_correct": ((pred == safe_targets) * mask).sum(), "ce": ce}
  objective = ce
  if z_loss > 0:  # static: coefficient * reduce(logsumexp(logits)**2), same weights as the CE
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

  logits_fn(params, micro_batch, rng) -> (b, T, V) logits. With steps > 1 the
  micro-batches run one after another inside a lax.scan (one compiled body,
  activations of one micro-batch alive at a time); micro-batch i gets the
  dropout key fold_in(rng, i).
  """
  if not isinstance(steps, int) or steps < 1:
    raise ValueError(f"optim.grad_accum_steps must be a positive int, got {steps!r}")
  if z_loss < 0:
    raise ValueError(f"z-loss coefficient must be >= 0, got {z_loss}")
  keys = _SUM_KEYS + ("ce",) + (("z_loss",) if z_loss > 0 else ())
  weights = losses.token_weights(batch.loss_mask, reduction)
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
                 accuracy=losses._safe_div(sums["num_correct"], sums["num_tokens"]))
  return objective, grads, metrics
