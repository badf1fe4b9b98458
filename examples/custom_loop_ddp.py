"""A custom data-parallel training loop in the style of PyTorch DDP, done right.

Every replica holds the whole model and computes gradients on its slice of
the global batch; **one all-reduce averages the gradients**, and every
replica then applies the same averaged gradient to its own copy of the
weights, so the copies stay identical without parameters ever being sent.
That is what `DistributedDataParallel` does (its gradient hooks all-reduce,
then each rank's `optimizer.step()`).

A common tutorial instead lets each replica step on its own gradient and
then averages the *parameters*. With SGD from identical weights the two
agree; with Adam (or momentum, weight decay, clipping) they do not: each
replica's moments are built from its own gradients, and the average of the
updated weights is not the update of the averaged gradient.
`--sync=parameters` runs that version so you can see the difference.

    python examples/custom_loop_ddp.py --num_simulated_devices=4 --check
    python examples/custom_loop_ddp.py --num_simulated_devices=4 --check --sync=parameters
    tfpar launch --nproc 2 -- python examples/custom_loop_ddp.py --check

`--check` also trains the same model on one device with the whole global
batch and prints the largest weight difference: ~1e-7 with gradient
averaging, ~1e-2 with parameter averaging.
"""

import json

import numpy as np
from absl import app, flags

import tfpar
from tfpar import flags as tfpar_flags  # defines --strategy, --num_simulated_devices, ...

flags.DEFINE_integer("steps", 30, "Optimizer steps.")
flags.DEFINE_enum("sync", "gradients", ["gradients", "parameters"],
                  "What the replicas all-reduce: gradients (DDP, correct) or parameters "
                  "(the tutorial mistake).")
flags.DEFINE_bool("check", False, "Also train on one device and print the weight difference.")
FLAGS = flags.FLAGS


def make_data(n=4096, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 32)).astype("float32")
    y = (np.sin(x[:, :8]) @ rng.normal(size=(8, 4))).astype("float32")
    return x, y


def build_model():
    import keras

    model = keras.Sequential([keras.Input((32,)), keras.layers.Dense(64, activation="gelu"),
                              keras.layers.Dense(64, activation="gelu"), keras.layers.Dense(4)])
    rng = np.random.default_rng(1)  # the same initial weights everywhere
    model.set_weights([rng.normal(scale=0.2, size=w.shape).astype("float32")
                       for w in model.get_weights()])
    return model


def per_example_loss(y, prediction):
    import tensorflow as tf

    return tf.reduce_mean(tf.square(y - prediction), axis=-1)


def train_distributed(strategy, dataset, global_batch):
    import keras
    import tensorflow as tf

    with strategy.scope():
        model = build_model()
        optimizer = keras.optimizers.Adam(1e-2)
        optimizer.build(model.trainable_variables)

    def step_on_every_replica(grads):
        # DDP's `optimizer.step()` on every rank: each replica updates its own
        # copy of the weights with its own (here: already averaged) gradient.
        # The update runs once per device in cross-replica context.
        def update(_, grads):
            optimizer.apply(grads, model.trainable_variables)

        tf.distribute.get_replica_context().merge_call(update, args=(grads,))

    def replica_step(x, y):
        context = tf.distribute.get_replica_context()
        with tf.GradientTape() as tape:
            # Divided by the *global* batch: summing over replicas gives the mean.
            loss = tf.nn.compute_average_loss(per_example_loss(y, model(x, training=True)),
                                              global_batch_size=global_batch)
        grads = tape.gradient(loss, model.trainable_variables)
        if FLAGS.sync == "gradients":
            # The all-reduce: every replica now holds the global batch's gradient.
            grads = context.all_reduce(tf.distribute.ReduceOp.SUM, grads)
            step_on_every_replica(grads)
        else:
            # The mistake: step on the local gradient (this replica's mean), then
            # average the weights. Replicas drift apart between averages.
            replicas = strategy.num_replicas_in_sync
            step_on_every_replica([g * replicas for g in grads])
            averaged = context.all_reduce(tf.distribute.ReduceOp.MEAN,
                                          [v.value for v in model.trainable_variables])

            def assign(strategy, values):
                for variable, value in zip(model.trainable_variables, values):
                    strategy.extended.update(variable.value, lambda v, t: v.assign(t),
                                             args=(value,))

            context.merge_call(assign, args=(averaged,))
        return loss

    @tf.function
    def train_step(batch):
        losses = strategy.run(replica_step, args=batch)
        return strategy.reduce(tf.distribute.ReduceOp.SUM, losses, axis=None)

    batches = iter(strategy.experimental_distribute_dataset(dataset))
    losses = [float(train_step(next(batches))) for _ in range(FLAGS.steps)]
    return model, losses


def train_one_device(dataset):
    import keras
    import tensorflow as tf

    model = build_model()
    optimizer = keras.optimizers.Adam(1e-2)

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(per_example_loss(y, model(x, training=True)))
        optimizer.apply(tape.gradient(loss, model.trainable_variables),
                        model.trainable_variables)
        return loss

    batches = iter(dataset)
    for _ in range(FLAGS.steps):
        step(*next(batches))
    return model


def main(argv):
    strategy = tfpar.from_flags()
    global_batch = tfpar_flags.global_batch_size(strategy, default=64)

    def dataset():
        # A new dataset object each time: tf.data reshuffles a dataset on each
        # new iterator, so a second iterator of one object sees another order.
        return tfpar.data.from_arrays(make_data(), strategy, global_batch_size=global_batch,
                                      shuffle=True, seed=0, repeat=True)

    model, losses = train_distributed(strategy, dataset(), global_batch)
    result = {"strategy": strategy.kind, "replicas": strategy.num_replicas_in_sync,
              "sync": FLAGS.sync, "first_loss": losses[0], "last_loss": losses[-1]}
    if FLAGS.check:
        reference = train_one_device(dataset())
        result["max_weight_difference_to_one_device"] = max(
            float(np.max(np.abs(a - b)))
            for a, b in zip(model.get_weights(), reference.get_weights()))
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(main)
