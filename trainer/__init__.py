"""The table-connectivity study: data, training loop, checkpoints, evaluation.

Entry point: `trainer.train.run(config, out_dir, ...)`. Kept import-light so
that tools which only need configs do not pay for torch/transformers.
"""
