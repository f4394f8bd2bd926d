"""The pod path on a CPU: `configs/experiment.py:llama3_8b,runlocal` end to end on 8 fake devices.

One `python -m safe_completion.main` run (XLA_FLAGS set before jax is imported) with everything a pod run has
from outside: a Llama base as an HF directory built with `transformers`; the teacher, our own `serve` of an HF
checkpoint on loopback; LLM-judge roles on a scripted judge server (valid verdicts, malformed bodies, slow
replies); the eval grader on another model (a scripted gpt-oss-safeguard). The tests read what the stages
recorded and fail if any stage took the tiny path (random init, float32, one device, no accumulation, learned
graders); the exported arms load in `transformers` and give our logits.

The teacher checkpoint is built, not trained, to write one well-formed teacher output: its layers add nothing
to the residual stream (zero output projections), so each next token is a function of the current one, and
the embedding and unembedding map every token outside the output to its first token and each of its tokens
to the next (the tags are added tokens, so no token repeats).
"""

import asyncio
import dataclasses
import json
import os
import subprocess
import sys

import fastapi
import httpx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from safe_completion import checkpoint
from safe_completion.data import sft_data
from safe_completion.models import transformer
from tests import scripted_classifiers
from tests import scripted_server

TEACHER_TAGS = ["<reasoning>", "</reasoning>", "<mode>", "</mode>", "<answer>", "</answer>"]
TEACHER_TEXT = ("<reasoning>The spec applies</reasoning><mode>refusal</mode>"
                "<answer>I can't help with that but here are safety resources</answer>")
TEACHER_MODEL = "served-teacher"
JUDGE, SAFEGUARD = scripted_server.ScriptedJudge.model_id, scripted_classifiers.SAFEGUARD
SLOW_REQUESTS, SLOW_S = 3, 1.0  # The judge's first replies come late.
MALFORMED_REQUESTS = 2  # Then some are 200s with a cut-off JSON body.
# The teacher's spec-augmented prompts are up to ~2240 tokens; `serve` answers one prompt per request, so one row.
TEACHER_PROMPT_LEN = 2304
ARMS = ("refusal", "safe_completion")
BASE_LAYERS = 3


def build_base(out_dir):
  """A random tiny Llama, saved as transformers saves one, with the shipped tokenizer.

  Three layers, where the runlocal model section has two: the trained shape shows which one SFT started from.
  """
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(sft_data.TOKENIZER_DIR))
  hf_config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=BASE_LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=512, tie_word_embeddings=False)
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(hf_config).save_pretrained(out_dir)
  tokenizer.save_pretrained(out_dir)


def build_teacher(out_dir, hidden: int = 64, margin: float = 10.0):
  """An HF Llama whose greedy and temperature samples are TEACHER_TEXT then EOS, whatever the prompt."""
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(sft_data.TOKENIZER_DIR))
  tokenizer.add_tokens(TEACHER_TAGS)
  chain = tokenizer(TEACHER_TEXT, add_special_tokens=False)["input_ids"]
  assert len(set(chain)) == len(chain) and len(chain) + 1 < hidden, "each output token must be distinct"
  vocab = (len(tokenizer) + 63) // 64 * 64
  hf_config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=4096, tie_word_embeddings=False)
  model = transformers.LlamaForCausalLM(hf_config)
  basis = np.eye(hidden, dtype=np.float32)
  embedding = np.tile(basis[len(chain)], (vocab, 1))  # Every other token: one shared direction.
  unembedding = np.zeros((vocab, hidden), np.float32)
  unembedding[chain[0]] = margin * basis[len(chain)]  # ... whose next token is the output's first.
  for i, token in enumerate(chain):
    embedding[token] = basis[i]
    unembedding[chain[i + 1] if i + 1 < len(chain) else tokenizer.eos_token_id] = margin * basis[i]
  state = model.state_dict()
  state["model.embed_tokens.weight"], state["lm_head.weight"] = torch.from_numpy(embedding), torch.from_numpy(unembedding)
  for name in state:
    if name.endswith(("o_proj.weight", "down_proj.weight")):
      state[name] = torch.zeros_like(state[name])
  model.load_state_dict(state)
  model.save_pretrained(out_dir)
  tokenizer.save_pretrained(out_dir)


def judge_app() -> fastapi.FastAPI:
  """The scripted judge behind the real `serve` app, its first SLOW_REQUESTS chat replies SLOW_S late."""
  app = scripted_server.build_app("judge")
  seen = {"chat": 0}

  @app.middleware("http")
  async def slow_start(request: fastapi.Request, call_next):
    if request.url.path == "/v1/chat/completions":
      seen["chat"] += 1
      if seen["chat"] <= SLOW_REQUESTS:
        await asyncio.sleep(SLOW_S)
    return await call_next(request)

  return app


def read_json(path):
  with open(path) as f:
    return json.load(f)


def read_rows(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def endpoints(tmp_path_factory):
  """The HF base and, on loopback, the served teacher, the judge and the classifier; shared by the presets."""
  root = tmp_path_factory.mktemp("runlocal")
  base_dir, teacher_dir = root / "base", root / "teacher"
  build_base(base_dir)
  build_teacher(teacher_dir)
  port = scripted_server.free_port()
  teacher_args = ["safe_completion.backends.serve", f"--model_dir={teacher_dir}", f"--model_id={TEACHER_MODEL}",
                  "--allow_no_auth", f"--port={port}", f"--max_prompt_len={TEACHER_PROMPT_LEN}",
                  "--batch_size=1", "--chunk_tokens=32"]
  with (scripted_server.running_server(teacher_args, port) as teacher_url,
        scripted_server.in_thread(judge_app()) as judge_url,
        scripted_server.in_thread(scripted_classifiers.build_app()) as classifier_url):
    yield dict(root=root, base_dir=base_dir, teacher_url=teacher_url, judge_url=judge_url,
               classifier_url=classifier_url)


# Presets run, with the master weights' dtype each trains. The LoRA variant ("llama3_8b,lora,runlocal":
# "bfloat16") passes these tests too, in another ~70 s: over this file's CI budget, so it is not run by default.
PRESETS = {"llama3_8b,runlocal": "float32"}


@pytest.fixture(scope="module", params=sorted(PRESETS))
def pod_run(request, endpoints):
  """One runlocal experiment; (preset, workdir, base dir, judge and classifier request counts)."""
  preset, urls = request.param, endpoints
  workdir = urls["root"] / preset.replace(",", "_")
  judge_url, classifier_url = scripted_server.reset(urls["judge_url"]), urls["classifier_url"]
  classifier_seen = len(httpx.get(classifier_url.removesuffix("/v1") + "/requests", timeout=5).json())
  scripted_server.inject(judge_url, "not_json", MALFORMED_REQUESTS)
  command = [sys.executable, "-m", "safe_completion.main", f"--config=configs/experiment.py:{preset}",
             f"--workdir={workdir}", f"--jax_cache_dir={urls['root'] / 'jax_cache'}",
             f"--config.sft.init.hf_dir={urls['base_dir']}", f"--config.teacher.endpoint.base_url={urls['teacher_url']}",
             f"--config.teacher.endpoint.model={TEACHER_MODEL}"]
  for role in ("datagen.judge", "rl.grader", "eval.grader.helpfulness"):
    command += [f"--config.{role}.endpoint.base_url={judge_url}", f"--config.{role}.endpoint.model={JUDGE}"]
  command += ["--config.eval.grader.kind=gpt_oss_safeguard", "--config.eval.grader.helpfulness.kind=llm_judge",
              f"--config.eval.grader.endpoint.base_url={classifier_url}",
              f"--config.eval.grader.endpoint.model={SAFEGUARD}"]
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  result = subprocess.run(command, cwd=scripted_server.REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
  assert result.returncode == 0, result.stderr[-6000:]
  judge_calls = scripted_server.stats(judge_url)["calls"]
  classifier_requests = httpx.get(classifier_url.removesuffix("/v1") + "/requests", timeout=5).json()[classifier_seen:]
  return preset, workdir, urls["base_dir"], judge_calls, classifier_requests


def _mesh_shapes(checkpoint_dir):
  """The mesh shape of every array the orbax checkpoint saved (as the stage sharded it)."""
  [step] = sorted(os.listdir(checkpoint_dir), key=int)[-1:]
  shardings = read_json(os.path.join(checkpoint_dir, step, "state", "_sharding"))
  return {tuple(json.loads(s)["shape"]) for s in shardings.values()}


def test_every_stage_takes_the_pod_path(pod_run):
  preset, workdir, base_dir, judge_calls, classifier_requests = pod_run
  datagen_stats = read_json(workdir / "datagen" / "stats.json")
  for arm in ARMS:
    records = read_rows(workdir / "datagen" / arm / "records-00000.jsonl")
    assert records and {r["teacher"] for r in records} == {TEACHER_MODEL}  # The served teacher wrote them.
    assert {r["grade"]["grader"] for r in records} == {"llm_judge"}
    assert datagen_stats[arm]["totals"]["kept"] == len(records)
    run_dir = workdir / arm / "seed_0"
    sft_config = read_json(run_dir / "sft" / "config.json")
    assert sft_config["init"]["hf_dir"] == str(base_dir) and sft_config["optimizer"]["grad_accum_steps"] == 2
    model = read_json(run_dir / "sft" / "model_config.json")  # The HF base's shape, pod numerics.
    assert (model["num_layers"], model["dtype"], model["param_dtype"]) == (BASE_LAYERS, "bfloat16", PRESETS[preset])
    assert model["remat_policy"] == read_json(run_dir / "rl" / "config.json")["model"]["remat_policy"] != "none"
    for stage in ("sft", "rl"):
      assert _mesh_shapes(run_dir / stage / "checkpoints") == {(1, 8, 1)}  # data=1, fsdp=8, tensor=1.
      # LoRA runs record their adapters' rank and base; full fine-tuning none.
      lora_path = run_dir / stage / checkpoint.LORA_FILE
      assert lora_path.exists() == ("lora" in preset)
    rl_config = read_json(run_dir / "rl" / "config.json")
    assert rl_config["grader"]["kind"] == "llm_judge" and rl_config["grader"]["endpoint"]["model"] == JUDGE
    completions = read_rows(run_dir / "eval" / "completions.jsonl")
    assert completions and all(c["grade"]["valid"] for c in completions)
    assert {c["grade"]["grader"] for c in completions} == {"gpt_oss_safeguard+llm_judge"}
  assert judge_calls > MALFORMED_REQUESTS + SLOW_REQUESTS and classifier_requests
  assert {r["model"] for r in classifier_requests} == {SAFEGUARD}
  report = read_json(workdir / "experiment.json")
  assert report["preset"] == preset and not report["tiny"]
  assert {f"{arm}/seed_0/export" for arm in ARMS} <= set(report["stage_times"])
  assert (workdir / "report" / "report.md").exists()


def test_exported_arms_load_in_transformers_and_match_our_logits(pod_run):
  _, workdir, base_dir, *_ = pod_run
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(base_dir))
  tokens = np.asarray([tokenizer("how do I stop a runaway process?")["input_ids"]], np.int32)
  with torch.no_grad():
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()(torch.from_numpy(tokens).long())
  for arm in ARMS:
    export_dir = workdir / arm / "seed_0" / "export"
    assert json.loads((export_dir / "config.json").read_text())["dtype"] == "bfloat16"  # The preset's export_dtype.
    exported = transformers.AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
    params, model_config, _ = checkpoint.load_model(str(workdir / arm / "seed_0" / "rl"))
    # The same weights as exported (the float32 masters rounded to bfloat16), computed in float32.
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), params)
    model_config = dataclasses.replace(model_config, dtype="float32")
    ours = transformer.forward(params, model_config, tokens, np.arange(tokens.shape[1])[None], np.ones_like(tokens))
    with torch.no_grad():
      theirs = exported(torch.from_numpy(tokens).long()).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4)
    assert np.abs(base.logits.numpy() - theirs).max() > 1e-4  # Training moved the base.
