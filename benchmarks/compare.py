"""lmmask (JAX) vs PyTorch eager, measured side by side in one process.

  python benchmarks/compare.py                          # default config, 3 rounds
  python benchmarks/compare.py configs=small rounds=3 steps=8 gelu_approximate=1
  python benchmarks/compare.py cpu_devices=1   # lmmask on one XLA:CPU device (default 0:
                                               # every core, as lmmask's mesh.cpu_devices)
  python benchmarks/compare.py tiny            # smoke run: tiny config, 1 round of 2 steps

Each round runs, one after another on the same cores: lmmask on padded batches,
PyTorch eager on the same padded batches, lmmask on the same documents packed
(PyTorch pads). Prints JSON per round and a summary with the median over rounds of
the ratio of real (non-pad) tokens/s, lmmask / PyTorch.
"""
from __future__ import annotations

import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import throughput  # noqa: E402
import torch_reference  # noqa: E402


def main(argv=None):
  o = throughput.parse_kv(sys.argv[1:] if argv is None else argv,
                          dict(configs="default", rounds=3, steps=8, gelu_approximate=False,
                               cpu_devices=0))  # see throughput.set_cpu_devices
  throughput.set_cpu_devices(o["cpu_devices"],
                             min(throughput.CONFIGS[n]["batch"] for n in o["configs"].split(",")))
  for name in o["configs"].split(","):
    spec = throughput.CONFIGS[name]
    padded = throughput.padded_batches(spec)
    packed = throughput.packed_batches(spec)
    kw = dict(gelu_approximate=o["gelu_approximate"], dtype="float32", attention="einsum")
    runners = {"jax_padded": throughput.JaxRunner(spec, padded, **kw),
               "torch_padded": torch_reference.TorchRunner(
                   spec, padded, gelu_approximate=o["gelu_approximate"]),
               "jax_packed": throughput.JaxRunner(spec, packed, packing=True, **kw)}
    ratios = {"padded": [], "packed": []}
    rounds = []
    for r in range(o["rounds"]):
      tps = {}
      for key, runner in runners.items():  # alternate: jax, torch, jax packed, jax, ...
        times = runner.measure(o["steps"])
        tps[key] = runner.real_tokens(o["steps"]) / sum(times)
      ratios["padded"].append(tps["jax_padded"] / tps["torch_padded"])
      ratios["packed"].append(tps["jax_packed"] / tps["torch_padded"])
      rounds.append(tps)
      print(json.dumps({"config": name, "round": r, "real_tokens_per_s": tps}), flush=True)
    print(json.dumps({
        "config": name, "rounds": o["rounds"], "steps_per_round": o["steps"],
        "gelu_approximate": o["gelu_approximate"],
        "threads": torch_reference.torch.get_num_threads(),
        "jax_devices": throughput.jax.device_count(),
        "logits_max_abs_diff": runners["torch_padded"].logits_max_abs_diff,
        "real_fraction_padded": sum(runners["jax_padded"].real) / (
            len(padded) * spec["batch"] * spec["seq"]),
        "real_fraction_packed": sum(runners["jax_packed"].real) / (
            len(packed) * spec["batch"] * spec["seq"]),
        "median_ratio_padded": statistics.median(ratios["padded"]),
        "median_ratio_packed": statistics.median(ratios["packed"]),
        "ratios_padded": ratios["padded"], "ratios_packed": ratios["packed"],
        "median_real_tokens_per_s": {k: statistics.median(r[k] for r in rounds)
                                     for k in runners}}), flush=True)


if __name__ == "__main__":
  main()
