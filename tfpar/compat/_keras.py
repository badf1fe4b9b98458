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
    if not model.built:
        raise ValueError("a model must be built before its weights are saved; call it on a "
                         "batch, or give it an Input.")
    from tfpar.strategies.base import gather_weights

    gather_weights(model)  # a pipeline across processes: the writer's copy made whole
    saving_lib = _saving_lib()
    store = _recording_store(saving_lib)()
    saving_lib._save_state(model, weights_store=store, assets_store=None, inner_path="",
                           visited_saveables=set())
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
    for call, *args in snapshot:
        if call == "make":
            store.make(args[0], metadata=args[1])
        else:
            store[args[0]] = args[1]
    store.h5_file.flush()
    data = store.h5_file.id.get_file_image()
    store.close()
    return data


def weights_h5_bytes(model) -> bytes:
    """`model.save_weights`'s `.weights.h5` file, in memory."""
    return snapshot_h5_bytes(weights_snapshot(model))


def _saving_lib():
    from keras.src.saving import saving_lib  # private, pinned

    return saving_lib


def _recording_store(saving_lib):
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
            self.calls.append(("set", key, np.asarray(backend.convert_to_numpy(value))))

    return RecordingStore
