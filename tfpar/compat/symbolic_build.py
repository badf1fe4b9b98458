"""Fix: Keras's symbolic build under MultiWorkerMirroredStrategy.

keras-team/keras#20585, tensorflow/tensorflow#72388, ray-project/ray#47464.
`TensorFlowTrainer._maybe_symbolic_build` takes one batch to build the model
and calls `strategy.reduce("MEAN", (x, y), axis=None)` on it. Under
MultiWorkerMirroredStrategy that is a cross-worker collective on a tuple of
PerReplica values and raises "Attempt to convert a value (PerReplica:...) to
a Tensor". The batch is needed only for its shapes and dtypes, so a local
replica's value serves, with no communication at all.

Drawing that batch has a second cost: Keras then resets the epoch iterator,
so training starts on a second iterator of the dataset, and a dataset that
reshuffles on each iteration (`shuffle(..., reshuffle_each_iteration=True)`,
the default) trains on its second order under tf.distribute strategies but
on its first under strategies without the symbolic build (DTensor ones): one
seed, two runs. For a `tf.data.Dataset` the shapes and dtypes come from its
`element_spec` instead, and no batch is drawn.
"""

import tensorflow as tf

from tfpar.compat._keras import first_local_value, trainer_module
from tfpar.compat.patch import Patch


def _dataset_spec(epoch_iterator):
    """The TensorSpecs of a `tf.data.Dataset`'s batches (Keras builds from shapes
    and dtypes alone), or None for other inputs (arrays, generators)."""
    adapter = getattr(epoch_iterator, "data_adapter", None)
    dataset = getattr(adapter, "_dataset", None)  # TFDatasetAdapter's, private: pinned Keras
    if not isinstance(dataset, tf.data.Dataset):
        return None
    return dataset.element_spec


def _maybe_symbolic_build(self, iterator=None, data_batch=None):
    if self._distribute_strategy is None:
        return
    if iterator is not None and data_batch is None:
        data_batch = _dataset_spec(iterator)
    if iterator is not None and data_batch is None:
        for _, _, it in iterator:
            data_batch = tf.nest.map_structure(first_local_value, next(it))
            break
    with self.distribute_strategy.scope():
        self._symbolic_build(data_batch=data_batch)


def _install():
    cls = trainer_module().TensorFlowTrainer
    cls._tfpar_upstream_symbolic_build = cls._maybe_symbolic_build
    cls._maybe_symbolic_build = _maybe_symbolic_build


def _uninstall():
    cls = trainer_module().TensorFlowTrainer
    cls._maybe_symbolic_build = cls._tfpar_upstream_symbolic_build


PATCH = Patch("symbolic_build", "fix", "keras-team/keras#20585, tensorflow/tensorflow#72388",
              _install, _uninstall,
              requires=("keras.src.backend.tensorflow.trainer:TensorFlowTrainer._maybe_symbolic_build",))
