"""Pipelines whose stages live in different processes.

Without tensor parallelism rank 0 drives every process's devices and the
others serve them (`tfpar.cluster.single_controller`); with tensor-parallel
(or sharded) stages every process runs its own stage's mesh and they
exchange activations as messages (`tfpar.strategies.pipeline.process_stages`).
Each case is real processes on loopback: under `tfpar launch` (as a user
runs it), or started one by one where a test stops or kills one of them.
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
from consistency_cases import TOLERANCE
from conftest import REPO, WORKERS, tfpar_cli
from tfpar import exit_codes
from tfpar.cluster import Cluster
from tfpar.cluster import single_controller
from tfpar.launch import free_ports

pytestmark = pytest.mark.multiprocess

WORKER = [sys.executable, str(WORKERS / "pipeline_across_processes.py")]


def last_json(output):
    for line in reversed(output.splitlines()):
        start = line.find("{")
        if start >= 0 and line[start:].startswith('{"max_abs_diff"'):
            return json.loads(line[start:])
    raise AssertionError(output[-3000:])


# (processes, devices per process, flags): which devices hold which stage and replica.
LAYOUTS = {
    # One stage per process, each data-parallel over its 2 devices.
    "pp2 across 2 processes x dp2 inside": (2, 2, ["--pp=2", "--dp=2", "--schedule=1f1b"]),
    # Stage 0's replicas on ranks 0 and 1, stage 1's on ranks 2 and 3.
    "pp2 x dp2 over 4 processes": (4, 1, ["--pp=2", "--dp=2", "--schedule=gpipe"]),
    # V shape: rank 0 holds the first and last model stages, rank 1 the middle two.
    "zbv over 2 processes": (2, 1, ["--pp=2", "--schedule=zbv"]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_pipeline_across_processes_equals_the_exact_single_device_run(layout):
    """10 AdamW steps of a 2-block GPT, 4 micro-batches, under `tfpar launch`."""
    processes, devices, flags = LAYOUTS[layout]
    result = tfpar_cli("launch", "--nproc", str(processes), "--", *WORKER, *flags,
                       "--microbatches=4", f"--num_simulated_devices={devices}", timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    row = last_json(result.stdout)
    assert row["moved"] > 100 * TOLERANCE
    assert row["max_abs_diff"] <= TOLERANCE, row
    assert row["plain_from_pipeline"] == 0.0  # its weights load into a plain model
    assert row["dims"]["world_size"] == processes * devices
    # Every process holds devices of the pipeline, and stage 1's variables live
    # on the process that holds it.
    tasks = {single_controller.task_prefix(r) for r in range(processes)}
    assert {d.rsplit("/device:", 1)[0] for d in row["devices"]} == tasks
    assert len({d.rsplit("/device:", 1)[0] for d in row["variable_devices"]}) == 2
    # Every server exited when rank 0 ended.
    for rank in range(1, processes):
        assert f"the controller ended; rank {rank} exits with 0" in result.stdout


# One program per process: (processes, devices per process, flags). Process
# k*R + r holds replica r of stage k (R processes per stage), on its own mesh.
MESH_LAYOUTS = {
    "pp2 across 2 processes x tp2 inside, 1F1B": (2, 2, ["--pp=2", "--tp=2", "--schedule=1f1b"]),
    # dp 4 = 2 replicas across processes x 2 inside each: 16 devices.
    "pp2 x dp2 across 4 processes x (dp2 x tp2) inside, GPipe": (
        4, 4, ["--pp=2", "--dp=4", "--tp=2", "--schedule=gpipe"]),
}


@pytest.mark.parametrize("layout", list(MESH_LAYOUTS))
def test_tensor_parallel_stages_across_processes_equal_the_exact_single_device_run(layout):
    """10 AdamW steps of a 2-block GPT, 4 micro-batches, under `tfpar launch`;
    rank 0's saved model (every stage's weights gathered) against one device."""
    processes, devices, flags = MESH_LAYOUTS[layout]
    result = tfpar_cli("launch", "--nproc", str(processes), "--", *WORKER, *flags,
                       "--microbatches=4",
                       f"--num_simulated_devices={devices}", timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    row = last_json(result.stdout)
    print(layout, row["max_abs_diff"])
    assert row["moved"] > 100 * TOLERANCE
    assert row["max_abs_diff"] <= TOLERANCE, row
    assert row["plain_from_pipeline"] == 0.0
    assert row["dims"]["world_size"] == processes * devices and row["dims"]["tp"] == 2
    # Rank 0's mesh is its own devices; its stage's weights are DTensor variables.
    assert len(row["devices"]) == devices
    assert all(d.startswith("/job:localhost/") for d in row["devices"])
    assert any("device:CUSTOM" in d for d in row["variable_devices"])


# Interleaved: two model stages per process, messages in both directions (1F1B's
# order is the same code path with one stage each).
@pytest.mark.parametrize("schedule, processes", [("interleaved_1f1b", 2)])
def test_the_timeline_of_processes_follows_the_schedule_on_every_process(schedule, processes):
    """record_timeline with stages in their own processes: rank 0's timeline has
    every process's actions, each process's in its device's schedule order, and
    no action began before the action of another process that it reads ended."""
    from tfpar.strategies.pipeline import schedules

    result = tfpar_cli("launch", "--nproc", str(processes), "--", sys.executable,
                       str(WORKERS / "process_stages_timeline.py"), schedule, "4", timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    line = next(line for line in reversed(result.stdout.splitlines()) if '"order"' in line)
    row = json.loads(line[line.index("{"):])
    plan = schedules.get(schedule)
    for device in range(processes):
        expected = [str(a) for a in plan.stage_order(device, processes, 4)]
        assert row["order"][f"0,{device}"] == expected, (device, row["order"])
    assert row["violations"] == [], row
    assert row["steps"] == [0, 1] and 0 < row["bubble"] < 1
    # predict and evaluate run across the processes too, on the trained weights.
    assert row["predict_shape"] == [16, 16, 64] and row["predict_gap"] < 1e-4, row
    assert row["evaluate_gap"] < 1e-4, row


def start(ports, rank, *flags):
    cluster = Cluster.from_hosts([f"127.0.0.1:{p}" for p in ports], task_index=rank)
    env = dict(os.environ, TF_CONFIG=cluster.to_json(), PYTHONUNBUFFERED="1",
               TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.Popen([*WORKER, "--pp=2", "--microbatches=2",
                             "--num_simulated_devices=1", *flags], env=env, cwd=REPO,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_for_training(controller, timeout=120):
    lines, deadline = [], time.monotonic() + timeout
    for line in controller.stdout:
        lines.append(line)
        if line.startswith("training") or time.monotonic() > deadline:
            break
    assert lines and lines[-1].startswith("training"), "".join(lines)[-3000:]
    time.sleep(2)  # a few steps into the run


def kill_all(*processes):
    for p in processes:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def test_a_server_whose_controller_dies_exits_peer_lost_so_the_group_restarts():
    """A server exits 0 only when rank 0 ended well (it says so at its exit);
    rank 0 killed: the server exits 211, which restarts it with rank 0 (an
    Indexed Job replaces only failed pods)."""
    ports = free_ports(2)
    controller, server = start(ports, 0, "--steps=100000"), start(ports, 1, "--steps=100000")
    try:
        wait_for_training(controller)
        os.kill(controller.pid, signal.SIGKILL)
        output, _ = server.communicate(timeout=30)
    finally:
        kill_all(controller, server)
    assert server.returncode == exit_codes.PEER_LOST, output[-3000:]
    assert "the controller ended without completing; rank 1 exits with 211" in output


def lose_rank_1(fault, *flags):
    """Starts ranks 0 and 1, sends rank 1 `fault` once training runs; returns
    (rank 0's process, its output, seconds from the fault to its exit)."""
    ports = free_ports(2)
    rank0, rank1 = start(ports, 0, *flags), start(ports, 1, *flags)
    try:
        wait_for_training(rank0)
        lost = time.monotonic()
        os.kill(rank1.pid, getattr(signal, fault))
        try:
            output, _ = rank0.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"rank 0 still runs 60 s after {fault} of rank 1")
        seconds = time.monotonic() - lost
    finally:
        kill_all(rank0, rank1)
    print(f"{fault}: rank 0 exited with {rank0.returncode} after {seconds:.1f} s")
    return rank0, output, seconds


@pytest.mark.parametrize("fault", ["SIGSTOP", "SIGKILL"])
def test_a_lost_stage_process_fails_the_controller_within_the_heartbeat_bound(fault):
    """A stage process that hangs (SIGSTOP: it answers nothing) or dies
    (SIGKILL: its connection resets) ends rank 0 with PEER_LOST (211, which
    restarts the group) instead of leaving it blocked in the step."""
    controller, output, seconds = lose_rank_1(fault, "--steps=100000", "--heartbeat_timeout=3")
    if fault == "SIGSTOP":
        assert controller.returncode == exit_codes.PEER_LOST, output[-3000:]
        assert re.search(r"/job:worker/replica:0/task:0/device:CPU:0 answered nothing for 3 s",
                         output), output[-3000:]
        # Its last answer came at most a ping interval (timeout / 4) before the stop.
        assert 3 * 3 / 4 <= seconds < 3 + 5, seconds
    else:  # the step fails at once: an uncaught error in this worker, rank 0 exits 1
        assert controller.returncode not in (0, None), output[-3000:]
        assert "UnavailableError" in output or "answered nothing" in output, output[-3000:]
        assert seconds < 3 + 5, seconds


@pytest.mark.parametrize("fault", ["SIGSTOP", "SIGKILL"])
def test_a_lost_tensor_parallel_stage_process_ends_the_other_with_peer_lost(fault):
    """One program per process (tp 2 inside each): rank 1 stopped or killed
    while rank 0 waits for its gradients. Rank 0 exits with PEER_LOST (211)
    within the heartbeat bound, never hangs."""
    rank0, output, seconds = lose_rank_1(fault, "--steps=100000", "--heartbeat_timeout=3",
                                         "--tp=2", "--num_simulated_devices=2")
    assert rank0.returncode == exit_codes.PEER_LOST, output[-3000:]
    assert "a peer process was lost; exiting with 211" in output, output[-3000:]
    if fault == "SIGSTOP":
        assert re.search(r"from rank 1 \(127.0.0.1:\d+\), silent for 3\.\d s", output), \
            output[-3000:]
        # Its last ping came at most a ping interval (timeout / 4) before the stop.
        assert 3 * 3 / 4 <= seconds < 3 + 5, seconds
    else:
        assert re.search(r"from rank 1 \(127.0.0.1:\d+\), which was lost", output), \
            output[-3000:]
        assert seconds < 5, seconds


# ------------------------------------------------ tfpar train, under tfpar launch
# 24 optimizer steps checkpointed every 6, as tests/test_preemption.py trains.
TRAIN = [sys.executable, "-m", "tfpar.cli.main", "train", "--model=tiny", "--tokenizer=bytes",
         "--layers=1", "--seq_len=32", "--global_batch_size=16", "--train_steps=24",
         "--eval_every=6", "--eval_batches=2", "--warmup_steps=2", "--lr_decay_steps=24",
         "--sample_tokens=8", "--peak_tflops=1", "--pp=2", "--microbatches=2",
         "--num_simulated_devices=1", "--heartbeat_timeout=3"]


def launch(out, data_dir, *launch_flags, train_flags=()):
    log = open(out.parent / f"{out.name}.log", "w")
    return subprocess.Popen(
        [sys.executable, "-m", "tfpar.cli.main", "launch", "--nproc", "2", *launch_flags, "--",
         *TRAIN, *train_flags, f"--data_dir={data_dir}", f"--output_dir={out}"],
        env=dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2"), cwd=REPO,
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def children(pid):
    """{TFPAR_RANK: pid} of the processes `pid` started."""
    ranks = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != pid:
                continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
        except (OSError, ValueError, IndexError):
            continue
        if b"TFPAR_RANK" in env:
            ranks[int(env[b"TFPAR_RANK"])] = int(entry)
    return ranks


def final_weights(out):
    model = keras.saving.load_model(str(out / "model.keras"))
    return {v.path: v.numpy() for v in model.weights}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from tfpar.data import corpus

    path = str(tmp_path_factory.mktemp("tfds"))
    corpus.prepare(corpus.DEFAULT_DATASET, path)
    return path


def test_tfpar_train_resumes_bit_identically_after_its_stage_process_is_killed(
        data_dir, tmp_path):
    """`tfpar train --pp=2` over 2 processes: rank 1 (stage 1's server) is killed
    mid-training; the launcher restarts the group, which resumes from rank 0's
    last checkpoint and ends with the uninterrupted run's weights, bit for bit."""
    clean = tmp_path / "clean"
    job = launch(clean, data_dir)
    assert job.wait(timeout=240) == 0, (tmp_path / "clean.log").read_text()[-3000:]
    summary = json.loads((clean / "summary.json").read_text())
    assert summary["dims"]["pp"] == 2 and len(summary["strategy_details"]["devices"]) == 2

    out = tmp_path / "out"
    job = launch(out, data_dir, "--max_restarts=1")
    log = tmp_path / "out.log"
    try:
        deadline = time.monotonic() + 180
        while "Epoch 3/4" not in log.read_text():  # epoch 2's checkpoint is taken
            assert job.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        os.kill(children(job.pid)[1], signal.SIGKILL)
        assert job.wait(timeout=240) == 0, log.read_text()[-3000:]
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    output = log.read_text()
    # Whichever the launcher saw first: rank 1 killed, or rank 0 exiting with 211
    # because its step lost rank 1 (a restart either way, never a permanent 1).
    assert re.search(r"rank 1 \(pid \d+\) failed \(killed by SIGKILL\)|rank 0 \(pid \d+\) "
                     r"failed \(a peer worker was lost", output), output[-3000:]
    assert "restarting all 2 ranks (restart 1 of 1)" in output, output[-3000:]
    resumed_at = re.search(r"at optimizer step (\d+) of 24", output)
    assert resumed_at and resumed_at.group(1) in ("6", "12"), output[-3000:]
    expected, got = final_weights(clean), final_weights(out)
    assert expected.keys() == got.keys()
    assert not [k for k in expected if not np.array_equal(expected[k], got[k])]


def kill_rank_1_and_resume(job, log):
    """Kills rank 1 once epoch 2's checkpoint is taken; the launcher restarts the group."""
    try:
        deadline = time.monotonic() + 180
        while "Epoch 3/4" not in log.read_text():  # epoch 2's checkpoint is taken
            assert job.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        os.kill(children(job.pid)[1], signal.SIGKILL)
        assert job.wait(timeout=240) == 0, log.read_text()[-3000:]
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    return log.read_text()


def test_tfpar_train_with_tensor_parallel_stages_across_processes_resumes_bit_identically(
        data_dir, tmp_path):
    """`tfpar train --pp=2 --tp=2` over 2 processes, each running its stage's
    mesh of 2 devices: its saved model equals the same job on one host's 4
    devices (every stage's weights reached rank 0's save); with rank 1 killed
    mid-training, the restarted group resumes from the last checkpoint and ends
    with the uninterrupted run's weights, bit for bit."""
    mesh = ["--tp=2", "--num_simulated_devices=2"]
    clean = tmp_path / "clean"
    job = launch(clean, data_dir, train_flags=mesh)
    assert job.wait(timeout=240) == 0, (tmp_path / "clean.log").read_text()[-3000:]
    summary = json.loads((clean / "summary.json").read_text())
    assert summary["dims"]["pp"] == 2 and summary["dims"]["tp"] == 2
    assert summary["workers"] == 2

    one_host = tmp_path / "one_host"
    result = subprocess.run([*TRAIN, "--tp=2", "--num_simulated_devices=4",
                             f"--data_dir={data_dir}", f"--output_dir={one_host}"],
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), cwd=REPO,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    expected, on_one_host = final_weights(clean), final_weights(one_host)
    # Not the attention's key bias: softmax cancels it, so its exact gradient
    # is 0 and what any run computes for it is rounding noise, which Adam
    # scales up to whole steps (2e-4 between any two layouts on one host too).
    gap = max(float(np.abs(expected[k] - on_one_host[k]).max()) for k in expected
              if not k.endswith("attention/key/bias"))
    print(f"across processes vs one host: max |dw| {gap:.2e}")
    assert gap <= TOLERANCE

    out = tmp_path / "out"
    output = kill_rank_1_and_resume(launch(out, data_dir, "--max_restarts=1", train_flags=mesh),
                                    tmp_path / "out.log")
    assert re.search(r"rank 1 \(pid \d+\) failed \(killed by SIGKILL\)|rank 0 \(pid \d+\) "
                     r"failed \(a peer worker was lost", output), output[-3000:]
    assert "restarting all 2 ranks (restart 1 of 1)" in output, output[-3000:]
    resumed_at = re.search(r"at optimizer step (\d+) of 24", output)
    assert resumed_at and resumed_at.group(1) in ("6", "12"), output[-3000:]
    got = final_weights(out)
    assert not [k for k in expected if not np.array_equal(expected[k], got[k])]
