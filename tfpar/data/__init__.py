"""Input pipelines for distributed training (global batches, correct sharding)."""

from tfpar.data.distributed import (
    batch_for,
    from_arrays,
    from_files,
    from_tfds,
    num_workers,
    resolve_global_batch_size,
)

__all__ = ["batch_for", "from_arrays", "from_files", "from_tfds", "num_workers",
           "resolve_global_batch_size"]
