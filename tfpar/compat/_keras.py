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
