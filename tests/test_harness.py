"""lmmask's lm-evaluation-harness model (lmmask/eval/harness.py) against lm-eval's own
`hf` backend with transformers, on a tiny random Llama built from a config and the
local tasks in tasks/ (offline)."""
import json
import os
import shutil

import jax
import numpy as np
import pytest
from conftest import REPO

os.environ["HF_DATASETS_OFFLINE"] = "1"  # before `datasets` is imported: no network
os.environ["HF_HUB_OFFLINE"] = "1"

from lmmask import batching  # noqa: E402
from lmmask import checkpoint as ckpt  # noqa: E402
from lmmask import step as step_lib  # noqa: E402
from lmmask import workdir as workdir_lib  # noqa: E402
from lmmask.eval import harness  # noqa: E402
from lmmask.interop import convert as interop  # noqa: E402

lm_eval = pytest.importorskip("lm_eval")  # the eval extra (the test extra includes it)
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
torch.set_num_threads(2)

TASKS = os.path.join(REPO, "tasks")
MC, PPL, GEN = (os.path.join(TASKS, f"{t}.yaml") for t in ("mc", "ppl", "gen"))
MAX_LEN = 40  # short enough that three-shot contexts are truncated from the left


def _tokenizer(out):
  """A byte-level BPE with <s> prepended by its post-processor (as Llama's)."""
  import tokenizers as tk
  texts = []
  for name in ("mc", "ppl", "gen"):
    with open(os.path.join(TASKS, "data", f"{name}.jsonl")) as f:
      texts += [json.dumps(json.loads(line)) for line in f]
  tok = tk.Tokenizer(tk.models.BPE())
  tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tk.decoders.ByteLevel()
  tok.train_from_iterator(texts * 2, tk.trainers.BpeTrainer(
      vocab_size=320, special_tokens=["<s>", "</s>", "<pad>"], show_progress=False,
      initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet()))
  tok.post_processor = tk.processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                        special_tokens=[("<s>", 0)])
  tok.save(os.path.join(out, "tokenizer.json"))
  with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
               "eos_token": "</s>", "pad_token": "<pad>",
               "model_max_length": MAX_LEN}, f)
  return tok.get_vocab_size()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  """(HF directory, imported lmmask workdir) of a tiny random Llama."""
  d = str(tmp_path_factory.mktemp("llama_hf"))
  vocab = _tokenizer(d)
  cfg = transformers.LlamaConfig(
      vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_LEN,
      bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=False)
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(cfg)
  g = torch.Generator().manual_seed(0)
  with torch.no_grad():  # weights large enough for confident, non-trivial predictions
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      p.copy_(1 + 0.3 * noise if "norm" in name else 0.2 * noise)
  model.eval().save_pretrained(d)
  workdir = str(tmp_path_factory.mktemp("llama_lmmask") / "w")
  interop.import_checkpoint(d, workdir)
  return d, workdir


def _evaluate(model, tasks, **kw):
  return harness.evaluate(model, tasks, log_samples=True, **kw)
