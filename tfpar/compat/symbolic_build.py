"""Fix: Keras's symbolic build under MultiWorkerMirroredStrategy.

keras-team/keras#20585, tensorflow/tensorflow#72388, ray-project/ray#47464.
`TensorFlowTrainer._maybe_symbolic_build` takes one batch to build the model
and calls `strategy.reduce("MEAN", (x, y), axis=None)` on it. Under
MultiWorkerMirroredStrategy that is a cross-worker collective on a tuple of
PerReplica values and raises "Attempt to convert a value (PerReplica:...) to
a Tensor". The batch is needed only for its shapes and dtypes, so a local
replica's value serves, with no communication at all.
"""

import tensorflow as tf

from tfpar.compat._keras import first_local_value, trainer_module
from tfpar.compat.patch import Patch


def _maybe_symbolic_build(self, iterator=None, data_batch=None):
    if self._distribute_strategy is None:
        return
    if iterator is not None:
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
