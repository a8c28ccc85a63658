"""Graceful stop on SIGTERM / SIGINT (preemption, Ctrl-C).

While a `StopSignals` block is active, the first SIGTERM or SIGINT only records
the request; the training loop polls `requested` after each step, saves a
checkpoint, waits for it and raises `Interrupted`, a `SystemExit` whose code is
128 + the signal number (143 for SIGTERM, 130 for SIGINT), the codes shells and
schedulers (Slurm, Kubernetes, GKE/TPU preemption) read as "stopped by that signal".
A second SIGINT aborts at once with KeyboardInterrupt (no new checkpoint; the
last complete one is still there). A second SIGTERM is ignored: the run is
already stopping.
"""
from __future__ import annotations

import signal
import sys
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(SystemExit):
  """Training stopped on a signal after saving; `code` is 128 + signum."""

  def __init__(self, signum: int, step: int, message: str):
    super().__init__(128 + signum)
    self.signum = signum
    self.step = step
    self.message = message

  def __str__(self):
    return self.message


class StopSignals:
  """Context manager: turn SIGTERM/SIGINT into a stop request polled by the loop.

  Outside the main thread (where Python cannot install handlers) it does nothing.
  """

  def __init__(self, signals=SIGNALS):
    self.signals = tuple(signals)
    self.signum: int | None = None
    self._old = {}

  @property
  def requested(self) -> bool:
    return self.signum is not None

  @property
  def name(self) -> str:
    return signal.Signals(self.signum).name if self.signum is not None else ""

  def _handle(self, signum, frame):  # noqa: ARG002 - signal handler signature
    if self.signum is not None:
      if signum == signal.SIGINT:
        raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: aborting without "
                                f"saving; the last complete checkpoint is kept")
      return
    self.signum = signum
    print(f"lmmask: received {signal.Signals(signum).name}: finishing this step, saving a "
          f"checkpoint, then exiting with code {128 + signum} (Ctrl-C again aborts without "
          f"saving)", file=sys.stderr, flush=True)

  def install(self) -> "StopSignals":
    if threading.current_thread() is threading.main_thread() and not self._old:
      for s in self.signals:
        self._old[s] = signal.signal(s, self._handle)
    return self

  def restore(self) -> None:
    for s, old in self._old.items():
      signal.signal(s, old)
    self._old.clear()

  def __enter__(self):
    return self.install()

  def __exit__(self, *exc):
    self.restore()
    return False
