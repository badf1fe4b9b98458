"""Shared test set-up.

The in-process tests run on 4 simulated CPU devices: TensorFlow's devices are
fixed at its first op, so they are split here, before any test runs.
Multi-process tests (marked `multiprocess`) start real worker processes with
`tfpar launch` or by hand and run in their own fresh TensorFlow.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# A stray cluster (TF_CONFIG, or a Kubernetes pod's tfpar environment) must not
# leak into tests.
for _name in ("TF_CONFIG", "TFPAR_NUM_WORKERS", "JOBSET_NAME"):
    os.environ.pop(_name, None)

import tfpar  # noqa: E402

NUM_DEVICES = 4
tfpar.simulate_devices(NUM_DEVICES)

TESTS = Path(__file__).parent
WORKERS = TESTS / "workers"
REPO = TESTS.parent


def run(args, timeout=240, env=None, check=False):
    """Runs a command, returns CompletedProcess with text output (stderr merged)."""
    merged = dict(os.environ, PYTHONUNBUFFERED="1")
    merged.pop("TF_CONFIG", None)
    merged.update(env or {})
    start = time.monotonic()
    result = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, timeout=timeout, env=merged, cwd=REPO)
    result.elapsed = time.monotonic() - start
    if check and result.returncode != 0:
        raise AssertionError(f"{args} exited {result.returncode}:\n{result.stdout[-4000:]}")
    return result


def tfpar_cli(*args, **kwargs):
    return run([sys.executable, "-m", "tfpar.cli.main", *args], **kwargs)


def worker_command(*flags):
    return [sys.executable, str(WORKERS / "mlp_worker.py"), *flags]


@pytest.fixture
def tmp(tmp_path):
    return tmp_path
