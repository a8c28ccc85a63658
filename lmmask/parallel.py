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
(`process_rows`, `put_batch`). Only process 0 writes logs, results and the
workdir's other files (`is_writer`); the others wait for it at a `barrier` and
then read what it wrote. Checkpoints are written by orbax from all processes
together; only process 0 prunes them (lmmask/checkpoint.py).

CPU devices: `resolve_cpu_devices` turns mesh.cpu_devices=0 (auto) into a count
and `apply_cpu_devices` sets it before JAX starts (launch.py calls both).
"""
from __future__ import annotations

import itertools
import math
import os
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
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
  (the state is donated) and the batch split over data x fsdp. It is traced and run
  with `mesh` set (jax.set_mesh), so the attention kernels, which XLA cannot split,
  run inside shard_map on each device's rows (model._per_shard). `.jitted` is the
  jitted function itself (for jax.export, under the same mesh)."""
  ss = state_shardings(state, mesh, rules)
  jitted = jax.jit(step_fn, in_shardings=(ss, batch_sharding(mesh)), out_shardings=(ss, None),
                   donate_argnums=0)

  def run(state, batch):
    with jax.set_mesh(mesh):
      return jitted(state, batch)

  def lower(state, batch):
    with jax.set_mesh(mesh):
      return jitted.lower(state, batch)
  run.jitted, run.mesh, run.lower = jitted, mesh, lower
  return run


# ---------------------------------------------------------------------------
# Multi-host.

def _use_gloo_on_cpu():
  """Cross-process collectives on XLA:CPU need an implementation (JAX has none by
  default: a multi-process CPU run fails at its first all-reduce). It only concerns
  the CPU client, so it is harmless on a GPU/TPU host."""
  jax.config.update("jax_cpu_collectives_implementation", "gloo")


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
  if jax.distributed.is_initialized():  # e.g. eval after train in one process
    return True
  if mode not in ("auto", "manual"):
    raise ValueError(f"distributed.mode must be off | auto | manual, got {mode!r}")
  timeouts = dict(heartbeat_timeout_seconds=int(dist_config.heartbeat_timeout_s),
                  shutdown_timeout_seconds=int(dist_config.shutdown_timeout_s))
  _use_gloo_on_cpu()
  if mode == "auto":
    jax.distributed.initialize(**timeouts)
    return True
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
  jax.distributed.initialize(coordinator_address=addr, num_processes=nproc, process_id=pid,
                             **timeouts)
  return True


_BARRIERS = itertools.count()  # every process passes the same barriers in the same order


def barrier(name: str, timeout_s: int):
  """Wait until every process reaches this point (no-op with one process). Raises
  after `timeout_s` (distributed.barrier_timeout_s) naming the barrier, so a lost
  peer never hangs a run."""
  if jax.process_count() == 1:
    return
  key = f"lmmask_{name}_{next(_BARRIERS)}"
  try:
    ocp.multihost.get_barrier_sync_fn()(key=key, timeout_ms=int(timeout_s * 1000))
  except Exception as e:  # noqa: BLE001 - the coordination service's own error types
    raise RuntimeError(
        f"process {jax.process_index()} of {jax.process_count()}: barrier {name!r} was not "
        f"reached by every process within {timeout_s} s ({type(e).__name__}: "
        f"{str(e).splitlines()[0][:200] if str(e) else ''}). Another process failed or is "
        f"stuck; see its log, then rerun every process to resume.") from e


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


# ---------------------------------------------------------------------------
# CPU devices (mesh.cpu_devices).

def forced_cpu_devices(env=None) -> int | None:
  """The device count XLA_FLAGS forces on the CPU platform, if it sets one."""
  flags = (os.environ if env is None else env).get("XLA_FLAGS", "")
  found = re.findall(r"--xla_force_host_platform_device_count=(\d+)", flags)
  return int(found[-1]) if found else None


def _cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def resolve_cpu_devices(config, recorded: int | None = None, env=None) -> tuple[int, str]:
  """(count, why) for mesh.cpu_devices; 0 = auto (the rules in lmmask/config.py).
  `recorded` is the count in the workdir's config.json when resuming."""
  n = config.mesh.cpu_devices
  if n:
    return n, "mesh.cpu_devices"
  # Setting jax_num_cpu_devices would silently replace what XLA_FLAGS asks for.
  forced = forced_cpu_devices(env)
  if forced:
    return forced, "XLA_FLAGS --xla_force_host_platform_device_count"
  if recorded:
    return recorded, "the count recorded in the workdir's config.json (resume)"
  if config.distributed.mode != "off":
    return 1, f"distributed.mode={config.distributed.mode} (one device per process)"
  m, d = config.mesh, config.data
  cores = _cores()
  if m.data > 0 and m.fsdp > 0:
    return m.data * m.fsdp, "mesh.data x mesh.fsdp"
  fixed = m.fsdp if m.fsdp > 0 else m.data  # the one explicitly sized axis must divide
  if (cores > 1 and d.batch_size % (cores * config.optim.grad_accum_steps) == 0
      and d.eval_batch_size % cores == 0 and cores % max(1, fixed) == 0):
    return cores, f"all {cores} cores"
  return 1, (f"1: data.batch_size={d.batch_size} / data.eval_batch_size={d.eval_batch_size} "
             f"do not divide over {cores} cores")


def apply_cpu_devices(n: int):
  """Split the CPU platform into `n` devices; call before JAX touches a device."""
  forced = forced_cpu_devices()
  if forced is not None:
    if n != forced:
      raise ValueError(f"mesh.cpu_devices={n} but XLA_FLAGS forces "
                       f"--xla_force_host_platform_device_count={forced}; set "
                       f"mesh.cpu_devices=0 (auto) or {forced}, or drop the XLA flag")
    return
  if n > 1:
    jax.config.update("jax_num_cpu_devices", n)


def spans_processes(tree) -> Mesh | None:
  """The mesh of a tree whose arrays span several processes, else None."""
  if jax.process_count() == 1:
    return None
  for leaf in jax.tree.leaves(tree):
    mesh = getattr(getattr(leaf, "sharding", None), "mesh", None)
    if mesh is not None and not leaf.is_fully_addressable:
      return mesh
  return None


def put_replicated(tree, mesh: Mesh):
  """Host arrays that every process holds whole, as arrays replicated on `mesh` (eval
  batches: their last batch need not divide over the devices)."""
  rep = NamedSharding(mesh, P())
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(rep, np.asarray(x)),
                      tree)


def gather_to_host(tree):
  """Every array of `tree` whole, as numpy, on every process (a collective: all call it)."""
  return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)),
                      tree)


def setup_jax_cache(path: str):
  """The persistent compilation cache (train.jax_cache_dir; "" disables)."""
  if path:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
