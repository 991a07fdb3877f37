"""Pre-training: run configuration and the training loop."""
