"""Prints one JSON line: for each pipeline x tensor x (sharded) data layout on 8
devices under its schedule (under GPipe and 1F1B with the argument `all`), max
|dw| from the exact single-device run after 10 AdamW steps of a GPT, and the
bytes its fullest device keeps.

One process for the whole matrix (tests/test_three_d.py runs it): in-process
tests have 4 simulated devices.
"""

import json
import sys
from pathlib import Path

import keras

import tfpar

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from consistency_cases import max_abs_diff, train_lm  # noqa: E402

STEPS, BATCH, MICROBATCHES = 10, 16, 4
# 4 heads and a vocabulary of 64: a 4-way model axis splits both.
SHAPE = tfpar.models.GPTConfig(layers=2, hidden=32, heads=4, vocab=64, seq_len=16)
# name: (pp, tp, dp, fsdp), and the schedule the suite runs it with.
LAYOUTS = {"pp2 tp2 dp2": ((2, 2, 2, 1), "1f1b"), "pp2 tp4": ((2, 4, 1, 1), "gpipe"),
           "pp4 tp2": ((4, 2, 1, 1), "1f1b"), "pp2 tp2 fsdp2": ((2, 2, 1, 2), "gpipe")}
# `all`: every layout under both GPipe and 1F1B (the full matrix, about twice the
# time). The suite runs each layout under one of them: both schedules reach the
# same stage-mesh actions, and tests/test_three_d.py checks each schedule's order
# on the step graph and in a profiled step.
EVERY_SCHEDULE = len(sys.argv) > 1 and sys.argv[1] == "all"


def checkpoint_round_trip(trained):
    """Weights saved from a 3-D model load into a plain one, and back into a new 3-D one."""
    import tempfile

    path = Path(tempfile.mkdtemp()) / "three_d.weights.h5"
    trained.save_weights(path)
    plain = tfpar.models.gpt(SHAPE)
    plain.load_weights(path)
    again = tfpar.Pipeline(stages=2, tensor_parallel=2, replicas=2, microbatches=MICROBATCHES)
    with again.scope():
        fresh = tfpar.models.gpt(SHAPE)
        fresh.compile(optimizer="adamw", loss=tfpar.models.lm_loss())
    again.prepare(fresh)  # the weights now live on the stage meshes
    plain.save_weights(path.with_name("plain.weights.h5"))
    fresh.load_weights(path.with_name("plain.weights.h5"))
    return {"plain_from_3d": max_abs_diff(trained, plain),
            "3d_from_plain": max_abs_diff(plain, fresh)}


def main():
    tfpar.simulate_devices(8)
    exact = train_lm(tfpar.OneDevice(), SHAPE, steps=STEPS, batch=BATCH)
    keras.utils.set_random_seed(0)
    start = tfpar.models.gpt(SHAPE)  # the initial weights every run starts from
    rows = {"moved": max_abs_diff(exact, start)}
    for name, ((pp, tp, dp, fsdp), suite_schedule) in LAYOUTS.items():
        for schedule in ["gpipe", "1f1b"] if EVERY_SCHEDULE else [suite_schedule]:
            strategy = tfpar.Pipeline(stages=pp, tensor_parallel=tp, replicas=dp, fsdp=fsdp,
                                      microbatches=MICROBATCHES, schedule=schedule)
            model = train_lm(strategy, SHAPE, steps=STEPS, batch=BATCH)
            report = strategy.memory_report(model)
            if (name, schedule) == ("pp2 tp2 dp2", "1f1b"):
                rows["checkpoint"] = checkpoint_round_trip(model)
            rows[f"{name} {schedule}"] = {
                "max_abs_diff": max_abs_diff(exact, model),
                "dims": strategy.dims.describe(),
                **{k: v for k, v in report.items() if k != "per_device"}}
    # Clipped by one norm over both stage meshes (tfpar train clips at 1.0);
    # at 0.5 the clipped run ends 2e-3 from the unclipped one.
    clipped = train_lm(tfpar.OneDevice(), SHAPE, steps=STEPS, batch=BATCH, global_clipnorm=0.5)
    strategy = tfpar.Pipeline(stages=2, tensor_parallel=2, replicas=2, microbatches=MICROBATCHES)
    rows["clipped"] = {
        "max_abs_diff": max_abs_diff(clipped, train_lm(strategy, SHAPE, steps=STEPS, batch=BATCH,
                                                       global_clipnorm=0.5)),
        "clipping_moved": max_abs_diff(clipped, exact)}
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
