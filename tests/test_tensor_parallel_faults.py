"""`tfpar train --strategy=tensor` on 2 processes: a 2x2 DTensor mesh of 2 clients x 2 CPU devices.

Only client 0 writes, yet every client takes each checkpoint's snapshot
(gathering a sharded weight is a collective); a second launch on the same output dir
resumes to the weights of an uninterrupted run; SIGTERM, to every client or
to one, stops all of them after one agreed step, the chief commits that
step, and every client exits 210; a client killed outright makes the other
exit 211 at once.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

import tfpar.models.transformer  # registers the GPT's layers for load_model
from conftest import REPO, WORKERS
from tfpar import exit_codes
from tfpar.data import corpus
from tfpar.launch import free_ports

# Each test (with the module's first launch, for the first that uses it) takes
# 25-90 s on 2 shared cores.
pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(300)]

# 24 optimizer steps of 16 windows of 32 bytes, validated every 12, on a
# 1-block GPT; the schedule is fixed at 24 steps so that a first launch of
# 12 steps is the first half of the same run.
TRAIN = [sys.executable, "-m", "tfpar.cli.main", "train", "--strategy=tensor",
         "--mesh=batch:2,model:2", "--num_simulated_devices=2", "--model=tiny",
         "--tokenizer=bytes", "--layers=1", "--seq_len=32",
         "--global_batch_size=16", "--eval_every=12", "--eval_batches=2", "--warmup_steps=2",
         "--lr_decay_steps=24", "--sample_tokens=8"]
CHIEF_FILES = {"train_state.json", "summary.json", "model.keras", "sample.txt", "loss.png",
               "checkpoint/training_metadata.json", "checkpoint/backup-e2-b0.weights.h5"}
PREEMPTED_AT = re.compile(r"tfpar: preempted: checkpoint of epoch (\d+) batch (\d+) saved")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tfds"))
    corpus.prepare(corpus.DEFAULT_DATASET, path)
    return path


def environment(tmpdir):
    env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2", TMPDIR=str(tmpdir))
    env.pop("TF_CONFIG", None)
    return env


def launch(out, data_dir, *flags, trace=None, timeout=150):
    """`tfpar launch --nproc 2 -- tfpar train ...`: (exit code, output).

    With `trace`, rank 1 runs under strace (tests/workers/trace_writes.py),
    which logs every file it creates or changes to that path. If it does not
    finish, the launcher gets SIGTERM, which stops its ranks (then SIGKILL).
    """
    tmpdir = out.parent / f"{out.name}-tmp"
    tmpdir.mkdir(exist_ok=True)
    wrapper = [sys.executable, str(WORKERS / "trace_writes.py"), str(trace), "--"] if trace else []
    command = [sys.executable, "-m", "tfpar.cli.main", "launch", "--nproc", "2", "--", *wrapper,
               *TRAIN, f"--data_dir={data_dir}", f"--output_dir={out}", *flags]
    process = subprocess.Popen(command, env=environment(tmpdir), cwd=REPO, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        output = process.communicate(timeout=timeout)[0]
    finally:
        if process.poll() is None:  # timed out, or the test was interrupted
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    return process.returncode, output


# The coordination service's heartbeat timeout under DTensor multi-client
# (TensorFlow's default: dtensor.initialize_accelerator_system sets none).
HEARTBEAT_TIMEOUT_S = 10


class Clients:
    """The 2 clients started by hand, as Kubernetes starts 2 pods: each its own
    TF_CONFIG (tfpar train derives DTENSOR_* from it), each signalled alone."""

    def __init__(self, out, data_dir, *flags):
        self.out = out
        cluster = [f"127.0.0.1:{port}" for port in free_ports(2)]
        tmpdir = out.parent / f"{out.name}-tmp"
        tmpdir.mkdir(exist_ok=True)
        self.logs = [out.parent / f"{out.name}.rank{rank}.log" for rank in range(2)]
        self.processes = []
        for rank in range(2):
            env = environment(tmpdir)
            env["TF_CONFIG"] = json.dumps({"cluster": {"worker": cluster},
                                           "task": {"type": "worker", "index": rank}})
            with open(self.logs[rank], "w") as log:
                self.processes.append(subprocess.Popen(
                    [*TRAIN, f"--data_dir={data_dir}", f"--output_dir={out}", *flags],
                    env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True))

    def output(self, rank):
        return self.logs[rank].read_text()

    def wait_for(self, text, timeout=120):
        deadline = time.monotonic() + timeout
        while text not in self.output(0):
            assert time.monotonic() < deadline, f"no {text!r}:\n{self.output(0)[-3000:]}"
            assert all(p.poll() is None for p in self.processes), self.output(0)[-3000:]
            time.sleep(0.02)

    def terminate(self, ranks, sig=signal.SIGTERM, timeout=60):
        """`sig` to `ranks`; returns (exit codes, seconds from the signal to each exit)."""
        signalled = time.monotonic()
        for rank in ranks:
            os.kill(self.processes[rank].pid, sig)
        seconds = [None, None]
        try:
            while None in seconds and time.monotonic() < signalled + timeout:
                for rank, process in enumerate(self.processes):
                    if seconds[rank] is None and process.poll() is not None:
                        seconds[rank] = time.monotonic() - signalled
                time.sleep(0.01)
        finally:
            self.kill()
        return [p.returncode for p in self.processes], seconds

    def kill(self):
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def files(out):
    return {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}


def weights(out):
    """{path: value} of the job's final model (a plain single-device Keras model)."""
    model = keras.saving.load_model(str(out / "model.keras"))
    return {v.path: v.numpy() for v in model.weights}


def max_abs_diff(a, b):
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def written_paths(strace_log):
    """Every path a traced process created, changed or removed."""
    paths = []
    for line in strace_log.read_text().splitlines():
        call = re.match(r"\d+\s+(\w+)\(", line)
        if call is None or " = -1 " in line:
            continue
        if call.group(1) in ("open", "openat") and not re.search(
                r"O_WRONLY|O_RDWR|O_CREAT|O_TRUNC", line):
            continue
        paths += re.findall(r'"([^"]*)"', line)
    return paths


# ---------------------------------------------------------------- writes
@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    """24 steps in one launch, rank 1 under strace (if the host has it)."""
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    trace = out.parent / "rank1.strace"
    code, output = launch(out, data_dir, "--train_steps=24", trace=trace)
    assert code == 0, output[-3000:]
    return out, trace, output


def test_two_clients_train_one_mesh_and_only_client_0_writes_outputs(uninterrupted):
    out, _, output = uninterrupted
    summary = json.loads((out / "summary.json").read_text())
    assert summary["workers"] == 2 and summary["devices"] == 4
    assert summary["strategy_details"]["mesh"] == {"batch": 2, "model": 2}
    assert summary["final_val_loss"] < 0.8 * summary["initial_val_loss"]
    tensorboard = {f for f in files(out) if f.startswith("tensorboard/")}
    assert files(out) - tensorboard == CHIEF_FILES
    # One event file per run, from one process.
    assert sorted(f.rsplit("/", 1)[0] for f in tensorboard) == [
        "tensorboard/train", "tensorboard/validation"]
    assert "[rank 0] tfpar train: validation loss" in output
    assert "[rank 1] tfpar train:" not in output
    # Rank 1's scratch copies of what it saved are gone.
    assert not list((out.parent / "out-tmp").glob("tfpar-worker-*"))


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_client_1_takes_its_snapshots_in_memory_and_touches_nothing_in_the_output_dir(
        uninterrupted):
    out, trace, _ = uninterrupted
    written = written_paths(trace)
    assert [p for p in written if p == str(out) or p.startswith(f"{out}/")] == []
    # It took part in every save (gathering its shards) without writing a file.
    assert [p for p in written if p.endswith(".weights.h5")] == []


def test_a_mesh_whose_model_axis_spans_both_clients_saves_without_deadlock(data_dir, tmp_path):
    """batch:1,model:4: each gather of a sharded weight needs both clients, so a
    checkpoint that only the chief ran would hang forever."""
    out = tmp_path / "out"
    code, output = launch(out, data_dir, "--mesh=batch:1,model:4", "--train_steps=12",
                          timeout=120)
    assert code == 0, output[-3000:]
    assert json.loads((out / "checkpoint" / "training_metadata.json").read_text())[
        "epoch"] == 1
    assert json.loads((out / "summary.json").read_text())["replicas"] == 1


# ---------------------------------------------------------------- resume
# A launch resumes where the checkpoint left off: the SIGTERM test below
# relaunches and ends bit-identical to an uninterrupted run (a second launch
# with more --train_steps takes the same resume path; tests/test_train.py
# extends a finished run on one host).


# ------------------------------------------------------------ preemption
def test_sigterm_to_every_client_stops_all_at_one_step_exits_210_and_resumes_identically(
        uninterrupted, data_dir, tmp_path):
    out = tmp_path / "out"
    clients = Clients(out, data_dir, "--train_steps=24")
    try:
        clients.wait_for("Epoch 2/2")  # compiled; SIGTERM in the middle of epoch 2
        codes, seconds = clients.terminate([0, 1])
    finally:
        clients.kill()
    assert codes == [exit_codes.PREEMPTED] * 2, clients.output(0)[-3000:]
    metadata = json.loads((out / "checkpoint" / "training_metadata.json").read_text())
    assert metadata["epoch"] == 1 and 0 < metadata["step_in_epoch"] < 12, metadata
    for rank in range(2):
        assert PREEMPTED_AT.findall(clients.output(rank)) == [
            ("1", str(metadata["step_in_epoch"]))]
    print(f"SIGTERM to exit: {seconds[0]:.2f} s (rank 0), {seconds[1]:.2f} s (rank 1)")
    assert max(seconds) < 30, seconds
    assert "summary.json" not in files(out)

    code, output = launch(out, data_dir, "--train_steps=24")
    assert code == 0, output[-3000:]
    assert f"at optimizer step {12 + metadata['step_in_epoch']} of 24" in output
    assert max_abs_diff(weights(uninterrupted[0]), weights(out)) == 0.0


def test_sigterm_to_client_1_alone_stops_both_at_the_same_step_with_210(data_dir, tmp_path):
    out = tmp_path / "out"
    clients = Clients(out, data_dir, "--train_steps=24")
    try:
        clients.wait_for("Epoch 2/2")
        codes, _ = clients.terminate([1])
    finally:
        clients.kill()
    assert codes == [exit_codes.PREEMPTED] * 2, clients.output(0)[-3000:]
    assert "got SIGTERM" in clients.output(1) and "got SIGTERM" not in clients.output(0)
    metadata = json.loads((out / "checkpoint" / "training_metadata.json").read_text())
    step = ("1", str(metadata["step_in_epoch"]))
    assert [PREEMPTED_AT.findall(clients.output(rank)) for rank in range(2)] == [[step], [step]]


def test_a_client_killed_mid_training_makes_the_other_exit_211_within_the_heartbeat_bound(data_dir, tmp_path):
    clients = Clients(tmp_path / "out", data_dir, "--train_steps=24")
    try:
        clients.wait_for("Epoch 2/2")
        codes, seconds = clients.terminate([1], sig=signal.SIGKILL)
    finally:
        clients.kill()
    assert codes == [exit_codes.PEER_LOST, -signal.SIGKILL], clients.output(0)[-3000:]
    assert "a peer worker was lost (UnavailableError)" in clients.output(0)
    print(f"survivor exited {seconds[0]:.2f} s after the kill")
    # Usually at once: blocked in a collective with the dead client, its socket
    # closes. When the survivor was not inside such a collective, the
    # coordination service declares the peer dead after its heartbeat timeout
    # (TensorFlow's 10 s under DTensor); either way, no hang.
    assert seconds[0] < HEARTBEAT_TIMEOUT_S + 5, seconds
