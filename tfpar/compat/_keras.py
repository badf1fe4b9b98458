"""The private Keras modules the patches replace parts of (pinned: see setup.cfg)."""

import tensorflow as tf


def trainer_module():
    from keras.src.backend.tensorflow import trainer  # private, pinned

    return trainer


def first_local_value(value):
    """One replica's value of a distributed value (any value otherwise)."""
    if isinstance(value, tf.distribute.DistributedValues):
        return value.values[0]
    return value


def weights_snapshot(model) -> list:
    """What `model.save_weights` would write (weights and optimizer state), copied to host memory.

    Keras's own walk over the model (`saving_lib._save_state`) runs with a
    store that records each call instead of writing HDF5; the values are
    host NumPy values that later steps do not change, so training may go
    on while `snapshot_h5_bytes` turns them into the file. Reading sharded
    or remote variables to NumPy happens here, on the calling thread: under
    DTensor it is a collective that every client must run.
    """
    store = _recording_store(_saving_lib())()
    _walk(model, store)
    return store.calls


def snapshot_h5_bytes(snapshot: list) -> bytes:
    """The `.weights.h5` file of a `weights_snapshot`, byte for byte what Keras writes.

    Replayed into Keras's own `H5IOStore` over an in-memory HDF5 file (the
    "core" driver: no Python callbacks per write, unlike an `io.BytesIO`),
    so `load_weights` reads it back unchanged.
    """
    import h5py

    saving_lib = _saving_lib()

    class InMemoryStore(saving_lib.H5IOStore):
        def _get_h5_file(self, path_or_io, mode=None):
            return h5py.File(path_or_io, mode="w", driver="core", backing_store=False)

    store = InMemoryStore("snapshot.weights.h5", mode="w")
    _replay(snapshot, store)
    store.h5_file.flush()
    data = store.h5_file.id.get_file_image()
    store.close()
    return data


def write_weights_h5(path: str, source, after_first_tensor=None) -> None:
    """Writes the `.weights.h5` file of `source` at the local `path`, one tensor at a time.

    `source`: a `weights_snapshot` (host values, written as they are), or a
    built model, whose variables are then read one at a time as they are
    written, so the process never holds a second copy of the model (only
    the tensor being written). The file is byte for byte what Keras's own
    `H5IOStore` writes, so `load_weights` reads it. `after_first_tensor`
    runs once, when the file holds its first tensor and not the rest.
    """
    saving_lib = _saving_lib()

    class FileStore(saving_lib.H5IOStore):
        tensors = 0

        def __setitem__(self, key, value):
            super().__setitem__(key, value)
            self.tensors += 1
            if self.tensors == 1 and after_first_tensor is not None:
                after_first_tensor()

    store = FileStore(path, mode="w")
    try:
        if isinstance(source, list):
            _replay(source, store)
        else:
            _walk(source, store)
    except BaseException:
        try:  # a full disk fails the close too: the write's own error is the one raised
            store.close()
        except Exception:
            pass
        raise
    store.close()


def read_weights(model) -> None:
    """Reads every value `weights_snapshot` would, keeping none: what a process that
    does not write runs, so that gathering sharded weights (a collective on a
    multi-client mesh) meets the writer's reads one for one."""
    _walk(model, _recording_store(_saving_lib(), keep=False)())


# What HDF5 may add to the tensors' bytes, for a bound on a file's size:
# measured 1.2-1.5 KB per dataset (with its group) and a few KB per file.
_H5_BYTES_PER_TENSOR = 4096
_H5_BYTES_PER_FILE = 65536


def state_bytes(source) -> int:
    """The bytes of the tensors a save writes: of a snapshot, or of a model's
    variables and its optimizer's (read from their shapes, not their values)."""
    return sum(_tensor_bytes(source))


def weights_file_bound(source) -> int:
    """At least the size of `source`'s `.weights.h5` file: its tensors plus
    HDF5's own bytes, bounded generously (a save checks the room first)."""
    sizes = _tensor_bytes(source)
    return sum(sizes) + _H5_BYTES_PER_TENSOR * len(sizes) + _H5_BYTES_PER_FILE


def _tensor_bytes(source) -> list[int]:
    import numpy as np

    if isinstance(source, list):
        return [args[1].nbytes for call, *args in source if call == "set"]
    variables = list(source.weights)
    if getattr(source, "optimizer", None) is not None and source.optimizer.built:
        variables += list(source.optimizer.variables)
    return [int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in variables]


def _walk(model, store) -> None:
    if not model.built:
        raise ValueError("a model must be built before its weights are saved; call it on a "
                         "batch, or give it an Input.")
    from tfpar.strategies.base import gather_weights

    gather_weights(model)  # a pipeline across processes: the writer's copy made whole
    _saving_lib()._save_state(model, weights_store=store, assets_store=None, inner_path="",
                              visited_saveables=set())


def _replay(snapshot: list, store) -> None:
    """Makes `store` receive the calls a snapshot recorded, in their order."""
    for call, *args in snapshot:
        if call == "make":
            store.make(args[0], metadata=args[1])
        else:
            store[args[0]] = args[1]


def weights_h5_bytes(model) -> bytes:
    """`model.save_weights`'s `.weights.h5` file, in memory."""
    return snapshot_h5_bytes(weights_snapshot(model))


def _saving_lib():
    from keras.src.saving import saving_lib  # private, pinned

    return saving_lib


def _recording_store(saving_lib, keep: bool = True):
    import numpy as np
    from keras.src import backend

    class RecordingStore(saving_lib.H5IOStore):
        """The writing half of `H5IOStore`'s interface, recorded (`_save_state` checks the type)."""

        def __init__(self):  # no file
            self.calls = []

        def __bool__(self):
            return True

        def make(self, path, metadata=None):
            self.calls.append(("make", path, metadata))
            return self

        def __setitem__(self, key, value):
            # No copy needed: the NumPy array keeps the tensor it was read
            # from alive, and TensorFlow copies a variable's buffer before
            # updating it in place while another reference holds it
            # (tests/test_checkpoint.py checks that a snapshot outlives steps).
            value = np.asarray(backend.convert_to_numpy(value))
            if keep:
                self.calls.append(("set", key, value))

    return RecordingStore
