"""ml_collections configs: `--config=configs/<stage>.py:<preset>`."""
