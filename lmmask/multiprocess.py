"""`launch.py --processes=N`: N local processes of one multi-process (multi-host) run.

Each child is launch.py itself with the same arguments plus distributed.mode=manual,
a coordinator on a free local port and its process id; on CPU each child gets its
own XLA:CPU devices (XLA_FLAGS), on a GPU host one GPU each (CUDA_VISIBLE_DEVICES).
Every child runs in its own process group. When one child fails the others cannot
go on (their collectives would wait for it), so they are killed at once and the
failed child is named, with how to resume. SIGTERM/SIGINT to the launcher is passed
on to every child (a preemption: they finish the step, save together and exit).
Every wait has a timeout and `finally` kills whatever is left: never a hang.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

from lmmask import parallel

DIST_FLAGS = ("mode", "coordinator_address", "num_processes", "process_id")


def free_port() -> int:
  """A port nobody listens on now (the OS picks it: bind to port 0)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _gpu_count() -> int:
  if "cpu" in os.environ.get("JAX_PLATFORMS", "").lower() or not shutil.which("nvidia-smi"):
    return 0
  try:
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
  except (OSError, subprocess.SubprocessError):
    return 0
  return sum(line.startswith("GPU ") for line in out.stdout.splitlines())


def child_env(i: int, n: int, cpu_devices: int, env=None, gpus: int | None = None) -> dict:
  """The environment of child `i` of `n`: one GPU each where there are enough, else
  `cpu_devices` XLA:CPU devices each (0: the cores shared out, at least 1)."""
  env = dict(os.environ if env is None else env)
  gpus = _gpu_count() if gpus is None else gpus
  if gpus >= n:
    env["CUDA_VISIBLE_DEVICES"] = str(i)
    return env
  count = parallel.forced_cpu_devices(env) or cpu_devices or max(1, parallel._cores() // n)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count=")]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={count}"])
  return env


def child_args(argv: list[str], i: int, n: int, addr: str, train: bool) -> list[str]:
  """launch.py's own arguments without --processes, plus the distributed settings
  (config overrides when training; environment variables cover the other modes)."""
  out = []
  skip = False
  for a in argv:
    if skip:
      skip = False
      continue
    if a == "--processes":
      skip = True
      continue
    if a.startswith("--processes=") or any(a.startswith(f"--config.distributed.{f}=")
                                           for f in DIST_FLAGS):
      continue
    out.append(a)
  if train:
    out += ["--config.distributed.mode=manual", f"--config.distributed.coordinator_address={addr}",
            f"--config.distributed.num_processes={n}", f"--config.distributed.process_id={i}"]
  return out


try:  # loaded here, not in the forked child (no imports between fork and exec)
  _LIBC = ctypes.CDLL("libc.so.6", use_errno=True)
except OSError:  # not Linux
  _LIBC = None


def _die_with_parent():
  """In the child, before exec: the kernel kills it if the launcher dies (even by
  kill -9), so no child outlives its launcher (Linux; elsewhere a no-op)."""
  if _LIBC is not None:
    _LIBC.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _kill_group(p: subprocess.Popen, sig=signal.SIGKILL):
  try:
    os.killpg(p.pid, sig)
  except (ProcessLookupError, PermissionError):
    pass


def _describe(rc: int) -> str:
  if rc < 0:
    try:
      return f"was killed by {signal.Signals(-rc).name}"
    except ValueError:
      return f"was killed by signal {-rc}"
  return f"exited with code {rc}"


def run(script: str, argv: list[str], n: int, *, train: bool, cpu_devices: int = 0,
        workdir: str | None = None, grace_s: float = 60.0, log=None) -> int:
  """Run `n` children of `script` with `argv` (launch.py's arguments); returns the exit
  code: 0 when every child succeeded, else the first failed child's (1 for a signal)."""
  log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
  if n < 2:
    raise ValueError(f"--processes must be >= 2 to launch several processes, got {n}")
  addr = f"127.0.0.1:{free_port()}"
  procs: list[subprocess.Popen] = []
  forwarded = {}

  def forward(signum, frame):  # a preemption of the launcher is one of every child
    forwarded["signum"] = signum
    for p in procs:
      _kill_group(p, signum)
  old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    for i in range(n):
      env = dict(child_env(i, n, cpu_devices), LMMASK_COORDINATOR=addr,
                 LMMASK_NUM_PROCESSES=str(n), LMMASK_PROCESS_ID=str(i))
      procs.append(subprocess.Popen([sys.executable, script, *child_args(argv, i, n, addr, train)],
                                    env=env, start_new_session=True,
                                    preexec_fn=_die_with_parent))
    log(f"lmmask: launched {n} processes (coordinator {addr}; pids "
        f"{', '.join(str(p.pid) for p in procs)})")
    deadline = None  # after a forwarded signal, how long the children get to save
    while True:
      codes = [p.poll() for p in procs]
      failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
      if failed and "signum" not in forwarded:
        i = failed[0]
        for p in procs:
          if p.poll() is None:
            _kill_group(p)
        where = f" in {workdir}" if workdir else ""
        log(f"lmmask: process {i} of {n} (pid {procs[i].pid}) {_describe(codes[i])}; stopped "
            f"the other {n - 1} (they cannot go on without it). Checkpoints{where} are those "
            f"committed before the failure: rerun the same command to resume from the "
            f"latest (a new port is chosen).")
        return codes[i] if codes[i] > 0 else 1
      if all(c is not None for c in codes):
        return max(codes) if "signum" not in forwarded else 128 + forwarded["signum"]
      if "signum" in forwarded:
        deadline = deadline or time.monotonic() + grace_s
        if time.monotonic() > deadline:
          log(f"lmmask: children still running {grace_s:.0f} s after the signal; killed")
          return 128 + forwarded["signum"]
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        _kill_group(p)
    for p in procs:
      try:
        p.wait(timeout=30)
      except subprocess.TimeoutExpired:
        pass
    for s, h in old.items():
      signal.signal(s, h)
