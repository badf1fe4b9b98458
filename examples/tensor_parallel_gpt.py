"""Tensor parallelism: the reference GPT split Megatron-style over a device mesh.

The model is built and compiled under `tfpar.TensorParallel`'s scope, as with
any tf.distribute strategy; the "megatron" layouts split the attention by
heads, the MLP column/row-wise and the embedding and LM head by vocabulary,
and `model.fit` runs each step as one SPMD program over the mesh::

    python examples/tensor_parallel_gpt.py --num_simulated_devices=4 --mesh=batch:2,model:2
    python examples/tensor_parallel_gpt.py --num_simulated_devices=4 --mesh=batch:1,model:4

It prints each device's share of the parameters and optimizer state (1/model
of the split ones) and the validation loss before and after training, on the
Python standard library's source text (no download).
"""

import json

from absl import app, flags

import tfpar
from tfpar import flags as tfpar_flags  # defines --strategy, --mesh, --layouts, ...
from tfpar.data import corpus, text

flags.DEFINE_integer("steps", 40, "Optimizer steps.")
flags.DEFINE_string("data_dir", None, "TFDS data directory for the prepared corpus.")
FLAGS = flags.FLAGS
FLAGS.set_default("strategy", "tensor")
FLAGS.set_default("mesh", "batch:2,model:2")


def main(argv):
    import keras

    strategy = tfpar.from_flags()
    batch = tfpar_flags.global_batch_size(strategy, default=16)
    shape = tfpar.models.GPTConfig(layers=2, hidden=64, heads=4, vocab=256, seq_len=32)
    def batches(split, train):
        return text.tfds_lm_batches(corpus.DEFAULT_DATASET, split, strategy, seq_len=shape.seq_len,
                                    global_batch_size=batch, train=train, data_dir=FLAGS.data_dir,
                                    eval_batches=None if train else 4)

    train, val = batches("train", True), batches("validation", False)
    with strategy.scope():
        model = tfpar.models.gpt(shape)
        model.compile(optimizer=keras.optimizers.AdamW(3e-3), loss=tfpar.models.lm_loss())
    before = model.evaluate(val, verbose=0)
    model.fit(train, epochs=2, steps_per_epoch=FLAGS.steps // 2, verbose=2)
    after = model.evaluate(val, verbose=0)
    memory = strategy.memory_report(model)
    print(json.dumps({
        "strategy": strategy.kind, "mesh": strategy.mesh_shape,
        "initial_val_loss": before, "final_val_loss": after,
        "parameter_bytes_per_device": memory["parameter_bytes_per_device"],
        "parameter_bytes_total": memory["parameter_bytes_total"],
        "optimizer_bytes_per_device": memory["optimizer_bytes_per_device"]}))


if __name__ == "__main__":
    app.run(main)
