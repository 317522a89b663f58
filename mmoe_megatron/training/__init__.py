"""The pretraining loop and its components (learning rate, batches, checkpoints, metrics)."""
