"""Text from a trained language model: autoregressive sampling with top-k.

The trained weights are copied into a plain single-device model first, so
sampling is the same whatever strategy trained them (a sharded or staged
model gives its weights through `get_weights`).

Example::

    text = generate(tfpar.models.gpt(config), tokenizer, prompt="def ", max_new_tokens=200)
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def generate(model, tokenizer, prompt: str, max_new_tokens: int, temperature: float = 0.8,
             top_k: int = 40, context: int | None = None, seed: int = 0) -> str:
    """`prompt` followed by `max_new_tokens` sampled tokens, decoded.

    Each new token is drawn from the softmax of the last position's logits
    divided by `temperature`, restricted to the `top_k` most likely tokens
    (top_k=1 is greedy). The model sees at most `context` tokens (its
    sequence length): older ones slide out of the window.
    """
    if max_new_tokens < 0 or temperature <= 0 or top_k < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}, temperature={temperature}, "
                         f"top_k={top_k}: need >= 0, > 0 and >= 1.")
    ids = [int(i) for i in np.asarray(tokenizer.encode(tf.constant(prompt)))]
    if not ids:
        ids = [0]
    context = context or model.input_shape[1] or len(ids) + max_new_tokens

    @tf.function(input_signature=[tf.TensorSpec([1, None], tf.int32),
                                  tf.TensorSpec([2], tf.int32)])
    def next_token(window, seed_pair):
        logits = model(window, training=False)[0, -1] / temperature
        k = min(top_k, int(logits.shape[-1]))
        values, indices = tf.math.top_k(logits, k=k)
        choice = tf.random.stateless_categorical(values[None], 1, seed=seed_pair)[0, 0]
        return tf.gather(indices, choice)

    for i in range(max_new_tokens):
        window = tf.constant([ids[-context:]], tf.int32)
        ids.append(int(next_token(window, tf.constant([seed, i], tf.int32))))
    return tokenizer.decode(ids)
