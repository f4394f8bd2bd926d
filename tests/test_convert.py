"""HF checkpoint conversion: logit parity per family, sharding, export round trips, errors, tokenizer."""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from safe_completion.models import convert
from safe_completion.models import transformer

TOKENIZER_DIR = os.path.join(os.path.dirname(__file__), os.pardir, "data", "tokenizer")
TOL = 1e-4
_COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=64, attn_implementation="eager")
# rope theta, scaling, soft-caps and windows chosen small enough to change the logits of a 9-token batch.
FAMILIES = {
    "llama3_rope": (transformers.LlamaConfig, dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    "qwen2_untied": (transformers.Qwen2Config, dict(tie_word_embeddings=False)),
    "qwen2_tied": (transformers.Qwen2Config, dict(tie_word_embeddings=True)),
    "mistral_window": (transformers.MistralConfig, dict(sliding_window=4)),
    "gemma": (transformers.GemmaConfig, dict()),
    "gemma2": (transformers.Gemma2Config, dict(sliding_window=4, query_pre_attn_scalar=32,
                                               attn_logit_softcapping=2.0, final_logit_softcapping=3.0)),
}
_forward = jax.jit(transformer.forward, static_argnums=1)


def _random_hf_model(config_cls, overrides, seed=0):
  """A tiny HF model with weights large enough that every op shows in the logits."""
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config_cls(**_COMMON, **overrides), dtype=torch.float32)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):  # Gemma stores w of (1 + w); the others w itself.
        p.copy_(0.3 * torch.randn_like(p) + (0.0 if "gemma" in config_cls.model_type else 1.0))
      elif "embed_tokens" in name:
        p.normal_(0.0, 1.0)
      else:
        p.normal_(0.0, 0.15)
  return model.eval()


def _batch():
  """Three left-padded rows of lengths 9, 6 and 3."""
  rng = np.random.default_rng(0)
  mask = np.zeros((3, 9), np.int32)
  for row, length in enumerate((9, 6, 3)):
    mask[row, 9 - length:] = 1
  tokens = rng.integers(1, 128, size=mask.shape).astype(np.int32) * mask
  return tokens, mask, np.asarray(transformer.positions_from_mask(mask))


def _hf_logits(model, tokens, mask, positions):
  with torch.no_grad():
    out = model(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask),
                position_ids=torch.tensor(positions, dtype=torch.long))
  return out.logits.float().numpy()


def _max_diff(a, b, mask):
  return float(np.abs(np.asarray(a) - np.asarray(b))[mask.astype(bool)].max())


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
  """One family: its HF model, checkpoint dir, converted params/config and both logits on the batch."""
  config_cls, overrides = FAMILIES[request.param]
  model = _random_hf_model(config_cls, overrides)
  model_dir = tmp_path_factory.mktemp(request.param)
  model.save_pretrained(model_dir, safe_serialization=True)
  params, config = convert.load_hf_checkpoint(model_dir)
  tokens, mask, positions = _batch()
  return dict(name=request.param, model=model, dir=model_dir, params=params, config=config,
              architecture=model.config.architectures[0], hf_logits=_hf_logits(model, tokens, mask, positions),
              logits=np.asarray(_forward(params, config, tokens, positions, mask)))


def test_converted_logits_match_transformers_on_left_padded_batch(family):
  _, mask, _ = _batch()
  assert _max_diff(family["logits"], family["hf_logits"], mask) < TOL
  assert family["logits"].std() > 0.3  # Random weights that are not near zero, so the test can fail.


def test_config_switches_are_read(family):
  config, name = family["config"], family["name"]
  assert config.tie_embeddings == (name in ("qwen2_tied", "gemma", "gemma2"))
  assert config.qkv_bias == name.startswith("qwen2")
  assert config.norm_offset == config.scale_embeddings == name.startswith("gemma")
  assert config.activation == ("gelu_tanh" if name.startswith("gemma") else "silu")
  assert ("lm_head" in family["params"]) != config.tie_embeddings
  assert config.max_seq_len == 64 and config.head_dim == 16 and config.num_kv_heads == 2
  if name == "llama3_rope":
    assert (config.rope_type, config.rope_theta, config.rope_factor, config.rope_original_max_position) == (
        "llama3", 500000.0, 8.0, 16)
  if name == "gemma2":
    assert config.sliding_layers() == (True, False, True) and config.sliding_window == 4
    assert (config.query_pre_attn_scalar, config.attn_logit_softcap, config.final_logit_softcap) == (32, 2.0, 3.0)
  if name == "mistral_window":
    assert config.sliding_layers() == (True, True, True) and config.sliding_window == 4


def test_export_round_trip_loads_in_transformers_with_our_logits(family, tmp_path):
  # Perturbed params, so the export is of weights no HF file held before.
  leaves, treedef = jax.tree.flatten(family["params"])
  rng = np.random.default_rng(1)
  params = jax.tree.unflatten(treedef, [x + 0.05 * rng.standard_normal(x.shape).astype(x.dtype) for x in leaves])
  tokens, mask, positions = _batch()
  ours = np.asarray(_forward(params, family["config"], tokens, positions, mask))
  convert.export_hf(params, family["config"], tmp_path, architecture=family["architecture"])
  model, info = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path, attn_implementation="eager", output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
  assert type(model) is type(family["model"])
  assert _max_diff(_hf_logits(model.eval(), tokens, mask, positions), ours, mask) < TOL
  reloaded, config = convert.load_hf_checkpoint(tmp_path)
  assert config == family["config"]
  jax.tree.map(np.testing.assert_array_equal, reloaded, params)


def test_sharded_checkpoint_loads_like_single_file(tmp_path):
  model = _random_hf_model(*FAMILIES["llama3_rope"])
  model.save_pretrained(tmp_path / "single", safe_serialization=True)
  model.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="50KB")
  assert os.path.exists(tmp_path / "sharded" / convert.INDEX_FILE)
  single, config = convert.load_hf_checkpoint(tmp_path / "single")
  sharded, _ = convert.load_hf_checkpoint(tmp_path / "sharded")
  jax.tree.map(np.testing.assert_array_equal, sharded, single)

  convert.export_hf(sharded, config, tmp_path / "export", architecture="LlamaForCausalLM", max_shard_bytes=50_000)
  index = json.loads((tmp_path / "export" / convert.INDEX_FILE).read_text())
  assert len(set(index["weight_map"].values())) > 3
  assert not os.path.exists(tmp_path / "export" / convert.SINGLE_FILE)
  exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export", attn_implementation="eager")
  for name, tensor in model.state_dict().items():
    torch.testing.assert_close(exported.state_dict()[name], tensor, rtol=0, atol=0, msg=name)


def test_float32_params_export_cast_to_the_requested_dtype(tmp_path):
  model = _random_hf_model(*FAMILIES["llama3_rope"])
  model.save_pretrained(tmp_path / "f32", safe_serialization=True)
  params, config = convert.load_hf_checkpoint(tmp_path / "f32")
  assert params["embedding"].dtype == np.float32
  convert.export_hf(params, config, tmp_path / "bf16", architecture="LlamaForCausalLM", dtype="bfloat16")
  assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
  exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
  assert exported.dtype == torch.bfloat16
  for name, tensor in model.state_dict().items():  # Each weight is its float32 value rounded to bfloat16.
    assert torch.equal(exported.state_dict()[name], tensor.to(torch.bfloat16)), name
  assert os.path.getsize(tmp_path / "bf16" / convert.SINGLE_FILE) < 0.6 * os.path.getsize(
      tmp_path / "f32" / convert.SINGLE_FILE)
  with pytest.raises(convert.CheckpointError, match="export dtype 'int8'"):
    convert.export_hf(params, config, tmp_path / "bad", architecture="LlamaForCausalLM", dtype="int8")


def test_bfloat16_checkpoint_loads_and_exports_in_bfloat16(tmp_path):
  model = _random_hf_model(*FAMILIES["qwen2_untied"]).to(torch.bfloat16)
  model.save_pretrained(tmp_path / "bf16", safe_serialization=True)
  params, config = convert.load_hf_checkpoint(tmp_path / "bf16", param_dtype="bfloat16", dtype="bfloat16")
  q_bias = model.state_dict()["model.layers.1.self_attn.q_proj.bias"].float().numpy()
  assert params["layers"]["attn"]["q_proj"]["bias"].dtype == jax.numpy.bfloat16
  np.testing.assert_array_equal(params["layers"]["attn"]["q_proj"]["bias"][1].astype(np.float32).reshape(-1), q_bias)
  as_f32 = convert.load_hf_params(tmp_path / "bf16", dataclasses.replace(config, param_dtype="float32"))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b.astype(np.float32)), as_f32, params)
  convert.export_hf(params, config, tmp_path / "out", architecture="Qwen2ForCausalLM")
  exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
  assert exported.dtype == torch.bfloat16
  assert torch.equal(exported.state_dict()["lm_head.weight"], model.state_dict()["lm_head.weight"])


# ----------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
  model_dir = tmp_path_factory.mktemp("llama_errors")
  _random_hf_model(*FAMILIES["llama3_rope"]).save_pretrained(model_dir, safe_serialization=True)
  return model_dir


def _edited_copy(src, dst, config_edit=None, tensors_edit=None):
  shutil.copytree(src, dst)
  if config_edit:
    raw = json.loads((dst / "config.json").read_text())
    config_edit(raw)
    (dst / "config.json").write_text(json.dumps(raw))
  if tensors_edit:
    tensors = load_file(dst / convert.SINGLE_FILE)
    tensors_edit(tensors)
    save_file(tensors, dst / convert.SINGLE_FILE, metadata={"format": "pt"})
  return dst


def test_unknown_architecture_is_named(llama_dir, tmp_path):
  bad = _edited_copy(llama_dir, tmp_path / "m", config_edit=lambda c: c.update(architectures=["FalconForCausalLM"]))
  with pytest.raises(convert.CheckpointError, match=r"'FalconForCausalLM'.*supported: LlamaForCausalLM"):
    convert.load_hf_checkpoint(bad)


def test_missing_tensor_is_named(llama_dir, tmp_path):
  bad = _edited_copy(llama_dir, tmp_path / "m", tensors_edit=lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(convert.CheckpointError, match=r"missing tensor\(s\) model\.layers\.1\.mlp\.up_proj\.weight"):
    convert.load_hf_checkpoint(bad)


def test_unexpected_tensor_is_named_but_rotary_buffers_are_ignored(llama_dir, tmp_path):
  def add(tensors):
    tensors["model.layers.0.self_attn.o_proj.bias"] = np.zeros(64, np.float32)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros(8, np.float32)
  bad = _edited_copy(llama_dir, tmp_path / "m", tensors_edit=add)
  with pytest.raises(convert.CheckpointError,
                     match=r"unexpected tensor\(s\) model\.layers\.0\.self_attn\.o_proj\.bias \(architecture"):
    convert.load_hf_checkpoint(bad)


def test_shape_mismatch_is_named(llama_dir, tmp_path):
  def shrink(tensors):
    tensors["model.layers.2.self_attn.k_proj.weight"] = tensors["model.layers.2.self_attn.k_proj.weight"][:16]
  bad = _edited_copy(llama_dir, tmp_path / "m", tensors_edit=shrink)
  with pytest.raises(convert.CheckpointError, match=r"model\.layers\.2\.self_attn\.k_proj\.weight: "
                     r"checkpoint \(16, 64\), config expects \(32, 64\)"):
    convert.load_hf_checkpoint(bad)


def test_missing_weights_file_is_named(llama_dir, tmp_path):
  bad = _edited_copy(llama_dir, tmp_path / "m")
  os.remove(bad / convert.SINGLE_FILE)
  with pytest.raises(FileNotFoundError, match="neither model.safetensors nor model.safetensors.index.json"):
    convert.load_hf_checkpoint(bad)


# ----------------------------------------------------------------------------- config.json layouts

_LLAMA = dict(architectures=["LlamaForCausalLM"], vocab_size=128, hidden_size=64, intermediate_size=96,
              num_hidden_layers=2, num_attention_heads=4)


def test_old_rope_layout_and_family_defaults():
  config = convert.config_from_hf_dict({**_LLAMA, "rope_theta": 1e6, "rope_scaling": {"type": "linear", "factor": 2.0}})
  assert (config.rope_type, config.rope_theta, config.rope_factor) == ("linear", 1e6, 2.0)
  assert (config.head_dim, config.num_kv_heads, config.tie_embeddings, config.max_seq_len) == (16, 4, False, 2048)
  gemma = convert.config_from_hf_dict({**_LLAMA, "architectures": ["GemmaForCausalLM"], "hidden_act": "gelu"})
  assert (gemma.tie_embeddings, gemma.activation, gemma.head_dim) == (True, "gelu_tanh", 256)
  assert convert.config_from_hf_dict(_LLAMA, dtype="bfloat16", remat_policy="full").dtype == "bfloat16"


def test_explicit_nulls_mean_off_not_the_family_default():
  mistral = convert.config_from_hf_dict({**_LLAMA, "architectures": ["MistralForCausalLM"], "sliding_window": None})
  assert mistral.sliding_window is None
  assert convert.config_from_hf_dict({**_LLAMA, "architectures": ["MistralForCausalLM"]}).sliding_window == 4096
  gemma2 = convert.config_from_hf_dict({**_LLAMA, "architectures": ["Gemma2ForCausalLM"], "head_dim": 16,
                                        "final_logit_softcapping": None, "query_pre_attn_scalar": None})
  assert (gemma2.final_logit_softcap, gemma2.attn_logit_softcap, gemma2.query_pre_attn_scalar) == (None, 50.0, 16)
  old_gemma2 = convert.config_from_hf_dict({**_LLAMA, "architectures": ["Gemma2ForCausalLM"], "num_hidden_layers": 4,
                                            "sliding_window": 8})  # No layer_types: HF alternates.
  assert old_gemma2.sliding_layers() == (True, False, True, False) and old_gemma2.sliding_window == 8


@pytest.mark.parametrize("edit, match", [
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}), "unsupported rope type 'yarn'"),
    (dict(architectures=["Qwen2ForCausalLM"], use_sliding_window=True), r"\['use_sliding_window'\]"),
    (dict(attention_bias=True), r"\['attention_bias'\] for LlamaForCausalLM"),
    (dict(hidden_act="relu2"), "unsupported activation 'relu2'"),
    (dict(architectures=["Gemma2ForCausalLM"], num_hidden_layers=3,
          layer_types=["full_attention", "sliding_attention", "sliding_attention"]), "repeating"),
    (dict(rope_parameters={"rope_type": "llama3", "factor": 8.0}), "llama3 rope scaling lacks 'low_freq_factor'"),
    (dict(vocab_size=None), r"missing required field\(s\) \['vocab_size'\]"),
])
def test_unsupported_settings_are_errors(edit, match):
  with pytest.raises(convert.CheckpointError, match=match):
    convert.config_from_hf_dict({**_LLAMA, **edit})


def test_export_refuses_an_architecture_that_computes_something_else(tmp_path):
  config = convert.config_from_hf_dict({**_LLAMA, "architectures": ["Qwen2ForCausalLM"]})
  params = transformer.init_params(config, jax.random.key(0))
  with pytest.raises(convert.CheckpointError, match=r"LlamaForCausalLM cannot express.*qkv_bias=True"):
    convert.export_hf(params, config, tmp_path, architecture="LlamaForCausalLM")
  params["layers"]["mlp"]["up_proj"]["kernel"] = params["layers"]["mlp"]["up_proj"]["kernel"][:, :, :80]
  with pytest.raises(convert.CheckpointError, match=r"layers/mlp/up_proj/kernel has shape \(2, 64, 80\), config "
                     r"expects \(2, 64, 96\)"):
    convert.export_hf(params, config, tmp_path, architecture="Qwen2ForCausalLM")
  with pytest.raises(convert.CheckpointError, match="tokenizer has 4096 tokens, more than vocab_size=128"):
    convert.export_hf(params, config, tmp_path, architecture="Qwen2ForCausalLM",
                      tokenizer=convert.load_tokenizer(TOKENIZER_DIR))
  assert not os.listdir(tmp_path)


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_with_chat_template_loads_and_is_exported(tmp_path):
  messages = [{"role": "user", "content": "How do I boil water?"}, {"role": "assistant", "content": "Heat it."}]
  tokenizer = convert.load_tokenizer(TOKENIZER_DIR)
  text = tokenizer.apply_chat_template(messages, tokenize=False)
  assert "How do I boil water?" in text and text != "How do I boil water?Heat it."
  config = convert.config_from_hf_dict({**_LLAMA, "vocab_size": len(tokenizer)})
  params = transformer.init_params(config, jax.random.key(0))
  convert.export_hf(params, config, tmp_path, architecture="LlamaForCausalLM", tokenizer=tokenizer)
  reloaded = convert.load_tokenizer(tmp_path)
  assert reloaded.apply_chat_template(messages, tokenize=False) == text
  assert reloaded.apply_chat_template(messages) == tokenizer.apply_chat_template(messages)
  hf_config = json.loads((tmp_path / "config.json").read_text())
  assert hf_config["eos_token_id"] == tokenizer.eos_token_id and hf_config["pad_token_id"] == tokenizer.pad_token_id
