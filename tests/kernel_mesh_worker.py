"""Run by tests/test_kernels.py in a subprocess with 8 fake CPU devices: one packed
train step of each Pallas kernel on a 4 x 2 (data x fsdp) mesh against the
single-device einsum step. Prints one JSON line of measured differences."""
import json
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import tiny_config  # noqa: E402  (sets the shared compilation cache)
from test_kernels import _packed_batches  # noqa: E402

from lmmask import model, parallel  # noqa: E402
from lmmask import step as step_lib  # noqa: E402


def _state(impl):
  config = tiny_config(**{"model.attention": impl, "model.dropout": 0.0, "data.packing": True,
                          "model.max_len": 40, "model.scan_layers": True})
  return step_lib.create_train_state(config, jax.random.PRNGKey(0), vocab_size=40,
                                     keys_are_prefix=False)


def main():
  batch = _packed_batches(1, rows=8)[0]
  ref_state, ref = jax.jit(step_lib.train_step)(_state("einsum"), batch)
  ref_params = jax.device_get(ref_state.params)
  out = {"devices": jax.device_count()}
  mesh = parallel.make_mesh(4, 2)
  for impl in model.KERNELS:
    base = _state(impl)
    step = parallel.jit_train_step(step_lib.train_step, base, mesh)
    with jax.set_mesh(mesh):  # the kernel runs per shard: a shard_map in the step
      jaxpr = str(jax.make_jaxpr(step.jitted)(base, batch))
    new, m = step(parallel.shard_state(base, mesh), parallel.put_batch(batch, mesh, 8))
    params = jax.device_get(new.params)
    out[impl] = {
        "shard_maps": jaxpr.count("shard_map["),
        "loss_rel": abs(float(m["loss"]) - float(ref["loss"])) / float(ref["loss"]),
        "tokens": [float(m["num_tokens"]), float(ref["num_tokens"])],
        "grad_norm_rel": abs(float(m["grad_norm"]) - float(ref["grad_norm"])) / float(ref["grad_norm"]),
        "params_max_diff": max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
                               zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)))}
  print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
  main()
