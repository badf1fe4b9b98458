"""Pipeline schedules measured: step time and bubble vs ideal, stash; GPT throughput.

    python bench/pipeline.py                 # K=4, M=8: 1F1B, interleaved, ZB-H1, ZBV (+ GPipe)
    python bench/pipeline.py --png docs/pipeline_schedules.png   # and draw the measured timelines
    python bench/pipeline.py --gpt           # also the reference GPT's tokens/s

Stages of fixed cost (`tfpar.strategies.pipeline.FixedCost`): per device a
forward of F seconds, an input gradient of B and a weight gradient of W
(default 20 ms each; a device of V virtual stages runs V stages of 1/V of
that). The measured step is compared with the ideal (`Schedule.simulate`)
twice: from the timeline (spans recorded by a marker per action, which
costs about a millisecond each) and from the wall-clock time of `fit`
steps without a timeline. Simulated devices share the host's cores: the
sleeps make the timing independent of the CPU's load, not of its wake-up
latency. Each schedule is also replayed directly in TensorFlow with the same
sleeps (`bare_tf_schedule`: no tfpar runner, no Keras): `bare_over_ideal` is
the host's floor, `wall_over_bare` / `timeline_over_bare` what tfpar adds.
"""

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tfpar  # noqa: E402

tfpar.simulate_devices(4)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from tfpar.strategies.pipeline import FixedCost, schedules  # noqa: E402

COMPARED = ("1f1b", "interleaved_1f1b", "zb_h1", "zbv", "gpipe")


def fixed_cost_run(name, stages, microbatches, seconds, steps, record):
    v = schedules.get(name).virtual_stages
    costs = [c / v for c in seconds]
    _, points = FixedCost.stages(stages * v, *costs)
    strategy = tfpar.Pipeline(split_points=points, microbatches=microbatches, schedule=name,
                              record_timeline=record)
    with strategy.scope():
        model, _ = FixedCost.stages(stages * v, *costs)
        model.compile(optimizer="sgd", loss="mse")
    x = np.ones((microbatches * 2 * steps, 4), "float32")
    wall = []

    class Clock(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            self.start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            wall.append(time.perf_counter() - self.start)

    model.fit(x, 0.5 * x, batch_size=microbatches * 2, verbose=0, callbacks=[Clock()])
    return strategy, wall[1:], strategy.schedule.simulate(stages, microbatches, *costs)


def schedules_table(stages, microbatches, seconds, steps, png=None):
    rows, drawn = [], {}
    for name in COMPARED:
        strategy, _, ideal = fixed_cost_run(name, stages, microbatches, seconds, steps, True)
        _, wall, _ = fixed_cost_run(name, stages, microbatches, seconds, steps + 1, False)
        timeline = strategy.timeline
        best = min(timeline.steps(), key=timeline.step_time)
        peaks = timeline.peak_stash(best)
        rows.append({
            "schedule": name, "K": stages, "M": microbatches,
            "V": strategy.schedule.virtual_stages,
            "ideal_s": round(ideal["step_time"], 4),
            "step_timeline_s": round(timeline.step_time(best), 4),
            "step_wall_s": round(min(wall), 4),
            "timeline_over_ideal": round(timeline.step_time(best) / ideal["step_time"], 3),
            "wall_over_ideal": round(min(wall) / ideal["step_time"], 3),
            "bubble": round(timeline.bubble_fraction(best), 3),
            "bubble_ideal": round(ideal["bubble_fraction"], 3),
            "peak_stash": [peaks[(0, d)] for d in range(stages)],
            "peak_stash_closed_form": strategy.schedule.peak_stash(stages, microbatches),
        })
        drawn[name] = (strategy.schedule, timeline.of_step(best))
        print(json.dumps(rows[-1]), flush=True)
    base = next(r for r in rows if r["schedule"] == "1f1b")
    for r in rows:
        r["ideal_vs_1f1b"] = round(r["ideal_s"] / base["ideal_s"], 3)
        r["timeline_vs_1f1b"] = round(r["step_timeline_s"] / base["step_timeline_s"], 3)
        r["wall_vs_1f1b"] = round(r["step_wall_s"] / base["step_wall_s"], 3)
    if png:
        draw(png, drawn, stages, microbatches, seconds)
    return rows


def bare_tf_schedule(name, stages, microbatches, seconds, steps=5):
    """The floor the host sets: the schedule replayed directly in TensorFlow.

    No tfpar runner, no Keras, no gradients: one `tf.function` in which each
    action of the schedule is FixedCost's sleep (a `numpy_function` on the
    data path) under its device's `tf.device`, reading the outputs of the
    actions it depends on (`schedules.dependencies`) and ordered after its
    device's previous action by a control dependency; a full backward sleeps
    its input and weight gradient one after the other before its output
    leaves (the ideal's terms). What this step costs over the ideal is the
    executor's and the sleeps', not the runner's. Returns the best step (s).
    """
    import tensorflow as tf

    from tfpar.strategies.pipeline.timeline import _device_lock, _sleep_until

    schedule = schedules.get(name)
    v = schedule.virtual_stages
    f, b, w = (c / v for c in seconds)
    costs = {"F": (f,), "B": (b,) if schedule.split_backward else (b, w), "W": (w,)}

    def slept(x, cost, lock):
        def run(a):
            with lock:
                _sleep_until(time.perf_counter() + cost)
            return a
        y = tf.numpy_function(run, [x], x.dtype, stateful=False)
        y.set_shape(x.shape)
        return y

    @tf.function(autograph=False)
    def step(x):
        out, last = {}, {}
        for action in schedule.creation_order(stages, microbatches):
            d = schedule.device_of(action.stage, stages)
            device = f"/device:CPU:{d}"
            deps = schedules.dependencies(action, stages * v, schedule.split_backward)
            inputs = [out[a] for a in deps] or [x + float(action.microbatch)]
            with tf.device(device), tf.control_dependencies([last[d]] if d in last else []):
                y = tf.add_n(inputs) if len(inputs) > 1 else tf.identity(inputs[0])
                for cost in costs[action.kind]:
                    y = slept(y, cost, _device_lock(device))
            out[action] = last[d] = y
        # Every action's output is fetched: a stateless op whose output nobody
        # reads is pruned, control dependencies or not.
        return tf.add_n([tf.reduce_sum(y) for y in out.values()])

    x = tf.ones((4, 4))
    step(x)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step(x).numpy()
        times.append(time.perf_counter() - start)
    return min(times)


def draw(path, drawn, stages, microbatches, seconds):
    """The measured timelines of one step of each schedule, in milliseconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tfpar.plan.render import draw_schedule

    names = [n for n in drawn if n != "gpipe"]
    fig, axes = plt.subplots(len(names), 1, figsize=(12, 0.6 + len(names) * 2.1), dpi=100,
                             sharex=True)
    for ax, name in zip(axes, names):
        schedule, spans = drawn[name]
        origin = min(s.start for s in spans)
        by_action = {schedules.Action(s.kind, s.model_stage, s.microbatch):
                     (s.start - origin, s.end - origin) for s in spans}
        draw_schedule(ax, schedule, stages, microbatches, by_action, unit=1e-3,
                      note=f" (measured, step {max(e for _, e in by_action.values()) * 1e3:.0f} "
                           "ms)")
    axes[-1].set_xlabel("ms")
    f, b, w = (round(x * 1e3) for x in seconds)
    fig.suptitle(f"K={stages} devices, M={microbatches} micro-batches, per device F={f} ms, "
                 f"B={b} ms, W={w} ms (tfpar, 4 simulated CPU devices)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def gpt_throughput(steps, batch=32, seq_len=64):
    config = tfpar.models.GPTConfig(layers=4, hidden=128, heads=4, seq_len=seq_len)
    tokens = np.random.RandomState(0).randint(0, 256, size=(batch * steps, seq_len + 1))
    x, y = tokens[:, :-1].astype("int32"), tokens[:, 1:].astype("int32")
    results = {}
    for name, make in (("one_device", lambda: None),
                       ("pipeline K=2 M=4 1f1b", lambda: tfpar.Pipeline(2, microbatches=4,
                                                                      schedule="1f1b")),
                       ("pipeline K=4 M=8 1f1b", lambda: tfpar.Pipeline(4, microbatches=8,
                                                                      schedule="1f1b"))):
        strategy = make()
        scope = strategy.scope() if strategy else _null()
        with scope:
            model = tfpar.models.gpt(config)
            model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss=tfpar.models.lm_loss())
        model.fit(x[:batch * 2], y[:batch * 2], batch_size=batch, verbose=0)  # trace
        start = time.perf_counter()
        model.fit(x, y, batch_size=batch, verbose=0)
        seconds = time.perf_counter() - start
        results[name] = batch * steps * seq_len / seconds
        print(json.dumps({"gpt": name, "tokens_per_s": round(results[name])}), flush=True)
    base = results["one_device"]
    return {k: {"tokens_per_s": round(v), "vs_one_device": round(v / base, 3)}
            for k, v in results.items()}


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *args):
        return False


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps")
    parser.add_argument("--cost", type=float, default=0.02,
                        help="seconds per device of a forward, an input and a weight gradient")
    parser.add_argument("--png", default=None, help="draw the measured timelines here")
    parser.add_argument("--gpt", action="store_true", help="also the GPT's tokens/s")
    args = parser.parse_args()
    steps = 2 if args.quick else 3
    table = schedules_table(4, 8, (args.cost,) * 3, steps, args.png)
    for r in table:
        bare = bare_tf_schedule(r["schedule"], 4, 8, (args.cost,) * 3)
        r["bare_tf_s"] = round(bare, 4)
        r["bare_over_ideal"] = round(bare / r["ideal_s"], 3)
        r["wall_over_bare"] = round(r["step_wall_s"] / bare, 3)
        r["timeline_over_bare"] = round(r["step_timeline_s"] / bare, 3)
    base = next(r for r in table if r["schedule"] == "1f1b")
    for r in table:
        r["bare_vs_1f1b"] = round(r["bare_tf_s"] / base["bare_tf_s"], 3)
        print(json.dumps({k: r[k] for k in ("schedule", "bare_tf_s", "bare_over_ideal",
                                            "wall_over_bare", "timeline_over_bare",
                                            "bare_vs_1f1b")}), flush=True)
    result = {"schedules": table}
    if args.gpt:
        result["gpt"] = gpt_throughput(5 if args.quick else 10)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
