"""The GPU-only checks and the GPU speed table, as one JSON object (run by gpu.sh).

  python benchmarks/gpu_check.py                 # on a GPU machine (gpu.sh sets it up)
  python benchmarks/gpu_check.py dry_run=1       # anywhere: tiny shapes on CPU, xla for cudnn

Parts (each in its own try: a failing part is reported, the others still run, and
the JSON is printed in every case):
  cudnn_vs_einsum  cudnn attention logits == the einsum reference, padded and packed
                   (packed rows reach the kernel as a segment mask; a path that
                   dropped it would differ here by O(1))
  bf16             bfloat16 compute keeps a float32 loss, close to the float32 model's
  kernels          per attention path the GPU serves (xla, cudnn, triton; einsum as the
                   reference): bf16 output against einsum in float32, and forward +
                   backward time of one attention layer at T=2048 and 4096, packed and
                   unpacked; skipped (and says why) when jax is below setup.cfg's floor
  speed            tokens/s and MFU of gpt100m (attention=auto: cudnn on full rows) and
                   smollm135m (cudnn) in lmmask, next to PyTorch (SDPA flash attention +
                   torch.compile) on the same GPU, same shapes, full rows
  speed_gpt100m_auto_packed  tokens/s and MFU of gpt100m on packed rows, attention=auto
                   (triton on a GPU)
A part is skipped (and says so) when the time budget (budget_s) would be exceeded.
"""
from __future__ import annotations

import configparser
import json
import os
import re
import statistics
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

from lmmask import masks  # noqa: E402
from lmmask import model as model_lib  # noqa: E402
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


def jax_floor() -> str:
  """The jax floor in setup.cfg's install_requires (the Pallas kernels are experimental
  APIs: below it the kernel table is skipped)."""
  cfg = configparser.ConfigParser()
  cfg.read(os.path.join(os.path.dirname(HERE), "setup.cfg"))
  found = re.search(r"^\s*jax>=([\d.]+)", cfg["options"]["install_requires"], re.M)
  return found.group(1)


def _version(v: str) -> tuple:
  return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def _attention_fn(impl, key_mask, seg):
  """One attention layer on `impl`, masked as the decoder masks it (masks.py decides)."""
  if impl == "einsum":
    allowed = masks.attention_mask(key_mask, segment_ids=seg)
    has = allowed.any(axis=-1, keepdims=True).astype(jnp.float32)
    return lambda q, k, v: model_lib.attend(q, k, v, masks.to_bias(allowed), has)[0]
  if impl in model_lib.KERNELS:
    km = masks.kernel_mask(key_mask, segment_ids=seg, block=model_lib.KERNEL_BLOCK)
    return lambda q, k, v: model_lib.attend_kernel(q, k, v, km, impl)
  st = masks.attention_structure(key_mask, segment_ids=seg, keys_are_prefix=seg is None)
  has = masks.rows_with_key(key_mask, segment_ids=seg)
  return lambda q, k, v: model_lib.attend_fused(q, k, v, st, has, impl)


def _layer_rows(b, t, packed, seed=0):
  """key_mask and segment ids (None unpacked) of b rows: right padding to between t/2 and
  t real tokens, or documents of t/16..t/2 tokens packed, with a pad tail."""
  rng = np.random.default_rng(seed)
  if not packed:
    lengths = rng.integers(t // 2, t + 1, b)
    return jnp.asarray(np.arange(t)[None, :] < lengths[:, None]), None
  seg = np.zeros((b, t), np.int32)
  for r in range(b):
    pos, doc = 0, 1
    while pos < t - t // 16:
      n = int(rng.integers(t // 16, t // 2))
      seg[r, pos:pos + n], pos, doc = doc, pos + n, doc + 1
    seg[r, -int(rng.integers(1, t // 16)):] = 0
  return jnp.asarray(seg > 0), jnp.asarray(seg)


def kernel_table(dry, reps=5):
  """bf16 correctness against einsum in float32 and forward+backward ms per path."""
  floor = jax_floor()
  if _version(jax.__version__) < _version(floor):
    return {"ok": True, "skipped": f"jax {jax.__version__} is below the floor {floor} "
            f"(setup.cfg); the Pallas kernels need it"}
  gpu = jax.default_backend() == "gpu"
  impls = ["einsum", "xla", "triton"] + (["cudnn"] if gpu else [])
  b, h, hkv, d = (2, 2, 1, 16) if dry else (4, 12, 4, 64)
  rows, ok = [], True
  for t in ((128, 256) if dry else (2048, 4096)):
    rng = np.random.default_rng(t)
    q32 = jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32)
    k32 = jnp.asarray(rng.normal(size=(b, t, hkv, d)), jnp.float32)
    v32 = jnp.asarray(rng.normal(size=(b, t, hkv, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(b, t, h * d)), jnp.float32)
    for packed in (False, True):
      key_mask, seg = _layer_rows(b, t, packed)
      real = np.asarray(key_mask)
      ref = np.asarray(jax.jit(_attention_fn("einsum", key_mask, seg))(q32, k32, v32))
      for impl in impls:
        row = {"impl": impl, "T": t, "packed": packed, "dtype": "bfloat16"}
        try:
          f = _attention_fn(impl, key_mask, seg)
          qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q32, k32, v32))
          out = np.asarray(jax.jit(f)(qb, kb, vb), np.float32)
          row["max_abs_diff_vs_einsum_f32"] = float(np.abs(out - ref)[real].max())
          row["ok"] = row["max_abs_diff_vs_einsum_f32"] < 5e-2
          loss = lambda q, k, v: (f(q, k, v).astype(jnp.float32) * w).sum()  # noqa: E731
          step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
          jax.block_until_ready(step(qb, kb, vb))  # compile and warm up
          times = []
          for _ in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(step(qb, kb, vb))
            times.append(time.perf_counter() - t0)
          row["fwd_bwd_ms"] = 1e3 * statistics.median(times)
          row["fwd_bwd_ms_spread"] = [1e3 * min(times), 1e3 * max(times)]
        except Exception as e:  # noqa: BLE001 - e.g. einsum out of memory at 4096
          row.update(ok=impl == "einsum", error=f"{type(e).__name__}: {str(e)[:200]}")
        ok = ok and row["ok"]
        rows.append(row)
        print(json.dumps({"kernels_row": row}), file=sys.stderr, flush=True)
  return {"ok": ok, "jax": jax.__version__, "floor": floor,
          "shape": {"batch": b, "heads": h, "kv_heads": hkv, "head_dim": d}, "rows": rows}


def speed_packed_auto(name, spec, steps, dry):
  """tokens/s and MFU of `spec` on packed rows with attention=auto."""
  if dry:
    spec = dict(TINY, **{k: spec[k] for k in throughput.ARCH_KEYS if k in spec})
  batches = throughput.packed_batches(spec, 3)
  runner = throughput.JaxRunner(spec, batches, attention="auto", packing=True)
  kind = jax.devices()[0].device_kind
  peak = next((v for k, v in PEAKS.items() if k in kind), None)
  measured = throughput.matmul_peak(jnp.dtype(runner.config.model.dtype))
  row = throughput.report(name, spec, runner, runner.measure(steps), steps, True, peak or measured)
  row["attention_resolved"] = runner.state.model().cfg.attention
  row["mfu_vs"] = "datasheet" if peak else "measured matmul peak"
  return row


def speed(name, spec, steps, dry):
  if dry:
    spec = dict(TINY, **{k: spec[k] for k in throughput.ARCH_KEYS if k in spec})
    spec["n_kv_heads"] = min(spec.get("n_kv_heads", 0), 2)  # a divisor of TINY's 4 heads
  batches = _full_rows(spec)
  runner = throughput.JaxRunner(spec, batches, attention="auto" if name == "gpt100m" else None)
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
    part("kernels", lambda: kernel_table(dry), 60)
    gpt = throughput.CONFIGS["gpt100m"]
    part("speed_gpt100m", lambda: speed("gpt100m", gpt, o["steps"], dry), 60)
    part("speed_gpt100m_auto_packed",
         lambda: speed_packed_auto("gpt100m", gpt, o["steps"], dry), 40)
    part("speed_smollm135m",
         lambda: speed("smollm135m", throughput.CONFIGS["smollm135m"], o["steps"], dry), 60)
  out["seconds"] = time.perf_counter() - t0
  out["ok"] = "error" not in out and all(p.get("ok", True) for p in out["parts"].values())
  print(json.dumps(out, default=str), flush=True)


if __name__ == "__main__":
  main()
