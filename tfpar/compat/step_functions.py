"""Mechanism of `TensorParallel` and `Pipeline`: their own train, test and predict steps.

Keras's `fit` builds its step functions for a `tf.distribute` strategy;
a DTensor program (batches packed onto the mesh) and the pipeline runner
(stages, micro-batches, a schedule) need their own. Models whose weights a
strategy of `tfpar.strategies.registry` owns get that strategy's step
functions (`strategy.step_function(model, kind)`); every other model keeps
Keras's.
"""

import functools

from tfpar.compat._keras import trainer_module
from tfpar.compat.patch import Patch

# Keras's step-function factories, the trainer attribute each one sets, and its kind.
FACTORIES = {"make_train_function": ("train_function", "train"),
             "make_test_function": ("test_function", "test"),
             "make_predict_function": ("predict_function", "predict")}


def _step_factory(upstream, name):
    attribute, kind = FACTORIES[name]

    @functools.wraps(upstream)
    def make(self, force=False):
        from tfpar.strategies import registry

        strategy = registry.strategy_of(self)
        if strategy is None:
            return upstream(self, force)
        if getattr(self, attribute) is None or force:
            setattr(self, attribute, strategy.step_function(self, kind))
        return getattr(self, attribute)

    make._tfpar_upstream = upstream
    return make


def _install():
    trainer = trainer_module().TensorFlowTrainer
    for name in FACTORIES:
        setattr(trainer, name, _step_factory(getattr(trainer, name), name))


def _uninstall():
    trainer = trainer_module().TensorFlowTrainer
    for name in FACTORIES:
        setattr(trainer, name, getattr(trainer, name)._tfpar_upstream)


PATCH = Patch("step_functions", "mechanism",
              "Keras 3's TF trainer builds steps for tf.distribute strategies only",
              _install, _uninstall,
              requires=tuple(f"keras.src.backend.tensorflow.trainer:TensorFlowTrainer.{n}"
                             for n in FACTORIES))
