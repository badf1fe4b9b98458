"""Fix: `Model.save` / `save_weights` write from one process only.

Keras 3 removed Keras 2's chief/worker file logic: every worker writing one
`.weights.h5` fails on the HDF5 file lock, and `.keras` archives race. The
weights are identical on every worker (data parallelism applies all-reduced
gradients; a DTensor mesh gathers sharded weights on every client), so only
the writer (`tfpar.strategies.should_write`, which knows every tfpar
strategy, not only `tf.distribute`'s) needs to write; the others write to a
private temporary directory that is removed at once (Keras 2's rule: every
process still runs the same code path, so collectives inside it, such as
gathering sharded weights, run everywhere, and a save that would fail,
fails everywhere).
"""

import contextlib
import functools
import os
import shutil
import tempfile

import keras

from tfpar.compat.patch import Patch


@contextlib.contextmanager
def scratch_path(filepath):
    """A path with `filepath`'s name in a private temporary directory, removed on exit.

    Where a process that does not write puts what it saves (it still runs
    the saving code, and the collectives inside it).
    """
    scratch = tempfile.mkdtemp(prefix="tfpar-worker-")
    try:
        yield os.path.join(scratch, os.path.basename(str(filepath)))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _chief_only_writer(upstream):
    @functools.wraps(upstream)
    def write(self, filepath, *args, **kwargs):
        from tfpar.strategies.base import gather_weights, should_write

        gather_weights(self)  # a pipeline across processes: the writer's copy made whole
        if should_write(self):
            return upstream(self, filepath, *args, **kwargs)
        with scratch_path(filepath) as path:
            return upstream(self, path, *args, **kwargs)

    write._tfpar_upstream = upstream
    return write


def _install():
    for name in ("save", "save_weights"):
        setattr(keras.Model, name, _chief_only_writer(getattr(keras.Model, name)))


def _uninstall():
    for name in ("save", "save_weights"):
        setattr(keras.Model, name, getattr(keras.Model, name)._tfpar_upstream)


PATCH = Patch("chief_only_writes", "fix",
              "Keras 3 has no chief/worker saving (tf.keras 2 had distribute_file_utils)",
              _install, _uninstall, requires=("keras:Model.save", "keras:Model.save_weights"))
