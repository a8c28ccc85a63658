#!/usr/bin/env bash
# GPU checks and the GPU speed table, on a machine that reaches no package registry.
#
#   bash benchmarks/gpu.sh            # on the GPU machine, from the repository root
#   bash benchmarks/gpu.sh --dry-run  # anywhere: the same script on CPU, tiny shapes
#   bash benchmarks/gpu.sh [--dry-run] steps=5 budget_s=200   # options of gpu_check.py
#
# The GPU machine has jax (CUDA), flax, optax, orbax, torch and transformers but not
# ml_collections: its wheel is carried in benchmarks/wheels/ and installed from there
# (--no-index --no-deps: nothing from the network) into a scratch directory on
# PYTHONPATH, next to the repository itself (PYTHONPATH=., no pip install of lmmask).
# tensorboardX is not needed (lmmask runs without it). Prints one JSON object, also
# when a part or the whole run fails; finishes within 5 minutes (timeout below).
set -u
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
SITE="$(mktemp -d /tmp/lmmask_gpu_site.XXXXXX)"
trap 'rm -rf "$SITE"' EXIT
PY="${PYTHON:-python3}"
if ! "$PY" -c "import ml_collections" 2>/dev/null; then
  "$PY" -m pip install --quiet --no-index --no-deps --target "$SITE" benchmarks/wheels/*.whl \
    >"$SITE/pip.log" 2>&1 || true
fi
export PYTHONPATH="$SITE:.${PYTHONPATH:+:$PYTHONPATH}"
[ "$DRY" = 1 ] && export JAX_PLATFORMS=cpu
# The jax found here decides whether the kernel table runs (setup.cfg's floor).
echo "gpu.sh: $("$PY" -c 'import jax; print("jax", jax.__version__)' 2>/dev/null || echo 'jax not importable')" >&2
OUT="$SITE/out.json"
timeout -k 10 285 "$PY" benchmarks/gpu_check.py "dry_run=$DRY" "$@" >"$OUT" 2>"$SITE/err.log"
RC=$?
if [ -s "$OUT" ] && tail -n 1 "$OUT" | python3 -c "import json,sys; json.loads(sys.stdin.read())" 2>/dev/null; then
  tail -n 1 "$OUT"
else
  # The checks died before printing (an import error, the timeout): still one JSON object.
  python3 - "$RC" "$SITE/err.log" <<'PYEOF'
import json, sys
rc, err = int(sys.argv[1]), open(sys.argv[2]).read()[-2000:]
print(json.dumps({"ok": False, "rc": rc, "timed_out": rc in (124, 137),
                  "error": "gpu_check.py printed no result", "stderr_tail": err}))
PYEOF
fi
tail -n 20 "$SITE/err.log" >&2
exit 0
