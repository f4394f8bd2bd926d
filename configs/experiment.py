r"""The paper's experimental design (the README's main job): refusal arm vs safe-completion arm, one command.

The tiny preset runs that design small, on a CPU: a run of the machinery, not evidence about the method at scale.
Its policy does not learn to write: 1.3M parameters and 480 train prompts, from a base pretrained on about a
thousand short responses (no pretrained model is reachable offline). More SFT only memorizes: 480 steps instead
of 160 took the refusal arm's train loss to 0.21 while its held-out loss rose from 4.6 to 6.8, and its samples
on eval prompts stayed token soup at temperature 0, 0.3 and 0.7. The report says so in its caveats and
withholds p-values.

Offline tiny default on a 2-core CPU (shipped data, learned reward models as graders):
  python -m safe_completion.main --config=configs/experiment.py:tiny --workdir=workdir/experiment
Both arms run the same recipe (prompts, steps, hyperparameters, seeds, reward r = h x s); they differ only in
the policy text their teacher, datagen judge and RL grader read (`specs/modes.md` vs `specs/modes_refusal.md`).

Grader roles are separate sections, each honoured as written (any `grader.kind` the factory knows):
  datagen.judge   filters the teacher's samples, under the arm's policy
  rl.grader       the RL reward grader, under the arm's policy
  eval.grader     grades both arms' eval completions, under the safe-completion policy
A role of kind `reward_model` with an empty `reward_model_dir` names one of `reward_models`, which the
experiment trains per policy it is needed for. By default the eval grader is not the reward grader: it is
trained on the other half of the grader data's prompts, with another seed, so reward hacking of the RL grader
shows up as a gap between the two (the report's reward-vs-eval table). For example, an LLM judge as the eval
grader: --config.eval.grader.kind=llm_judge --config.eval.grader.endpoint.base_url=http://host:8001/v1
--config.eval.grader.endpoint.model=NAME. `--config.seeds=N` trains each arm N times.

Real models (`llama3_8b`, `qwen2_7b`, `gemma2_9b`; `docs/experiment.md`): the base model is a local HF directory,
the teacher a reasoning model and the graders LLM judges behind OpenAI-compatible servers (vLLM), one override
each; a missing one is a start-up error naming the field. Datagen -> SFT -> RL -> eval of both arms -> report ->
HF export of both arms (`<workdir>/<arm>/seed_<i>/export`), resumed after preemption:
  python -m safe_completion.main --config=configs/experiment.py:llama3_8b --workdir=/gcs/bucket/experiment \
    --config.sft.init.hf_dir=/mnt/models/Meta-Llama-3-8B-Instruct \
    --config.teacher.endpoint.base_url=http://teacher:8000/v1 --config.teacher.endpoint.model=Qwen/QwQ-32B \
    --config.datagen.judge.endpoint.base_url=http://judge:8001/v1 --config.datagen.judge.endpoint.model=JUDGE \
    --config.rl.grader.endpoint.base_url=http://judge:8001/v1 --config.rl.grader.endpoint.model=JUDGE \
    --config.eval.grader.endpoint.base_url=http://eval-judge:8002/v1 --config.eval.grader.endpoint.model=OTHER
The eval grader must be another model than the RL reward grader. `<preset>,lora` trains LoRA adapters in SFT
and RL on a smaller slice (`REAL`). `configs/experiment.py:llama3_8b,runlocal`
runs the same path on a CPU (tiny shapes, a few prompts and steps; still an HF start, bf16 compute with f32
master weights, remat, gradient accumulation, the FSDP mesh, HTTP teacher and judges, HF export).

Two OpenAI-compatible endpoints compared with one eval grader (`docs/compare.md`):
  python -m safe_completion.main --config=configs/experiment.py:compare --workdir=/tmp/compare \
    --config.models.a.endpoint.base_url=http://a:8000/v1 --config.models.a.endpoint.model=A \
    --config.models.b.endpoint.base_url=http://b:8000/v1 --config.models.b.endpoint.model=B \
    --config.eval.grader.endpoint.base_url=http://judge:8001/v1 --config.eval.grader.endpoint.model=JUDGE
"""

import os

import ml_collections as mlc

from configs import common
from configs import datagen
from configs import eval as eval_config
from configs import reward_model
from configs import rl
from configs import sft
from safe_completion.graders import factory

# The tiny policy's shape. Both arms start SFT from the shipped base with this shape (data/tiny_base,
# pretrained by scripts/pretrain_tiny_base.py on text that is neither arm's SFT data), as the paper's
# arms start from a pretrained model.
TINY_POLICY = dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32, mlp_dim=384)
TINY_BASE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "tiny_base")


def learned_grader(name: str) -> mlc.ConfigDict:
  """A grader role that uses the experiment's learned reward model `name` (trained per policy)."""
  config = rl.get_config("tiny").grader.copy_and_resolve_references()
  config.kind = "reward_model"
  config.reward_model = name
  config.arm = "safe_completion"  # The policy an LLM judge reads; the experiment sets it per arm.
  return config


# Real presets: the slice each was sized for and its HF architecture. GiB per device on v5p-8 (95 GiB), full
# fine-tuning, from `python -m safe_completion.plan --config=configs/sft.py:<preset> --slice=v5p-8` (RL:
# --config=configs/rl.py:<preset> --sft_config=configs/sft.py:<preset>); in brackets the stage configs'
# `<preset>,lora` variant (rank 16 on a bfloat16 frozen base):
#   llama3_8b  SFT 79.7 (8 x 32 accumulation steps) [25.6], RL 67.3 (8 prompts x 4) [18.3]
#   qwen2_7b   SFT 77.9 (8 x 32 accumulation steps) [25.4], RL 65.7 (8 prompts x 4) [18.3]
#   gemma2_9b  SFT 69.4 (4 x 64 accumulation steps) [17.3], RL 81.6 (4 prompts x 4) [28.4]
# `<preset>,lora` trains the stage configs' LoRA variant in both SFT and RL (exports merge the adapters), on a
# smaller slice: llama3_8b / qwen2_7b on v5e-8 (8 x 16 GiB): SFT 13.1 / 13.0, RL 9.4 / 9.4; gemma2_9b on v4-8
# (4 x 32 GiB): SFT 17.3, RL 28.4 (89%, tight: v5p-8 if it does not fit; its SFT batch of 4 cannot split over
# v5e-8's 8 devices).
REAL = {"llama3_8b": dict(slice="v5p-8", lora_slice="v5e-8", architecture="LlamaForCausalLM"),
        "qwen2_7b": dict(slice="v5p-8", lora_slice="v5e-8", architecture="Qwen2ForCausalLM"),
        "gemma2_9b": dict(slice="v5p-8", lora_slice="v4-8", architecture="Gemma2ForCausalLM")}
PRESETS = {"tiny": {}, **{name: {} for name in REAL}}

# Stage budgets of a real run: datagen over all train prompts; SFT 1000 optimizer steps of 256 sequences
# (`sft.num_steps` counts micro-batches: 1000 x the accumulation steps), a checkpoint and held-out loss every 50;
# RL 500 steps of the stage preset's rollout batch; eval of every eval prompt, 4 completions each, with attacks.
SFT_OPTIMIZER_STEPS, SFT_EVERY = 1000, 50
REAL_BUDGETS = {"rl.num_steps": 500, "rl.checkpoint.every_steps": 50, "rl.sample_table_every": 50,
                "eval.model.max_prompt_len": 2048, "eval.model.batch_size": 16}
# runlocal: tiny shapes, a few prompts, 2 steps per stage, short generations. What stays as on the pod: the HF
# start, the numerics (bfloat16 compute, float32 master weights, remat), gradient accumulation, the FSDP mesh,
# the HTTP teacher and judges, the export.
RUNLOCAL = {"teacher.max_tokens": 32, "datagen.data.max_prompts": 8, "datagen.max_attempts": 2,
            "datagen.batch_size": 4, "sft.num_steps": 2, "sft.batch_size": 8, "sft.optimizer.grad_accum_steps": 2,
            "sft.optimizer.warmup_steps": 0, "sft.data.seq_len": 256, "sft.checkpoint.every_steps": 1,
            "sft.checkpoint.async_save": False, "sft.eval_every": 2, "rl.num_steps": 2, "rl.data.max_prompts": 8,
            "rl.rl.prompts_per_step": 4, "rl.rl.samples_per_prompt": 2, "rl.rl.minibatches": 1,
            "rl.rl.max_new_tokens": 8, "rl.rl.max_prompt_len": 128, "rl.optimizer.warmup_steps": 0,
            "rl.checkpoint.every_steps": 1, "rl.checkpoint.async_save": False, "rl.sample_table_every": 1,
            "eval.data.max_prompts": 4, "eval.samples_per_prompt": 1, "eval.sampling.max_tokens": 8,
            "eval.model.max_prompt_len": 160, "eval.model.batch_size": 8, "eval.bootstrap_samples": 50,
            "eval.attacks.names": ("past_tense",)}


def judge() -> mlc.ConfigDict:
  """A grader role that reads the arm's policy (the experiment sets `arm`): an LLM judge behind an
  OpenAI-compatible endpoint. Any kind `graders.factory` knows fits; a safety classifier kind takes mode
  and helpfulness from a `helpfulness` section."""
  return mlc.ConfigDict(dict(kind="llm_judge", reward_model_dir="", keyword="", saturation=4,
                             endpoint=common.endpoint(), arm="safe_completion"))


def real_config(name: str, runlocal: bool, lora: bool = False) -> mlc.ConfigDict:
  """A real open model: HF base, HTTP teacher, LLM-judge roles, the stage presets sized for `REAL[name]`."""
  stage_preset = name + (",lora" if lora else "")
  config = mlc.ConfigDict()
  config.stage = "experiment"
  config.preset = stage_preset + (",runlocal" if runlocal else "")
  config.slice = REAL[name]["lora_slice" if lora else "slice"]
  config.seed = 0
  config.seeds = 1
  config.reward_models = mlc.ConfigDict()  # No learned grader: every role is a judge endpoint.
  config.teacher = datagen.get_config("endpoint").teacher  # kind http: a reasoning model, OpenAI-compatible.
  config.datagen = datagen.get_config("endpoint")
  del config.datagen.teacher  # The experiment's teacher is `config.teacher`.
  config.datagen.judge = judge()
  config.sft = sft.get_config(stage_preset)
  config.sft.init.hf_dir = ""  # The base model's HF directory (config.json + safetensors): required.
  config.sft.export_architecture = REAL[name]["architecture"]
  config.sft.export_dtype = "bfloat16"  # The float32 master weights exported at vLLM's serving dtype.
  config.rl = rl.get_config(stage_preset)
  config.rl.grader = judge()
  config.eval = eval_config.get_config("endpoint")
  config.eval.model.kind = "checkpoint"  # Our arms' checkpoints; the experiment sets the path.
  config.eval.grader = judge()
  config.eval.grader.classifier = factory.classifier_config()
  config.eval.grader.helpfulness = judge()
  config.eval.grader.helpfulness.kind = ""  # Only for a safety classifier kind as the eval grader.
  config.eval.grader_policy = "safe_completion"
  config.sft_eval_samples_per_prompt = 1
  config.export_hf = True  # Both arms' RL models as HF directories, for transformers and vLLM.
  accum = config.sft.optimizer.grad_accum_steps
  config.sft.num_steps = SFT_OPTIMIZER_STEPS * accum
  config.sft.checkpoint.every_steps = config.sft.eval_every = SFT_EVERY * accum
  common.override(config, REAL_BUDGETS)
  if runlocal:
    common.override(config, RUNLOCAL)
    numerics = {k: config.sft.model[k] for k in ("dtype", "param_dtype", "remat_policy")}
    config.sft.model = common.runlocal_model(config.sft.model)  # Only for a random init; the HF dir's shape wins.
    config.sft.model.update(numerics)
  return config


def get_config(arg: str = "tiny") -> mlc.ConfigDict:
  if arg.split(",")[0] == "compare":  # Two endpoints, one eval grader, pairwise report: configs/compare.py.
    from configs import compare
    return compare.get_config(arg)
  name, runlocal, _ = common.parse_variants(arg, PRESETS, "experiment", {"lora": {}})
  if name in REAL:
    return real_config(name, runlocal, lora="lora" in arg.split(",")[1:])
  if arg != "tiny":
    raise ValueError(f"experiment config arg {arg!r}: tiny takes no options (it already runs locally)")
  config = mlc.ConfigDict()
  config.stage = "experiment"
  config.preset = name
  config.seed = 0
  config.seeds = 1  # Each arm is trained this many times (seeds seed, seed + 1, ...).
  # Learned graders, trained on disjoint halves of the grader data's prompts with different seeds; the
  # `transfer` preset (hashed response n-grams beside the frozen embeddings, every hand-written author,
  # the reward-ordering loss) is the one chosen by cross-validation over the hand-written training
  # prompts (docs/graders.md).
  reward, judge = reward_model.get_config("transfer"), reward_model.get_config("transfer")
  reward.data.half, judge.data.half, judge.seed = 0, 1, 1
  config.reward_models = mlc.ConfigDict({"reward": reward, "eval": judge})

  config.datagen = datagen.get_config("tiny")
  config.datagen.judge = learned_grader("reward")

  config.sft = sft.get_config("tiny")
  # The shape of a random init; the base's config.json wins. A copy: the stage preset's model section is one
  # shared ConfigDict (common.override assigns it), which update() would change for every later get_config.
  config.sft.model = mlc.ConfigDict({**config.sft.model.to_dict(), **TINY_POLICY})
  config.sft.init.hf_dir = TINY_BASE_DIR
  config.sft.data.seq_len, config.sft.data.pack_dataset, config.sft.batch_size = 768, True, 6
  config.sft.num_steps = 160
  config.sft.optimizer.learning_rate = 3e-3
  config.sft.optimizer.warmup_steps = 20
  config.sft.checkpoint.every_steps = 40
  config.sft.eval_every = 40
  config.sft.log_every = 10

  config.rl = rl.get_config("tiny")
  config.rl.grader = learned_grader("reward")
  config.rl.num_steps = 6
  # A gentler step than the RL stage's tiny default: at 3e-3 the tiny policy's answer rate fell from
  # 0.9 to 0.34 within five steps (it stopped closing its reasoning block) before recovering; at 1e-3 the
  # refusal arm's rollouts still fell from 0.97 to 0.81-0.84 by steps 5-6 (KL 0.23) and its eval answer
  # rate was 0.86 (the SFT checkpoint's 0.96).
  config.rl.optimizer.learning_rate = 5e-4
  config.rl.checkpoint.every_steps = 3
  config.rl.sample_table_every = 3
  # Room for the demonstrations' reasoning + answer (up to ~370 tokens of the tiny tokenizer).
  config.rl.rl.max_new_tokens = 384
  # 1.0: a truncated rollout (r - 1 <= 0) never beats a finished one (configs/rl.py). At 0.25 the
  # safe-completion arm's answers grew from ~150 to ~260 tokens in 6 steps and 75 of its 768 eval
  # completions hit the 384-token budget mid-answer (eval answer rate 0.889; SFT checkpoint 0.98).
  config.rl.reward.truncation_penalty = 1.0
  # Rollouts at the eval temperature, and the trainer's log-probs at the same one (rl/pg.py), so RL optimizes
  # the tempered policy that eval samples. At 1.0 the tiny policy's noisy tail left a quarter of the
  # rollouts unfinished (answer rate 0.75-0.79, eval after RL 0.82-0.83, SFT checkpoint at 0.7: 0.96-0.98).
  config.rl.rl.temperature = 0.7

  config.eval = eval_config.get_config("tiny")
  config.eval.grader = learned_grader("eval")
  config.eval.grader_policy = "safe_completion"  # Both arms are judged by the output-centric policy.
  config.eval.sampling.max_tokens = 384
  config.eval.model.max_prompt_len = 320  # Attacked prompts reach ~300 tokens; 320 + 384 fits the base's 768.
  # Below 1.0 for the samples of a tiny model, whose tail at temperature 1 is noise (RL samples at it too).
  config.eval.sampling.temperature = config.rl.rl.temperature
  config.eval.attacks.names = ("past_tense", "prefill", "base64")
  # The SFT checkpoint is evaluated too (one sample per eval prompt, no attacks): does the policy
  # answer in the modes of its SFT data?
  config.sft_eval_samples_per_prompt = 1
  config.export_hf = False
  return config
