"""Training prompt-free heads on cached embeddings: losses, schedules, the jit-compiled loop, checkpoints."""
