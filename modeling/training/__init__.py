"""Stage 3 internals: config, setup checks, data loading and packing, the DeepSpeed trainer, checkpoints, metrics."""
