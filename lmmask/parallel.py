"""Scaling out: device mesh, shardings by logical-axis rules, multi-host data.

The mesh has two axes, ``data`` and ``fsdp``. A training batch is split along
its first (row) axis over both of them, so every device gets B / (data * fsdp)
rows. Parameters and optimizer state are split over ``fsdp`` only: each weight
names its axes logically (``embed``, ``mlp``, ``vocab``, ...) and `RULES` maps a
logical axis to a mesh axis. XLA (GSPMD, auto axis types) inserts the
all-gathers and reduce-scatters; the jitted step is the same program on one
device or on a pod.

Multi-host: `initialize_distributed` calls ``jax.distributed.initialize``;
every process computes the same global row indices for a step (they are a pure
function of seed and step) and materialises only the rows its own devices hold
(`process_rows`, `put_batch`). Only process 0 writes logs and results
(`is_writer`); checkpoints are written by orbax from all processes together.
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")   # the batch row axis is split over both mesh axes

# Logical axes of every parameter, keyed by (module name, parameter name).
# A kernel of nnx.Linear is (in, out); an embedding table is (rows, features).
# The decoder options need no more entries: the SwiGLU gate and up
# projections are the two halves of the fc1 kernel (embed, mlp); grouped-query
# attention only narrows the qkv output; a tied LM head reuses `embed`; rope has
# no pos_embed; LayerNorm / RMSNorm scales and biases are vectors, replicated.
LOGICAL_AXES = {
    ("embed", "embedding"): ("vocab", "embed"),
    ("pos_embed", "embedding"): ("position", "embed"),
    ("qkv", "kernel"): ("embed", "qkv"),
    ("qkv", "bias"): ("qkv",),
    ("out", "kernel"): ("heads", "embed"),
    ("out", "bias"): ("embed",),
    ("fc1", "kernel"): ("embed", "mlp"),
    ("fc1", "bias"): ("mlp",),
    ("fc2", "kernel"): ("mlp", "embed"),
    ("fc2", "bias"): ("embed",),
    ("head", "kernel"): ("embed", "vocab"),
    ("head", "bias"): ("vocab",),
}
# Logical axis -> mesh axis, in priority order. FSDP splits the model width of
# every matrix; vectors (biases, norm scales) are small and stay replicated.
# A rule is skipped for a tensor whose dimension the mesh axis does not divide.
RULES: tuple[tuple[str, str], ...] = (("embed", "fsdp"), ("mlp", "fsdp"), ("vocab", "fsdp"))


# ---------------------------------------------------------------------------
# Mesh.

def mesh_shape(data: int, fsdp: int, n_devices: int) -> tuple[int, int]:
  """Resolve -1 (= all remaining devices) and check data * fsdp == n_devices."""
  for name, v in (("mesh.data", data), ("mesh.fsdp", fsdp)):
    if not isinstance(v, int) or isinstance(v, bool) or (v < 1 and v != -1):
      raise ValueError(f"{name} must be a positive int or -1 (all remaining devices), "
                       f"got {v!r}")
  if data == -1 and fsdp == -1:
    raise ValueError("only one of mesh.data and mesh.fsdp may be -1")
  if data == -1 or fsdp == -1:
    known = fsdp if data == -1 else data
    if n_devices % known:
      raise ValueError(f"{n_devices} devices cannot be split into groups of {known}; "
                       f"set mesh.data and mesh.fsdp so that data * fsdp = {n_devices}")
    rest = n_devices // known
    return (rest, fsdp) if data == -1 else (data, rest)
  if data * fsdp != n_devices:
    raise ValueError(f"mesh.data * mesh.fsdp = {data} * {fsdp} = {data * fsdp} but "
                     f"{n_devices} devices are visible; make the product equal the device "
                     f"count or set one of them to -1")
  return data, fsdp


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence | None = None) -> Mesh:
  """A ("data", "fsdp") mesh with auto axis types (GSPMD decides the collectives)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(data, fsdp, len(devices))
  return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def mesh_from_config(config) -> Mesh:
  return make_mesh(config.mesh.data, config.mesh.fsdp)


# ---------------------------------------------------------------------------
# Shardings.

def _names(path) -> tuple[str, ...]:
  out = []
  for k in path:
    name = getattr(k, "key", getattr(k, "name", None))
    if isinstance(name, str) and name != "value":
      out.append(name)
  return tuple(out)


def logical_axes(path, shape) -> tuple | None:
  """The logical axes of the parameter (or optimizer moment) at `path`, or None."""
  names = _names(path)
  if len(names) >= 2 and (names[-2], names[-1]) in LOGICAL_AXES:
    axes = LOGICAL_AXES[(names[-2], names[-1])]
    if len(axes) == len(shape):
      return axes
  return None


def spec_for(path, shape, mesh: Mesh, rules=RULES) -> P:
  """PartitionSpec from the logical axes and `rules`; unknown leaves are replicated."""
  axes = logical_axes(path, shape)
  if axes is None:
    return P()
  spec = [None] * len(shape)
  used = set()
  for logical, mesh_axis in rules:
    if mesh_axis in used or mesh.shape[mesh_axis] == 1 or logical not in axes:
      continue
    dim = axes.index(logical)
    if spec[dim] is None and shape[dim] % mesh.shape[mesh_axis] == 0:
      spec[dim] = mesh_axis
      used.add(mesh_axis)
  return P(*spec)


def tree_shardings(tree, mesh: Mesh, rules=RULES):
  """NamedShardings for every array leaf of params or optimizer state."""
  def one(path, leaf):
    shape = np.shape(leaf)
    return NamedSharding(mesh, spec_for(path, shape, mesh, rules))
  return jax.tree_util.tree_map_with_path(one, tree)


def state_shardings(state, mesh: Mesh, rules=RULES):
  """A TrainState-shaped pytree of shardings (step and rng replicated)."""
  rep = NamedSharding(mesh, P())
  return state.replace(step=rep, params=tree_shardings(state.params, mesh, rules),
                       opt_state=tree_shardings(state.opt_state, mesh, rules), rng=rep)


def shard_state(state, mesh: Mesh, rules=RULES):
  """The state laid out on `mesh`, in fresh buffers.

  device_put may reuse the caller's single-device buffer as one shard of a
  replicated array (even with may_alias=False, jax 0.10), and the jitted step
  donates its input; the on-mesh copy keeps the caller's state alive.
  """
  sh = state_shardings(state, mesh, rules)
  placed = jax.device_put(state, sh)
  return jax.jit(lambda s: jax.tree.map(jnp.copy, s), out_shardings=sh)(placed)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def check_batch_size(batch_size: int, mesh: Mesh, grad_accum_steps: int = 1):
  n = math.prod(mesh.shape[a] for a in BATCH_AXES)
  if batch_size % (n * grad_accum_steps):
    raise ValueError(f"data.batch_size={batch_size} must be divisible by the number of "
                     f"batch shards ({n} = mesh data x fsdp) times optim.grad_accum_steps="
                     f"{grad_accum_steps}, i.e. by {n * grad_accum_steps}, so every "
                     f"micro-batch is split evenly over the devices")


def jit_train_step(step_fn, state, mesh: Mesh, rules=RULES):
  """jit `step_fn(state, batch)` with the state's shardings pinned on input and output
  (the state is donated) and the batch split over data x fsdp."""
  ss = state_shardings(state, mesh, rules)
  return jax.jit(step_fn, in_shardings=(ss, batch_sharding(mesh)), out_shardings=(ss, None),
                 donate_argnums=0)


# ---------------------------------------------------------------------------
# Multi-host.

def initialize_distributed(dist_config) -> bool:
  """Call jax.distributed.initialize from the config's `distributed` section.

  mode "off": single process (nothing is called). mode "auto": JAX detects the
  cluster (TPU pods, SLURM, Open MPI, ...). mode "manual": coordinator_address,
  num_processes and process_id from the config (or the LMMASK_COORDINATOR,
  LMMASK_NUM_PROCESSES, LMMASK_PROCESS_ID environment variables). Must run before
  any other JAX call touches the devices. Returns True if it initialised.
  """
  mode = dist_config.mode
  if mode == "off":
    return False
  if mode == "auto":
    jax.distributed.initialize()
    return True
  if mode != "manual":
    raise ValueError(f"distributed.mode must be off | auto | manual, got {mode!r}")
  addr = dist_config.coordinator_address or os.environ.get("LMMASK_COORDINATOR")
  nproc = dist_config.num_processes
  pid = dist_config.process_id
  nproc = int(os.environ["LMMASK_NUM_PROCESSES"]) if nproc is None and \
      "LMMASK_NUM_PROCESSES" in os.environ else nproc
  pid = int(os.environ["LMMASK_PROCESS_ID"]) if pid is None and \
      "LMMASK_PROCESS_ID" in os.environ else pid
  missing = [n for n, v in (("coordinator_address", addr), ("num_processes", nproc),
                            ("process_id", pid)) if v is None]
  if missing:
    raise ValueError(f"distributed.mode=manual needs {', '.join('distributed.' + m for m in missing)}"
                     f" (or their LMMASK_* environment variables); use mode=auto on TPU/SLURM")
  if not 0 <= pid < nproc:
    raise ValueError(f"distributed.process_id={pid} must lie in [0, num_processes={nproc})")
  jax.distributed.initialize(coordinator_address=addr, num_processes=nproc, process_id=pid)
  return True


def is_writer() -> bool:
  """Only process 0 writes logs, JSON results and other files outside orbax."""
  return jax.process_index() == 0


def process_rows(sharding: NamedSharding, batch_size: int) -> tuple[int, int]:
  """[start, stop) of the global batch rows that this process's devices hold."""
  idx = sharding.addressable_devices_indices_map((batch_size,))
  starts = sorted({(s[0].start or 0, s[0].stop if s[0].stop is not None else batch_size)
                   for s in idx.values()})
  lo, hi = starts[0][0], starts[-1][1]
  covered = sum(b - a for a, b in starts)
  if covered != hi - lo:
    raise ValueError("this process's devices hold non-contiguous batch rows; build the mesh "
                     "with parallel.make_mesh so each host's devices are adjacent")
  return lo, hi


def put_batch(local_batch, mesh: Mesh, batch_size: int):
  """Assemble a global batch from this process's rows (see `process_rows`)."""
  sh = batch_sharding(mesh)
  def one(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(sh, x, (batch_size,) + x.shape[1:])
  return jax.tree.map(one, local_batch)


def setup_jax_cache(path: str):
  """The persistent compilation cache (train.jax_cache_dir; "" disables)."""
  if path:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
