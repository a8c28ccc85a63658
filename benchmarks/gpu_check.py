"""The GPU-only checks and the GPU speed table, as one JSON object (run by gpu.sh).

  python benchmarks/gpu_check.py                 # on a GPU machine (gpu.sh sets it up)
  python benchmarks/gpu_check.py dry_run=1       # anywhere: tiny shapes on CPU, xla for cudnn

Parts (each in its own try: a failing part is reported, the others still run, and
the JSON is printed in every case):
  cudnn_vs_einsum  cudnn attention logits == the einsum reference, padded and packed
                   (packed rows reach the kernel as a segment mask; a path that
                   dropped it would differ here by O(1))
  bf16             bfloat16 compute keeps a float32 loss, close to the float32 model's
  speed            tokens/s and MFU of gpt100m and smollm135m (bf16, cudnn attention) in
                   lmmask, next to PyTorch (SDPA flash attention + torch.compile) on the
                   same GPU, same shapes, full rows
A part is skipped (and says so) when the time budget (budget_s) would be exceeded.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import throughput  # noqa: E402

from lmmask import step as step_lib  # noqa: E402
from lmmask.batching import batch_from_ids  # noqa: E402

# Dense bf16 peak FLOP/s per device kind (vendor datasheets), for MFU; the matmul
# peak measured in the same run is reported next to it.
PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12}
TINY = dict(vocab=512, d_model=64, n_layers=2, n_heads=4, d_ff=128, seq=64, batch=4,
            min_len=16, max_len=64, dtype="float32", attention="xla")


def _full_rows(spec, n=3, seed=0):
  """Rows with no padding (every token real), for the speed table on both sides."""
  rng = np.random.default_rng(seed)
  return [batch_from_ids(rng.integers(1, spec["vocab"], (spec["batch"], spec["seq"] + 1)),
                         pad_id=0) for _ in range(n)]


def _logits(spec, batch, attention, dtype, packing):
  config = throughput.lm_config(spec, attention=attention, dtype=dtype, packing=packing)
  state = step_lib.create_train_state(config, jax.random.PRNGKey(0), vocab_size=spec["vocab"],
                                      keys_are_prefix=not packing)  # right-padded rows
  return np.asarray(jax.jit(step_lib.forward)(state, state.params, batch), np.float32)


def check_attention(dry):
  spec = dict(TINY) if dry else dict(TINY, d_model=128, n_heads=4, seq=256, batch=4,
                                     min_len=32, max_len=256, dtype="bfloat16")
  fused = "xla" if dry else "cudnn"
  out = {"fused": fused}
  for packing, batches in ((False, throughput.padded_batches(spec, 1)),
                           (True, throughput.packed_batches(spec, 1))):
    b = batches[0]
    ref = _logits(spec, b, "einsum", spec["dtype"], packing)
    got = _logits(spec, b, fused, spec["dtype"], packing)
    real = np.asarray(b.loss_mask) > 0
    diff = float(np.abs(got - ref)[real].max())
    tol = 2e-2 if spec["dtype"] == "bfloat16" else 1e-4
    out["packed" if packing else "padded"] = {"max_abs_diff": diff, "tol": tol,
                                              "ok": diff <= tol}
  out["ok"] = out["padded"]["ok"] and out["packed"]["ok"]
  return out


def check_bf16(dry):
  spec = dict(TINY, attention="xla" if dry else "cudnn")
  b = throughput.padded_batches(spec, 1)[0]
  losses = {}
  for dtype in ("float32", "bfloat16"):
    config = throughput.lm_config(spec, dtype=dtype)
    state = step_lib.create_train_state(config, jax.random.PRNGKey(0), vocab_size=spec["vocab"],
                                        keys_are_prefix=True)  # right-padded rows
    _, m = jax.jit(step_lib.train_step)(state, b)
    losses[dtype] = (float(m["loss"]), str(m["loss"].dtype))
  rel = abs(losses["bfloat16"][0] - losses["float32"][0]) / losses["float32"][0]
  return {"loss_f32": losses["float32"][0], "loss_bf16": losses["bfloat16"][0],
          "loss_dtype_bf16_run": losses["bfloat16"][1], "rel_diff": rel,
          "ok": losses["bfloat16"][1] == "float32" and rel < 2e-2}


def speed(name, spec, steps, dry):
  if dry:
    spec = dict(TINY, **{k: spec[k] for k in throughput.ARCH_KEYS if k in spec})
    spec["n_kv_heads"] = min(spec.get("n_kv_heads", 0), 2)  # a divisor of TINY's 4 heads
  batches = _full_rows(spec)
  runner = throughput.JaxRunner(spec, batches)
  kind = jax.devices()[0].device_kind
  peak = next((v for k, v in PEAKS.items() if k in kind), None)
  measured = throughput.matmul_peak(jnp.dtype(runner.config.model.dtype))
  times = runner.measure(steps)
  row = throughput.report(name, spec, runner, times, steps, False, peak or measured)
  row["mfu_vs"] = "datasheet" if peak else "measured matmul peak"
  row["matmul_peak_flops_per_s"] = measured
  try:
    import torch_gpu
    t = torch_gpu.measure(spec, batches, steps, device="cpu" if dry else "cuda",
                          compile=not dry)
    t["mfu"] = row["model_flops_per_step"] / (t["step_ms"] / 1e3) / (peak or measured)
    row["torch"] = t
    row["jax_over_torch"] = row["all_tokens_per_s"] / t["tokens_per_s"]
  except Exception as e:  # noqa: BLE001 - the JAX numbers stand without the reference
    row["torch"] = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
  return row


def main(argv=None):
  o = throughput.parse_kv(sys.argv[1:] if argv is None else argv,
                          dict(dry_run=False, steps=10, budget_s=270.0))
  dry = o["dry_run"]
  t0 = time.perf_counter()
  out = {"dry_run": dry, "parts": {}}

  def part(name, fn, need_s):
    left = o["budget_s"] - (time.perf_counter() - t0)
    if left < need_s:
      out["parts"][name] = {"ok": False, "skipped": f"{left:.0f} s left, needs ~{need_s} s"}
      return
    t = time.perf_counter()
    try:
      res = fn()
    except Exception as e:  # noqa: BLE001 - reported, the other parts still run
      res = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:500]}",
             "trace": traceback.format_exc()[-1500:]}
    res["seconds"] = time.perf_counter() - t
    out["parts"][name] = res
    print(json.dumps({name: res}, default=str), file=sys.stderr, flush=True)

  try:
    out["backend"] = jax.default_backend()
    out["device"] = jax.devices()[0].device_kind
    out["jax"] = jax.__version__
    if not dry and jax.default_backend() != "gpu":
      out["error"] = f"no GPU: JAX's backend is {jax.default_backend()} (dry_run=1 on CPU)"
  except Exception as e:  # noqa: BLE001
    out["error"] = f"jax did not start: {type(e).__name__}: {e}"
  if "error" not in out:
    part("cudnn_vs_einsum", lambda: check_attention(dry), 20)
    part("bf16", lambda: check_bf16(dry), 15)
    for name in ("gpt100m", "smollm135m"):
      part(f"speed_{name}", lambda n=name: speed(n, throughput.CONFIGS[n], o["steps"], dry), 60)
  out["seconds"] = time.perf_counter() - t0
  out["ok"] = "error" not in out and all(p.get("ok", True) for p in out["parts"].values())
  print(json.dumps(out, default=str), flush=True)


if __name__ == "__main__":
  main()
