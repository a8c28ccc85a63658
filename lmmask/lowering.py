"""The whole jitted train step lowered for an accelerator this machine may lack.

`lower_train_step(config, platform)` exports forward, backward and optimizer update
(`parallel.jit_train_step` on the configured mesh shape) with `jax.export` for
``tpu`` or ``cuda`` from abstract shapes: no data is read, no parameter is
allocated. On a CPU backend the Pallas attention kernels run in interpret mode;
lowered for their accelerator they are the real kernels (Mosaic custom calls for
splash, Triton custom calls for mha), which this module counts. Lowering proves the
program is well formed for that platform; Mosaic and Triton compile a kernel only
on the device, so block-size or register limits show up only there.
"""
from __future__ import annotations

import os
import re
import tempfile

import jax
import numpy as np

from lmmask import batching, parallel
from lmmask import config as config_lib
from lmmask import model as model_lib
from lmmask import step as step_lib

# jax.export platform -> the JAX backend name model.attention is resolved for.
PLATFORMS = {"tpu": "tpu", "cuda": "gpu"}
# Custom-call targets of the fused attention paths in lowered StableHLO.
KERNEL_TARGETS = {"splash": "tpu_custom_call", "triton": "__gpu$xla.gpu.triton",
                  "cudnn": "__cudnn$fmha"}
_TENSOR = re.compile(r"tensor<((?:\d+x)+)([a-z]\w*)>")


def _need(cond, field, msg):
  if not cond:
    raise ValueError(f"config.{field}: {msg}")


def largest_tensor(text: str) -> dict:
  """The tensor type with the most elements in StableHLO `text`: shape and dtype."""
  best = ((), "", 0)
  for dims, dtype in sorted(set(_TENSOR.findall(text))):  # ties: the first in sort order
    shape = tuple(int(d) for d in dims.rstrip("x").split("x"))
    n = int(np.prod(shape))
    if n > best[2]:
      best = (shape, dtype, n)
  return {"shape": list(best[0]), "dtype": best[1], "elements": best[2]}


def tensor_shapes(text: str) -> list[tuple[int, ...]]:
  """Every distinct tensor shape in StableHLO `text`."""
  return sorted({tuple(int(d) for d in dims.rstrip("x").split("x"))
                 for dims, _ in _TENSOR.findall(text)})


_FUNC = re.compile(r"^\s*func\.func (?:public |private )?@([\w$.-]+)\(", re.M)
_CALL = re.compile(r"\bcall @([\w$.-]+)\(")


def kernel_calls(text: str, attention: str) -> int:
  """Custom calls of `attention`'s fused kernel executed by @main of StableHLO `text`
  (0 for einsum and xla): a function called from two places counts twice, as a
  layer's kernel outlined once and called per layer must."""
  target = KERNEL_TARGETS.get(attention)
  if not target:
    return 0
  starts = [(m.group(1), m.start()) for m in _FUNC.finditer(text)]
  bodies = {name: text[a:b] for (name, a), (_, b) in
            zip(starts, starts[1:] + [("", len(text))])}
  direct = re.compile(rf"custom_call @{re.escape(target)}\b")
  memo = {}

  def count(name):
    if name not in memo:
      memo[name] = 0  # a recursion guard; StableHLO has no recursion
      body = bodies.get(name, "")
      memo[name] = len(direct.findall(body)) + sum(count(c) for c in _CALL.findall(body))
    return memo[name]
  return count("main")


def lower_train_step(config, platform: str) -> tuple[dict, str]:
  """(summary, StableHLO text) of the train step of `config` exported for `platform`.

  summary: platform, attention (model.attention resolved for that platform),
  kernel_calls, largest_tensor, mesh, batch (rows x tokens), jax version.
  """
  if platform not in PLATFORMS:
    raise ValueError(f"--platform={platform!r}: lowering targets are {', '.join(PLATFORMS)}")
  config_lib.validate(config)
  m = config.model
  _need(m.vocab_size != -1, "model.vocab_size", "-1 means 'the corpus vocabulary', but "
        "--mode=lower reads no data; set it, e.g. --config.model.vocab_size=512")
  attention = model_lib.resolve_attention(m.attention, PLATFORMS[platform],
                                          packed=bool(config.data.packing))
  _need(attention != "cudnn" or jax.default_backend() == "gpu", "model.attention",
        "cudnn cannot be lowered without a GPU (JAX checks for cuDNN while tracing); lower "
        "triton or xla here, or run --mode=lower on a GPU machine")
  # The resolved name, so the model is built with it on this (CPU) backend too.
  config = config_lib.apply_overrides(config, {"model.attention": attention})
  mesh = parallel.mesh_from_config(config)
  parallel.check_batch_size(config.data.batch_size, mesh, config.optim.grad_accum_steps)
  state = jax.eval_shape(lambda: step_lib.create_train_state(
      config, jax.random.PRNGKey(config.seed), vocab_size=m.vocab_size,
      # No corpus is read: the general form (segment ids honoured) that every corpus may use.
      keys_are_prefix=False))
  shardings = parallel.state_shardings(state, mesh)
  state_in = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          state, shardings)
  ids = np.ones((config.data.batch_size, config.data.length), np.int32)  # shapes only
  rows = parallel.batch_sharding(mesh)
  batch_in = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rows),
                          batching.batch_from_ids(ids, pad_id=0))
  step_fn = parallel.jit_train_step(step_lib.train_step, state, mesh)
  # Triton's custom call is not on jax.export's list of stable targets (its ABI may
  # change between jax versions): the export is for inspection and for this jax.
  checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  with jax.set_mesh(mesh):
    exported = jax.export.export(step_fn.jitted, platforms=[platform],
                                 disabled_checks=checks)(state_in, batch_in)
  text = exported.mlir_module()
  summary = {"platform": platform, "attention": attention,
             "kernel_calls": kernel_calls(text, attention),
             "largest_tensor": largest_tensor(text), "mesh": dict(mesh.shape),
             "batch": [config.data.batch_size, config.data.length - 1],
             "layers": m.n_layers, "jax": jax.__version__}
  return summary, text


def write_text(path: str, text: str):
  """Write the StableHLO text atomically. An existing file is replaced only when it is
  itself a lowered module (never someone's other file)."""
  path = os.path.expanduser(path)
  if os.path.exists(path):
    with open(path) as f:  # a lowered module: `#loc` lines, then `module @...`
      first = next((line for line in f if not line.startswith("#loc")), "")
    if not first.startswith("module @"):
      raise FileExistsError(f"--out={path} exists and is not a StableHLO module written by "
                            f"--mode=lower; choose another path or remove it")
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp_", suffix=".mlir")
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
