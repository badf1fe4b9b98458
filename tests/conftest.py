"""Shared test set-up.

The in-process tests run on 4 simulated CPU devices: TensorFlow's devices are
fixed at its first op, so they are split here, before any test runs.
Multi-process tests (marked `multiprocess`) start real worker processes with
`tfpar launch` or by hand and run in their own fresh TensorFlow.

A test that starts a Python interpreter or the `tfpar` command must be
marked `multiprocess`, so that `pytest -m "not multiprocess"` runs only the
in-process tests: the autouse fixture `only_multiprocess_tests_start_python`
fails any other test that tries (other programs, such as `ip`, are allowed).
"""

import os
import re
import shlex
import shutil
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


def launched_mlp_diff(tmp_path, *flags, nproc=2) -> tuple[float, dict]:
    """The MLP worker on one device, then under `tfpar launch --nproc` with `flags`:
    (the largest weight difference of any rank from the one-device run, rank 0's report)."""
    import json

    import numpy as np

    reference, out = tmp_path / "ref", tmp_path / "launched"
    run(worker_command("--strategy=one_device", f"--out={reference}"), check=True)
    result = tfpar_cli("launch", "--nproc", str(nproc), "--",
                       *worker_command(*flags, f"--out={out}"))
    assert result.returncode == 0, result.stdout[-3000:]
    expected = np.load(f"{reference}.rank0.npz")
    diff = 0.0
    for rank in range(nproc):
        got = np.load(f"{out}.rank{rank}.npz")
        diff = max(diff, max(float(np.max(np.abs(expected[k] - got[k]))) for k in expected))
    return diff, json.load(open(f"{out}.rank0.json"))


@pytest.fixture
def tmp(tmp_path):
    return tmp_path


@pytest.fixture
def small_disk(tmp_path):
    """mount(size[, path]) -> a directory on a tmpfs of `size` bytes, unmounted afterwards.

    A full disk, for the checkpoint tests (needs root; skips otherwise).
    """
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    mounted = []

    def mount(size, path=None):
        path = path or tmp_path / "disk"
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tfpar-test", str(path)],
                       check=True)
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "--lazy", str(path)], check=True)


_PYTHON = re.compile(r"python[0-9.]*$")
_CALL_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        item.stash[_CALL_FAILED] = report.failed


def _shell_words(line: str) -> list[str]:
    try:
        return shlex.split(line)
    except ValueError:  # unbalanced quotes: the shell will say so; check the words anyway
        return line.split()


def _starts_python_or_tfpar(args, executable=None, shell=False) -> bool:
    """Whether Popen(args, executable=..., shell=...) starts a Python interpreter or `tfpar`."""
    if isinstance(args, (str, bytes, os.PathLike)):
        args = [args]
    words = [os.fsdecode(a) for a in args]
    if shell:
        # A shell command line: any word may start an interpreter.
        words = [w for line in words for w in _shell_words(line)]
    else:
        words = words[:1]
        if words and os.path.basename(words[0]) == "env":  # env [-i] [NAME=value ...] PROGRAM
            words = [w for w in map(os.fsdecode, args[1:])
                     if not w.startswith("-") and "=" not in w][:1]
    if executable is not None:
        words.append(os.fsdecode(executable))
    python = os.path.realpath(sys.executable)
    return any(_PYTHON.match(os.path.basename(w)) or os.path.basename(w) == "tfpar"
               or os.path.realpath(w) == python for w in words)


@pytest.fixture(autouse=True)
def only_multiprocess_tests_start_python(request, monkeypatch):
    """Fails a test not marked `multiprocess` that starts python or `tfpar`."""
    if request.node.get_closest_marker("multiprocess"):
        yield
        return
    refused = []
    upstream_init = subprocess.Popen.__init__

    def guarded_init(self, args, *rest, **kwargs):
        if _starts_python_or_tfpar(args, kwargs.get("executable"), kwargs.get("shell", False)):
            command = args if isinstance(args, (str, bytes)) else shlex.join(map(str, args))
            refused.append(command)
            pytest.fail(
                f"{request.node.nodeid} starts `{command[:200]}` but is not marked "
                "multiprocess; add @pytest.mark.multiprocess (`pytest -m \"not multiprocess\"` "
                "must run in-process tests only)", pytrace=False)
        upstream_init(self, args, *rest, **kwargs)

    # Patched on the class: subprocess.run, check_output and any module that
    # imported Popen by name all go through it.
    monkeypatch.setattr(subprocess.Popen, "__init__", guarded_init)
    yield
    # Started from a thread, or the failure above was caught.
    if refused and not request.node.stash.get(_CALL_FAILED, False):
        pytest.fail(f"{request.node.nodeid} is not marked multiprocess but started: "
                    f"{refused}", pytrace=False)


# Files whose tests assert time bounds (a lost peer within the heartbeat, a
# profiled schedule's bubble, SIGTERM to exit) or create network namespaces
# with fixed names: `.ci/run` runs them alone, after the rest has run on two
# test processes (pytest-xdist), so no other test competes for the 2 cores.
SERIAL_FILES = frozenset({
    "test_checkpoint_faults.py", "test_discovery.py", "test_k8s_pods.py", "test_launcher.py",
    "test_multiworker.py", "test_pipeline.py", "test_pipeline_across_processes.py",
    "test_preemption.py", "test_private_network.py", "test_process_group.py",
    "test_tensor_parallel_faults.py", "test_three_d.py",
})


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in SERIAL_FILES:
            item.add_marker(pytest.mark.serial)
