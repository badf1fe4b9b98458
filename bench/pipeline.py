"""Pipeline schedules measured: step time vs ideal, bubble vs theory, stash; GPT throughput.

    python bench/pipeline.py            # K = 2, 4 x M = 4, 8, 16, both schedules; GPT
    python bench/pipeline.py --quick    # fewer steps

Part 1 uses stages of fixed cost (`tfpar.strategies.pipeline.FixedCost`: a forward of
F seconds, a backward of 2F) so the measured step can be compared with the
ideal schedule (`Schedule.simulate`) and the bubble with (K-1)/(M+K-1).
Part 2 trains the reference GPT on one device and pipelined over simulated
CPU devices. Simulated devices share the host's cores: the ratio shows the
runner's overhead here, not the speed-up of real devices.
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

from tfpar.strategies.pipeline import FixedCost  # noqa: E402


def schedules_table(forward, steps):
    rows = []
    for stages in (2, 4):
        for microbatches in (4, 8, 16):
            for schedule in ("gpipe", "1f1b"):
                strategy = tfpar.Pipeline(stages=stages, microbatches=microbatches,
                                          schedule=schedule, record_timeline=True)
                with strategy.scope():
                    model = keras.Sequential([keras.Input((4,))] + [
                        FixedCost(forward, 2 * forward, name=f"cost_{i}")
                        for i in range(stages)])
                    model.compile(optimizer="sgd", loss="mse")
                x = np.ones((microbatches * 2 * steps, 4), "float32")
                model.fit(x, x, batch_size=microbatches * 2, verbose=0)
                timeline = strategy.timeline
                best = min(timeline.steps(), key=timeline.step_time)
                ideal = strategy.schedule.simulate(stages, microbatches, forward, 2 * forward)
                rows.append({
                    "K": stages, "M": microbatches, "schedule": schedule,
                    "step_s": round(timeline.step_time(best), 4),
                    "ideal_s": round(ideal["step_time"], 4),
                    "step_over_ideal": round(timeline.step_time(best) / ideal["step_time"], 3),
                    "bubble": round(timeline.bubble_fraction(best), 3),
                    "bubble_theory": round((stages - 1) / (microbatches + stages - 1), 3),
                    "peak_stash": max(timeline.peak_stash(best).values()),
                })
                print(json.dumps(rows[-1]), flush=True)
    return rows


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
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--forward", type=float, default=0.02, help="seconds per stage forward")
    args = parser.parse_args()
    steps = 2 if args.quick else 3
    table = schedules_table(args.forward, steps)
    gpt = gpt_throughput(5 if args.quick else 10)
    print(json.dumps({"schedules": table, "gpt": gpt}, indent=1))


if __name__ == "__main__":
    main()
