"""Every example runs, on simulated devices and under the launcher, and learns."""

import json
import sys

import pytest

from conftest import REPO, run, tfpar_cli

EXAMPLE = str(REPO / "examples" / "data_parallel_fit.py")
SHORT = ["--epochs=2", "--steps_per_epoch=15", "--corpus_bytes=300000"]


def test_data_parallel_example_learns_on_four_simulated_devices(tmp_path):
    result = run([sys.executable, EXAMPLE, "--num_simulated_devices=4",
                  f"--output_dir={tmp_path}", *SHORT])
    assert result.returncode == 0, result.stdout[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["replicas"] == 4 and summary["strategy"] == "data"
    assert summary["final_val_loss"] < 0.7 * summary["initial_val_loss"]
    assert (tmp_path / "model.keras").exists() and (tmp_path / "ckpt-2.weights.h5").exists()


@pytest.mark.multiprocess
def test_data_parallel_example_runs_unchanged_under_launch(tmp_path):
    result = tfpar_cli("launch", "--nproc", "2", "--", sys.executable, EXAMPLE,
                       f"--output_dir={tmp_path}", *SHORT)
    assert result.returncode == 0, result.stdout[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["strategy"] == "multi_worker" and summary["replicas"] == 2
    assert summary["final_val_loss"] < 0.7 * summary["initial_val_loss"]


def test_data_parallel_example_runs_unchanged_as_a_pipeline(tmp_path):
    result = run([sys.executable, EXAMPLE, "--strategy=pipeline", "--num_simulated_devices=4",
                  "--microbatches=4", f"--output_dir={tmp_path}", *SHORT])
    assert result.returncode == 0, result.stdout[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["strategy"] == "pipeline"
    assert summary["final_val_loss"] < 0.7 * summary["initial_val_loss"]
    assert (tmp_path / "model.keras").exists()
