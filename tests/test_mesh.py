"""Sharding, accumulation and resharded resume on 8 fake CPU devices (a subprocess: the main
pytest process has 1 device).

Sharded (8 data; 4 data x 2 fsdp) and accumulated (4 micro-batches whose
real-token counts differ ~10x) losses and gradients equal the single-device,
single-batch ones to 1e-5; checkpoints saved on one mesh restore onto others; the
whole training loop runs on 4 x 2 and resumes on 8 x 1.
"""
import pytest


@pytest.fixture(scope="module")
def mesh_result(eight_devices):
  """tests/mesh_worker.py's measurements, in the suite's one 8-device process."""
  return eight_devices.result()


@pytest.mark.slow
def test_sharded_and_accumulated_equal_single_device(mesh_result):
  assert mesh_result["devices"] == 8
  toks = mesh_result["micro_tokens"]
  assert max(toks) > 5 * min(toks)  # skewed micro-batches
  assert set(mesh_result["grads"]) == {"8x1/accum1", "4x2/accum1", "4x2/accum4"}
  for name, r in mesh_result["grads"].items():
    assert r["loss_rel"] < 1e-5, name
    assert r["grad_rel"] < 1e-5, name
  s = mesh_result["step"]  # train_step end to end, 4 x 2, 4 micro-batches, SGD
  assert s["loss_rel"] < 1e-5 and s["grad_norm_rel"] < 1e-5
  assert s["params_rel"] < 1e-5 and s["update_rel"] < 1e-5


@pytest.mark.slow
def test_params_are_sharded_over_fsdp(mesh_result):
  assert mesh_result["fc1_spec"] == "P('fsdp', None)"
  assert mesh_result["fc1_shard_shape"] == [16, 64]  # d_model 32 split over fsdp = 2


@pytest.mark.slow
def test_checkpoint_restores_across_mesh_shapes(mesh_result):
  for name in ("8x1", "2x4", "1dev"):
    r = mesh_result["restore"][name]
    assert r["max_rel"] == 0.0 and r["shardings_match"] and r["meta"] == "4x2", name


@pytest.mark.slow
def test_training_loop_on_mesh_resumes_on_another(mesh_result):
  loop = mesh_result["loop"]
  assert loop["step1"] == 3 and loop["step2"] == 4
  assert loop["loss2"] < loop["loss1"] < 10
