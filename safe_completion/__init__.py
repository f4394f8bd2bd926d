"""Output-centric safety training (safe-completions) in JAX/Flax."""
