"""Pipeline parallelism: the reference GPT cut into stages, trained with model.fit.

`tfpar.Pipeline` splits the GPT between its blocks (balancing parameters),
puts each stage's weights and optimizer slots on its own device and runs
every batch as micro-batches on a GPipe or 1F1B schedule. The timeline of
each (stage, micro-batch, forward/backward) action is recorded, so the
bubble can be compared with (K-1)/(M+K-1), and saved as a Chrome trace::

    python examples/pipeline_gpt.py --num_simulated_devices=2 --pipeline_stages=2 --microbatches=4
    python examples/pipeline_gpt.py --num_simulated_devices=4 --pipeline_stages=4 \\
        --microbatches=8 --schedule=gpipe --trace=/tmp/pipeline.json   # open in Perfetto

Simulated devices share the host's cores: this shows the schedule and the
exact gradients, not a speed-up.
"""

import json

from absl import app, flags

import tfpar
from tfpar import flags as tfpar_flags  # noqa: F401  (--pipeline_stages, --microbatches, ...)
from tfpar.data import corpus, text

flags.DEFINE_integer("steps", 20, "Optimizer steps.")
flags.DEFINE_string("trace", None, "Write the timeline as a Chrome trace (JSON) here.")
flags.DEFINE_string("data_dir", None, "TFDS data directory for the prepared corpus.")
FLAGS = flags.FLAGS
FLAGS.set_default("strategy", "pipeline")
FLAGS.set_default("pipeline_stages", 2)
FLAGS.set_default("microbatches", 4)


def main(argv):
    import keras

    if FLAGS.num_simulated_devices:
        tfpar.simulate_devices(FLAGS.num_simulated_devices)
    m = FLAGS.microbatches
    # Built by hand rather than by tfpar.from_flags(), to record the timeline.
    strategy = tfpar.Pipeline(stages=FLAGS.pipeline_stages, microbatches=m,
                              schedule=FLAGS.schedule, record_timeline=True)
    shape = tfpar.models.GPTConfig(layers=4, hidden=64, heads=4, vocab=256, seq_len=32)
    def batches(split, train):
        return text.tfds_lm_batches(corpus.DEFAULT_DATASET, split, strategy, seq_len=shape.seq_len,
                                    global_batch_size=16, train=train, data_dir=FLAGS.data_dir,
                                    eval_batches=None if train else 4)

    train, val = batches("train", True), batches("validation", False)
    with strategy.scope():
        model = tfpar.models.gpt(shape)
        model.compile(optimizer=keras.optimizers.AdamW(3e-3), loss=tfpar.models.lm_loss())
    before = model.evaluate(val, verbose=0)
    model.fit(train, epochs=2, steps_per_epoch=FLAGS.steps // 2, verbose=2)
    after = model.evaluate(val, verbose=0)
    k = strategy.num_stages
    timeline = strategy.timeline
    if FLAGS.trace:
        timeline.save_chrome_trace(FLAGS.trace)
    print(json.dumps({
        "strategy": strategy.kind, "schedule": strategy.schedule.name,
        "stages": [stage.spec.layer_names for stage in strategy.stages],
        "devices": [stage.device for stage in strategy.stages],
        "microbatches": m, "initial_val_loss": before, "final_val_loss": after,
        "bubble_measured": timeline.bubble_fraction(-1), "bubble_theory": (k - 1) / (m + k - 1),
        "peak_stash": {str(stage): n for (_, stage), n in timeline.peak_stash(-1).items()}}))


if __name__ == "__main__":
    app.run(main)
