"""The corpus registry: the same batches, bit for bit, as the pre-registry loader
(hashes recorded by tests/fixtures/pinned/record_batches.py), legacy workdirs and
datasets read back, and the DataSource fields every corpus fills."""
import hashlib
import json
import os
import shutil
import warnings

import numpy as np
import pytest
from ml_collections import ConfigDict

from lmmask.data import registry, shards, tokenizer
from lmmask.data.source import DataSource

HERE = os.path.dirname(os.path.abspath(__file__))
PINNED = os.path.join(HERE, "fixtures", "pinned")
LEGACY = os.path.join(HERE, "fixtures", "legacy")
LEGACY_PREFIX = "/tmp/fx/legacy"  # the absolute root the legacy fixtures were written under
FIELDS = ("inputs", "targets", "loss_mask", "key_mask", "positions", "segment_ids")
TRAIN_STEPS = (0, 1, 2, 7, 40)


def batch_hash(b) -> str:
  """The hash record_batches.py wrote (field names, dtypes, shapes and bytes)."""
  h = hashlib.sha256()
  for f in FIELDS:
    a = np.ascontiguousarray(np.asarray(getattr(b, f)))
    h.update(f"{f}:{a.dtype.str}:{a.shape};".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def upgrade(cfg: dict) -> dict:
  """What the config upgrade does for configs saved before data.packing named the
  text corpus's packing too."""
  d = cfg["data"]
  if "pack" in d:
    d["packing"] = d.pop("pack")
  return cfg


@pytest.fixture(scope="module")
def legacy(tmp_path_factory):
  """A copy of the legacy fixtures with their absolute paths rewritten to the copy."""
  root = str(tmp_path_factory.mktemp("legacy") / "legacy")
  shutil.copytree(LEGACY, root)
  for dirpath, _, files in os.walk(root):
    for name in files:
      if name.endswith(".json"):
        p = os.path.join(dirpath, name)
        with open(p) as f:
          text = f.read()
        if LEGACY_PREFIX in text:
          with open(p, "w") as f:
            f.write(text.replace(LEGACY_PREFIX, root))
  return root


def _json(path):
  with open(path) as f:
    return json.load(f)


def pinned_cases(tmp, legacy_root):
  verbs = _json(os.path.join(PINNED, "verbs_config.json"))
  text = upgrade(_json(os.path.join(PINNED, "text_config.json")))
  packed = json.loads(json.dumps(verbs))
  packed["data"]["packing"] = True
  unpacked_text = json.loads(json.dumps(text))
  unpacked_text["data"]["packing"] = False
  out = {"verbs": (verbs, None), "verbs_packed": (packed, None),
         "text": (text, os.path.join(tmp, "text")),
         "text_unpacked": (unpacked_text, os.path.join(tmp, "text_unpacked")),
         "legacy_text": (upgrade(_json(os.path.join(legacy_root, "text", "config.json"))),
                         os.path.join(legacy_root, "text"))}
  for name in ("chat_sft", "chat_base"):
    out[name] = (_json(os.path.join(legacy_root, name, "config.json")), None)
  return out


def test_registry_batches_are_bit_identical_to_the_recorded_ones(tmp_path, legacy):
  want = _json(os.path.join(PINNED, "batch_hashes.json"))
  cases = pinned_cases(str(tmp_path), legacy)
  assert set(cases) == set(want)
  for name, (cfg, workdir) in cases.items():
    with warnings.catch_warnings():  # the tiny chat val split has a low mask density
      warnings.simplefilter("ignore", UserWarning)
      data = registry.load(ConfigDict(cfg), workdir)
    w = want[name]
    assert (data.vocab_size, data.pad_id) == (w["vocab_size"], w["pad_id"]), name
    got_train = {str(s): batch_hash(data.train_batch(s)) for s in TRAIN_STEPS}
    assert got_train == w["train"], name
    got_eval = {k: [batch_hash(b) for b in v] for k, v in data.eval_sets().items()}
    assert got_eval == w["eval"], name
    if "tokenizer_sha256" in w:  # the text run's trained tokenizer.json, byte for byte
      assert tokenizer.sha256_file(os.path.join(workdir, "tokenizer.json")) == \
          w["tokenizer_sha256"], name
