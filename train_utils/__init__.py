"""Training utilities: losses, the train/eval engine, metrics, transforms, checkpoints."""
