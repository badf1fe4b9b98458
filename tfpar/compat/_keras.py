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


def weights_h5_bytes(model) -> bytes:
    """`model.save_weights`'s `.weights.h5` file (weights and optimizer state), in memory.

    The same file Keras writes, built by Keras's own writer into an
    `io.BytesIO` (which `saving_lib.H5IOStore` accepts; `save_weights` only
    takes paths), so `load_weights` reads it back unchanged. Reading sharded
    or remote variables to NumPy happens here, on the calling thread: under
    DTensor it is a collective that every client must run.
    """
    import io

    from keras.src.saving import saving_lib  # private, pinned

    if not model.built:
        raise ValueError("a model must be built before its weights are saved; call it on a "
                         "batch, or give it an Input.")
    buffer = io.BytesIO()
    store = saving_lib.H5IOStore(buffer, mode="w")
    saving_lib._save_state(model, weights_store=store, assets_store=None, inner_path="",
                           visited_saveables=set())
    store.close()
    return buffer.getvalue()
