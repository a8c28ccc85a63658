"""Two decoders in one process, alternating: this checkout's `decode.generate` against
the `lmmask/decode.py` of another checkout (e.g. the Python-loop decoder before the
compiled loop), on the same model and prompts, so both see the same machine load.

  python benchmarks/decode_ab.py baseline=DIR model=HF_DIR [new_tokens=32] [rounds=3]

HF_DIR: a Hugging Face directory (hf_compare.py leaves SmolLM2's float32 export in
/tmp/lmmask_hf_compare_smol/hf). The baseline's decode.py is loaded under another
module name and uses this checkout's model and masks. Prints one JSON line per
run and, per batch size, the medians and whether both produced the same tokens.
"""
from __future__ import annotations

import importlib.util
import json
import os
import statistics
import sys
import time

import numpy as np

from lmmask import decode
from lmmask.interop import hf


def main(argv):
  opts = dict(a.split("=", 1) for a in argv if "=" in a)
  if {"baseline", "model"} - set(opts) or set(opts) - {"baseline", "model", "new_tokens",
                                                      "rounds"}:
    sys.exit(f"usage: python benchmarks/decode_ab.py baseline=DIR model=HF_DIR "
             f"[new_tokens=32] [rounds=3]; got {argv}")
  spec = importlib.util.spec_from_file_location(
      "baseline_decode", os.path.join(opts["baseline"], "lmmask", "decode.py"))
  old = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(old)
  model, _ = hf.load(opts["model"])
  n, rounds = int(opts.get("new_tokens", 32)), int(opts.get("rounds", 3))
  rng = np.random.default_rng(0)
  prompts = [rng.integers(3, model.cfg.vocab_size, int(k)).tolist()
             for k in rng.integers(16, 33, 8)]
  impls = (("baseline", old), ("current", decode))
  for b in (1, 8):
    tokens = {name: mod.generate(model, prompts[:b], max_new_tokens=n, eos_id=None,
                                 pad_id=0).tokens for name, mod in impls}  # warm-up
    speed = {name: [] for name, _ in impls}
    for r in range(rounds):
      for name, mod in impls:
        t = time.perf_counter()
        mod.generate(model, prompts[:b], max_new_tokens=n, eos_id=None, pad_id=0)
        speed[name].append(b * n / (time.perf_counter() - t))
        print(json.dumps({"impl": name, "batch": b, "round": r,
                          "tokens_per_s": round(speed[name][-1], 2), "load": os.getloadavg()}),
              flush=True)
    print(json.dumps({"batch": b, "same_tokens": bool((tokens["baseline"] == tokens["current"]).all()),
                      **{f"{k}_median": statistics.median(v) for k, v in speed.items()},
                      **{k: [round(x, 2) for x in v] for k, v in speed.items()}}), flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
