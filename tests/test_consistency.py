"""Identical, exact training under every strategy: one consistency matrix.

The same small GPT (an Embedding and a Transformer block), from the same
initial weights, trains 12 AdamW steps on the same batches under each
strategy. Its weights must end within 1e-5 of the exact single-device run
(one device, dense Embedding gradients via `use_dense_gradients`), and so
within 1e-5 of each other:

| row | ParallelDims | strategy |
| --- | --- | --- |
| one_device | () | `OneDevice`, sparse Embedding updates (tfpar's `sum_duplicate_rows`) |
| data_parallel | dp=4 | `DataParallel`, sparse updates (the fix) |
| multi_worker | 2 processes | `MultiWorker` under `tfpar launch` (one launch, both models) |
| tensor_1x4 | tp=4 | `TensorParallel` "batch:1,model:4", megatron layouts |
| tensor_2x2 | dp=2, tp=2 | `TensorParallel` "batch:2,model:2" |
| pipeline_gpipe | pp=2, M=4 | `Pipeline`, GPipe |
| pipeline_1f1b | pp=4, M=4 | `Pipeline`, 1F1B |
| pipeline_*_2_replicas | pp=2, dp=2, M=2 | `Pipeline` with 2 data-parallel replicas |

A small CNN with `keras.layers.BatchNormalization(synchronized=True)` goes
through the strategies that split a batch: every weight, the moving mean
and variance included, must match `OneDevice` within 1e-5. What each
strategy does with the batch statistics:

- `DataParallel`, `MultiWorker` (tf.distribute): `synchronized=True` sums
  each replica's moments with a cross-replica all-reduce: full-batch
  statistics. With `synchronized=False` each replica normalizes its own
  rows (and training differs, as Keras documents).
- `TensorParallel` (DTensor): the batch is one global tensor, sharded on
  the batch axis; DTensor reduces the moments over every shard whatever
  `synchronized` says: full-batch statistics either way.
- `Pipeline`: the documented exception. Each micro-batch (of each replica)
  runs the forward pass on its own, so BatchNormalization normalizes over
  the micro-batch, not the batch; training then equals one-device gradient
  accumulation over the same micro-batches, not one-device full-batch
  training. With one micro-batch and one replica it is exact.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfpar
from consistency_cases import (BATCH, CASES, LEARNING_RATE, STEPS, TOLERANCE, by_path, cnn,
                               cnn_data, compiled, initial_weights, loss, max_abs_diff)
from tfpar import ParallelDims
from tfpar.strategies.tensor.tensor_parallel import use_dense_gradients

GPT_ROWS = {
    "one_device": ParallelDims(),
    "data_parallel": ParallelDims(dp=4),
    "tensor_1x4": ParallelDims(tp=4),
    "tensor_2x2": ParallelDims(dp=2, tp=2),
    "pipeline_gpipe": ParallelDims(pp=2, microbatches=4, schedule="gpipe"),
    "pipeline_1f1b": ParallelDims(pp=4, microbatches=4, schedule="1f1b"),
    "pipeline_gpipe_2_replicas": ParallelDims(pp=2, dp=2, microbatches=2, schedule="gpipe"),
    "pipeline_1f1b_2_replicas": ParallelDims(pp=2, dp=2, microbatches=2, schedule="1f1b"),
}

# (dims, strategy kind): data parallelism on a DTensor mesh is TensorParallel
# with replicated weights ("batch:4,model:1").
CNN_ROWS = {
    "data_parallel": (ParallelDims(dp=4), None),
    "tensor_batch_4_replicated": (ParallelDims(dp=4), "tensor"),
    "pipeline_one_microbatch": (ParallelDims(pp=2), None),
}


def build_row(dims, kind=None):
    return tfpar.strategies.build(dims, kind=kind, layouts="replicated" if kind else "megatron")


def train(strategy, case, initial, dense=False, build=None):
    x, y = CASES[case][1]()
    with strategy.scope():
        model = compiled(case, initial, build)
        if dense:
            use_dense_gradients(model.optimizer)
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == STEPS
    return model


@pytest.fixture(scope="module")
def initial():
    return {case: initial_weights(case) for case in CASES}


@pytest.fixture(scope="module")
def exact(initial):
    """The references: the GPT with dense (exact) Embedding gradients, the CNN as is."""
    return {"gpt": train(tfpar.OneDevice(), "gpt", initial["gpt"], dense=True),
            "cnn": train(tfpar.OneDevice(), "cnn", initial["cnn"])}


@pytest.fixture(scope="module")
def gpt_row(initial):
    """Trains the GPT under a row of the matrix (once per module)."""
    trained = {}

    def get(name):
        if name not in trained:
            trained[name] = train(build_row(GPT_ROWS[name]), "gpt", initial["gpt"])
        return trained[name]

    return get


def test_the_references_moved_far_beyond_the_tolerance(exact, initial):
    for case in CASES:
        start = CASES[case][0]()
        start.set_weights(initial[case])
        assert max_abs_diff(start, exact[case]) > 1e3 * TOLERANCE, case


# ------------------------------------------------------------------- GPT
@pytest.mark.parametrize("row", list(GPT_ROWS))
def test_gpt_matches_the_exact_one_device_run(row, gpt_row, exact):
    model = gpt_row(row)
    assert tfpar.strategies.strategy_for(model).dims == GPT_ROWS[row]
    assert max_abs_diff(exact["gpt"], model) <= TOLERANCE


@pytest.mark.parametrize("a, b", [("tensor_2x2", "pipeline_1f1b_2_replicas"),
                                  ("data_parallel", "tensor_1x4")])
def test_distributed_rows_agree_with_each_other(a, b, gpt_row):
    assert max_abs_diff(gpt_row(a), gpt_row(b)) <= TOLERANCE


# ------------------------------------------------- synchronized BatchNormalization
@pytest.mark.parametrize("row", list(CNN_ROWS))
def test_synchronized_batch_normalization_matches_one_device(row, initial, exact):
    model = train(build_row(*CNN_ROWS[row]), "cnn", initial["cnn"])
    assert max_abs_diff(exact["cnn"], model) <= TOLERANCE


def accumulated_over_microbatches(initial, microbatches, synchronized=True):
    """One device, each batch cut into micro-batches whose gradients are summed
    (each loss weighted 1/M) before one AdamW step: what a pipeline computes."""
    model = cnn(synchronized)
    model.set_weights(initial)
    optimizer = keras.optimizers.AdamW(LEARNING_RATE)
    loss_fn = loss()
    x, y = cnn_data()
    for step in range(STEPS):
        rows = slice(step * BATCH, (step + 1) * BATCH)
        total = None
        for xm, ym in zip(np.split(x[rows], microbatches), np.split(y[rows], microbatches)):
            with tf.GradientTape() as tape:
                part = loss_fn(ym, model(xm, training=True)) / microbatches
            grads = tape.gradient(part, model.trainable_variables)
            total = grads if total is None else [t + g for t, g in zip(total, grads)]
        optimizer.apply(total, model.trainable_variables)
    return model


@pytest.fixture(scope="module")
def four_microbatches(initial):
    return accumulated_over_microbatches(initial["cnn"], 4)


@pytest.mark.parametrize("dims", [ParallelDims(pp=2, microbatches=4, schedule="gpipe"),
                                  ParallelDims(pp=2, dp=2, microbatches=2, schedule="1f1b")],
                         ids=["4_microbatches", "2_replicas_x_2_microbatches"])
def test_pipeline_batch_normalization_normalizes_each_microbatch(dims, initial, exact,
                                                                 four_microbatches):
    model = train(build_row(dims), "cnn", initial["cnn"])
    # Statistics over 4 rows instead of 16: training differs from one device...
    assert max_abs_diff(exact["cnn"], model) > 1e-3
    # ... and equals one-device gradient accumulation over the same micro-batches,
    # moving statistics included (updated once per micro-batch, in order).
    assert max_abs_diff(four_microbatches, model) <= TOLERANCE


def test_unsynchronized_batch_normalization_under_data_parallel_normalizes_each_replica(
        initial, exact, four_microbatches):
    model = train(tfpar.DataParallel(), "cnn", initial["cnn"], build=lambda: cnn(False))
    assert max_abs_diff(exact["cnn"], model) > 1e-3
    # Each replica's 4 rows are normalized on their own: the weights are those of
    # gradient accumulation over 4 micro-batches.
    trainable = {w.path for w in model.trainable_weights}
    assert max_abs_diff({k: v for k, v in by_path(four_microbatches).items() if k in trainable},
                        {k: v for k, v in by_path(model).items() if k in trainable}) <= TOLERANCE


def test_tensor_parallel_batch_normalization_uses_the_whole_batch_even_unsynchronized(
        initial, exact):
    strategy = build_row(ParallelDims(dp=4), "tensor")
    model = train(strategy, "cnn", initial["cnn"], build=lambda: cnn(False))
    assert max_abs_diff(exact["cnn"], model) <= TOLERANCE


# ------------------------------------------------------------- MultiWorker
@pytest.mark.multiprocess
def test_multi_worker_matches_the_exact_one_device_run(initial, exact, tmp_path):
    import sys

    from conftest import WORKERS, tfpar_cli

    for case in CASES:
        np.savez(tmp_path / f"initial_{case}.npz", *initial[case])
    result = tfpar_cli("launch", "--nproc", "2", "--grace_period", "5", "--",
                       sys.executable, str(WORKERS / "consistency_worker.py"),
                       "--strategy=multi_worker", f"--init_dir={tmp_path}", f"--out={tmp_path}",
                       timeout=180)
    assert result.returncode == 0, result.stdout[-3000:]
    for case in CASES:
        ranks = [dict(np.load(tmp_path / f"{case}.rank{i}.npz")) for i in range(2)]
        assert max_abs_diff(ranks[0], ranks[1]) == 0.0  # identical replicas
        assert max_abs_diff(by_path(exact[case]), ranks[0]) <= TOLERANCE, case
