"""Training throughput of lmmask's jitted train_step; prints one JSON object per config.

  python benchmarks/throughput.py                     # default and small, padded
  python benchmarks/throughput.py configs=default packing=1
  python benchmarks/throughput.py configs=gpt100m     # a GPU: bf16, cuDNN attention
  python benchmarks/throughput.py tiny                # smoke run: the tiny config, 2 steps

Reported: real (non-pad) input tokens/s, all tokens/s, median step ms, compile s,
model FLOPs per step (6 N per token + attention, over all positions computed),
achieved FLOP/s, and MFU = achieved / a matmul peak measured in the same run
(a large jitted matmul in the compute dtype), plus XLA's own FLOP count.
Data: documents with lengths uniform in [min_len, max_len] tokens, random ids,
right-padded to seq + 1 (or, with --packing, packed into the same rows).
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lmmask import config as config_lib
from lmmask import parallel  # noqa: E402
from lmmask import step as step_lib  # noqa: E402
from lmmask.batching import batch_from_ids, pad_sequences  # noqa: E402
from lmmask.data import packing  # noqa: E402
from lmmask.model import count_params  # noqa: E402

# name -> model / data sizes. "default" is the reference point of the measured tables.
CONFIGS = {
    # Seconds on a CPU: for the smoke test of every script (`tiny`), never for numbers.
    "tiny": dict(vocab=64, d_model=32, n_layers=1, n_heads=2, d_ff=64, seq=16, batch=4,
                 min_len=4, max_len=16, dtype="float32", attention="einsum"),
    "default": dict(vocab=256, d_model=128, n_layers=4, n_heads=4, d_ff=512, seq=128, batch=32,
                    min_len=32, max_len=128, dtype="float32", attention="einsum"),
    "small": dict(vocab=256, d_model=64, n_layers=2, n_heads=4, d_ff=256, seq=64, batch=16,
                  min_len=16, max_len=64, dtype="float32", attention="einsum"),
    # ~100M parameters (85M in blocks, 13M embeddings + head) for an accelerator.
    "gpt100m": dict(vocab=8192, d_model=768, n_layers=12, n_heads=12, d_ff=3072, seq=1024,
                    batch=16, min_len=256, max_len=1024, dtype="bfloat16", attention="cudnn"),
    # SmolLM2-135M's shape (HuggingFaceTB/SmolLM2-135M config.json): GQA 9/3 heads, RoPE,
    # RMSNorm, SwiGLU, tied embeddings, 49152-token vocabulary.
    "smollm135m": dict(vocab=49152, d_model=576, n_layers=30, n_heads=9, d_ff=1536, seq=2048,
                       batch=8, min_len=512, max_len=2048, dtype="bfloat16", attention="cudnn",
                       n_kv_heads=3, pos_encoding="rope", norm="rmsnorm", mlp="swiglu",
                       tie_embeddings=True),
}
ARCH_KEYS = ("n_kv_heads", "pos_encoding", "norm", "mlp", "tie_embeddings")  # optional spec keys


def lm_config(spec: dict, *, gelu_approximate=False, remat=False, scan_layers=False,
              attention=None, dtype=None, grad_accum_steps=1, packing=False):
  """An lmmask experiment config (configs/verbs.py) resized to `spec`."""
  c = config_lib.load_file(os.path.join(os.path.dirname(HERE), "configs", "verbs.py"))
  m = c.model
  m.vocab_size, m.d_model, m.n_layers = spec["vocab"], spec["d_model"], spec["n_layers"]
  m.n_heads, m.d_ff, m.max_len = spec["n_heads"], spec["d_ff"], spec["seq"]
  m.dropout = 0.0
  m.dtype = dtype or spec["dtype"]
  m.attention = attention or spec["attention"]
  m.gelu_approximate, m.remat, m.scan_layers = gelu_approximate, remat, scan_layers
  for key in ARCH_KEYS:
    if key in spec:
      m[key] = spec[key]
  c.data.length = spec["seq"] + 1
  c.data.batch_size = spec["batch"]
  c.optim.grad_accum_steps = grad_accum_steps
  c.data.packing = packing  # packed rows need the segment mask (no key-length shortcut)
  return c


def set_cpu_devices(n: int, batch: int | None = None):
  """Split the host into n XLA:CPU devices (jax_num_cpu_devices); JaxRunner then splits the
  batch over them (data parallel, same maths). XLA:CPU runs most fused elementwise kernels
  on one thread, so on a multi-core CPU n > 1 is how one step uses the other cores.
  n=0 (the default, as lmmask's mesh.cpu_devices): every core when `batch` divides over
  them, else 1. Must run before JAX first touches a device."""
  if n == 0:
    cores = len(os.sched_getaffinity(0))
    n = cores if batch is None or batch % cores == 0 else 1
  if n != 1:
    jax.config.update("jax_num_cpu_devices", n)


def documents(spec: dict, n: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  lens = rng.integers(spec["min_len"], spec["max_len"] + 1, size=n)
  return [rng.integers(1, spec["vocab"], size=int(k)).tolist() for k in lens]


def padded_batches(spec: dict, n_batches: int = 4, seed: int = 0):
  """Right-padded batches; the same documents feed the PyTorch reference."""
  docs = documents(spec, n_batches * spec["batch"] * 3, seed)  # the packed runs' stream
  out = []
  for i in range(n_batches):
    chunk = docs[i * spec["batch"]:(i + 1) * spec["batch"]]
    out.append(batch_from_ids(pad_sequences(chunk, pad_id=0, length=spec["seq"] + 1), pad_id=0))
  return out


def packed_batches(spec: dict, n_batches: int = 4, seed: int = 0):
  """The same document stream packed (first fit, longest first) into batch rows."""
  docs = documents(spec, n_batches * spec["batch"] * 3, seed)
  out, at = [], 0
  for _ in range(n_batches):
    take = docs[at:at + 2 * spec["batch"]]
    b, dropped = packing.pack_batch(take, length=spec["seq"] + 1, pad_id=0, rows=spec["batch"])
    # documents that did not fit go back to the stream (none is lost)
    at += len(take) - len(dropped)
    out.append(b)
  return out


def model_flops_per_step(spec: dict, n_params_nonembed: int) -> float:
  """Training FLOPs over all B x T positions: 6 N per token + attention scores/values."""
  t, b, d, layers = spec["seq"], spec["batch"], spec["d_model"], spec["n_layers"]
  dense = 6 * n_params_nonembed * b * t
  attention = 6 * 2 * layers * b * t * t * d  # QK^T and PV, forward 2x, backward 4x
  return float(dense + attention)


def matmul_peak(dtype, n=None, reps=10) -> float:
  """FLOP/s of a large square matmul in `dtype` on the default device (the MFU peak)."""
  n = n or (8192 if jax.default_backend() == "gpu" else 1024)
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    f(a, a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best


class JaxRunner:
  """Compiled lmmask train_step plus its batches; `measure(steps)` -> seconds/step list."""

  def __init__(self, spec, batches, compiler_options=None, **cfg_kw):
    self.spec, self.batches = spec, [jax.device_put(b) for b in batches]
    config = lm_config(spec, **cfg_kw)
    self.state = step_lib.create_train_state(config, jax.random.PRNGKey(0),
                                          vocab_size=spec["vocab"],
                                          # right-padded rows, one per document unless packed
                                          keys_are_prefix=not config.data.packing)
    self.config = config
    self.mesh = None
    if jax.device_count() > 1:  # e.g. cpu_devices=2: the batch split over the devices
      self.mesh = parallel.mesh_from_config(config)
      parallel.check_batch_size(spec["batch"], self.mesh)
      self.state = parallel.shard_state(self.state, self.mesh)
      self.batches = [jax.device_put(b, parallel.batch_sharding(self.mesh)) for b in batches]
    model = self.state.model()
    self.n_params = count_params(model)
    pos = getattr(model, "pos_embed", None)  # rope models have no position table
    self.n_embed = model.embed.embedding[...].size + (pos.embedding[...].size if pos else 0)
    t = time.perf_counter()
    if self.mesh is None:
      jitted = jax.jit(step_lib.train_step, donate_argnums=0)
    else:
      jitted = parallel.jit_train_step(step_lib.train_step, self.state, self.mesh)
    lowered = jitted.lower(self.state, self.batches[0])
    compiled = lowered.compile(compiler_options or None)  # XLA debug options, e.g. onednn
    self.compile_s = time.perf_counter() - t
    self.step = compiled
    try:
      ca = compiled.cost_analysis()
      ca = ca[0] if isinstance(ca, (list, tuple)) else ca
      self.xla_flops = float(ca.get("flops", float("nan")))
    except Exception:  # noqa: BLE001  (cost analysis is best effort)
      self.xla_flops = float("nan")
    self.state, m = self.step(self.state, self.batches[0])  # warm-up
    jax.block_until_ready(m)
    self.real = [float(np.asarray(b.key_mask).sum()) for b in batches]

  def measure(self, steps: int):
    times = []
    for i in range(steps):
      b = self.batches[i % len(self.batches)]
      t = time.perf_counter()
      self.state, m = self.step(self.state, b)
      jax.block_until_ready(m["loss"])
      times.append(time.perf_counter() - t)
    return times

  def real_tokens(self, steps: int) -> float:
    return sum(self.real[i % len(self.real)] for i in range(steps))


def report(name, spec, runner, times, steps, packing, peak):
  step_s = statistics.median(times)
  total = sum(times)
  all_tok = spec["batch"] * spec["seq"]
  flops = model_flops_per_step(spec, runner.n_params - runner.n_embed)
  return {
      "config": name, "packing": packing, "backend": jax.default_backend(),
      "device": jax.devices()[0].device_kind, "n_devices": jax.device_count(), "dtype": runner.config.model.dtype,
      "attention": runner.config.model.attention,
      "gelu_approximate": runner.config.model.gelu_approximate,
      "params": runner.n_params, "batch": spec["batch"], "seq": spec["seq"],
      "real_tokens_per_s": runner.real_tokens(steps) / total,
      "all_tokens_per_s": all_tok * steps / total,
      "real_fraction": runner.real_tokens(steps) / (all_tok * steps),
      "step_ms": 1e3 * step_s, "compile_s": runner.compile_s,
      "model_flops_per_step": flops, "achieved_flops_per_s": flops / step_s,
      "xla_flops_per_step": runner.xla_flops, "matmul_peak_flops_per_s": peak,
      "mfu": flops / step_s / peak,
  }


# What the single word `tiny` stands for (one device: the smoke path compiles least).
TINY_ARGS = ("configs=tiny", "steps=2", "rounds=1", "cpu_devices=1")


def parse_kv(argv, defaults: dict) -> dict:
  """key=value words (no flags: launch.py alone defines flags) -> typed options.

  The single word `tiny` stands for the tiny config and the fewest steps (TINY_ARGS
  that `defaults` knows), the smoke test's run of the whole script path.
  """
  out = dict(defaults)
  if list(argv) == ["tiny"]:
    argv = [a for a in TINY_ARGS if a.partition("=")[0] in defaults]
  for item in argv:
    key, sep, value = item.partition("=")
    if not sep or key not in defaults:
      raise ValueError(f"expected key=value with key in {sorted(defaults)}, got {item!r}")
    d = defaults[key]
    out[key] = (value.lower() in ("1", "true", "yes")) if isinstance(d, bool) else \
        type(d)(value) if d is not None else value
  return out


OPTIONS = dict(configs="default,small", steps=10, packing=False, gelu_approximate=False,
               attention=None, dtype=None, remat=False, scan_layers=False,
               cpu_devices=0)  # >1: data parallel over that many XLA:CPU devices; 0 = auto


def main(argv=None):
  o = parse_kv(sys.argv[1:] if argv is None else argv, OPTIONS)
  set_cpu_devices(o["cpu_devices"], min(CONFIGS[n]["batch"] for n in o["configs"].split(",")))
  for name in o["configs"].split(","):
    spec = CONFIGS[name]
    batches = packed_batches(spec) if o["packing"] else padded_batches(spec)
    runner = JaxRunner(spec, batches, packing=o["packing"], gelu_approximate=o["gelu_approximate"],
                       attention=o["attention"], dtype=o["dtype"], remat=o["remat"],
                       scan_layers=o["scan_layers"])
    peak = matmul_peak(jnp.dtype(runner.config.model.dtype), n=256 if name == "tiny" else None)
    times = runner.measure(o["steps"])
    print(json.dumps(report(name, spec, runner, times, o["steps"], o["packing"], peak)),
          flush=True)


if __name__ == "__main__":
  main()
