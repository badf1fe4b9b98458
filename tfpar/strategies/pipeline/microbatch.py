"""Micro-batches: splitting a batch along its first axis, and merging outputs back.

Every tensor of a (nested) batch is cut into M equal consecutive slices;
micro-batch i is the structure of the i-th slices. Worked example, a batch
``(x, y)`` of 8 rows and M = 4::

    x: rows 0..7  -> x0 = rows 0-1, x1 = rows 2-3, x2 = rows 4-5, x3 = rows 6-7
    y: likewise   -> micro-batches [(x0, y0), (x1, y1), (x2, y2), (x3, y3)]

Equal slices make the mean of the micro-batch losses equal the loss of the
whole batch (Keras losses average over the batch), so accumulating
``grad(loss_i) / M`` gives the gradient of the whole batch exactly.
"""

from __future__ import annotations

import logging

import tensorflow as tf

log = logging.getLogger("tfpar")


def count_for(rows: int, microbatches: int) -> int:
    """The micro-batch count used for a batch of `rows` rows.

    `microbatches` if it divides `rows`, else its largest divisor below it
    that divides `rows` (a last partial batch of an epoch, an evaluation
    batch): micro-batches must be equal for the loss to be exact.
    """
    if rows < 1:
        raise ValueError(f"a batch of {rows} rows cannot be split into micro-batches.")
    for m in range(min(microbatches, rows), 0, -1):
        if rows % m == 0:
            return m
    return 1


def split(batch, num: int) -> list:
    """[micro-batch 0, ..., micro-batch num-1]; None entries stay None."""
    if num == 1:
        return [batch]
    flat = tf.nest.flatten(batch)
    parts = [None if t is None else tf.split(t, num, axis=0) for t in flat]
    return [tf.nest.pack_sequence_as(batch, [None if p is None else p[i] for p in parts])
            for i in range(num)]


def merge(outputs: list):
    """Concatenates per-micro-batch outputs (same structure) along the first axis."""
    if len(outputs) == 1:
        return outputs[0]
    return tf.nest.map_structure(lambda *t: tf.concat(t, axis=0), *outputs)


def rows_of(batch) -> int:
    first = next(t for t in tf.nest.flatten(batch) if t is not None)
    return int(tf.convert_to_tensor(first).shape[0])
