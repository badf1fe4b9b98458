"""A process killed at every step of a backup's commit: the previous backup is the latest, and resumes.

`TFPAR_CHECKPOINT_FAULT=STEP@2` (see `tfpar.callbacks.COMMIT_STEPS`) makes
the worker SIGKILL itself right after STEP of its second backup (the end of
epoch 2 of 3). A relaunch must resume from the last committed backup (the
first, or the second once its metadata was renamed) and end with the
weights of an uninterrupted run, bit for bit.
"""

import json

import numpy as np
import pytest

from conftest import run, worker_command
from tfpar.callbacks import COMMIT_STEPS

pytestmark = pytest.mark.multiprocess

COMMITTED_AFTER = COMMIT_STEPS.index("metadata_renamed")


def weights(out):
    saved = np.load(f"{out}.rank0.npz")
    return [saved[f"arr_{i}"] for i in range(len(saved.files))]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    result = run(worker_command("--epochs=3", f"--out={out}"), timeout=120)
    assert "rank 0 done" in result.stdout, result.stdout[-3000:]
    return weights(out)


@pytest.mark.parametrize("step, async_save", [(step, False) for step in COMMIT_STEPS]
                         + [("weights_partial", True), ("metadata_staged", True)],
                         ids=lambda v: v if isinstance(v, str) else ("async" if v else "sync"))
def test_a_kill_at_each_commit_step_leaves_the_last_committed_backup_and_resumes_exactly(
        uninterrupted, tmp_path, step, async_save):
    backup, out = tmp_path / "backup", tmp_path / "out"
    flags = ("--epochs=3", f"--backup_dir={backup}", f"--out={out}",
             "--async_save" if async_save else "--noasync_save")
    killed = run(worker_command(*flags), env={"TFPAR_CHECKPOINT_FAULT": f"{step}@2"},
                 timeout=120)
    assert killed.returncode == -9, killed.stdout[-3000:]
    assert f"killing this process after {step}" in killed.stdout

    epoch = 2 if COMMIT_STEPS.index(step) >= COMMITTED_AFTER else 1
    metadata = json.loads((backup / "training_metadata.json").read_text())
    assert metadata == {"epoch": epoch, "step_in_epoch": 0,
                        "weights": f"backup-e{epoch}-b0.weights.h5"}
    resumed = run(worker_command(*flags), timeout=120)
    assert "rank 0 done" in resumed.stdout, resumed.stdout[-3000:]
    assert f"at epoch {epoch}, batch 0" in resumed.stdout
    for a, b in zip(uninterrupted, weights(out)):
        assert np.array_equal(a, b)
    # What the killed save left behind is gone after the relaunch's own saves.
    assert sorted(p.name for p in backup.iterdir()) == [
        "backup-e3-b0.weights.h5", "training_metadata.json"]
