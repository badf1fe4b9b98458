"""Trains a small MLP on a 2x2 DTensor mesh and on one device; prints max |dw|.

With `--combine_all_reduces=1` it turns TensorFlow's all-reduce-combining
optimization back on after tfpar turned it off (TensorFlow reads the setting
once, when it compiles the first DTensor function, so this needs a fresh
process).
"""

import os
import sys

import numpy as np

import tfpar

tfpar.simulate_devices(4)

import keras  # noqa: E402

from tfpar.strategies.tensor.tensor_parallel import use_dense_gradients  # noqa: E402


def build():
    model = keras.Sequential([keras.Input((16,)),
                              keras.layers.Dense(32, activation="tanh", name="mlp_up"),
                              keras.layers.Dense(8, name="mlp_down")])
    rng = np.random.RandomState(7)
    model.set_weights([rng.normal(scale=0.3, size=w.shape).astype("float32")
                       for w in model.get_weights()])
    model.compile(optimizer=keras.optimizers.AdamW(1e-2, weight_decay=1e-2), loss="mse",
                  metrics=["mae"])
    return model


rng = np.random.RandomState(42)
x = rng.normal(size=(256, 16)).astype("float32")
y = np.tanh(x @ rng.normal(size=(16, 8))).astype("float32")
strategy = tfpar.TensorParallel("batch:2,model:2")
if "--combine_all_reduces=1" in sys.argv:
    os.environ["DTENSOR_ENABLE_COMBINE_ALL_REDUCES_OPTIMIZATION"] = "1"
with strategy.scope():
    sharded = build()
sharded.fit(x, y, batch_size=32, epochs=3, verbose=0, shuffle=False)
reference = build()
use_dense_gradients(reference.optimizer)
reference.fit(x, y, batch_size=32, epochs=3, verbose=0, shuffle=False)
diff = max(float(np.max(np.abs(a - b)))
           for a, b in zip(sharded.get_weights(), reference.get_weights()))
print(f"max_abs_diff {diff}")
