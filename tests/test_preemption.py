"""Preemption and kills under every strategy: SIGTERM -> agreed step -> checkpoint -> exit 210
-> exact resume; SIGKILL mid-training -> relaunch -> exact resume.

Multi-worker data parallelism runs on 2 loopback workers (tests/workers/
mlp_worker.py); one-process `tfpar train` runs under `OneDevice`,
`DataParallel`, `TensorParallel` and `Pipeline` (with and without replicas).
2-process `TensorParallel` is in tests/test_tensor_parallel_faults.py.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

import tfpar.models.transformer  # noqa: F401  (registers the GPT's layers for load_model)
from conftest import REPO, worker_command
from tfpar import exit_codes
from tfpar.data import corpus
from tfpar.launch import free_ports

pytestmark = pytest.mark.multiprocess


def weights(out, rank=0):
    saved = np.load(f"{out}.rank{rank}.npz")
    return [saved[f"arr_{i}"] for i in range(len(saved.files))]


def start(cluster, index, *flags):
    env = dict(os.environ, TF_CONFIG=json.dumps(
        {"cluster": {"worker": cluster}, "task": {"type": "worker", "index": index}}),
        PYTHONUNBUFFERED="1")
    return subprocess.Popen(worker_command(*flags), env=env, cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


def finish(processes, timeout=120):
    outputs = []
    try:
        for p in processes:
            outputs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in processes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return outputs


def test_sigterm_saves_an_agreed_step_exits_210_and_resumes_to_identical_weights(tmp_path):
    common = ("--strategy=multi_worker", "--epochs=3", "--heartbeat_timeout=5",
              "--collective_timeout=30", "--register_timeout=60")
    clean = tmp_path / "clean"
    cluster = [f"127.0.0.1:{p}" for p in free_ports(2)]
    outputs = finish([start(cluster, i, *common, f"--out={clean}") for i in range(2)])
    assert all("done" in o for o in outputs), outputs[0][-2000:]

    backup, resumed = tmp_path / "backup", tmp_path / "resumed"
    flags = (*common, f"--backup_dir={backup}", "--preemption", f"--out={resumed}")
    cluster = [f"127.0.0.1:{p}" for p in free_ports(2)]
    workers = [start(cluster, i, *flags, "--sleep_per_batch=0.2") for i in range(2)]
    chief_lines = []
    deadline = time.monotonic() + 120
    for line in workers[0].stdout:  # SIGTERM in the middle of epoch 2
        chief_lines.append(line)
        if line.startswith("Epoch 2/") or time.monotonic() > deadline:
            break
    time.sleep(0.5)
    # Only the non-chief is preempted: the chief must stop at the same step.
    os.kill(workers[1].pid, signal.SIGTERM)
    outputs = finish(workers)
    codes = [w.returncode for w in workers]
    assert codes == [exit_codes.PREEMPTED] * 2, "".join(chief_lines) + outputs[0][-3000:]
    metadata = json.loads((backup / "training_metadata.json").read_text())
    assert metadata["epoch"] == 1 and 0 < metadata["step_in_epoch"] < 8, metadata
    assert "checkpoint of epoch 1 batch" in outputs[0]

    cluster = [f"127.0.0.1:{p}" for p in free_ports(2)]
    outputs = finish([start(cluster, i, *flags) for i in range(2)])
    assert all("done" in o for o in outputs), outputs[0][-3000:]
    assert f"at epoch 1, batch {metadata['step_in_epoch']}" in outputs[0]
    assert json.load(open(f"{resumed}.rank0.json"))["steps"] == 24
    for a, b in zip(weights(clean), weights(resumed)):
        assert np.array_equal(a, b)


# ------------------------------------------------- tfpar train, one process
# 24 optimizer steps of 16 windows of 32 bytes, validated and checkpointed
# every 6, on a 1-block GPT (checkpoints are written in the background: the
# default). Each run takes 15-35 s on 2 shared cores, mostly start-up and tracing.
# The pipeline runs with replicas (2 stages x 2 replicas): one pipeline without
# replicas takes the same checkpoint path through the same runner. One device:
# the SIGTERM path is the same code, and tests/test_train.py resumes a
# one-device run bit-identically.
TRAIN = [sys.executable, "-m", "tfpar.cli.main", "train", "--model=tiny", "--tokenizer=bytes",
         "--layers=1", "--seq_len=32",
         "--global_batch_size=16", "--train_steps=24", "--eval_every=6", "--eval_batches=2",
         "--warmup_steps=2", "--lr_decay_steps=24", "--sample_tokens=8", "--peak_tflops=1"]
STRATEGIES = {
    "data": ["--strategy=data", "--num_simulated_devices=2"],
    "tensor": ["--strategy=tensor", "--mesh=batch:2,model:2", "--num_simulated_devices=4"],
    "pipeline_replicas": ["--strategy=pipeline", "--pipeline_stages=2",
                          "--pipeline_replicas=2", "--microbatches=2",
                          "--num_simulated_devices=4"],
}
PREEMPTED_AT = re.compile(r"tfpar: preempted: checkpoint of epoch (\d+) batch (\d+) saved")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tfds"))
    corpus.prepare(corpus.DEFAULT_DATASET, path)
    return path


class Train:
    """One `tfpar train` process, its output in a log file."""

    def __init__(self, strategy, out, data_dir):
        self.log = out.parent / f"{out.name}.{len(list(out.parent.glob(out.name + '.*.log')))}.log"
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                [*TRAIN, *STRATEGIES[strategy], f"--data_dir={data_dir}", f"--output_dir={out}"],
                env=dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2"), cwd=REPO,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def output(self):
        return self.log.read_text()

    def wait_for(self, text, timeout=120):
        deadline = time.monotonic() + timeout
        while text not in self.output:
            assert time.monotonic() < deadline, f"no {text!r}:\n{self.output[-3000:]}"
            assert self.process.poll() is None, self.output[-3000:]
            time.sleep(0.02)

    def signal(self, sig, timeout=60):
        """(exit code, seconds from `sig` to the exit)."""
        signalled = time.monotonic()
        os.kill(self.process.pid, sig)
        try:
            self.process.wait(timeout=timeout)
        finally:
            self.kill()
        return self.process.returncode, time.monotonic() - signalled

    def finish(self, timeout=180):
        try:
            self.process.wait(timeout=timeout)
        finally:
            self.kill()
        assert self.process.returncode == 0, self.output[-3000:]
        return self.output

    def kill(self):
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def final_weights(out):
    model = keras.saving.load_model(str(out / "model.keras"))
    return {v.path: v.numpy() for v in model.weights}


def assert_bit_identical(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not np.array_equal(a[k], b[k])]
    assert not different, different


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    """strategy -> the final weights of its uninterrupted run (made once)."""
    runs = {}

    def get(strategy):
        if strategy not in runs:
            out = tmp_path_factory.mktemp(f"uninterrupted-{strategy}") / "out"
            Train(strategy, out, data_dir).finish()
            runs[strategy] = final_weights(out)
        return runs[strategy]

    return get


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_tfpar_train_sigterm_commits_an_agreed_step_exits_210_and_resumes_bit_identically(
        strategy, uninterrupted, data_dir, tmp_path):
    expected = uninterrupted(strategy)
    out = tmp_path / "out"
    job = Train(strategy, out, data_dir)
    job.wait_for("Epoch 2/4")  # compiled; SIGTERM in the middle of training
    code, seconds = job.signal(signal.SIGTERM)
    assert code == exit_codes.PREEMPTED, job.output[-3000:]
    print(f"{strategy}: SIGTERM to exit {code} in {seconds:.2f} s")
    assert seconds < 30, seconds
    # The save was committed before the exit, although writes are asynchronous.
    metadata = json.loads((out / "checkpoint" / "training_metadata.json").read_text())
    assert PREEMPTED_AT.findall(job.output) == [
        (str(metadata["epoch"]), str(metadata["step_in_epoch"]))]
    assert (out / "checkpoint" / metadata["weights"]).is_file()
    step = metadata["epoch"] * 6 + metadata["step_in_epoch"]
    assert 6 < step < 24

    output = Train(strategy, out, data_dir).finish()
    assert f"at optimizer step {step} of 24" in output
    assert_bit_identical(expected, final_weights(out))


# A kill leaves the last committed checkpoint whatever the strategy (the commit
# is tfpar.callbacks'); pipelines are killed and resumed across processes in
# tests/test_pipeline_across_processes.py, with both of their runners.
@pytest.mark.parametrize("strategy", ["tensor"])
def test_tfpar_train_killed_mid_training_resumes_from_its_last_checkpoint_bit_identically(
        strategy, uninterrupted, data_dir, tmp_path):
    expected = uninterrupted(strategy)
    out = tmp_path / "out"
    job = Train(strategy, out, data_dir)
    job.wait_for("Epoch 3/4")  # epoch 2's checkpoint taken, perhaps still being written
    code, _ = job.signal(signal.SIGKILL)
    assert code == -signal.SIGKILL

    output = Train(strategy, out, data_dir).finish()
    resumed_at = re.search(r"at optimizer step (\d+) of 24", output)
    assert resumed_at and resumed_at.group(1) in ("6", "12"), output[-3000:]
    assert_bit_identical(expected, final_weights(out))
