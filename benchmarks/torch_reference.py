"""The same decoder in PyTorch eager, for a fair speed reference (needs the `bench` extra).

  pip install -e ".[bench]"
  python benchmarks/torch_reference.py configs=default
  python benchmarks/torch_reference.py tiny       # smoke run: tiny config, 2 steps

Standard torch blocks only (nn.Embedding, nn.LayerNorm, nn.Linear, exact nn.GELU,
F.scaled_dot_product_attention with a boolean mask, F.cross_entropy, AdamW with
the same betas/eps/decay mask, clip_grad_norm_). It loads lmmask's initial weights
and checks that its logits match lmmask's on the benchmark batch (printed as
logits_max_abs_diff), so both sides run the same model on the same data with the
same number of threads, measured the same way (median step, real tokens/s).
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import numpy as np  # noqa: E402

try:
  import torch
  import torch.nn.functional as F
  from torch import nn
except ImportError as e:  # pragma: no cover
  raise SystemExit(f"PyTorch is an optional extra: pip install -e '.[bench]' ({e})")

import throughput  # noqa: E402

from lmmask import step as step_lib  # noqa: E402


class Block(nn.Module):

  def __init__(self, d, h, ff, eps, approximate):
    super().__init__()
    self.h = h
    self.ln1 = nn.LayerNorm(d, eps=eps)
    self.qkv = nn.Linear(d, 3 * d)
    self.out = nn.Linear(d, d)
    self.ln2 = nn.LayerNorm(d, eps=eps)
    self.fc1 = nn.Linear(d, ff)
    self.fc2 = nn.Linear(ff, d)
    self.gelu = nn.GELU(approximate="tanh" if approximate else "none")

  def forward(self, x, mask):
    b, t, d = x.shape
    q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
    q, k, v = (a.view(b, t, self.h, d // self.h).transpose(1, 2) for a in (q, k, v))
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    x = x + self.out(a.transpose(1, 2).reshape(b, t, d))
    return x + self.fc2(self.gelu(self.fc1(self.ln2(x))))


class TorchDecoder(nn.Module):

  def __init__(self, spec, approximate=False, eps=1e-6):
    super().__init__()
    d = spec["d_model"]
    self.embed = nn.Embedding(spec["vocab"], d)
    self.pos_embed = nn.Embedding(spec["seq"], d)
    self.blocks = nn.ModuleList([Block(d, spec["n_heads"], spec["d_ff"], eps, approximate)
                                 for _ in range(spec["n_layers"])])
    self.ln_f = nn.LayerNorm(d, eps=eps)
    self.head = nn.Linear(d, spec["vocab"])

  def forward(self, inputs, positions, key_mask):
    t = inputs.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    mask = key_mask[:, None, None, :] & causal  # True = may attend (right padding: no empty row)
    x = self.embed(inputs) + self.pos_embed(positions)
    for blk in self.blocks:
      x = blk(x, mask)
    return self.head(self.ln_f(x))

  def load_lmmask(self, params):
    """Copy an lmmask nnx.State of parameters (flax kernels are (in, out))."""
    p = params.to_pure_dict() if hasattr(params, "to_pure_dict") else params
    t = lambda a: torch.from_numpy(np.array(a, dtype=np.float32))  # noqa: E731
    with torch.no_grad():
      self.embed.weight.copy_(t(p["embed"]["embedding"]))
      self.pos_embed.weight.copy_(t(p["pos_embed"]["embedding"])[:self.pos_embed.num_embeddings])
      def lin(mod, d):
        mod.weight.copy_(t(d["kernel"]).T)
        mod.bias.copy_(t(d["bias"]))
      def ln(mod, d):
        mod.weight.copy_(t(d["scale"]))
        mod.bias.copy_(t(d["bias"]))
      for i, blk in enumerate(self.blocks):
        q = p["blocks"][i]
        ln(blk.ln1, q["ln1"]), ln(blk.ln2, q["ln2"])
        lin(blk.qkv, q["attn"]["qkv"]), lin(blk.out, q["attn"]["out"])
        lin(blk.fc1, q["fc1"]), lin(blk.fc2, q["fc2"])
      ln(self.ln_f, p["ln_f"])
      lin(self.head, p["head"])


def torch_batch(b):
  return {"inputs": torch.from_numpy(np.asarray(b.inputs, np.int64)),
          "positions": torch.from_numpy(np.asarray(b.positions, np.int64)),
          "key_mask": torch.from_numpy(np.asarray(b.key_mask, bool)),
          "targets": torch.from_numpy(np.where(np.asarray(b.loss_mask) > 0,
                                               np.asarray(b.targets), -100).astype(np.int64))}


class TorchRunner:
  """AdamW train step of TorchDecoder on lmmask's batches and initial weights."""

  def __init__(self, spec, batches, *, gelu_approximate=False, threads=None, optim=None):
    import jax
    torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
    torch.manual_seed(0)
    config = throughput.lm_config(spec, gelu_approximate=gelu_approximate, dtype="float32",
                                  attention="einsum")
    state = step_lib.create_train_state(config, jax.random.PRNGKey(0), vocab_size=spec["vocab"],
                                        keys_are_prefix=True)  # right-padded rows
    self.model = TorchDecoder(spec, approximate=gelu_approximate)
    self.model.load_lmmask(state.params)
    o = config.optim
    decay = [p for n, p in self.model.named_parameters()
             if n.endswith("weight") and p.ndim == 2]          # kernels and embeddings
    no_decay = [p for n, p in self.model.named_parameters()
                if not (n.endswith("weight") and p.ndim == 2)]
    self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}],
                                 lr=o.lr, betas=(o.b1, o.b2), eps=o.eps)
    self.clip = o.clip_norm
    self.batches = [torch_batch(b) for b in batches]
    self.real = [float(np.asarray(b.key_mask).sum()) for b in batches]
    # Same initial function: compare logits with lmmask's on the first batch.
    b0 = batches[0]
    want = np.asarray(state.model()(b0.inputs, key_mask=b0.key_mask, positions=b0.positions))
    with torch.no_grad():
      tb = self.batches[0]
      got = self.model(tb["inputs"], tb["positions"], tb["key_mask"]).numpy()
    real = np.asarray(b0.key_mask)
    self.logits_max_abs_diff = float(np.abs(got - want)[real].max())
    t = time.perf_counter()
    self.measure(1)  # warm-up
    self.warmup_s = time.perf_counter() - t

  def step(self, b):
    self.opt.zero_grad(set_to_none=True)
    logits = self.model(b["inputs"], b["positions"], b["key_mask"])
    loss = F.cross_entropy(logits.flatten(0, 1), b["targets"].flatten(), ignore_index=-100)
    loss.backward()
    if self.clip > 0:
      torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
    self.opt.step()
    return float(loss.detach())  # syncs, like block_until_ready on the JAX side

  def measure(self, steps: int):
    times = []
    for i in range(steps):
      b = self.batches[i % len(self.batches)]
      t = time.perf_counter()
      self.step(b)
      times.append(time.perf_counter() - t)
    return times

  def real_tokens(self, steps: int) -> float:
    return sum(self.real[i % len(self.real)] for i in range(steps))


def main(argv=None):
  o = throughput.parse_kv(sys.argv[1:] if argv is None else argv,
                          dict(configs="default", steps=10, gelu_approximate=False))
  for name in o["configs"].split(","):
    spec = throughput.CONFIGS[name]
    r = TorchRunner(spec, throughput.padded_batches(spec), gelu_approximate=o["gelu_approximate"])
    times = r.measure(o["steps"])
    print(json.dumps({
        "config": name, "impl": "torch-eager", "torch": torch.__version__,
        "threads": torch.get_num_threads(), "gelu_approximate": o["gelu_approximate"],
        "logits_max_abs_diff": r.logits_max_abs_diff,
        "real_tokens_per_s": r.real_tokens(o["steps"]) / sum(times),
        "all_tokens_per_s": spec["batch"] * spec["seq"] * o["steps"] / sum(times),
        "step_ms": 1e3 * statistics.median(times)}), flush=True)


if __name__ == "__main__":
  main()
