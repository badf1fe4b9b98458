"""Fix: scalar metric reduction under MultiWorkerMirroredStrategy.

Same upstream issues as `symbolic_build`. `reduce_per_replica(..., "mean")`
calls `strategy.reduce("MEAN", v, axis=0)`; the step's logs are scalars, and
reducing a scalar along axis 0 raises "Invalid reduction dimension 0 for
input with 0 dimensions". For scalars the right reduction is the
element-wise mean across replicas: axis=None.
"""

import functools

import tensorflow as tf

from tfpar.compat._keras import first_local_value, trainer_module
from tfpar.compat.patch import Patch


def _make_reduce_per_replica(upstream):
    @functools.wraps(upstream)
    def reduce_per_replica(values, strategy, reduction):
        trainer = trainer_module()
        if reduction in ("auto", "mean") and trainer._collective_all_reduce_multi_worker(
            strategy
        ):

            def reduce_one(v):
                rank = first_local_value(v).shape.rank
                if rank == 0:
                    return strategy.reduce("MEAN", v, axis=None)
                return upstream(v, strategy, reduction)

            return tf.nest.map_structure(reduce_one, values)
        return upstream(values, strategy, reduction)

    reduce_per_replica._tfpar_upstream = upstream
    return reduce_per_replica


def _install():
    trainer = trainer_module()
    trainer.reduce_per_replica = _make_reduce_per_replica(trainer.reduce_per_replica)


def _uninstall():
    trainer = trainer_module()
    trainer.reduce_per_replica = trainer.reduce_per_replica._tfpar_upstream


PATCH = Patch("reduce_scalar_metrics", "fix",
              "keras-team/keras#20585, tensorflow/tensorflow#72388", _install, _uninstall,
              requires=("keras.src.backend.tensorflow.trainer:reduce_per_replica",))
