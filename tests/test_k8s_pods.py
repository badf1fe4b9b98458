"""End to end on emulated pods: the rendered Indexed Job's own command, one network namespace per pod.

Each pod runs exactly the container command of the manifest `tfpar k8s
render` writes, with the manifest's environment plus what Kubernetes adds
(JOB_COMPLETION_INDEX, HOSTNAME), so discovery, name resolution, training,
failure detection and preemption are exercised as in a cluster. The
uninterrupted run also enforces the manifest's NetworkPolicy with nftables
(`pods.Pods.enforce`) and probes it from namespaces that are not the job's.
"""

import itertools
import json
import os
import signal
import sys
import time

import numpy as np
import pytest
import yaml

import pods
from conftest import REPO, run, tfpar_cli, worker_command
from tfpar import exit_codes

pytestmark = pytest.mark.multiprocess

REASON = pods.unavailable_reason()
needs_netns = pytest.mark.skipif(REASON is not None,
                                 reason=f"network namespaces unavailable: {REASON}")
NFT_REASON = REASON or pods.nft_unavailable_reason()
needs_nft = pytest.mark.skipif(NFT_REASON is not None,
                               reason=f"NetworkPolicy emulation unavailable: {NFT_REASON}")
NAME, WORKERS = "mlp", 3
# 48 = 3 workers x 16: the global batch divides evenly, so the 3-pod run is
# the single-process run up to float summation order.
TRAINING = ["--epochs=3", "--examples=288", "--global_batch_size=48"]
_tags = itertools.count()


# Egress closed but for the peers, DNS and a network no pod is in.
EGRESS = "--egress=10.99.0.0/16:443"


def render_job(tmp_path, *worker_flags, render_flags=(), command=None):
    """Renders the Indexed Job (of `command`, else the MLP worker with
    `worker_flags`); returns its documents by kind."""
    command = command or ["python", "tests/workers/mlp_worker.py", "--strategy=multi_worker",
                          *TRAINING, *worker_flags]
    out = tmp_path / f"job{next(_tags)}.yaml"
    result = tfpar_cli("k8s", "render", f"--name={NAME}", "--image=tfpar:test",
                       f"--workers={WORKERS}", f"--checkpoint_dir={tmp_path / 'ckpt'}",
                       *render_flags, f"--output={out}", "--", *command, timeout=60)
    assert result.returncode == 0, result.stdout
    documents = {d["kind"]: d for d in yaml.safe_load_all(out.read_text())}
    (container,) = documents["Job"]["spec"]["template"]["spec"]["containers"]
    assert container["command"] == command  # passed through unchanged
    return documents


def render(tmp_path, *worker_flags):
    """Renders the Indexed Job; returns the worker container (command and env)."""
    (container,) = render_job(tmp_path, *worker_flags)["Job"]["spec"]["template"]["spec"][
        "containers"]
    return container


def start_pods(network, container):
    base = {e["name"]: e["value"] for e in container["env"]}
    base["PYTHONPATH"] = str(REPO)  # the image would have tfpar installed
    base["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return [network.start(i, container["command"], dict(base, JOB_COMPLETION_INDEX=str(i)),
                          cwd=REPO)
            for i in range(WORKERS)]


def read_until(process, prefix, timeout=150):
    """Reads `process`'s output up to a line starting with `prefix`; returns what it read."""
    deadline, lines = time.monotonic() + timeout, []
    for line in process.stdout:
        lines.append(line)
        if line.startswith(prefix) or time.monotonic() > deadline:
            break
    return "".join(lines)


def wait_all(processes, timeout=180):
    outputs = [p.communicate(timeout=timeout)[0] for p in processes]
    return [p.returncode for p in processes], outputs


def weights(out, rank=0):
    saved = np.load(f"{out}.rank{rank}.npz")
    return [saved[f"arr_{i}"] for i in range(len(saved.files))]


def max_abs_diff(a, b):
    return max(float(np.max(np.abs(u - v))) for u, v in zip(a, b))


@pytest.fixture
def network():
    with pods.Pods([f"{NAME}-{i}" for i in range(WORKERS)], NAME,
                   tag=f"{os.getpid() % 100000}-{next(_tags)}") as emulated:
        yield emulated
    # Teardown above removed every namespace this test created.


@pytest.fixture(scope="module")
def three_pod_run(tmp_path_factory):
    """An uninterrupted 3-pod run and the single-process run it must equal.

    Where nftables works, the pods run under the rendered NetworkPolicy
    (egress closed too, by EGRESS), and while they train, connections are
    probed from two outsiders on the same bridge (pods of another tfpar
    job: the same labels, another instance) and from pod 2.
    Returns (single-process output, 3-pod output, pod outputs, probes or None).
    """
    if REASON is not None:
        pytest.skip(f"network namespaces unavailable: {REASON}")
    tmp = tmp_path_factory.mktemp("pods")
    single = tmp / "single"
    run(worker_command("--strategy=one_device", *TRAINING, f"--out={single}"), check=True)
    out = tmp / "pods"
    # The sleep keeps the servers up while the probes run; it changes no weight.
    documents = render_job(tmp, f"--out={out}", "--sleep_per_batch=0.1", render_flags=[EGRESS])
    (container,) = documents["Job"]["spec"]["template"]["spec"]["containers"]
    labels = documents["Job"]["spec"]["template"]["metadata"]["labels"]
    other_job = dict(labels, **{"app.kubernetes.io/instance": "other"})
    probes = None
    with pods.Pods([f"{NAME}-{i}" for i in range(WORKERS)], NAME,
                   tag=f"{os.getpid() % 100000}-m", outsiders=2) as network:
        if NFT_REASON is None:
            network.enforce(documents["NetworkPolicy"], [labels] * WORKERS, [other_job] * 2)
        processes = start_pods(network, container)
        head = read_until(processes[0], "Epoch 1/")  # every worker's server is up
        if NFT_REASON is None:
            workers = [f"{network.address(i)}:2222" for i in range(WORKERS)]
            outsider = f"{network.outsider_address(0)}:80"  # nothing listens: refused
            # Outsider first, pod 2 after: if pod 2 still connects, every server was up
            # while the outsider knocked.
            probes = {"outsider": network.probe(network.outsider_ns[0], workers),
                      "pod": network.probe(network.pod_ns[2], [*workers, outsider]),
                      "outsider to outsider": network.probe(network.outsider_ns[1], [outsider])}
        codes, outputs = wait_all(processes)
    outputs[0] = head + outputs[0]
    assert codes == [0] * WORKERS, outputs[0][-3000:] + outputs[1][-2000:]
    return single, out, outputs, probes


@needs_netns
def test_three_pods_train_to_the_single_process_weights(three_pod_run):
    single, out, _, _ = three_pod_run
    ref = weights(single)
    diffs = [max_abs_diff(ref, weights(out, r)) for r in range(WORKERS)]
    print(f"3-pod vs single process: max |dw| = {max(diffs):.2e}")
    assert max(diffs) <= 1e-5
    report = json.load(open(f"{out}.rank0.json"))
    assert report["workers"] == 3 and report["steps"] == 18
    assert max_abs_diff(ref, [w * 0 for w in ref]) > 1e-2  # training moved the weights


@needs_nft
def test_only_the_jobs_own_pods_reach_the_worker_port_while_the_job_trains(three_pod_run):
    *_, probes = three_pod_run  # the job itself trained to the end (the fixture checks)
    print(probes)
    workers = [f"{pods.SUBNET}.{10 + i}:2222" for i in range(WORKERS)]
    outsider = f"{pods.SUBNET}.200:80"
    # Another job's pod: its SYNs are dropped by the pods' ingress rules.
    assert probes["outsider"] == {w: "no answer" for w in workers}
    # A pod of the job reaches every worker; its egress to the outsider is dropped,
    # which, unfiltered, answers with a reset.
    assert probes["pod"] == {**{w: "connected" for w in workers}, outsider: "no answer"}
    assert probes["outsider to outsider"] == {outsider: "refused"}


@needs_netns
def test_pods_resolve_peers_by_name_inside_their_namespace(network, tmp_path):
    env = {"JOB_COMPLETION_INDEX": "1", "TFPAR_NUM_WORKERS": "3", "TFPAR_SUBDOMAIN": NAME,
           "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    probe = network.start(1, [sys.executable, "-c", (
        "import socket; from tfpar.cluster import discover, wait_until_resolvable; "
        "d = discover(); wait_until_resolvable(d.cluster, 5); "
        "print(d.source, d.cluster.rank, [socket.gethostbyname(a.split(':')[0]) "
        "for a in d.cluster.training_addresses])")], env, cwd=REPO)
    output, _ = probe.communicate(timeout=60)
    assert probe.returncode == 0, output
    assert "indexed-job 1 ['10.213.0.10', '10.213.0.11', '10.213.0.12']" in output


@needs_netns
def test_cutting_one_pods_link_makes_the_others_fail_fast(network, tmp_path):
    container = render(tmp_path, f"--out={tmp_path / 'w'}", "--epochs=300",
                       "--sleep_per_batch=0.02", f"--backup_dir={tmp_path / 'b'}",
                       "--preemption")
    processes = start_pods(network, container)
    deadline = time.monotonic() + 150
    for line in processes[0].stdout:  # training under way on every pod
        if line.startswith("Epoch 3/") or time.monotonic() > deadline:
            break
    network.cut(2)
    cut_at = time.monotonic()
    survivors = processes[:2]
    outputs = [p.communicate(timeout=60)[0] for p in survivors]
    detected = time.monotonic() - cut_at
    print(f"survivors failed {detected:.1f} s after the link cut")
    assert detected < 30, detected
    assert [p.returncode for p in survivors] == [exit_codes.PEER_LOST] * 2, outputs[1][-3000:]
    for output in outputs:
        assert "UnavailableError" in output or "DeadlineExceeded" in output, output[-3000:]
        assert "tfpar: a peer worker was lost" in output
    network.kill_all()  # the isolated pod is killed by the fixture's owner, by PID


@needs_netns
def test_sigterm_to_all_pods_checkpoints_and_the_relaunch_resumes_to_the_same_weights(
        three_pod_run, network, tmp_path):
    _, clean, _, _ = three_pod_run
    out = tmp_path / "resumed"
    container = render(tmp_path, f"--out={out}", "--sleep_per_batch=0.15",
                       "--backup_dir=$(TFPAR_CHECKPOINT_DIR)/backup", "--preemption")
    processes = start_pods(network, container)
    deadline = time.monotonic() + 150
    for line in processes[0].stdout:
        if line.startswith("Epoch 2/") or time.monotonic() > deadline:
            break
    time.sleep(0.4)
    for p in processes:  # the node pool is drained: every pod gets SIGTERM
        os.kill(p.pid, signal.SIGTERM)
    signalled = time.monotonic()
    codes, outputs = wait_all(processes, timeout=120)
    stopped = time.monotonic() - signalled
    print(f"all pods saved and exited {stopped:.1f} s after SIGTERM")
    assert codes == [exit_codes.PREEMPTED] * WORKERS, outputs[0][-3000:]
    assert stopped < 120  # the manifest's terminationGracePeriodSeconds
    backup = tmp_path / "ckpt" / "backup"
    metadata = json.loads((backup / "training_metadata.json").read_text())
    assert metadata["epoch"] == 1 and 0 < metadata["step_in_epoch"] < 6, metadata

    network.processes = []
    codes, outputs = wait_all(start_pods(network, container))  # the Job recreates the pods
    assert codes == [0] * WORKERS, outputs[0][-3000:]
    assert f"at epoch 1, batch {metadata['step_in_epoch']}" in outputs[0]
    assert json.load(open(f"{out}.rank0.json"))["steps"] == 18
    for rank in range(WORKERS):
        for a, b in zip(weights(clean, 0), weights(out, rank)):
            assert np.array_equal(a, b)


# A pipeline across the pods: rank 0 drives the stages on every pod's CPU
# (tfpar.cluster.single_controller), reaching them at their pod addresses.
PIPELINE = ["python", "tests/workers/pipeline_across_processes.py", f"--pp={WORKERS}",
            "--microbatches=3", "--num_simulated_devices=1", "--heartbeat_timeout=3"]


def pipeline_pods(network, tmp_path, *flags):
    documents = render_job(tmp_path, command=[*PIPELINE, *flags])
    (container,) = documents["Job"]["spec"]["template"]["spec"]["containers"]
    return start_pods(network, container)


@needs_netns
def test_a_pipeline_across_three_pods_equals_the_exact_single_device_run(network, tmp_path):
    processes = pipeline_pods(network, tmp_path)
    codes, outputs = wait_all(processes)
    assert codes == [0] * WORKERS, outputs[0][-3000:]
    row = json.loads(outputs[0].strip().splitlines()[-1])
    assert row["max_abs_diff"] <= 1e-5 and row["moved"] > 1e-3, row
    assert len({d.rsplit("/device:", 1)[0] for d in row["variable_devices"]}) == WORKERS
    for output in outputs[1:]:
        assert "the controller ended" in output, output[-2000:]


def cut_the_last_stage_pod(network, tmp_path, *flags):
    """Pipeline pods training, then pod 2's link cut: (the pods, rank 0's
    output, seconds from the cut to rank 0's exit)."""
    processes = pipeline_pods(network, tmp_path, *flags, "--steps=100000")
    head = read_until(processes[0], "training")
    assert head.endswith("training\n"), head[-3000:]
    time.sleep(2)
    network.cut(2)
    cut_at = time.monotonic()
    output = processes[0].communicate(timeout=60)[0]
    detected = time.monotonic() - cut_at
    print(f"rank 0 exited {processes[0].returncode} {detected:.1f} s after the link cut")
    return processes, output, detected


@needs_netns
def test_cutting_a_stage_pods_link_ends_the_pipeline_within_the_heartbeat_bound(
        network, tmp_path):
    """No connection resets when a link is cut: only the controller's heartbeat
    notices, and it ends rank 0 with PEER_LOST (211) instead of a hang."""
    processes, output, detected = cut_the_last_stage_pod(network, tmp_path)
    assert processes[0].returncode == exit_codes.PEER_LOST, output[-3000:]
    assert "task:1/device:CPU:0 answered nothing for 3 s" in output, output[-3000:]
    assert detected < 3 + 5, detected
    network.kill_all()


# Tensor-parallel stages across the pods: every pod runs its own stage's mesh
# of 2 devices (tfpar.strategies.pipeline.process_stages), the activations cross
# between the pods' addresses on the worker port, the only one the policy opens.
MESH_STAGES = ["--tp=2", "--num_simulated_devices=2"]


@needs_netns
def test_tensor_parallel_stages_across_three_pods_equal_the_exact_single_device_run(
        network, tmp_path):
    processes = pipeline_pods(network, tmp_path, *MESH_STAGES)
    codes, outputs = wait_all(processes)
    assert codes == [0] * WORKERS, outputs[0][-3000:]
    row = json.loads(outputs[0].strip().splitlines()[-1])
    assert row["max_abs_diff"] <= 1e-5 and row["moved"] > 1e-3, row
    assert row["dims"]["world_size"] == 2 * WORKERS and row["dims"]["tp"] == 2


@needs_netns
def test_cutting_a_tensor_parallel_stage_pods_link_ends_every_pod_with_peer_lost(
        network, tmp_path):
    """The last stage's pod cut off: its neighbour hears nothing for the heartbeat
    timeout and exits PEER_LOST (211); rank 0 then sees its neighbour gone and
    exits 211 too, all within the bound: no hang, and the Job restarts the group."""
    processes, output, detected = cut_the_last_stage_pod(network, tmp_path, *MESH_STAGES)
    assert processes[0].returncode == exit_codes.PEER_LOST, output[-3000:]
    assert "a peer process was lost; exiting with 211" in output, output[-3000:]
    assert detected < 3 + 5, detected
    assert processes[1].wait(timeout=30) == exit_codes.PEER_LOST
    network.kill_all()
