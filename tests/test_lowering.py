"""--mode=lower: the whole train step exported for TPU and GPU from this CPU. The
kernels show up as their custom calls, and attention memory is linear in T (no
tensor with two dimensions of T) where the einsum reference holds the T x T logits."""
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, load_config

from lmmask import lowering

T = 4096
LONG = {"data.length": T + 1, "model.max_len": T, "data.packing": True, "model.n_layers": 2,
        "model.d_model": 256, "model.n_heads": 4, "model.vocab_size": 512}


def _square(text):
  """Shapes with two dimensions of at least T (a T x T attention tensor)."""
  return [s for s in lowering.tensor_shapes(text) if sum(d >= T for d in s) >= 2]


def test_lower_tpu_splash_from_the_command_line(tmp_path):
  out = tmp_path / "step.mlir"
  flags = [f"--config.{k}={v}" for k, v in LONG.items()]
  p = subprocess.run([sys.executable, os.path.join(REPO, "launch.py"), "--mode=lower",
                      "--platform=tpu", f"--config={REPO}/configs/text.py", f"--out={out}",
                      "--config.mesh.cpu_devices=1", *flags],
                     capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
  assert p.returncode == 0, p.stderr[-3000:]
  res = json.loads(p.stdout.strip().splitlines()[-1])
  assert res["platform"] == "tpu" and res["attention"] == "splash"  # auto on TPU
  assert res["kernel_calls"] == 3 * LONG["model.n_layers"]  # forward, dq, dkv per layer
  text = out.read_text()
  assert "\nmodule @" in text and lowering.kernel_calls(text, "splash") == 6
  assert not _square(text), _square(text)[:3]
  assert sum(d >= T for d in res["largest_tensor"]["shape"]) < 2


@pytest.mark.parametrize("platform,attention", [("cuda", "auto"), ("tpu", "einsum")])
def test_lower_triton_linear_and_einsum_quadratic(platform, attention):
  config = load_config("text.py", None, **LONG, **{"model.attention": attention})
  res, text = lowering.lower_train_step(config, platform)
  if attention == "einsum":
    assert res["kernel_calls"] == 0
    assert sum(d == T for d in res["largest_tensor"]["shape"]) == 2  # the T x T logits
    assert _square(text)
  else:
    assert res["attention"] == "triton"  # auto on GPU with packed rows
    assert res["kernel_calls"] == 3 * LONG["model.n_layers"]  # forward, backward prep, backward
    assert not _square(text), _square(text)[:3]


def test_lower_refuses_unknown_vocabulary_and_cudnn_here():
  config = load_config("text.py", None, **{**LONG, "model.vocab_size": -1})
  with pytest.raises(ValueError, match="model.vocab_size.*reads no data"):
    lowering.lower_train_step(config, "tpu")
  config = load_config("text.py", None, **{**LONG, "data.packing": False})
  with pytest.raises(ValueError, match="model.attention: cudnn cannot be lowered"):
    lowering.lower_train_step(config, "cuda")  # auto on GPU without packing: cudnn


def test_write_text_never_replaces_another_file(tmp_path):
  other = tmp_path / "notes.txt"
  other.write_text("keep me")
  with pytest.raises(FileExistsError, match="not a StableHLO module"):
    lowering.write_text(str(other), "module @jit_train_step {}")
  assert other.read_text() == "keep me"
  mine = tmp_path / "step.mlir"
  lowering.write_text(str(mine), "#loc = loc(unknown)\nmodule @a {}")
  lowering.write_text(str(mine), "module @b {}")
  assert mine.read_text() == "module @b {}"
