"""Skipping an optimizer update inside a jitted step.

Under AdamW a zero gradient still moves the parameters (the first moment keeps
its momentum, weight decay shrinks the weights) and advances the optimizer's
counters. A batch that must not train the model -- no target token counted, or
(the same mechanism) a non-finite loss -- therefore has to keep the old
parameters AND the old optimizer state, selected on device with `jnp.where` so
the step stays one compiled program with no host round trip.

Step counter: `train.train_step` still increments ``state.step`` on a skipped
batch. The batch was consumed; data order and the lr schedule are functions of
the step, so a skipped batch is not retried and the schedule does not stall.
The step's metrics carry ``skipped_empty=1`` and ``update_norm=0``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def keep_if(skip, old, new):
  """``old`` where the scalar boolean ``skip`` is True, else ``new`` (any pytrees of
  the same structure, e.g. ``(params, opt_state)``)."""
  skip = jnp.asarray(skip, dtype=bool)
  if skip.ndim != 0:
    raise ValueError(f"keep_if needs a scalar skip flag, got shape {skip.shape}")
  return jax.tree.map(lambda o, n: jnp.where(skip, o, n), old, new)


def no_targets(metrics) -> jnp.ndarray:
  """True when the batch counted no target token (an all-zero loss mask)."""
  return metrics["num_tokens"] == 0
