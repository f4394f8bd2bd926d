"""The Flax BERT encoder equals transformers' BertModel on the shipped MiniLM weights."""

import os
import shutil

import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from safe_completion.models import encoder

TEXTS = ["A short one.",
         "How should I store cleaning products safely at home?",
         "A much longer text, with several clauses, so that the padded batch has real padding "
         "in the other two rows and the attention mask matters for every layer of the encoder."]


@pytest.fixture(scope="module")
def loaded():
  return encoder.load_bert(encoder.DEFAULT_ENCODER_DIR)


@pytest.fixture(scope="module")
def batch():
  tokenizer = transformers.AutoTokenizer.from_pretrained(encoder.DEFAULT_ENCODER_DIR)
  # A pair for the last row, so token type 1 is exercised too.
  tokens = tokenizer(TEXTS, ["", "", "and a second segment"], padding=True, return_tensors="np")
  assert len(set(tokens["attention_mask"].sum(axis=1))) == 3
  return tokens


def test_hidden_states_and_pooled_embeddings_match_transformers(loaded, batch):
  params, config = loaded
  hidden = np.asarray(encoder.encode(params, config, batch["input_ids"], batch["attention_mask"],
                                     batch["token_type_ids"]))
  pooled = np.asarray(encoder.mean_pool(hidden, batch["attention_mask"]))
  model = transformers.BertModel.from_pretrained(encoder.DEFAULT_ENCODER_DIR, attn_implementation="eager").eval()
  with torch.no_grad():
    ref = model(**{k: torch.as_tensor(v) for k, v in batch.items()}).last_hidden_state.numpy()
  mask = batch["attention_mask"].astype(bool)
  np.testing.assert_allclose(hidden[mask], ref[mask], atol=1e-4)
  ref_pooled = (ref * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
  np.testing.assert_allclose(pooled, ref_pooled, atol=1e-4)
  assert hidden.shape == ref.shape == (3, mask.shape[1], config.hidden_size)


def test_mean_pool_ignores_padding():
  hidden = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
  pooled = encoder.mean_pool(hidden, np.array([[1, 1, 0]]))
  np.testing.assert_allclose(pooled, [[2.0, 3.0, 4.0, 5.0]])


def _copy_model_dir(tmp_path, edit):
  model_dir = tmp_path / "model"
  model_dir.mkdir()
  shutil.copy(os.path.join(encoder.DEFAULT_ENCODER_DIR, "config.json"), model_dir)
  tensors = safetensors.numpy.load_file(os.path.join(encoder.DEFAULT_ENCODER_DIR, encoder.WEIGHTS_FILE))
  edit(tensors)
  safetensors.numpy.save_file(tensors, str(model_dir / encoder.WEIGHTS_FILE))
  return str(model_dir)


def test_missing_tensor_is_a_clear_error(tmp_path):
  model_dir = _copy_model_dir(tmp_path, lambda t: t.pop("encoder.layer.3.attention.self.key.weight"))
  with pytest.raises(ValueError, match=r"missing tensors \['encoder\.layer\.3\.attention\.self\.key\.weight'\]"):
    encoder.load_bert(model_dir)


def test_extra_and_misshapen_tensors_are_clear_errors(tmp_path):
  model_dir = _copy_model_dir(tmp_path, lambda t: t.update(extra_head=np.zeros(3, np.float32)))
  with pytest.raises(ValueError, match=r"unexpected tensors \['extra_head'\]"):
    encoder.load_bert(model_dir)
  (tmp_path / "b").mkdir()
  name = "encoder.layer.0.intermediate.dense.weight"
  model_dir = _copy_model_dir(tmp_path / "b", lambda t: t.update({name: t[name][:10]}))
  with pytest.raises(ValueError, match=name.replace(".", r"\.") + ".*expected"):
    encoder.load_bert(model_dir)
