"""Fix: an IndexedSlices gradient's duplicate rows are summed before the optimizer uses it.

An Embedding's gradient is a `tf.IndexedSlices` with one row per looked-up
token, so a token seen twice in a batch has two rows. Keras 3 on TensorFlow
hands it to the optimizer as it is: Adam squares it row by row (`ops.square`
keeps the slices), so that token's second moment gets g1^2 + g2^2 instead of
(g1 + g2)^2, and global-norm clipping measures ||g1||^2 + ||g2||^2. One
Transformer with an Embedding, 12 AdamW steps: 2.0e-2 from the exact
(dense-gradient) run on one device and under DataParallel (whose all-reduce
of IndexedSlices concatenates every replica's rows: more duplicates).
tf.keras 2 summed them (`optimizer_v2._deduplicate_indexed_slices`); Keras 3
lost it.

The fix sums duplicate rows (`tf.unique` + `unsorted_segment_sum`) at the
start of `_clip_gradients`, which Keras calls on every path before clipping,
weight decay and `update_step`, and which `reduce_before_apply` runs after
the all-reduce: the update is exact (equal to the dense gradient's) and
still sparse, its cost growing with the rows touched, not the vocabulary.
"""

import functools

import tensorflow as tf

from tfpar.compat.patch import Patch


def sum_duplicate_rows(gradient):
    """An IndexedSlices with each index once, its rows summed (anything else as is).

    Example: indices [3, 1, 3] with rows [a, b, c] -> indices [3, 1], rows [a + c, b].
    """
    if not isinstance(gradient, tf.IndexedSlices):
        return gradient
    unique, positions = tf.unique(gradient.indices)
    values = tf.math.unsorted_segment_sum(gradient.values, positions, tf.shape(unique)[0])
    return tf.IndexedSlices(values, unique, gradient.dense_shape)


def _summing_clip(upstream):
    @functools.wraps(upstream)
    def _clip_gradients(self, grads):
        return upstream(self, [sum_duplicate_rows(g) for g in grads])

    _clip_gradients._tfpar_upstream = upstream
    return _clip_gradients


def _optimizer_class():
    from keras.src.optimizers.base_optimizer import BaseOptimizer  # private, pinned

    return BaseOptimizer


def _install():
    cls = _optimizer_class()
    cls._clip_gradients = _summing_clip(cls._clip_gradients)


def _uninstall():
    cls = _optimizer_class()
    cls._clip_gradients = cls._clip_gradients._tfpar_upstream


PATCH = Patch("sum_duplicate_rows", "fix",
              "tf.keras 2 summed duplicate IndexedSlices rows (_deduplicate_indexed_slices); "
              "Keras 3 does not", _install, _uninstall,
              requires=("keras.src.optimizers.base_optimizer:BaseOptimizer._clip_gradients",))
