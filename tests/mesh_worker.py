"""Run by tests/test_mesh.py in a subprocess with 8 fake CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=8). Prints one JSON line of
measured differences; the test decides pass/fail."""
import dataclasses
import json
import os
import sys
import tempfile

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import tiny_config  # noqa: E402  (sets the shared compilation cache)

from lmmask import checkpoint as ckpt  # noqa: E402
from lmmask import (  # noqa: E402
  losses,  # noqa: E402
  parallel,
  train,
)
from lmmask import step as step_lib
from lmmask.batching import batch_from_ids, pad_sequences  # noqa: E402

V, PAD, B, L = 40, 0, 32, 14


def skewed_batch():
  rng = np.random.default_rng(0)
  seqs = [list(rng.integers(1, V, size=L if r % 4 == 0 else int(rng.integers(2, 4))))
          for r in range(B)]
  return batch_from_ids(pad_sequences(seqs, pad_id=PAD, length=L), pad_id=PAD)


def max_rel(a_tree, b_tree):
  worst = 0.0
  for a, b in zip(jax.tree.leaves(a_tree), jax.tree.leaves(b_tree)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    # per tensor: largest difference relative to the tensor's largest entry
    worst = max(worst, float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12)))
  return worst


def main():
  out = {"devices": jax.device_count()}
  config = tiny_config(**{"model.dropout": 0.0, "optim.name": "sgd", "optim.clip_norm": 0.0,
                          "optim.warmup_steps": 0, "optim.schedule": "constant",
                          "optim.lr": 0.5, "optim.weight_decay": 0.0})
  base = step_lib.create_train_state(config, jax.random.PRNGKey(0), vocab_size=V,
                                     keys_are_prefix=True)
  base_params = jax.device_get(base.params)  # host copy: the sharded step donates its input
  batch = skewed_batch()
  per_micro = [float(batch.loss_mask[i::4].sum()) for i in range(4)]
  out["micro_tokens"] = per_micro

  def grads_fn(steps):
    def f(state, b):
      logits_fn = lambda p, mb, r: step_lib.forward(state, p, mb, deterministic=True)  # noqa
      loss, g, m = losses.loss_and_grads(logits_fn, state.params, b,
                                             reduction=state.options.reduction, steps=steps)
      return loss, g
    return f

  # Reference: one device, one batch.
  ref_loss, ref_g = jax.jit(grads_fn(1))(base, batch)
  ref_state, ref_m = jax.jit(step_lib.train_step)(base, batch)
  out["grads"] = {}
  for (d, f), steps in (((8, 1), 1), ((4, 2), 1), ((4, 2), 4)):
    mesh = parallel.make_mesh(d, f)
    st = parallel.shard_state(base, mesh)
    fn = jax.jit(grads_fn(steps), in_shardings=(parallel.state_shardings(base, mesh),
                                                parallel.batch_sharding(mesh)))
    loss, g = fn(st, jax.device_put(batch, parallel.batch_sharding(mesh)))
    out["grads"][f"{d}x{f}/accum{steps}"] = {
        "loss_rel": abs(float(loss) - float(ref_loss)) / abs(float(ref_loss)),
        "grad_rel": max_rel(g, ref_g)}

  # End to end: train_step on a 4 x 2 mesh with 4 accumulated micro-batches.
  mesh = parallel.make_mesh(4, 2)
  st4 = base.replace(options=dataclasses.replace(base.options, grad_accum_steps=4))
  step = parallel.jit_train_step(step_lib.train_step, st4, mesh)
  new, m = step(parallel.shard_state(st4, mesh), parallel.put_batch(batch, mesh, B))
  out["step"] = {"loss_rel": abs(float(m["loss"]) - float(ref_m["loss"])) / float(ref_m["loss"]),
                 "grad_norm_rel": abs(float(m["grad_norm"]) - float(ref_m["grad_norm"]))
                 / float(ref_m["grad_norm"]),
                 "params_rel": max_rel(new.params, ref_state.params),
                 "update_rel": max_rel(jax.tree.map(lambda a, b: a - b, new.params, base_params),
                                       jax.tree.map(lambda a, b: a - b, ref_state.params,
                                                    base_params))}
  fc1 = new.params["blocks"][0]["fc1"]["kernel"][...]
  out["fc1_spec"] = str(fc1.sharding.spec)
  out["fc1_shard_shape"] = list(fc1.addressable_shards[0].data.shape)

  # Checkpoint saved on 4 x 2, restored on 8 x 1, 2 x 4 and one device.
  with tempfile.TemporaryDirectory() as tmp:
    mngr = ckpt.manager(tmp, "c", 2, barrier_timeout_s=config.distributed.barrier_timeout_s)
    ckpt.save(mngr, 1, new.checkpoint_tree(), {"note": "4x2"})
    ckpt.finish(mngr)
    restored = {}
    for name, target in (("8x1", parallel.shard_state(base, parallel.make_mesh(8, 1))),
                         ("2x4", parallel.shard_state(base, parallel.make_mesh(2, 4))),
                         ("1dev", jax.device_put(base, jax.devices()[0]))):
      _, tree, meta = ckpt.restore(mngr, 1, target.checkpoint_tree())
      same_values = max_rel(tree, new.checkpoint_tree())
      want = jax.tree.map(lambda x: x.sharding, target.checkpoint_tree())
      got = jax.tree.map(lambda x: x.sharding, tree)
      same_sh = all(a.is_equivalent_to(b, np.ndim(x)) for a, b, x in zip(
          jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(tree)))
      restored[name] = {"max_rel": same_values, "shardings_match": bool(same_sh),
                        "meta": meta["note"]}
    mngr.close()
  out["restore"] = restored

  # The whole loop: train on 4 x 2 with accumulation, resume on 8 x 1.
  with tempfile.TemporaryDirectory() as tmp:
    c = tiny_config(**{"mesh.data": 4, "mesh.fsdp": 2, "optim.grad_accum_steps": 2,
                       "train.steps": 3, "train.ckpt_every": 3, "train.eval_every": 3})
    r1 = train.train_and_evaluate(c, tmp)
    c2 = tiny_config(**{"mesh.data": -1, "mesh.fsdp": 1, "optim.grad_accum_steps": 2,
                        "train.steps": 4, "train.ckpt_every": 3, "train.eval_every": 3})
    r2 = train.train_and_evaluate(c2, tmp)
    out["loop"] = {"step1": r1["step"], "step2": r2["step"],
                   "loss1": r1["train_loss"], "loss2": r2["train_loss"]}
  print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
  main()
