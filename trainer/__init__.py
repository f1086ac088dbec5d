"""The table-connectivity study: data, training loop, checkpoints, evaluation.

Entry point: `trainer.train.run(config, out_dir, ...)`; a worker runs it as
`trainer.job.StudyJob`, behind the small `trainer.job.Job` interface. Kept
import-light so that tools which only need configs do not pay for
torch/transformers.
"""
