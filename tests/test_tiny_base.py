"""The shipped tiny base policy: an HF checkpoint that transformers and our decoder agree on, built from
text that is neither arm's SFT data nor the grader held-out set."""

import numpy as np
import torch
import transformers

from configs import experiment as experiment_config
from safe_completion.data import labeled
from safe_completion.data import records
from safe_completion.models import convert
from safe_completion.models import transformer
from scripts import pretrain_tiny_base


def test_shipped_base_loads_in_transformers_with_our_logits():
  base_dir = experiment_config.TINY_BASE_DIR
  tokenizer = transformers.AutoTokenizer.from_pretrained(base_dir, trust_remote_code=False)
  params, model_config = convert.load_hf_checkpoint(base_dir)
  for field, value in experiment_config.TINY_POLICY.items():
    assert getattr(model_config, field) == value, field
  tokens = np.asarray([tokenizer("How do I remove a stripped screw?")["input_ids"]], np.int32)
  ours = transformer.forward(params, model_config, tokens, np.arange(tokens.shape[1])[None], np.ones_like(tokens))
  hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32,
                                                         trust_remote_code=False).eval()
  with torch.no_grad():
    theirs = hf(torch.from_numpy(tokens).long()).logits.numpy()
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4)


def test_base_corpus_is_neither_sft_data_nor_heldout():
  rows = pretrain_tiny_base.corpus_rows()
  assert len(rows) > 500 and all(r["cot"] == "" for r in rows)
  answers = {r["answer"] for r in rows}
  demos, _ = records.load_demonstrations(records.DEFAULT_DATA_DIR / "demonstrations")
  assert not answers & {d.answer for d in demos}
  heldout, _ = labeled.load_labeled(labeled.HELDOUT_DIR)
  assert not {r["messages"][0]["content"] for r in rows} & {r.prompt for r in heldout}
  # Only stock one-liners ("I can't help with this request.") may coincide with held-out responses.
  assert all(len(text) < 60 for text in answers & {r.response for r in heldout})
  train, _ = labeled.load_labeled(labeled.TRAIN_DIR)
  unsafe = {r.response for r in train if r.unsafe("safe_completion") or r.label == "manipulation"}
  assert not answers & unsafe
