"""Leak audit: does any output depend on tokens it must not see?

Two perturbation probes on real batches, run exactly as training runs the model
(same masks, positions, segment ids, the state's `causal` flag, dropout off):

* future probe: for every cut t, replace the real tokens after t by random tokens
  and measure the largest change of the logits at real positions <= t;
* pad probe: replace the ids at padding positions (their masks unchanged) by random
  tokens and measure the largest change of the logits at real positions.

Both are run on right- and left-padded copies of the batches. Any change above
`tolerance` is a leak. The attention maps are checked too: per layer and head, the
mean attention mass (over real queries) above the diagonal and on pad keys, drawn
as PNG heat maps for a few examples. The probes run the configured attention path;
fused paths (xla, cudnn, splash, triton) form no probabilities, so the maps come from
the einsum path on the same weights, and the report says so.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmmask import checkpoint as ckpt
from lmmask import config as config_lib
from lmmask import step as step_lib
from lmmask import workdir as wd
from lmmask.data import registry
from lmmask.model import Decoder


def future_region(length: int, t):
  """Bool (length,): the columns a probe cut at t perturbs (strictly after t)."""
  return jnp.arange(length) > t


class _Spec(NamedTuple):
  """The static half of a TrainState (hashable, for jit): what `step.forward` reads."""
  graphdef: object
  options: step_lib.StepOptions


def _static(state) -> _Spec:
  # The probes also run on re-padded copies whose real keys are no prefix, so the
  # fused attention's prefix shortcut is off here (same maths, general path).
  return _Spec(state.graphdef, dataclasses.replace(state.options, keys_are_prefix=False))


def _forward(state, params, batch, return_attention=False):
  """The model as evaluation calls it (dropout off): the one `step.forward`."""
  return step_lib.forward(state, params, batch, deterministic=True,
                          return_attention=return_attention)


# The jitted probes take the state's static part and its params apart, so states of
# one architecture share compiled code.
@functools.partial(jax.jit, static_argnums=(0,))
def _future_change(state, params, batch, t, noise):
  """Largest |logit change| at real columns <= t when real tokens after t change."""
  base = _forward(state, params, batch)
  length = batch.inputs.shape[1]
  perturb = future_region(length, t)[None, :] & batch.key_mask
  new_inputs = jnp.where(perturb, noise, batch.inputs)
  out = _forward(state, params, batch.replace(inputs=new_inputs))
  watch = (jnp.arange(length) <= t)[None, :] & batch.key_mask
  diff = jnp.abs(out - base).max(axis=-1)
  return jnp.where(watch, diff, 0.0).max()


@functools.partial(jax.jit, static_argnums=(0,))
def _pad_change(state, params, batch, noise):
  base = _forward(state, params, batch)
  new_inputs = jnp.where(batch.key_mask, batch.inputs, noise)
  out = _forward(state, params, batch.replace(inputs=new_inputs))
  diff = jnp.abs(out - base).max(axis=-1)
  return jnp.where(batch.key_mask, diff, 0.0).max()


def _noise(rng, shape, vocab_size, pad_id):
  # random non-pad ids (pad_id excluded so the perturbed token is a real-looking one)
  ids = jax.random.randint(rng, shape, 0, vocab_size - 1)
  return jnp.where(ids >= pad_id, ids + 1, ids).astype(jnp.int32)


def future_probe(state, batches, *, vocab_size: int, pad_id: int, seed: int = 0) -> float:
  worst = 0.0
  rng = jax.random.PRNGKey(seed)
  for i, b in enumerate(batches):
    for t in range(b.inputs.shape[1] - 1):
      noise = _noise(jax.random.fold_in(rng, i * 1000 + t), b.inputs.shape, vocab_size, pad_id)
      worst = max(worst, float(_future_change(_static(state), state.params, b, t, noise)))
  return worst


def pad_probe(state, batches, *, vocab_size: int, pad_id: int, seed: int = 1) -> float:
  worst = 0.0
  rng = jax.random.PRNGKey(seed)
  for i, b in enumerate(batches):
    noise = _noise(jax.random.fold_in(rng, i), b.inputs.shape, vocab_size, pad_id)
    worst = max(worst, float(_pad_change(_static(state), state.params, b, noise)))
  return worst


@functools.partial(jax.jit, static_argnums=(0,))
def _attention_jit(state, params, batch):
  return _forward(state, params, batch, return_attention=True)[1]


@functools.lru_cache(maxsize=8)
def _einsum_graphdef(cfg):
  """The graphdef of the decoder `cfg` on the einsum path (the same parameters)."""
  abstract = nnx.eval_shape(lambda: Decoder(dataclasses.replace(cfg, attention="einsum"),
                                            rngs=nnx.Rngs(0)))
  return nnx.split(abstract, nnx.Param)[0]


def attention_path(state) -> str:
  """The configured attention path of `state`'s model (model.attention, resolved)."""
  return nnx.merge(state.graphdef, state.params).cfg.attention


def _attention(state, batch):
  spec = _static(state)
  cfg = nnx.merge(state.graphdef, state.params).cfg
  if cfg.attention != "einsum":  # a fused path has no probabilities: einsum, same weights
    spec = spec._replace(graphdef=_einsum_graphdef(cfg))
  return _attention_jit(spec, state.params, batch)


def attention_stats(state, batches) -> dict:
  """(n_layers, n_heads) mean attention mass per real query above the diagonal / on pads."""
  above = pad = None
  count = 0.0
  for b in batches:
    probs = [np.asarray(p, np.float64) for p in _attention(state, b)]
    t = b.inputs.shape[1]
    upper = np.triu(np.ones((t, t), bool), k=1)
    q_real = np.asarray(b.key_mask, bool)                       # (B, T)
    pad_key = ~np.asarray(b.key_mask, bool)                     # (B, T)
    a = np.stack([(p * upper).sum(-1) for p in probs])           # (L, B, H, T)
    d = np.stack([(p * pad_key[:, None, None, :]).sum(-1) for p in probs])
    w = q_real[None, :, None, :]
    a_sum = (a * w).sum(axis=(1, 3))
    d_sum = (d * w).sum(axis=(1, 3))
    above = a_sum if above is None else above + a_sum
    pad = d_sum if pad is None else pad + d_sum
    count += q_real.sum()
  return {"mass_above_diagonal": (above / count).tolist(), "mass_on_pad_keys": (pad / count).tolist()}


def save_heatmaps(state, batch, tok, outdir: str, num: int) -> list[str]:
  """One PNG per example: a grid of layers x heads attention maps over its real tokens."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  os.makedirs(outdir, exist_ok=True)
  probs = [np.asarray(p) for p in _attention(state, batch)]
  n_layers, n_heads = len(probs), probs[0].shape[1]
  paths = []
  for i in range(min(num, batch.inputs.shape[0])):
    real = np.nonzero(np.asarray(batch.key_mask[i]))[0]
    if real.size == 0:
      continue
    labels = [tok.decode([int(x)], skip_special=False)
              for x in np.asarray(batch.inputs[i])[real]]
    fig, axes = plt.subplots(n_layers, n_heads, figsize=(2.6 * n_heads, 2.6 * n_layers),
                             squeeze=False)
    for layer in range(n_layers):
      for h in range(n_heads):
        ax = axes[layer][h]
        m = probs[layer][i, h][np.ix_(real, real)]
        ax.imshow(m, vmin=0.0, vmax=1.0, cmap="viridis")
        above = float(np.triu(m, 1).sum(-1).mean())
        ax.set_title(f"L{layer} H{h}  above diag {above:.2f}", fontsize=7)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=90, fontsize=5)
        ax.set_yticks(range(len(labels)))
        ax.set_yticklabels(labels, fontsize=5)
    fig.suptitle(f"attention (rows: queries, cols: keys), causal={state.causal}", fontsize=8)
    fig.tight_layout()
    path = os.path.join(outdir, f"attention_{i}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
  return paths


def pad_right_to_left(batch):
  """A copy of an unpacked, right-padded batch with each row's real tokens moved to
  the end (left padding): inputs, targets, masks and positions roll together, so
  every target keeps its input. Packed rows (several segments) are left as they are."""
  km = np.asarray(batch.key_mask, bool)
  seg = np.asarray(batch.segment_ids)
  n = km.sum(axis=1)
  t = km.shape[1]
  prefix = (km == (np.arange(t)[None, :] < n[:, None])).all(axis=1)
  single = (np.where(km, seg, 0).max(axis=1) <= 1)
  shift = np.where(prefix & single, t - n, 0)

  def roll(x):
    x = np.asarray(x)
    return np.stack([np.roll(row, s, axis=0) for row, s in zip(x, shift)])
  return batch.replace(**{f: roll(getattr(batch, f)) for f in
                          ("inputs", "targets", "key_mask", "loss_mask", "positions",
                           "segment_ids")})


def audit_batches(config, data) -> list:
  """The first eval.audit_batches batches of the train and val eval sets, as the data
  gives them and with their padding moved to the other side."""
  nb = int(config.eval.audit_batches)
  sets = data.eval_sets()
  batches = [b for name in ("train", "val") for b in sets.get(name, [])[:nb]]
  return batches + [pad_right_to_left(b) for b in batches]


def run_audit(state, config, data, *, outdir: str | None = None) -> dict:
  """All probes and attention checks on real batches; `passed` is False on any leak."""
  tol = float(config.eval.audit_tolerance)
  batches = audit_batches(config, data)
  kw = dict(vocab_size=data.vocab_size, pad_id=data.pad_id)
  path = attention_path(state)
  res = {"causal": bool(state.causal), "tolerance": tol, "num_batches": len(batches),
         "attention": path, "attention_maps_from": "einsum",
         "future_max_logit_change": future_probe(state, batches, **kw),
         "pad_max_logit_change": pad_probe(state, batches, **kw)}
  stats = attention_stats(state, batches)
  res.update(stats)
  res["max_mass_above_diagonal"] = float(np.max(stats["mass_above_diagonal"]))
  res["max_mass_on_pad_keys"] = float(np.max(stats["mass_on_pad_keys"]))
  checks = {"future_probe": res["future_max_logit_change"] <= tol,
            "pad_probe": res["pad_max_logit_change"] <= tol,
            "attention_above_diagonal": res["max_mass_above_diagonal"] <= tol,
            "attention_on_pad_keys": res["max_mass_on_pad_keys"] <= tol}
  res["checks"] = checks
  res["passed"] = all(checks.values())
  if outdir is not None:
    os.makedirs(outdir, exist_ok=True)
    res["heatmaps"] = save_heatmaps(state, batches[0], data.tokenizer, outdir,
                                    int(config.eval.audit_heatmaps))
    wd.atomic_write_json(os.path.join(outdir, "audit.json"), res)
  return res


def format_audit(res: dict) -> str:
  lines = [f"audit (causal={res['causal']}, {res['num_batches']} batches, tolerance "
           f"{res['tolerance']:g}):"]
  if res.get("attention", "einsum") != "einsum":
    lines.append(f"  probes ran model.attention={res['attention']}; it forms no attention "
                 f"probabilities, so the attention maps below come from the einsum path on "
                 f"the same weights")
  names = {"future_probe": ("future-perturbation max |dlogit|", "future_max_logit_change"),
           "pad_probe": ("pad-perturbation max |dlogit|", "pad_max_logit_change"),
           "attention_above_diagonal": ("attention mass above diagonal", "max_mass_above_diagonal"),
           "attention_on_pad_keys": ("attention mass on pad keys", "max_mass_on_pad_keys")}
  for key, ok in res["checks"].items():
    label, field = names[key]
    lines.append(f"  {label:34s} {res[field]:.3e}  {'ok' if ok else 'LEAK'}")
  for name in ("mass_above_diagonal", "mass_on_pad_keys"):
    for layer, row in enumerate(res[name]):
      lines.append(f"  {name} layer {layer}: " + " ".join(f"{x:.3f}" for x in row))
  if res.get("heatmaps"):
    lines.append(f"  heat maps: {', '.join(res['heatmaps'])}")
  lines.append("  PASSED: no leak found" if res["passed"] else "  FAILED: the model leaks")
  return "\n".join(lines)


def audit_workdir(workdir: str, config=None, step=None, which: str = "latest"):
  """Audit a workdir's checkpoint, or a fresh model from `config` if it has none.

  config: for a checkpoint, the data to probe with (e.g. another data.path); by
  default the workdir's own."""
  if ckpt.committed_steps(workdir, wd.WHICH[which]):
    config, data, state, step = wd.restore_state(workdir, which, step, config=config)
    source = f"checkpoint step {step}"
  elif config is not None:
    config_lib.validate(config)
    data = registry.load(config, workdir)
    state = step_lib.create_train_state(config, jax.random.PRNGKey(config.seed),
                                        vocab_size=data.vocab_size,
                                        keys_are_prefix=data.keys_are_prefix)
    source = "fresh (untrained) model from --config"
  else:
    raise FileNotFoundError(f"no checkpoints in {workdir} and no --config given: nothing to "
                            f"audit")
  res = run_audit(state, config, data, outdir=os.path.join(workdir, "audit"))
  res["source"] = source
  return res
