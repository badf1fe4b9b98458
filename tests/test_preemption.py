"""Preemption on loopback workers: SIGTERM -> agreed step -> checkpoint -> exit 210 -> exact resume."""

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from conftest import REPO, run, worker_command
from tfpar import exit_codes
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
