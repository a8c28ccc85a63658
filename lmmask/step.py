"""The train state, the one forward, and the module-level steps.

`forward(state, params, batch)` is the only place a Batch is fed to the model:
training, evaluation, the audit and the experiments all call it, so they see the
same masks, positions and segment ids. `train_step` and `eval_step` are plain
functions: jit them at the call site (training donates the state).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lmmask import losses, optim, parallel
from lmmask import model as model_lib
from lmmask.batching import Batch
from lmmask.config import decoder_config
from lmmask.model import Decoder

# Skipping an optimizer update inside a jitted step.
#
# Under AdamW a zero gradient still moves the parameters (the first moment keeps
# its momentum, weight decay shrinks the weights) and advances the optimizer's
# counters. A batch that must not train the model -- no target token counted, or
# (the same mechanism) a non-finite loss -- therefore has to keep the old
# parameters AND the old optimizer state, selected on device with `jnp.where` so
# the step stays one compiled program with no host round trip.
#
# Step counter: `train_step` still increments ``state.step`` on a skipped
# batch. The batch was consumed; data order and the lr schedule are functions of
# the step, so a skipped batch is not retried and the schedule does not stall.
# The step's metrics carry ``skipped_empty=1`` and ``update_norm=0``.


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


@dataclasses.dataclass(frozen=True)
class StepOptions:
  """The static knobs of a step, taken from the config once."""
  reduction: str = "token_mean"   # loss.reduction
  causal: bool = True             # model.causal
  z_loss: float = 0.0             # loss.z_loss coefficient
  skip_nonfinite: bool = False    # train.nonfinite == "skip"
  grad_accum_steps: int = 1       # optim.grad_accum_steps: micro-batches per step
  logits_chunk: int = 0           # loss.logits_chunk: positions per chunk of the LM head + loss
  # Right padding, no packing: real keys are a prefix, the fused attention uses lengths.
  keys_are_prefix: bool = False


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray                 # int32 scalar: optimizer steps taken
  params: Any                       # nnx.State of the model's nnx.Param variables
  opt_state: Any                    # optax state
  rng: jnp.ndarray                  # base PRNG key; step k uses fold_in(rng, k)
  graphdef: Any = flax.struct.field(pytree_node=False)
  tx: Any = flax.struct.field(pytree_node=False)
  schedule: Any = flax.struct.field(pytree_node=False)
  options: StepOptions = flax.struct.field(pytree_node=False, default=StepOptions())

  @property
  def causal(self) -> bool:
    return self.options.causal

  def model(self) -> Decoder:
    return nnx.merge(self.graphdef, self.params)

  def checkpoint_tree(self):
    return {"step": self.step, "params": self.params, "opt_state": self.opt_state,
            "rng": self.rng}

  def replace_from_tree(self, tree):
    return self.replace(step=tree["step"], params=tree["params"],
                        opt_state=tree["opt_state"], rng=tree["rng"])


def step_options(config, keys_are_prefix: bool) -> StepOptions:
  """keys_are_prefix: the batches' promise (`DataSource.keys_are_prefix`)."""
  return StepOptions(reduction=losses.check_reduction(config.loss.reduction),
                     causal=bool(config.model.causal), z_loss=float(config.loss.z_loss),
                     skip_nonfinite=config.train.nonfinite == "skip",
                     grad_accum_steps=int(config.optim.grad_accum_steps),
                     logits_chunk=int(config.loss.logits_chunk),
                     keys_are_prefix=bool(keys_are_prefix))


def create_train_state(config, rng, *, vocab_size: int, keys_are_prefix: bool) -> TrainState:
  """vocab_size and keys_are_prefix: the corpus's (`DataSource` fields of the same names)."""
  cfg = decoder_config(config, vocab_size)
  init_rng, train_rng = jax.random.split(rng)
  model = Decoder(cfg, rngs=nnx.Rngs(params=init_rng))
  graphdef, params = nnx.split(model, nnx.Param)
  tx, sched = optim.make_optimizer(config.optim)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=train_rng, graphdef=graphdef, tx=tx, schedule=sched,
                    options=step_options(config, keys_are_prefix))


# ---------------------------------------------------------------------------
# The forward and the steps.

def forward(state: TrainState, params, batch: Batch, *, deterministic: bool = True, rng=None,
            return_attention: bool = False, upto=None, apply_head: bool = True):
  """Logits (B, T, V) of `batch` under `params`, masked as training masks it.
  upto: hide every key after this column (`model.prefix_forward`); apply_head=False:
  the final hidden states instead of the logits."""
  model = nnx.merge(state.graphdef, params)
  rngs = None if deterministic else nnx.Rngs(dropout=rng)
  prefix = state.options.keys_are_prefix
  # Unpacked batches have segment_ids == key_mask: dropping them changes nothing.
  return model_lib.prefix_forward(
      model, batch.inputs, key_mask=batch.key_mask, positions=batch.positions,
      segment_ids=None if prefix else batch.segment_ids, causal=state.options.causal,
      upto=upto, deterministic=deterministic, rngs=rngs, keys_are_prefix=prefix,
      return_attention=return_attention, apply_head=apply_head)


def train_step(state: TrainState, batch: Batch):
  """One optimizer step on `batch`; returns (new_state, metrics)."""
  o = state.options
  rng = jax.random.fold_in(state.rng, state.step)

  # Exact under accumulation and sharding: weights from the global mask (losses.loss_and_grads).
  # loss = cross-entropy + z-loss term (differentiated); metrics["loss"] stays the
  # cross-entropy, metrics["z_loss"] is the z-loss term (when loss.z_loss > 0).
  logits_fn = lambda p, mb, r: forward(state, p, mb, deterministic=False, rng=r)  # noqa: E731
  if o.logits_chunk:  # static: the LM head applied inside the loss, a chunk at a time
    def logits_fn(p, mb, r):
      hidden = forward(state, p, mb, deterministic=False, rng=r, apply_head=False)
      return losses.ChunkedLogits(hidden, nnx.merge(state.graphdef, p).logits, o.logits_chunk)
  loss, grads, metrics = losses.loss_and_grads(
      logits_fn, state.params, batch, reduction=o.reduction, steps=o.grad_accum_steps,
      rng=rng, z_loss=o.z_loss)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  grad_norm = optax.global_norm(grads)
  # A batch with no counted target (all-zero loss mask) has loss 0 and must not
  # train: keep params AND optimizer state (AdamW would still move them). The
  # step counter still advances (the batch is consumed; data order and lr
  # schedule are step-derived). See keep_if. train.nonfinite=skip uses
  # the same mechanism for a non-finite loss or gradient.
  skipped_empty = no_targets(metrics)
  keep_old = skipped_empty
  extra = {}
  if o.skip_nonfinite:  # static: a non-finite step keeps params and opt state, bit for bit
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep_old = keep_old | ~finite
    extra["skipped"] = (~finite).astype(jnp.float32)
  params, opt_state = keep_if(keep_old, (state.params, state.opt_state),
                                     (params, opt_state))
  metrics = dict(metrics, lr=state.schedule(state.step), grad_norm=grad_norm,
                 update_norm=jnp.where(keep_old, 0.0, optax.global_norm(updates)),
                 param_norm=optax.global_norm(params), real_tokens=batch.key_mask.sum(),
                 skipped_empty=skipped_empty.astype(jnp.float32), **extra)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(state: TrainState, batch: Batch):
  """Dropout-off metrics as sums (nll_sum, num_tokens, num_correct, ...)."""
  logits = forward(state, state.params, batch, deterministic=True)
  _, metrics = losses.masked_cross_entropy(logits, batch.targets, batch.loss_mask,
                                           reduction="token_mean")
  return metrics


_eval_step_jit = jax.jit(eval_step)


@functools.lru_cache(maxsize=8)
def _eval_step_on(mesh):
  # Sums replicated on every device, so every process can read them.
  return jax.jit(eval_step, out_shardings=NamedSharding(mesh, P()))


def evaluate(state: TrainState, batches) -> dict:
  """Token-mean loss, PPL and accuracy over a list of batches (exact, from sums).
  A state spanning several processes is evaluated on its mesh, every process
  passing the same (whole) batches."""
  mesh = parallel.spans_processes(state.params)
  fn = _eval_step_jit if mesh is None else _eval_step_on(mesh)
  nll = tokens = correct = 0.0
  for b in batches:
    if mesh is not None:
      b = parallel.put_replicated(b, mesh)
    m = jax.device_get(fn(state, b))
    nll += float(m["nll_sum"])
    tokens += float(m["num_tokens"])
    correct += float(m["num_correct"])
  loss = nll / tokens if tokens else 0.0
  return {"loss": loss, "ppl": math.exp(loss), "accuracy": correct / tokens if tokens else 0.0,
          "num_tokens": tokens}


def run_evals(state: TrainState, eval_sets: dict) -> dict:
  """{name}_loss / _ppl / _accuracy for every eval set."""
  out = {}
  for name, batches in eval_sets.items():
    m = evaluate(state, batches)
    out.update({f"{name}_loss": m["loss"], f"{name}_ppl": m["ppl"],
                f"{name}_accuracy": m["accuracy"]})
  return out
