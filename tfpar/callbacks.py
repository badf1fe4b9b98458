"""Fault-tolerance callbacks that are safe on many workers.

`keras.callbacks.ModelCheckpoint` works as it is under tfpar's strategies:
`tfpar.compat` makes `Model.save`/`save_weights` write from the chief only.
`keras.callbacks.BackupAndRestore` does not: every worker writes the backup
(an HDF5 lock error or a makedirs race on a shared directory), it writes
the weights and the epoch counter as two files, so a kill between the two
leaves a backup whose weights and epoch disagree, and it resumes a mid-epoch
backup from the start of its epoch. `BackupAndRestore` below fixes all three,
makes the commit durable (fsync) and can write in the background
(`async_save`); `PreemptionCheckpoint` adds saving on SIGTERM (Kubernetes
preemption). `StepPeak` measures the allocator's peak of one training step
(`tfpar.memory`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import signal
import sys
import threading

import keras
import tensorflow as tf

from tfpar import exit_codes, memory
from tfpar.compat._keras import (read_weights, snapshot_h5_bytes, weights_file_bound,
                                 weights_snapshot, write_weights_h5)
from tfpar.strategies import registry
from tfpar.strategies.base import should_write, strategy_for

log = logging.getLogger("tfpar")

_METADATA = "training_metadata.json"


class BackupError(ValueError):
    """A backup directory whose backup cannot be restored (corrupt or incomplete)."""


class CheckpointWriteError(OSError):
    """A backup that could not be written (a full disk, a lost mount, no permission).

    Nothing was committed: the previous backup is still the one a restart
    restores. The message names the file, and for a full disk the space it
    needs and the space that is free.
    """


# ------------------------------------------------------------------ commit
# The steps of committing a backup, in order (see `_commit`). Setting
# TFPAR_CHECKPOINT_FAULT=STEP, or STEP@N for the N-th commit of the process
# (default the first), makes the writer kill itself with SIGKILL right after
# STEP: the seam through which tests/test_checkpoint_faults.py shows that a
# process killed at any point of a save leaves the previous backup as the
# latest, restorable one. Unset, it costs one environment lookup per step.
COMMIT_STEPS = (
    "weights_partial",   # the first half of the new weights file is written
    "weights_written",   # all of it is written, not yet synced
    "weights_synced",    # fsync'ed and closed
    "metadata_staged",   # the new metadata is in training_metadata.json.tmp, synced
    "metadata_renamed",  # the commit: the new metadata replaced the old one
    "stale_removed",     # older weights files are gone
)
FAULT_ENV = "TFPAR_CHECKPOINT_FAULT"
_commits_started = [0]  # commits this process began (for STEP@N)
_WEIGHTS_FILE = re.compile(r"backup-e\d+-b\d+\.weights\.h5$")


def _fault_point(step: str) -> None:
    """SIGKILLs this process if TFPAR_CHECKPOINT_FAULT names `step` of this commit."""
    wanted = os.environ.get(FAULT_ENV)
    if not wanted:
        return
    name, _, nth = wanted.partition("@")
    if name not in COMMIT_STEPS or not (nth or "1").isdigit():
        raise ValueError(f"{FAULT_ENV}={wanted!r}: not STEP or STEP@N with STEP one of "
                         f"{', '.join(COMMIT_STEPS)}; unset it to save normally.")
    if name == step and _commits_started[0] == int(nth or 1):
        sys.stderr.write(f"tfpar: {FAULT_ENV}={wanted}: killing this process after {step}\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def _is_local(path: str) -> bool:
    """Whether `path` is on a local (or mounted) file system, where fsync works.

    Bucket paths (gs://, s3://, hdfs://) go through tf.io.gfile, which has
    no fsync: their durability is the object store's (an object is visible
    whole or not at all once its upload returns).
    """
    return "://" not in str(path)


def _fsync(path: str) -> None:
    """Makes a file's bytes, or a directory's entries (new files, renames), durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.2f} MB"


def _out_of_space(error: Exception) -> bool:
    # HDF5's write errors reach Python as OSError with the errno in the text only.
    return getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or \
        "errno = 28," in str(error) or "No space left on device" in str(error)


def _write_failure(path: str, size: int, error: Exception) -> str:
    if _out_of_space(error):
        try:
            stat = os.statvfs(os.path.dirname(path))
            free = f", {_megabytes(stat.f_bavail * stat.f_frsize)} free"
        except OSError:
            free = ""
        return (f"cannot write the checkpoint {path}: no space left on its file system (it "
                f"needs about {_megabytes(size)}{free}); free space there or give another "
                "directory. The previous checkpoint is intact.")
    return (f"cannot write the checkpoint {path}: {error}. The previous checkpoint is "
            "intact.")


def _write_file(path: str, data: bytes, steps: tuple) -> None:
    """Writes `data` to a new file at `path` and syncs it, or raises CheckpointWriteError.

    `steps`: the fault points after half of it, all of it, and its sync.
    A file that could not be written whole is removed.
    """
    partial, written, synced = steps
    try:
        if _is_local(path):
            with open(path, "wb") as f:
                f.write(data[:len(data) // 2])
                f.flush()
                _fault_point(partial)
                f.write(data[len(data) // 2:])
                f.flush()
                _fault_point(written)
                os.fsync(f.fileno())
        else:
            with tf.io.gfile.GFile(path, "wb") as f:
                f.write(data)
    except (OSError, tf.errors.OpError) as e:
        with contextlib.suppress(OSError, tf.errors.OpError):
            tf.io.gfile.remove(path)
        raise CheckpointWriteError(_write_failure(path, len(data), e)) from e
    _fault_point(synced)


def _write_weights(path: str, source) -> None:
    """Writes the weights file of `source` (a snapshot or the model) at `path`, durably.

    On a local file system the file is written tensor by tensor (no image of
    the whole file in memory; from the model itself, no copy of the model
    either) and fsync'ed; elsewhere (gs://, ...) its bytes are made in
    memory and written through tf.io.gfile. A file not written whole is
    removed, and the failure raised as CheckpointWriteError.
    """
    if not _is_local(path):
        snapshot = source if isinstance(source, list) else weights_snapshot(source)
        _write_file(path, snapshot_h5_bytes(snapshot),
                    ("weights_partial", "weights_written", "weights_synced"))
        return
    # Refused before a byte is written when the room is short: a disk that
    # fills in the middle of an HDF5 write fails cleanly too, but h5py then
    # prints a traceback for every object it frees.
    needed = weights_file_bound(source)
    stat = os.statvfs(os.path.dirname(path) or ".")
    if stat.f_bavail * stat.f_frsize < needed:
        raise CheckpointWriteError(_write_failure(path, needed, OSError(errno.ENOSPC, "")))
    try:
        write_weights_h5(path, source, after_first_tensor=lambda: _fault_point("weights_partial"))
        _fault_point("weights_written")
        _fsync(path)
    except (OSError, RuntimeError) as e:  # h5py's write errors are one or the other
        with contextlib.suppress(OSError):
            os.remove(path)
        raise CheckpointWriteError(_write_failure(path, needed, e)) from e
    _fault_point("weights_synced")


def _commit(backup_dir: str, metadata_path: str, name: str, source, metadata: dict) -> None:
    """Writes weights file `name` and commits `metadata` naming it; atomic and durable.

    1. the weights (`source`: a snapshot, see
       `tfpar.compat._keras.weights_snapshot`, or the model itself for a
       synchronous save) are written to a new `.weights.h5` file, which is
       fsync'ed (`_write_weights`);
    2. the metadata goes to a staging file, which is fsync'ed, and so is the
       directory (the new entries survive a power loss);
    3. a rename replaces the metadata (the commit: readers see the old
       backup or the new one, never a mix), and the directory is synced;
    4. every other weights file (the previous backup, or one a killed save
       left behind) is removed.
    """
    _commits_started[0] += 1
    local = _is_local(backup_dir)
    _write_weights(tf.io.gfile.join(backup_dir, name), source)
    staging = metadata_path + ".tmp"
    _write_file(staging, json.dumps(metadata).encode(), (None, None, None))
    if local:
        _fsync(backup_dir)
    _fault_point("metadata_staged")
    if local:
        os.replace(staging, metadata_path)
        _fsync(backup_dir)
    else:
        tf.io.gfile.rename(staging, metadata_path, overwrite=True)
    _fault_point("metadata_renamed")
    for other in tf.io.gfile.listdir(backup_dir):
        if other != name and _WEIGHTS_FILE.match(other):
            with contextlib.suppress(tf.errors.NotFoundError, OSError):
                tf.io.gfile.remove(tf.io.gfile.join(backup_dir, other))
    _fault_point("stale_removed")


class BackupAndRestore(keras.callbacks.BackupAndRestore):
    """`keras.callbacks.BackupAndRestore` for multi-worker jobs.

    - Only the chief writes; every worker restores from the chief's backup,
      so all workers resume at the same epoch with the same weights (the
      backup directory must be shared between workers: a volume or a bucket).
    - A backup is committed atomically and durably: weights go to a new
      file, which is fsync'ed, then a small metadata file naming that file
      and the position replaces the old one with a rename (the directory is
      fsync'ed before and after). A process killed at any moment, or a
      machine that loses power, leaves the previous backup intact; a full
      disk raises `CheckpointWriteError` naming the file and the space it
      needs, and leaves it intact too. (Buckets, through tf.io.gfile, have
      no fsync: there an object is whole once its upload returns.)
    - ``async_save=True``: at the step boundary every process snapshots the
      weights and optimizer state to host memory (NumPy; gathering sharded
      weights is a collective); the writer then serializes, writes and
      commits them in a background thread while training goes on. The
      next save, the end of training, a preemption (before its exit 210)
      and the process's exit wait for that write; a failed write is raised
      (`CheckpointWriteError`) at the next save or at the end.

    - A mid-epoch backup (integer ``save_freq``, or a preemption) records
      how many batches of the epoch were done; on restore those batches are
      skipped (read from the input, not trained on), so the run continues
      exactly where it stopped. Keras's own callback replays them.

    What it guarantees: a restarted job resumes at the step after the last
    backup with that backup's weights and optimizer state, and (with a data
    order that depends only on the epoch, e.g. no shuffle or a per-epoch
    seed) ends with bit-identical weights to an uninterrupted run. The loss
    and metrics of a resumed epoch cover only its batches after the restart.

    Example::

        model.fit(ds, epochs=10, callbacks=[
            tfpar.callbacks.BackupAndRestore("/ckpt/backup", async_save=True)])
    """

    def __init__(self, backup_dir, save_freq="epoch", delete_checkpoint=True, *,
                 async_save: bool = False):
        super().__init__(backup_dir, save_freq=save_freq,
                         delete_checkpoint=delete_checkpoint, double_checkpoint=False)
        self._metadata_path = tf.io.gfile.join(backup_dir, _METADATA)
        self._skip_batches = 0
        self.async_save = async_save
        self._pending: threading.Thread | None = None
        self._pending_error: BaseException | None = None
        self._last_saved: tuple[int, int] | None = None

    def _read_metadata(self):
        if not tf.io.gfile.exists(self._metadata_path):
            return None
        with tf.io.gfile.GFile(self._metadata_path, "r") as f:
            text = f.read()
        try:
            metadata = json.loads(text)
        except json.JSONDecodeError as e:
            raise BackupError(f"{self._metadata_path} is not a backup's metadata ({e}); "
                              f"restore it, or remove {self.backup_dir} to start afresh.") from None
        if not isinstance(metadata, dict):
            raise BackupError(f"{self._metadata_path} holds {text[:80]!r}, not a backup's "
                              f"metadata; restore it, or remove {self.backup_dir} to start "
                              "afresh.")
        return metadata

    def position(self) -> tuple[int, int] | None:
        """(epoch, batches done in it) of the committed backup, or None if there is none.

        A job that must know where it resumes before `fit` (to position its
        input, or to size its schedule) reads it here; `fit` restores it.
        """
        metadata = self._read_metadata()
        if metadata is None or "weights" not in metadata:
            return None
        if not tf.io.gfile.exists(tf.io.gfile.join(self.backup_dir, metadata["weights"])):
            raise BackupError(f"{self._metadata_path} names weights {metadata['weights']!r} "
                              f"that are not in {self.backup_dir}; restore them, or remove "
                              f"{self.backup_dir} to start afresh.")
        return metadata["epoch"], metadata.get("step_in_epoch", 0)

    def _load_model(self):
        metadata = self._read_metadata()
        if metadata is None or "weights" not in metadata:
            return super()._load_model()  # a plain Keras backup, or none
        if not self.model.built:
            raise ValueError(
                "BackupAndRestore needs a built model to restore into; build it "
                "(call it on a batch, or give it an Input) before fit()."
            )
        optimizer = self.model.optimizer
        if optimizer is not None and not optimizer.built:
            # Slots are made as the first step would make them: a strategy that
            # creates variables itself (TensorParallel: DVariables laid out
            # like their weight) must see them, or loading a sharded slot fails
            # ("AssignVariableOp got a regular tensor ... expecting a DTensor").
            owner = registry.strategy_of(self.model)
            with owner.scope() if owner is not None else contextlib.nullcontext():
                optimizer.build(self.model.trainable_variables)
        self.model.load_weights(tf.io.gfile.join(self.backup_dir, metadata["weights"]))
        epoch, done = metadata["epoch"], metadata.get("step_in_epoch", 0)
        steps = (self.params or {}).get("steps")
        if steps and done >= steps:  # saved after the epoch's last batch
            epoch, done = epoch + 1, 0
        self.model._initial_epoch = epoch
        self._skip_batches = done
        log.info("tfpar: resumed from %s at epoch %d, batch %d", self.backup_dir, epoch, done)

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self._skip_batches:
            self._skip_done_batches(self._skip_batches)

    def _skip_done_batches(self, count: int) -> None:
        """The next `count` batches are read from the input but not trained on.

        Keras has no "initial step": the resumed epoch starts at its first
        batch. The train function is wrapped so that its first calls only
        advance the iterator (every worker skips the same batches, so their
        input stays aligned), then the real function takes over.
        """
        model = self.model
        real = model.train_function
        per_call = model.steps_per_execution or 1
        if count % per_call:
            raise ValueError(
                f"the backup was taken after {count} batches of the epoch, which is not a "
                f"multiple of steps_per_execution={per_call}; resume with the "
                "steps_per_execution the backup was written with.")
        calls = [count // per_call]

        def skip(iterator):
            for _ in range(per_call):
                next(iterator)
            calls[0] -= 1
            if calls[0] == 0:
                model.train_function = real
            return {}

        model.train_function = skip

    def on_epoch_begin(self, epoch, logs=None):
        # Keras only advances its epoch counter at epoch ends, so a mid-epoch
        # backup in the first epoch after a restore would record epoch 0.
        self._current_epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self._should_save_on_batch(batch):
            self._save_model(step_in_epoch=batch + 1)

    def _save_model(self, step_in_epoch: int = 0):
        """Backs up the state after `step_in_epoch` batches of the current epoch.

        Every process reads every weight: reading a sharded weight to the
        host is a collective over the mesh, which may span processes (a
        DTensor mesh "batch:1,model:4" over 2 clients deadlocks if only the
        chief gathers); only the writer (`should_write`) keeps what it reads.
        With `async_save` the writer snapshots the values to host memory and
        writes and commits them (`_commit`) in a background thread; a
        synchronous save on a local file system writes each tensor as it is
        read, so the save adds about one tensor to the process's memory, not
        the model (plus its optimizer state) once more.
        """
        self.wait_for_pending_save()
        position = (self._current_epoch, step_in_epoch)
        if position == self._last_saved:  # e.g. a preemption right after a regular save
            return
        self._last_saved = position
        if not should_write(self.model):
            read_weights(self.model)
            return
        tf.io.gfile.makedirs(self.backup_dir)
        name = f"backup-e{position[0]}-b{position[1]}.weights.h5"
        metadata = {"epoch": position[0], "step_in_epoch": position[1], "weights": name}
        if not self.async_save:
            _commit(self.backup_dir, self._metadata_path, name, self.model, metadata)
            return
        args = (self.backup_dir, self._metadata_path, name, weights_snapshot(self.model),
                metadata)
        # Not a daemon: a process that ends (training done, an error) waits
        # for the write instead of cutting it off.
        self._pending = threading.Thread(target=self._commit_in_background, args=args,
                                         name="tfpar-backup-writer", daemon=False)
        self._pending.start()

    def _commit_in_background(self, *args):
        try:
            _commit(*args)
        except BaseException as e:  # raised on the training thread by the next wait
            log.error("tfpar: the background write of a backup failed: %s", e)
            self._pending_error = e

    def wait_for_pending_save(self) -> None:
        """Waits for a backup being written in the background; raises its failure.

        The next save, the end of training and a preemption call it, so a
        failed write stops training at the next save rather than going
        unnoticed, and a process never exits before its backup is committed.
        """
        thread, self._pending = self._pending, None
        if thread is not None:
            thread.join()
        error, self._pending_error = self._pending_error, None
        if error is None:
            return
        if isinstance(error, CheckpointWriteError):
            raise CheckpointWriteError(str(error)) from error
        raise CheckpointWriteError(f"writing a backup to {self.backup_dir} in the background "
                                   f"failed: {error!r}. The previous checkpoint is "
                                   "intact.") from error

    def on_train_end(self, logs=None):
        self.wait_for_pending_save()
        if not should_write(self.model):
            return
        if self.delete_checkpoint and tf.io.gfile.exists(self.backup_dir):
            tf.io.gfile.rmtree(self.backup_dir)


# Errors a worker raises when a peer vanished mid-collective or stopped
# sending heartbeats (measured: UnavailableError; the others are the same
# failure seen from a different place in TensorFlow's runtime).
_PEER_LOST_ERRORS = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
                     tf.errors.AbortedError, tf.errors.CancelledError)


class PreemptionCheckpoint(BackupAndRestore):
    """BackupAndRestore that also saves when the job is preempted (SIGTERM).

    Kubernetes stops a pod (preemption, eviction, node drain, a rolling
    restart of the job) with SIGTERM, then SIGKILL after the pod's
    terminationGracePeriodSeconds. On SIGTERM this callback lets the current
    step finish, and at the next batch boundary:

    1. every worker learns whether *any* worker was signalled (a small
       all-reduce after each batch, so all of them stop after the same step
       even when only one pod was preempted);
    2. the chief commits a backup of that step (atomically, see
       `BackupAndRestore`); a second all-reduce keeps the others alive until
       it is written;
    3. every worker exits with `tfpar.exit_codes.PREEMPTED` (210), which the
       manifests of `tfpar k8s render` retry without counting a failure.

    After the restart, training resumes at the step after the backup and
    ends with the same weights as an uninterrupted run.

    It also turns the loss of a peer (its pod killed, its network cut) into
    exit code `tfpar.exit_codes.PEER_LOST` (211) instead of 1, so the job
    restarts the group rather than failing as if the program had a bug.

    Args:
      backup_dir: shared directory or bucket for the backups.
      save_freq: regular backups as well: "epoch" or every N batches.
      exit_code: the exit code after a preemption save.
      peer_lost_exit_code: exit code when a peer is lost (None: leave the
        default, 1).
      delete_checkpoint: remove the backup when training completes.
      async_save: write backups in a background thread (see
        `BackupAndRestore`); the preemption save is committed before the
        exit either way.

    Example::

        model.fit(ds, epochs=10, callbacks=[
            tfpar.callbacks.PreemptionCheckpoint(os.environ["TFPAR_CHECKPOINT_DIR"])])
    """

    def __init__(self, backup_dir, save_freq="epoch", *, exit_code: int = exit_codes.PREEMPTED,
                 peer_lost_exit_code: int | None = exit_codes.PEER_LOST,
                 delete_checkpoint: bool = True, async_save: bool = False):
        super().__init__(backup_dir, save_freq=save_freq, delete_checkpoint=delete_checkpoint,
                         async_save=async_save)
        self.exit_code = exit_code
        self.peer_lost_exit_code = peer_lost_exit_code
        self._signalled = threading.Event()
        self._previous_handler = None
        self._previous_excepthook = None

    # ------------------------------------------------------------- signals
    def _on_sigterm(self, signum, frame):
        if not self._signalled.is_set():
            sys.stderr.write(f"tfpar: got {signal.Signals(signum).name}; saving a checkpoint "
                             "after the current step\n")
            sys.stderr.flush()
        self._signalled.set()

    def _multi_worker(self) -> bool:
        strategy = strategy_for(self.model)
        return (getattr(strategy, "num_workers", 1) > 1
                or getattr(strategy, "spans_processes", False))

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        if self.peer_lost_exit_code is not None and self._multi_worker():
            self._previous_excepthook = sys.excepthook
            sys.excepthook = self._exit_on_peer_loss

    def _exit_on_peer_loss(self, exc_type, exc, tb):
        self._previous_excepthook(exc_type, exc, tb)
        if issubclass(exc_type, _PEER_LOST_ERRORS):
            with contextlib.suppress(Exception):  # a backup being written is kept
                self.wait_for_pending_save()
            code = self.peer_lost_exit_code
            sys.stderr.write(f"tfpar: a peer worker was lost ({exc_type.__name__}); exiting "
                             f"with {code} ({exit_codes.describe(code)})\n")
            sys.stderr.flush()
            sys.stdout.flush()
            # os._exit: a normal exit would wait in TensorFlow's shutdown
            # barrier for the peer that is gone.
            os._exit(code)

    def on_train_end(self, logs=None):
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None
        if self._previous_excepthook is not None:
            sys.excepthook = self._previous_excepthook
            self._previous_excepthook = None
        super().on_train_end(logs)

    # ---------------------------------------------------------- agreement
    def _any_worker(self, flag: bool) -> bool:
        """Whether `flag` is set on any process (a collective: all must call it)."""
        strategy = strategy_for(self.model)
        any_worker = getattr(strategy, "any_worker", None)
        return any_worker(flag) if any_worker is not None else bool(flag)

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, logs)
        if not self._any_worker(self._signalled.is_set()):
            return
        self._save_model(step_in_epoch=batch + 1)
        self.wait_for_pending_save()
        self._any_worker(True)  # barrier: nobody exits before the chief has committed
        log.warning("tfpar: preempted; saved epoch %d batch %d to %s; exiting with %d",
                    self._current_epoch, batch + 1, self.backup_dir, self.exit_code)
        sys.stderr.write(f"tfpar: preempted: checkpoint of epoch {self._current_epoch} "
                         f"batch {batch + 1} saved to {self.backup_dir}; exiting with "
                         f"{self.exit_code} ({exit_codes.describe(self.exit_code)})\n")
        sys.stderr.flush()
        sys.exit(self.exit_code)  # sys.exit: tfpar.cluster.single_controller sees the code


class StepPeak(keras.callbacks.Callback):
    """Measures the allocator peak of one training step (the `at`-th of a fit).

    The first step traces the function and creates the optimizer's slots,
    so the default measures the second: the memory every later step needs.
    """

    def __init__(self, at: int = 1):
        super().__init__()
        self.at = at
        self.bytes_per_device: int | None = None
        self._on = False
        self._seen = 0

    def on_train_batch_begin(self, batch, logs=None):
        if self._seen == self.at and self.bytes_per_device is None:
            self._on = memory.reset_peak()

    def on_train_batch_end(self, batch, logs=None):
        if self._on:
            self.bytes_per_device = memory.peak_bytes_per_device()
            self._on = False
        self._seen += 1
