"""Learning-rate schedules as small functions composed with optax, and the optimizer."""
from __future__ import annotations

import jax
import optax

SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "sgd")


def warmup(peak_lr: float, steps: int):
  return optax.linear_schedule(0.0, peak_lr, max(steps, 1))


def decay(kind: str, peak_lr: float, steps: int, end_factor: float):
  end = peak_lr * end_factor
  steps = max(steps, 1)
  if kind == "cosine":
    return optax.cosine_decay_schedule(peak_lr, steps, alpha=end_factor)
  if kind == "linear":
    return optax.linear_schedule(peak_lr, end, steps)
  if kind == "constant":
    return optax.constant_schedule(peak_lr)
  raise ValueError(f"unknown schedule {kind!r}; valid: {', '.join(SCHEDULES)}")


def make_schedule(optim_cfg):
  """Linear warmup for `warmup_steps`, then `schedule` over the remaining decay steps."""
  c = optim_cfg
  if c.warmup_steps == 0:
    return decay(c.schedule, c.lr, c.decay_steps, c.end_lr_factor)
  return optax.join_schedules(
      [warmup(c.lr, c.warmup_steps),
       decay(c.schedule, c.lr, c.decay_steps - c.warmup_steps, c.end_lr_factor)],
      [c.warmup_steps])


def decay_mask(params):
  """True on weight matrices and embeddings; False on norms' scales and biases."""
  def is_matrix(path, _):
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    return any(n in ("kernel", "embedding") for n in names)
  return jax.tree_util.tree_map_with_path(is_matrix, params)


def make_optimizer(optim_cfg):
  """optax chain: [global-norm clipping] + AdamW (masked decay) or SGD."""
  c = optim_cfg
  sched = make_schedule(c)
  parts = []
  if c.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(c.clip_norm))
  if c.name == "adamw":
    parts.append(optax.adamw(sched, b1=c.b1, b2=c.b2, eps=c.eps,
                             weight_decay=c.weight_decay, mask=decay_mask))
  elif c.name == "sgd":
    parts.append(optax.sgd(sched, momentum=c.momentum or None))
  else:
    raise ValueError(f"unknown optimizer {c.name!r}; valid: {', '.join(OPTIMIZERS)}")
  return optax.chain(*parts), sched
