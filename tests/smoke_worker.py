"""Run by tests/test_smoke_scripts.py: several scripts' `tiny` paths in this one process.

`python tests/smoke_worker.py TMPROOT` reads script paths from stdin, one a line, runs each
as `python SCRIPT tiny` would (run as __main__, argv [SCRIPT, "tiny"], its folder first on
sys.path, $TMPDIR its own folder under TMPROOT), and answers each with one line
`RESULT [script, exit code, output, seconds, CPU seconds]`. What a separate interpreter per script would
redo every time, importing JAX, Flax, lmmask (and PyTorch) and compiling the same tiny
programs, is done once; what belongs to a script is not shared: its own modules
(experiments/common.py and its siblings) are imported afresh, and the environment,
working directory, sys.path and tempfile's directory are restored after it.
"""
import contextlib
import io
import json
import os
import runpy
import sys
import tempfile
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT_DIRS = tuple(os.path.join(REPO, d) + os.sep for d in ("experiments", "benchmarks"))


def _own_modules():
  """Modules imported from experiments/ or benchmarks/ (a script's, not the library's)."""
  return [name for name, m in list(sys.modules.items())
          if (getattr(m, "__file__", None) or "").startswith(SCRIPT_DIRS)]


def run_one(script, tmp):
  os.makedirs(tmp, exist_ok=True)
  env, cwd, path, argv = dict(os.environ), os.getcwd(), list(sys.path), list(sys.argv)
  os.environ["TMPDIR"] = tmp
  tempfile.tempdir = None  # tempfile caches $TMPDIR at first use: read it again
  sys.argv = [script, "tiny"]
  sys.path.insert(0, os.path.dirname(os.path.join(REPO, script)))
  out = io.StringIO()
  t0, c0 = time.perf_counter(), time.process_time()
  try:
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
      try:
        runpy.run_path(os.path.join(REPO, script), run_name="__main__")
        rc = 0
      except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
          print(e.code)
      except BaseException:  # noqa: B036  (a script's crash is its result, not ours)
        traceback.print_exc()
        rc = 1
  finally:
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    sys.path[:], sys.argv = path, argv
    tempfile.tempdir = None
    for name in _own_modules():
      del sys.modules[name]
  return rc, out.getvalue(), time.perf_counter() - t0, time.process_time() - c0


def main(root):
  """Read script paths from stdin, one a line; answer each with one RESULT line."""
  for line in sys.stdin:
    script = line.strip()
    if script:
      rc, out, secs, cpu = run_one(script, os.path.join(root, script.replace("/", "_")))
      print("RESULT " + json.dumps([script, rc, out, secs, cpu]), flush=True)


if __name__ == "__main__":
  main(sys.argv[1])
