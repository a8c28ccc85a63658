"""PyTorch reference for the GPU speed table (benchmarks/gpu_check.py).

The same shapes as lmmask's benchmark configs (learned positions + LayerNorm +
GELU, or RoPE + RMSNorm + SwiGLU + grouped-query attention + tied embeddings),
bf16 autocast, F.scaled_dot_product_attention (flash attention where PyTorch picks
it: causal, no mask, bf16), torch.compile, fused AdamW. Full rows (no padding) on
both sides, so tokens/s compare directly.
"""
from __future__ import annotations

import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):

  def __init__(self, d, eps=1e-6):
    super().__init__()
    self.eps = eps
    self.weight = nn.Parameter(torch.ones(d))

  def forward(self, x):
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps).to(x.dtype) * \
        self.weight


def rope(x, base=10000.0):
  """Rotary embedding of (B, H, T, D), half-split layout."""
  t, d = x.shape[-2], x.shape[-1]
  inv = 1.0 / base ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
  ang = torch.arange(t, device=x.device, dtype=torch.float32)[:, None] * inv[None]
  cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
  x1, x2 = x[..., :d // 2], x[..., d // 2:]
  return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Block(nn.Module):

  def __init__(self, spec):
    super().__init__()
    d, self.h = spec["d_model"], spec["n_heads"]
    self.kv = spec.get("n_kv_heads") or self.h
    self.hd = d // self.h
    self.rope = spec.get("pos_encoding") == "rope"
    norm = RMSNorm if spec.get("norm") == "rmsnorm" else nn.LayerNorm
    self.ln1, self.ln2 = norm(d), norm(d)
    self.qkv = nn.Linear(d, (self.h + 2 * self.kv) * self.hd)
    self.out = nn.Linear(d, d)
    self.swiglu = spec.get("mlp") == "swiglu"
    self.fc1 = nn.Linear(d, spec["d_ff"] * (2 if self.swiglu else 1))
    self.fc2 = nn.Linear(spec["d_ff"], d)

  def forward(self, x):
    b, t, d = x.shape
    q, k, v = self.qkv(self.ln1(x)).split([self.h * self.hd, self.kv * self.hd,
                                           self.kv * self.hd], dim=-1)
    q = q.view(b, t, self.h, self.hd).transpose(1, 2)
    k = k.view(b, t, self.kv, self.hd).transpose(1, 2)
    v = v.view(b, t, self.kv, self.hd).transpose(1, 2)
    if self.rope:
      q, k = rope(q), rope(k)
    a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv != self.h)
    x = x + self.out(a.transpose(1, 2).reshape(b, t, d))
    h = self.fc1(self.ln2(x))
    if self.swiglu:
      gate, up = h.chunk(2, dim=-1)
      h = F.silu(gate) * up
    else:
      h = F.gelu(h)
    return x + self.fc2(h)


class Decoder(nn.Module):

  def __init__(self, spec):
    super().__init__()
    d = spec["d_model"]
    self.embed = nn.Embedding(spec["vocab"], d)
    self.pos = None if spec.get("pos_encoding") == "rope" else nn.Embedding(spec["seq"], d)
    self.blocks = nn.ModuleList([Block(spec) for _ in range(spec["n_layers"])])
    self.ln_f = RMSNorm(d) if spec.get("norm") == "rmsnorm" else nn.LayerNorm(d)
    self.head = nn.Linear(d, spec["vocab"], bias=False)
    if spec.get("tie_embeddings"):
      self.head.weight = self.embed.weight

  def forward(self, ids):
    x = self.embed(ids)
    if self.pos is not None:
      x = x + self.pos(torch.arange(ids.shape[1], device=ids.device))[None]
    for blk in self.blocks:
      x = blk(x)
    return self.head(self.ln_f(x))


def measure(spec, batches, steps: int, *, device="cuda", compile=True) -> dict:
  torch.manual_seed(0)
  model = Decoder(spec).to(device)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
  data = [(torch.from_numpy(np.asarray(b.inputs, np.int64)).to(device),
           torch.from_numpy(np.asarray(b.targets, np.int64)).to(device)) for b in batches]
  dtype = torch.bfloat16 if spec["dtype"] == "bfloat16" else torch.float32

  def step(ids, tgt):
    with torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32):
      logits = model(ids)
    loss = F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  fn = torch.compile(step) if compile else step
  t = time.perf_counter()
  fn(*data[0]).item()  # compile + warm-up
  compile_s = time.perf_counter() - t
  times = []
  for i in range(steps):
    t = time.perf_counter()
    fn(*data[i % len(data)]).item()  # .item() syncs, like block_until_ready
    times.append(time.perf_counter() - t)
  tokens = spec["batch"] * spec["seq"]
  return {"ok": True, "torch": torch.__version__, "compile": compile, "compile_s": compile_s,
          "step_ms": 1e3 * statistics.median(times), "tokens_per_s": tokens * steps / sum(times),
          "params": sum(p.numel() for p in model.parameters())}
