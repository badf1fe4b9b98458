"""Distributed input: batches with a stated meaning, sharded correctly.

Every function here returns a `tf.data.Dataset` of *global* batches (the
examples of one optimizer step summed over all replicas and workers, which is
what Keras's `batch_size` means under a strategy), with the auto-shard policy
set so that `strategy.experimental_distribute_dataset` (which `model.fit`
calls) gives each replica a disjoint slice of every global batch:

- arrays and in-memory datasets: DATA sharding. TensorFlow splits each global
  batch into per-replica slices and hands each worker its own. Each example is
  seen by exactly one replica, once per epoch.
- files: FILE sharding (each worker reads only its files) when there are at
  least as many files as workers; otherwise TensorFlow would fail with
  "Could not apply FILE based sharding", so tfpar falls back to DATA sharding
  and says so once.

Partial batches: with `drop_remainder=True` (the default for training) every
step has the same global batch, so every replica does the same work and the
gradient average is exact; the last ``N mod global_batch`` examples of an
epoch are skipped (a different set each epoch when shuffled), as with
PyTorch's ``DistributedSampler(drop_last=True)``. With `drop_remainder=False`
(evaluation), every example is seen exactly once: TensorFlow gives replicas
that run out an empty slice of the last batch.

Example::

    strategy = tfpar.DataParallel()
    ds = tfpar.data.from_arrays((x, y), strategy, global_batch_size=256,
                                shuffle=True, seed=1)
    model.fit(ds, epochs=3)
"""

from __future__ import annotations

import glob as globlib
import logging
from typing import Callable, Sequence

import tensorflow as tf

log = logging.getLogger("tfpar")


def resolve_global_batch_size(strategy, global_batch_size: int | None = None,
                              per_replica_batch_size: int | None = None) -> int:
    """The global batch from exactly one of the two sizes, checked.

    Raises ValueError if neither or both are given, or if the global batch
    does not split evenly over the replicas.
    """
    replicas = strategy.num_replicas_in_sync
    if (global_batch_size is None) == (per_replica_batch_size is None):
        raise ValueError(
            "give exactly one of global_batch_size (examples per step over all "
            "replicas) and per_replica_batch_size (examples per step per "
            f"replica); got global_batch_size={global_batch_size}, "
            f"per_replica_batch_size={per_replica_batch_size}."
        )
    if per_replica_batch_size is not None:
        if per_replica_batch_size < 1:
            raise ValueError(f"per_replica_batch_size={per_replica_batch_size}: must be >= 1.")
        return per_replica_batch_size * replicas
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size={global_batch_size}: must be >= 1.")
    if global_batch_size % replicas:
        lower = max(replicas, global_batch_size - global_batch_size % replicas)
        raise ValueError(
            f"global_batch_size={global_batch_size} does not split evenly over "
            f"{replicas} replicas; use a multiple of {replicas}, e.g. {lower} or "
            f"{lower + replicas}."
        )
    return global_batch_size


def num_workers(strategy) -> int:
    count = getattr(strategy, "num_workers", None)
    if count is not None:
        return count
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None:
        return 1
    spec = resolver.cluster_spec().as_dict()
    return sum(len(spec.get(role, ())) for role in ("chief", "worker")) or 1


def _with_shard_policy(dataset: tf.data.Dataset, policy) -> tf.data.Dataset:
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = policy
    return dataset.with_options(options)


def batch_for(dataset: tf.data.Dataset, strategy, *, global_batch_size: int | None = None,
              per_replica_batch_size: int | None = None, shuffle: bool = False,
              shuffle_buffer: int = 10_000, seed: int | None = None,
              drop_remainder: bool = True, repeat: bool = False,
              shard_policy=None) -> tf.data.Dataset:
    """Shuffles, batches (global batch) and sets the shard policy of examples.

    Args:
      dataset: a dataset of single examples (not yet batched).
      strategy: the strategy the data will be fed to.
      global_batch_size / per_replica_batch_size: exactly one.
      shuffle: reshuffle every epoch, with a buffer of `shuffle_buffer`. With
        a `seed`, every worker draws the same order, which DATA sharding needs.
      drop_remainder: see the module docstring.
      repeat: repeat forever (then give `steps_per_epoch` to `fit`).
      shard_policy: a `tf.data.experimental.AutoShardPolicy`; default DATA.
    """
    batch = resolve_global_batch_size(strategy, global_batch_size, per_replica_batch_size)
    if shuffle:
        if seed is None and num_workers(strategy) > 1:
            raise ValueError(
                "shuffle=True on several workers needs a seed: DATA sharding "
                "splits each global batch between workers, so every worker "
                "must draw the same order. Pass seed=<int>."
            )
        dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        dataset = dataset.repeat()
    dataset = dataset.batch(batch, drop_remainder=drop_remainder)
    rows = getattr(strategy, "local_batch_rows", None)
    if rows is not None and strategy.num_workers > 1:
        # A multi-client DTensor mesh: each process feeds only the rows of the
        # global batch that its devices hold.
        start, stop = rows(batch)
        dataset = dataset.map(lambda *x: tf.nest.map_structure(lambda t: t[start:stop],
                                                               x if len(x) > 1 else x[0]))
    dataset = dataset.prefetch(tf.data.AUTOTUNE)
    policy = tf.data.experimental.AutoShardPolicy.DATA if shard_policy is None else shard_policy
    return _with_shard_policy(dataset, policy)


def from_arrays(arrays, strategy, **batch_kwargs) -> tf.data.Dataset:
    """Global batches from in-memory arrays (a tensor, tuple or dict of them).

    Example::

        ds = from_arrays((x, y), strategy, global_batch_size=64)
    """
    return batch_for(tf.data.Dataset.from_tensor_slices(arrays), strategy, **batch_kwargs)


_warned_file_fallback = False


def from_files(files: str | Sequence[str], strategy,
               reader: Callable[[tf.Tensor], tf.data.Dataset] = tf.data.TFRecordDataset,
               parse: Callable | None = None, **batch_kwargs) -> tf.data.Dataset:
    """Global batches from files (a glob or a list), sharded by file when possible.

    Args:
      files: a glob pattern or a list of paths.
      reader: maps one file name to a dataset of its records
        (`tf.data.TFRecordDataset`, `tf.data.TextLineDataset`, ...).
      parse: optional function applied to every record.

    With at least as many files as workers, each worker reads only its own
    files (FILE sharding). With fewer, every worker reads every file and
    keeps its share of each batch (DATA sharding); tfpar logs this once.
    """
    global _warned_file_fallback
    paths = sorted(globlib.glob(files)) if isinstance(files, str) else list(files)
    if not paths:
        raise FileNotFoundError(f"from_files({files!r}): no file matches.")
    workers = num_workers(strategy)
    if len(paths) >= workers:
        policy = tf.data.experimental.AutoShardPolicy.FILE
    else:
        policy = tf.data.experimental.AutoShardPolicy.DATA
        if not _warned_file_fallback:
            log.warning(
                "tfpar: %d file(s) for %d workers: FILE sharding needs at least "
                "one file per worker, so every worker reads all files and keeps "
                "its share of each batch (DATA sharding). Split the data into "
                ">= %d files to read less.", len(paths), workers, workers,
            )
            _warned_file_fallback = True
    dataset = tf.data.Dataset.from_tensor_slices(paths)
    # Deterministic interleave: FILE sharding assigns files by position, and
    # DATA sharding needs every worker to see the same element order.
    dataset = dataset.interleave(reader, cycle_length=min(len(paths), 8),
                                 num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if parse is not None:
        dataset = dataset.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return batch_for(dataset, strategy, shard_policy=policy, **batch_kwargs)


def from_tfds(name: str, split: str, strategy, *, data_dir: str | None = None,
              as_supervised: bool = False, parse: Callable | None = None,
              download: bool = False, **batch_kwargs) -> tf.data.Dataset:
    """Global batches from a TFDS split.

    `download=False` by default: on machines without internet `tfds.load`
    of a dataset that is not prepared yet retries for minutes before failing,
    so tfpar fails at once with the fix instead. Prepare the data once (or
    point `data_dir` at prepared data) and train offline.
    """
    from tfpar.data.corpus import prepare

    builder = prepare(name, data_dir, download=download)
    shards = builder.info.splits[split].num_shards
    # FILE sharding needs one file per worker; TFDS's own ReadConfig cannot
    # fall back, so the decision is made here from the shard count.
    policy = (tf.data.experimental.AutoShardPolicy.FILE
              if shards >= num_workers(strategy) else tf.data.experimental.AutoShardPolicy.DATA)
    dataset = builder.as_dataset(split=split, shuffle_files=False, as_supervised=as_supervised)
    if parse is not None:
        dataset = dataset.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return batch_for(dataset, strategy, shard_policy=policy, **batch_kwargs)
