"""The config owner: every default in one place, reachable from every config file."""
import json
import os
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from lmmask import config as config_lib
from lmmask import workdir as workdir_lib
from lmmask.model import DecoderConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = ["verbs.py", "verbs.py:tiny", "text.py", "text.py:tiny,modern", "chat.py:pretrain",
                "chat.py:sft,tiny"]


def _parse(spec, overrides=()):
  """What launch.py does with --config=<spec> and --config.<field>=... flags."""
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True)
  argv = ["prog", f"--config={os.path.join(REPO, 'configs', spec)}", *overrides]
  saved, sys.argv = sys.argv, argv  # config_flags reads the overrides from sys.argv
  try:
    fv(argv)
  finally:
    sys.argv = saved
  return fv.config


def _other(key, value):
  """A valid-typed value different from `value`, as a command-line string and parsed."""
  if isinstance(value, bool):
    return str(not value).lower(), not value
  if isinstance(value, int):
    return str(value + 3), value + 3
  if isinstance(value, float):
    return repr(value + 0.25), value + 0.25
  if value is None:  # placeholders: typed but unset
    typed = {"distributed.coordinator_address": ("127.0.0.1:5", "127.0.0.1:5"),
             "distributed.num_processes": ("2", 2), "distributed.process_id": ("1", 1)}
    return typed[key]
  return "x" + value.replace("\n", ""), "x" + value.replace("\n", "")


@pytest.mark.parametrize("spec", CONFIG_FILES)
def test_every_default_field_is_overridable_in_every_config(spec):
  fields = config_lib.flatten(config_lib.defaults())
  base = config_lib.flatten(_parse(spec))
  assert set(base) == set(fields), "a config file must not add or drop fields"
  args, want = [], {}
  for key in fields:
    text, parsed = _other(key, base[key])
    args.append(f"--config.{key}={text}")
    want[key] = parsed
  got = config_lib.flatten(_parse(spec, args))
  wrong = {k: (got[k], v) for k, v in want.items() if got[k] != v}
  assert not wrong


def test_empty_string_override_means_empty():
  assert _parse("text.py", ["--config.data.doc_separator="]).data.doc_separator == ""


def test_unknown_override_is_refused():
  with pytest.raises(Exception, match="nonexistent"):
    _parse("verbs.py", ["--config.data.nonexistent=1"])


def test_configs_set_only_what_differs_and_documented_grammar():
  c = config_lib.load_file(os.path.join(REPO, "configs/chat.py:pretrain,tiny"))
  assert c.data.corpus == "shards" and c.model.d_model == 32
  assert config_lib.load_file(os.path.join(REPO, "configs/verbs.py")) == config_lib.defaults()
  with pytest.raises(ValueError, match="unknown variant 'tinny'"):
    config_lib.load_file(os.path.join(REPO, "configs/verbs.py:tinny"))
  with pytest.raises(ValueError, match="causal=.maybe"):
    config_lib.load_file(os.path.join(REPO, "configs/verbs.py:causal=maybe"))


def test_parse_arg_names_and_values():
  v = {"tiny": None, "seed": int, "mask": config_lib.parse_bool}
  assert config_lib.parse_arg("tiny,seed=3,mask=false", v, "x") == {
      "tiny": True, "seed": 3, "mask": False}
  assert config_lib.parse_arg("", v, "x") == {}
  with pytest.raises(ValueError, match="takes no value"):
    config_lib.parse_arg("tiny=1", v, "x")
  with pytest.raises(ValueError, match="needs a value"):
    config_lib.parse_arg("seed", v, "x")


@pytest.mark.parametrize("name", ["verbs", "text", "chat_sft", "chat_base"])
def test_legacy_config_upgrades_to_the_same_experiment(name):
  """A config.json written before the redesign is the same experiment as today's
  config with the same settings: a resume is not refused."""
  with open(os.path.join(REPO, "tests/fixtures/legacy", name, "config.json")) as f:
    saved = json.load(f)
  up = config_lib.upgrade(saved)
  assert set(config_lib.flatten(up)) == set(config_lib.flatten(config_lib.defaults()))
  assert config_lib.identity_diff(saved, config_lib.to_dict(up)) == []
  if name == "text":
    assert up.data.packing is True and "pack" not in up.data  # the renamed knob


def test_identity_diff_names_a_changed_field():
  c = config_lib.defaults()
  d = config_lib.defaults()
  d.model.rope_base = 500.0
  d.train.steps = 7  # resumable
  assert [k for k, _, _ in config_lib.identity_diff(c.to_dict(), d.to_dict())] == [
      "model.rope_base"]


def test_arch_fields_are_decoder_fields_minus_training_knobs():
  import dataclasses
  names = {f.name for f in dataclasses.fields(DecoderConfig)}
  assert set(config_lib.ARCH_FIELDS) == (names - set(config_lib.TRAINING_KNOBS)) | {"causal"}
  assert set(config_lib.TRAINING_KNOBS) <= names


class _Data:
  def __init__(self, vocab_size, sha="abc"):
    self.vocab_size = vocab_size
    self.identity = {"tokenizer_sha256": sha}


def _base_workdir(tmp_path, config, vocab_size=40):
  base = tmp_path / "base"
  base.mkdir()
  workdir_lib.atomic_write_json(str(base / workdir_lib.CONFIG_FILE), config_lib.to_dict(config))
  workdir_lib.atomic_write_json(str(base / workdir_lib.MODEL_FILE), workdir_lib.model_record(config, _Data(vocab_size)))
  return str(base)


def _changed(value):
  return {bool: lambda v: not v, int: lambda v: v * 2, float: lambda v: v * 2,
          str: lambda v: {"learned": "rope", "layernorm": "rmsnorm", "gelu": "swiglu"}[v]
          }[type(value)](value)


@pytest.mark.parametrize("field", [f for f in config_lib.ARCH_FIELDS if f != "vocab_size"])
def test_init_from_refuses_every_architecture_field(tmp_path, field):
  base_cfg = config_lib.defaults()
  base_cfg.model.n_kv_heads = 2
  base = _base_workdir(tmp_path, base_cfg)
  new = config_lib.defaults()
  new.model.n_kv_heads = 2
  new.train.init_from = base
  new.model[field] = _changed(new.model[field])
  with pytest.raises(ValueError, match=f"model.{field}"):
    workdir_lib.check_init_from(new, str(tmp_path / "new"), _Data(40))


def test_init_from_accepts_training_knobs_and_checks_vocab_and_tokenizer(tmp_path):
  base_cfg = config_lib.defaults()
  base_cfg.model.dropout = 0.1
  base = _base_workdir(tmp_path, base_cfg)
  new = config_lib.defaults()
  new.train.init_from = base
  new.model.dropout = 0.0  # the chat pre-train (0.1) -> SFT (0.0) flow
  new.model.remat = True
  new.model.attention = "xla"
  assert workdir_lib.check_init_from(new, str(tmp_path / "new"), _Data(40)).model.dropout == 0.1
  with pytest.raises(ValueError, match="vocab_size"):
    workdir_lib.check_init_from(new, str(tmp_path / "new"), _Data(41))
  with pytest.raises(ValueError, match="tokenizer"):
    workdir_lib.check_init_from(new, str(tmp_path / "new"), _Data(40, sha="other"))


def test_packing_refuses_an_attention_path_without_segment_ids(monkeypatch):
  """A fused kernel that cannot apply segment ids must never run packed rows (it would
  let packed documents attend to each other); every current path can."""
  c = config_lib.apply_overrides(config_lib.load_file(os.path.join(REPO, "configs", "verbs.py") + ":tiny"),
                                 {"data.packing": True, "model.attention": "xla"})
  config_lib.validate(c)
  monkeypatch.setattr(config_lib, "HONOURS_SEGMENTS", ("einsum",))
  with pytest.raises(ValueError, match="model.attention.*segment ids"):
    config_lib.validate(c)


def test_dropout_comes_from_the_config_and_refuses_remat_and_scan():
  c = config_lib.load_file(os.path.join(REPO, "configs", "verbs.py") + ":tiny")
  assert config_lib.decoder_config(c, 40).dropout == c.model.dropout > 0
  with pytest.raises(TypeError, match="dropout"):
    DecoderConfig(vocab_size=40)  # no default of its own
  for field in ("remat", "scan_layers"):
    bad = config_lib.apply_overrides(c, {f"model.{field}": True})
    with pytest.raises(ValueError, match=rf"config.model.{field}: .*model.dropout=0"):
      config_lib.validate(bad)
    config_lib.validate(config_lib.apply_overrides(bad, {"model.dropout": 0.0}))


def test_text_steps_variant_moves_the_schedule_horizon():
  for arg, steps in (("steps=300", 300), ("tiny,steps=12", 12)):
    c = config_lib.load_file(os.path.join(REPO, "configs", "text.py") + ":" + arg)
    assert c.train.steps == c.optim.decay_steps == steps
  c = config_lib.load_file(os.path.join(REPO, "configs", "text.py"))
  assert (c.train.steps, c.optim.decay_steps) == (400, 400)
