"""Distributed input: every example is seen exactly once per epoch across replicas and workers."""

import json
import sys
from collections import Counter

import numpy as np
import pytest

import tfpar
from conftest import WORKERS, tfpar_cli


def local_ids(strategy, dataset):
    seen, steps = [], 0
    for batch in strategy.experimental_distribute_dataset(dataset):
        steps += 1
        for local in strategy.experimental_local_results(batch):
            seen.extend(int(i) for i in local.numpy())
    return seen, steps


def test_four_replicas_see_every_example_exactly_once_including_the_partial_batch():
    strategy = tfpar.DataParallel()
    ds = tfpar.data.from_arrays(np.arange(37), strategy, global_batch_size=8,
                                shuffle=True, seed=1, drop_remainder=False)
    seen, steps = local_ids(strategy, ds)
    assert sorted(seen) == list(range(37))
    assert steps == 5


def test_drop_remainder_keeps_whole_global_batches_and_never_repeats():
    strategy = tfpar.DataParallel()
    ds = tfpar.data.from_arrays(np.arange(37), strategy, global_batch_size=8,
                                shuffle=True, seed=1)
    seen, steps = local_ids(strategy, ds)
    assert steps == 4 and len(seen) == 32
    assert max(Counter(seen).values()) == 1


def test_shuffled_epochs_differ_but_each_is_a_permutation():
    strategy = tfpar.DataParallel()
    ds = tfpar.data.from_arrays(np.arange(32), strategy, global_batch_size=8,
                                shuffle=True, seed=1)
    first, _ = local_ids(strategy, ds)
    second, _ = local_ids(strategy, ds)
    assert sorted(first) == sorted(second) == list(range(32))
    assert first != second


def test_batch_sizes_are_stated_once():
    strategy = tfpar.DataParallel()
    with pytest.raises(ValueError, match="give exactly one of global_batch_size"):
        tfpar.data.from_arrays(np.arange(8), strategy, global_batch_size=8,
                               per_replica_batch_size=2)
    ds = tfpar.data.from_arrays(np.arange(64), strategy, per_replica_batch_size=4)
    assert next(iter(ds)).shape[0] == 16


def read_worker_ids(out, nproc):
    reports = [json.load(open(f"{out}.rank{r}.json")) for r in range(nproc)]
    return [r["ids"] for r in reports], [r["steps"] for r in reports]


@pytest.mark.multiprocess
def test_two_workers_see_every_example_exactly_once(tmp_path):
    out = tmp_path / "ids"
    result = tfpar_cli("launch", "--nproc", "2", "--", sys.executable,
                       str(WORKERS / "ids_worker.py"), f"--out={out}", "--examples=100",
                       "--batch=8")
    assert result.returncode == 0, result.stdout[-3000:]
    ids, steps = read_worker_ids(out, 2)
    assert sorted(ids[0] + ids[1]) == list(range(100))
    assert steps[0] == steps[1] == 13  # same step count: no worker waits in a collective
    assert len(ids[0]) == len(ids[1]) == 50


@pytest.mark.multiprocess
def test_one_file_for_two_workers_falls_back_to_data_sharding_and_says_so(tmp_path):
    (tmp_path / "ids-0.txt").write_text("\n".join(str(i) for i in range(64)) + "\n")
    out = tmp_path / "ids"
    result = tfpar_cli("launch", "--nproc", "2", "--", sys.executable,
                       str(WORKERS / "ids_worker.py"), f"--out={out}", "--source=one_file",
                       "--examples=64", "--batch=8")
    assert result.returncode == 0, result.stdout[-3000:]
    assert "Could not apply FILE based sharding" not in result.stdout
    assert result.stdout.count("1 file(s) for 2 workers") == 2  # once per worker
    ids, _ = read_worker_ids(out, 2)
    assert sorted(ids[0] + ids[1]) == list(range(64))


@pytest.mark.multiprocess
def test_enough_files_are_sharded_by_file(tmp_path):
    for f in range(4):
        (tmp_path / f"ids-{f}.txt").write_text(
            "\n".join(str(i) for i in range(f * 16, f * 16 + 16)) + "\n")
    out = tmp_path / "ids"
    result = tfpar_cli("launch", "--nproc", "2", "--", sys.executable,
                       str(WORKERS / "ids_worker.py"), f"--out={out}", "--source=files",
                       "--examples=64", "--batch=8")
    assert result.returncode == 0, result.stdout[-3000:]
    assert "DATA sharding" not in result.stdout
    ids, _ = read_worker_ids(out, 2)
    assert sorted(ids[0] + ids[1]) == list(range(64))
    # FILE sharding: each worker read whole files of its own.
    assert {i // 16 for i in ids[0]}.isdisjoint({i // 16 for i in ids[1]})
