"""16-bit gradient reduction (`--reduce_dtype`): half the bytes, within the rounding bound.

`DataParallel(reduce_dtype=...)` casts each replica's float32 gradient to 16
bits, all-reduces it and casts the sum back before the update. The bound it
guarantees: every gradient element is rounded at most n + 1 times on n
replicas (each partial gradient, then each of the n - 1 additions), each a
relative error of at most 2^-8 (bfloat16) or 2^-11 (float16).
"""

import keras
import numpy as np
import pytest

import tfpar
from consistency_cases import max_abs_diff
from tfpar.parallel_dims import ParallelDims
from tfpar.plan import cost
from tfpar.strategies.tensor.tensor_parallel import use_dense_gradients

SHAPE = tfpar.models.GPTConfig(layers=2, hidden=32, heads=2, vocab=64, seq_len=16)
BATCH, LR, REPLICAS = 16, 0.1, 4
UNIT = {"bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}


def one_sgd_step(strategy):
    tokens = np.random.RandomState(0).randint(0, SHAPE.vocab, size=(BATCH, SHAPE.seq_len + 1))
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = tfpar.models.gpt(SHAPE)
        model.compile(optimizer=keras.optimizers.SGD(LR), loss=tfpar.models.lm_loss())
        use_dense_gradients(model.optimizer)
    before = [np.array(w) for w in model.get_weights()]
    model.fit(tokens[:, :-1], tokens[:, 1:], batch_size=BATCH, epochs=1, shuffle=False,
              verbose=0)
    return model, before


@pytest.fixture(scope="module")
def exact():
    return one_sgd_step(tfpar.OneDevice())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_16_bit_reduction_stays_within_its_rounding_bound(exact, dtype):
    model, before = exact
    # SGD: the update is lr x the reduced gradient, so the weights show the gradient's error.
    gradient = max(float(np.max(np.abs(b - a))) for b, a in zip(before, model.get_weights())) / LR
    compressed, _ = one_sgd_step(tfpar.DataParallel(reduce_dtype=dtype))
    error = max_abs_diff(model, compressed)
    assert error > 0  # the gradients really crossed in 16 bits
    # Each element within (n + 1) roundings of the largest partial sum (n partials
    # no larger than n x the largest gradient element, conservatively).
    assert error <= LR * (REPLICAS + 1) * UNIT[dtype] * REPLICAS * gradient


def test_16_bit_reduction_halves_the_bytes_and_the_plan_prices_them_the_same():
    model, _ = one_sgd_step(tfpar.DataParallel(reduce_dtype="bfloat16"))
    full = tfpar.DataParallel().communication_report(model)
    half = tfpar.DataParallel(reduce_dtype="bfloat16").communication_report(model)
    assert half["gradient_wire_bytes_per_device"] * 2 == full["gradient_wire_bytes_per_device"]
    assert full["gradient_wire_bytes_per_device"] == 2 * 3 / 4 * 4 * model.count_params()
    for dtype, measured in (("float32", full), ("bfloat16", half)):
        planned = cost.step(cost.Workload(SHAPE, BATCH, precision="float32", reduce_dtype=dtype),
                            ParallelDims(dp=REPLICAS), BATCH // REPLICAS,
                            cost.Hardware(devices=REPLICAS))["comm_bytes"]
        assert planned == pytest.approx(measured["gradient_wire_bytes_per_device"], rel=0.01)


def test_reduce_dtype_is_refused_where_tfpar_cannot_cast_the_reduction():
    with pytest.raises(tfpar.parallel_dims.ParallelDimsError, match="reduces gradients inside"):
        tfpar.strategies.build(ParallelDims(dp=2, tp=2), reduce_dtype="bfloat16")
    with pytest.raises(ValueError, match="reduce_dtype='int8'"):
        tfpar.DataParallel(reduce_dtype="int8")
