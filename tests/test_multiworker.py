"""MultiWorker with real processes: equivalence, the Keras fixes, saving, resume, faults."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, run, tfpar_cli, worker_command

pytestmark = pytest.mark.multiprocess


def weights(out, rank=0):
    saved = np.load(f"{out}.rank{rank}.npz")
    return [saved[f"arr_{i}"] for i in range(len(saved.files))]


def report(out, rank=0):
    return json.load(open(f"{out}.rank{rank}.json"))


def max_abs_diff(a, b):
    return max(float(np.max(np.abs(u - v))) for u, v in zip(a, b))


def launch(*flags, nproc=2, restarts=0, timeout=300):
    return tfpar_cli("launch", "--nproc", str(nproc), "--max_restarts", str(restarts),
                     "--grace_period", "5", "--", *worker_command(*flags), timeout=timeout)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The single-device run every distributed run must equal."""
    out = tmp_path_factory.mktemp("ref") / "w"
    run(worker_command("--strategy=one_device", f"--out={out}"), check=True)
    return out


def test_multi_worker_under_launch_matches_one_device_and_data_parallel(reference, tmp_path):
    data_out = tmp_path / "data"
    run(worker_command("--strategy=data", "--num_simulated_devices=4", f"--out={data_out}"),
        check=True)
    mw_out = tmp_path / "mw"
    result = launch("--strategy=multi_worker", f"--out={mw_out}")
    assert result.returncode == 0, result.stdout[-3000:]
    ref = weights(reference)
    assert report(mw_out)["steps"] == 24 and report(mw_out)["workers"] == 2
    for other in (weights(data_out), weights(mw_out, 0), weights(mw_out, 1)):
        assert max_abs_diff(ref, other) <= 1e-5
    # The workers hold identical replicas.
    assert max_abs_diff(weights(mw_out, 0), weights(mw_out, 1)) == 0.0
    # Training moved the weights far beyond the tolerance.
    assert report(reference)["history"]["loss"][-1] < 0.5 * report(reference)["history"]["loss"][0]
    # The launcher prefixes every line with its rank and keeps Keras progress
    # (every rank runs verbose=2) from the chief only.
    lines = result.stdout.splitlines()
    assert "[rank 0] rank 0 done" in lines and "[rank 1] rank 1 done" in lines
    assert any(l.startswith("[rank 0] Epoch 3/3") for l in lines)
    assert sum(l.startswith("[rank 0] 8/8 - ") for l in lines) == 3
    assert not any(l.startswith("[rank 1] Epoch") or l.startswith("[rank 1] 8/8") for l in lines)


@pytest.mark.parametrize("fix, upstream_error", [
    ("symbolic_build", "Attempt to convert a value (PerReplica"),
    ("reduce_scalar_metrics", "Invalid reduction dimension 0 for input with 0 dimensions"),
])
def test_each_keras_fix_is_needed_for_multi_worker_fit(tmp_path, fix, upstream_error):
    result = launch(f"--out={tmp_path / 'w'}", "--epochs=1", f"--without_fix={fix}")
    assert result.returncode != 0
    assert upstream_error in result.stdout


def test_only_the_chief_writes_model_save_and_the_fix_is_what_stops_the_others(tmp_path):
    ok = launch(f"--out={tmp_path / 'w'}", "--epochs=1",
                f"--save_path={tmp_path / 'fixed-{rank}.keras'}")
    assert ok.returncode == 0, ok.stdout[-3000:]
    broken = launch(f"--out={tmp_path / 'w2'}", "--epochs=1", "--without_fix=chief_only_writes",
                    f"--save_path={tmp_path / 'unfixed-{rank}.keras'}")
    assert broken.returncode == 0, broken.stdout[-3000:]
    names = sorted(p.name for p in tmp_path.glob("*.keras"))
    assert names == ["fixed-0.keras", "unfixed-0.keras", "unfixed-1.keras"]


def test_model_checkpoint_backup_and_save_share_one_directory_without_races(tmp_path):
    shared = tmp_path / "shared"
    result = launch(f"--out={tmp_path / 'w'}", "--epochs=3",
                    f"--checkpoint_path={shared / 'ckpt-{epoch}.weights.h5'}",
                    f"--backup_dir={shared / 'backup'}", f"--save_path={shared / 'model.keras'}")
    assert result.returncode == 0, result.stdout[-3000:]
    assert sorted(p.name for p in shared.iterdir()) == [
        "backup", "ckpt-1.weights.h5", "ckpt-2.weights.h5", "ckpt-3.weights.h5", "model.keras"]
    backup = sorted(p.name for p in (shared / "backup").iterdir())
    assert backup == ["backup-e3-b0.weights.h5", "training_metadata.json"]
    import keras

    restored = keras.models.load_model(shared / "model.keras")
    assert max_abs_diff(restored.get_weights(), weights(tmp_path / "w")) == 0.0


def test_killed_worker_and_group_restart_resume_to_bit_identical_weights(tmp_path):
    clean = tmp_path / "clean"
    assert launch(f"--out={clean}", "--epochs=4").returncode == 0
    resumed = tmp_path / "resumed"
    result = launch(f"--out={resumed}", "--epochs=4", f"--backup_dir={tmp_path / 'backup'}",
                    "--kill_at_epoch=2", "--kill_rank=1",
                    f"--kill_once_marker={tmp_path / 'killed'}", restarts=1)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "rank 1" in result.stdout and "killed by SIGKILL" in result.stdout
    assert "restarting all 2 ranks (restart 1 of 1)" in result.stdout
    assert "resumed from" in result.stdout and "at epoch 2" in result.stdout
    # Epochs 2 and 3 ran after the restart: 2 epochs x 8 steps on the restored counter.
    assert report(resumed)["steps"] == 32
    for a, b in zip(weights(clean), weights(resumed)):
        assert np.array_equal(a, b)


def processes_mentioning(token):
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if token.encode() in cmdline and int(pid) != os.getpid():
            found.append(int(pid))
    return found


def test_launch_stops_everything_when_a_worker_is_sigkilled_mid_fit(tmp_path):
    token = str(tmp_path / "w")
    start = time.monotonic()
    result = launch(f"--out={token}", "--epochs=50", "--sleep_per_batch=0.05",
                    "--kill_at_epoch=1", "--kill_rank=1")
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    assert "rank 1" in result.stdout and "failed (killed by SIGKILL)" in result.stdout
    assert "test hook: rank 1 kills itself" in result.stdout  # the failed rank's last lines
    assert elapsed < 60, elapsed  # 50 epochs would take minutes
    assert processes_mentioning(token) == []


def start_worker(cluster, index, *flags, **popen):
    env = dict(os.environ, TF_CONFIG=json.dumps(
        {"cluster": {"worker": cluster}, "task": {"type": "worker", "index": index}}))
    return subprocess.Popen(worker_command(*flags), env=env, cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)


def two_ports():
    from tfpar.launch import free_ports

    return [f"127.0.0.1:{p}" for p in free_ports(2)]


def test_survivor_fails_within_the_heartbeat_bound_when_its_peer_dies(tmp_path):
    cluster = two_ports()
    flags = ("--epochs=200", "--sleep_per_batch=0.02", "--heartbeat_timeout=3",
             f"--out={tmp_path / 'w'}")
    chief = start_worker(cluster, 0, *flags)
    peer = start_worker(cluster, 1, *flags)
    try:
        deadline = time.monotonic() + 120
        for line in chief.stdout:  # wait until training is under way
            if "Epoch 2/" in line or time.monotonic() > deadline:
                break
        peer.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        output, _ = chief.communicate(timeout=60)
        detected = time.monotonic() - killed_at
    finally:
        for p in (chief, peer):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert chief.returncode != 0
    assert detected < 30, detected
    assert any(word in output for word in ("UnavailableError", "Socket closed", "heartbeat",
                                           "DeadlineExceeded", "connection", "Connection"))


def test_worker_that_never_starts_fails_the_others_at_registration(tmp_path):
    cluster = two_ports()
    start = time.monotonic()
    lone = start_worker(cluster, 0, "--register_timeout=5", f"--out={tmp_path / 'w'}")
    try:
        output, _ = lone.communicate(timeout=120)
    finally:
        if lone.poll() is None:
            lone.kill()
    elapsed = time.monotonic() - start
    assert lone.returncode != 0
    assert "Barrier timed out" in output or "register" in output.lower(), output[-2000:]
    assert elapsed < 60, elapsed


def test_multi_worker_all_reduces_gradients_in_bfloat16_when_asked(reference, tmp_path):
    out = tmp_path / "mw16"
    result = launch("--strategy=multi_worker", "--reduce_dtype=bfloat16", f"--out={out}")
    assert result.returncode == 0, result.stdout[-3000:]
    ref, w0, w1 = weights(reference), weights(out, 0), weights(out, 1)
    assert max_abs_diff(w0, w1) == 0.0  # the same 16-bit sum on every worker
    # Rounded to 8 significant bits before the sum: off the exact run, but not far.
    assert 1e-6 < max_abs_diff(ref, w0) < 5e-2
