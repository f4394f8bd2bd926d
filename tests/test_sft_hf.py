"""SFT from a Hugging Face checkpoint, exported back to HF: transformers loads the result and agrees."""

import os

import numpy as np
import torch
import transformers

from safe_completion import checkpoint
from safe_completion import sft
from safe_completion.data import sft_data
from safe_completion.models import transformer
from tests.test_sft import micro_config


def write_tiny_llama(hf_dir) -> transformers.PreTrainedTokenizerBase:
  """Saves a random 2-layer Llama (seed 0, untied embeddings) and the shipped tokenizer in `hf_dir`; returns it."""
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(sft_data.TOKENIZER_DIR))
  hf_config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=512, tie_word_embeddings=False)
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(hf_config).save_pretrained(hf_dir)
  tokenizer.save_pretrained(hf_dir)
  return tokenizer


def test_sft_starts_from_an_hf_checkpoint_and_exports_one_transformers_loads(tmp_path):
  hf_dir, export_dir = tmp_path / "hf", tmp_path / "export"
  tokenizer = write_tiny_llama(hf_dir)

  config = micro_config(num_steps=3, **{"init.hf_dir": str(hf_dir), "export_hf_dir": str(export_dir),
                                        "export_architecture": "LlamaForCausalLM"})
  final = sft.train(config, str(tmp_path / "sft"))
  assert np.isfinite(final["loss"])

  params, model_config, _ = checkpoint.load_model(str(tmp_path / "sft"))
  assert model_config.hidden_size == 64 and not model_config.tie_embeddings
  exported = transformers.AutoModelForCausalLM.from_pretrained(export_dir, torch_dtype=torch.float32).eval()
  tokens = np.asarray([tokenizer("how do I stop a runaway process?")["input_ids"]], np.int32)
  positions = np.arange(tokens.shape[1])[None]
  ours = transformer.forward(params, model_config, tokens, positions, np.ones_like(tokens))
  with torch.no_grad():
    theirs = exported(torch.from_numpy(tokens).long()).logits.numpy()
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4)
  initial = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
  with torch.no_grad():
    assert np.abs(initial(torch.from_numpy(tokens).long()).logits.numpy() - theirs).max() > 1e-3  # Training moved it.
  assert os.path.exists(export_dir / "tokenizer_config.json")
