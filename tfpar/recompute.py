"""Activation recomputation: keep a block's input, rebuild its activations in the backward.

A Transformer block keeps every intermediate activation for its backward
pass: at sequence length s, micro-batch b, hidden h and a heads, about
s*b*h*(34 + 5*a*s/h) bytes at 16 bits (Korthikanti et al., 2022). Two ways
to trade compute for that memory, named as Megatron-LM names them:

| mode | kept per block | extra compute |
| --- | --- | --- |
| `none` | every activation | none |
| `selective` | all but the attention core (scores, softmax, dropout: the 5*a*s/h term, the one that grows with s^2) | the attention core's forward again |
| `full` | only the block's input | the whole block's forward again (about 1/3 more FLOPs) |

`wrap(fn)` is the mechanism: `fn` runs without keeping its activations and
runs again when its gradient is needed (`keras.remat`, which on TensorFlow is
`tf.recompute_grad`). tfpar's GPT blocks take `recompute=` and use it; a
user's own block does the same in its `call`::

    class Block(keras.layers.Layer):
        def call(self, x, training=False):
            return tfpar.recompute.wrap(lambda h: self.forward(h, training=training))(x)

Bind `training` in a closure as above: `keras.RematScope` and keyword
arguments through the rematerialized function fail inside `fit` on
TensorFlow ("The custom_gradient decorator currently supports keywords
arguments only when eager execution is enabled", keras-team/keras#21207).
The recomputed forward must draw the same numbers as the first: layers with
dropout > 0 are refused (their seed generator would advance between the two).
"""

from __future__ import annotations

MODES = ("none", "selective", "full")


class RecomputeError(ValueError):
    """A recomputation setting that cannot work; the message says which and why."""


def check(mode: str, dropout: float = 0.0) -> str:
    """Returns `mode` if it is valid for a block with this dropout rate."""
    if mode not in MODES:
        raise RecomputeError(f"recompute={mode!r}: use one of {list(MODES)}.")
    if mode != "none" and dropout > 0:
        raise RecomputeError(
            f"recompute={mode!r} with dropout={dropout}: the recomputed forward would draw "
            "other dropout masks than the first, so the gradient would be wrong; use "
            "dropout=0 with recomputation.")
    return mode


def unsupported_by(strategy, mode: str) -> str | None:
    """Why `strategy` cannot recompute (mode other than "none"), or None.

    HSDP (`ShardedDataParallel` with dp > 1) keeps its weights on a second
    DTensor mesh; `tf.recompute_grad` routes the gradients of the variables a
    block reads through one IdentityN op together with the block's outputs,
    and DTensor refuses an op whose inputs live on two meshes ("All inputs to
    `tf_device.Cluster` must have same mesh configuration").
    """
    if mode == "none" or getattr(strategy, "storage_mesh", None) is None:
        return None
    return ("recomputation under HSDP (dp x fsdp) is not available in this tfpar release "
            "(its weights live on a second DTensor mesh, which tf.recompute_grad cannot "
            "route gradients to); use --recompute=none, or shard over every device "
            "(--fsdp without --dp) to recompute")


def wrap(fn):
    """`fn(x) -> y`, computed again in the backward pass instead of keeping its activations."""
    import keras

    from tfpar.strategies import registry

    reason = unsupported_by(registry.current(), "full")
    if reason:
        raise RecomputeError(reason + ".")
    return keras.remat(fn)
