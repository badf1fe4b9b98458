"""Fix: gradient clipping and accumulation under tf.distribute strategies.

Keras 3's optimizer clips (`clipnorm`, `global_clipnorm`, `clipvalue`) and
accumulates (`gradient_accumulation_steps`) *before* the TF backend's
`_backend_update_step` all-reduces the gradients, so:
  - each replica clips its own partial gradient by its own norm: data-parallel
    training silently differs from one device (AdamW, global_clipnorm=0.05,
    4 replicas: 2.2e-2 off after 24 steps). Clipping must follow the
    all-reduce (tensorflow/tensorflow#33929, where tf.keras 2 refused to clip
    under a strategy for this reason);
  - accumulation puts the update in an `ops.cond` whose branches call
    `merge_call`, which fails at once in every strategy that uses merge calls
    (all of them except XLA on GPUs): "`merge_call` called while defining a
    new graph or a tf.function" (keras-team/keras#17429).
The fix changes the order, not the arithmetic: in replica context the raw
gradients are all-reduced first (Keras already scales each replica's loss
by 1/replicas, so the sum is the global batch's gradient), then one
`merge_call` runs Keras's own clipping, accumulation, weight decay and
update in cross-replica context on the reduced gradient, where a cond may
hold variable updates. There `maybe_merge_call` (which Keras calls for each
update) must call its function directly: `merge_call` only exists in
replica context. Verified on Keras 3.15.1, TensorFlow 2.21.

Being the one place where tf.distribute strategies all-reduce gradients, it
also casts them to the strategy's `reduce_dtype` (16-bit gradient
reduction) before the all-reduce and back to the variable's dtype after.
"""

import functools

import keras
import tensorflow as tf

from tfpar.compat.patch import Patch


def _reduce_before_apply(upstream):
    @functools.wraps(upstream)
    def _backend_apply_gradients(self, grads, trainable_variables):
        if not tf.distribute.has_strategy() or tf.distribute.in_cross_replica_context():
            return upstream(self, grads, trainable_variables)
        # A tfpar strategy's reduce_dtype: the gradients cross devices in 16 bits.
        wire = getattr(tf.distribute.get_strategy(), "reduce_dtype", None)
        reduced = self._all_reduce_sum_gradients(
            list(zip([_cast(g, wire) for g in grads],
                     [_tf_variable(v) for v in trainable_variables])))

        def apply_reduced(strategy, grads):
            # After the all-reduce every replica holds the same values; the
            # first local one stands for all (updates copy it to each device).
            grads = [None if g is None else
                     _cast(strategy.experimental_local_results(g)[0], v.dtype if wire else None)
                     for g, v in zip(grads, trainable_variables)]
            return upstream(self, grads, trainable_variables)

        tf.distribute.get_replica_context().merge_call(
            apply_reduced, args=([g for g, _ in reduced],))

    _backend_apply_gradients._tfpar_upstream = upstream
    return _backend_apply_gradients


def _cast(gradient, dtype):
    if gradient is None or dtype is None:
        return gradient
    if isinstance(gradient, tf.IndexedSlices):
        return tf.IndexedSlices(tf.cast(gradient.values, dtype), gradient.indices,
                                gradient.dense_shape)
    return tf.cast(gradient, dtype)


def _tf_variable(variable):
    return variable.value if isinstance(variable, keras.Variable) else variable


def _make_maybe_merge_call(upstream):
    @functools.wraps(upstream)
    def maybe_merge_call(fn, strategy, *args, **kwargs):
        if tf.distribute.in_cross_replica_context():
            return fn(strategy, *args, **kwargs)
        return upstream(fn, strategy, *args, **kwargs)

    maybe_merge_call._tfpar_upstream = upstream
    return maybe_merge_call


def _optimizer_class():
    from keras.src.backend.tensorflow.optimizer import TFOptimizer  # private, pinned

    return TFOptimizer


def _install():
    cls = _optimizer_class()
    interim = tf.__internal__.distribute.interim
    cls._backend_apply_gradients = _reduce_before_apply(cls._backend_apply_gradients)
    interim.maybe_merge_call = _make_maybe_merge_call(interim.maybe_merge_call)


def _uninstall():
    cls = _optimizer_class()
    interim = tf.__internal__.distribute.interim
    cls._backend_apply_gradients = cls._backend_apply_gradients._tfpar_upstream
    interim.maybe_merge_call = interim.maybe_merge_call._tfpar_upstream


PATCH = Patch("reduce_before_apply", "fix",
              "tensorflow/tensorflow#33929, keras-team/keras#17429", _install, _uninstall,
              requires=("keras.src.backend.tensorflow.optimizer:TFOptimizer._backend_apply_gradients",))
