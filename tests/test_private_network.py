"""`tfpar launch --private_network`: the ranks' ports are reachable from nowhere but the ranks.

A "LAN" here is a network namespace the test creates, joined to the host by
a veth pair whose host end gets an address in 10.214.0.0/16: what another
host on the LAN would see. Every namespace, link and process is removed at
the end of each test.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import pods
from conftest import REPO, WORKERS
from tfpar.cli.launch import COMMAND as LAUNCH
from tfpar.launch import Launcher, LaunchError, private_network

REASON = private_network.unavailable_reason() or pods.unavailable_reason()
needs_root = pytest.mark.skipif(REASON is not None,
                                reason=f"private networks unavailable: {REASON}")
NPROC = 2
# 3 epochs of 3 steps; the sleep keeps the servers up while the probes run.
TRAINING = ["--strategy=multi_worker", "--epochs=3", "--examples=96", "--global_batch_size=32",
            "--sleep_per_batch=0.1"]


def net_namespace(pid):
    return os.readlink(f"/proc/{pid}/ns/net")


def processes_in(namespace):
    """PIDs of the live processes whose network namespace is `namespace` ("net:[...]")."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/ns/net") == namespace:
                    with open(f"/proc/{entry}/stat") as f:
                        if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                            found.append(int(entry))
            except OSError:
                pass
    return found


def launch(tmp_path, program, *flags):
    """`tfpar launch --private_network` of a shell line that first records, per rank, its
    pid, network namespace and TF_CONFIG in tmp_path (rank.N)."""
    record = (f'{{ echo $$; readlink /proc/self/ns/net; echo "$TF_CONFIG"; }} '
              f'> {tmp_path}/rank.$TFPAR_RANK.tmp && mv {tmp_path}/rank.$TFPAR_RANK.tmp '
              f'{tmp_path}/rank.$TFPAR_RANK; exec {program}')
    return subprocess.Popen(
        [sys.executable, "-m", "tfpar.cli.main", "launch", f"--nproc={NPROC}",
         "--private_network", "--grace_period=5", *flags, "--", "sh", "-c", record],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def ranks(tmp_path, timeout=60):
    """(pid, network namespace, worker port) of each rank, once every rank has started."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        files = [tmp_path / f"rank.{r}" for r in range(NPROC)]
        if all(f.exists() for f in files):
            found = []
            for rank, f in enumerate(files):
                pid, namespace, tf_config = f.read_text().splitlines()
                address = json.loads(tf_config)["cluster"]["worker"][rank]
                found.append((int(pid), namespace, int(address.rsplit(":", 1)[1])))
            return found
        time.sleep(0.1)
    raise AssertionError(f"the ranks did not start within {timeout} s")


@pytest.fixture
def lan():
    """A namespace on a veth link to the host: (namespace, the host's address on the link)."""
    tag = os.getpid() % 100000
    ns, link, subnet = f"tfpar-lan-{tag}", f"tfl{tag}", f"10.214.{tag % 250}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "link", "add", link, "type", "veth", "peer", "name", "eth0",
                        "netns", ns], check=True)
        subprocess.run(["ip", "addr", "add", f"{subnet}.1/30", "dev", link], check=True)
        subprocess.run(["ip", "link", "set", link, "up"], check=True)
        subprocess.run(["ip", "-n", ns, "addr", "add", f"{subnet}.2/30", "dev", "eth0"],
                       check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", "eth0", "up"], check=True)
        yield ns, f"{subnet}.1"
    finally:
        subprocess.run(["ip", "link", "delete", link], stderr=subprocess.DEVNULL)
        subprocess.run(["ip", "netns", "delete", ns], check=True)


@pytest.mark.multiprocess
@needs_root
def test_no_one_outside_reaches_the_ranks_ports_while_the_job_trains(tmp_path, lan):
    lan_ns, host_address = lan
    from_lan = ["ip", "netns", "exec", lan_ns]
    # The LAN reaches whatever listens on the host's address there, as a TensorFlow
    # server that binds every interface would.
    with socket.create_server((host_address, 0)) as listener:
        control = f"{host_address}:{listener.getsockname()[1]}"
        assert pods.probe([control], enter=from_lan) == {control: "connected"}

    out = tmp_path / "w"
    launcher = launch(tmp_path, f"{sys.executable} {WORKERS / 'mlp_worker.py'} "
                      f"{' '.join(TRAINING)} --out={out}")
    try:
        started = ranks(tmp_path)
        head = []
        for line in launcher.stdout:  # both servers are up once rank 0 trains
            head.append(line)
            if line.startswith("[rank 0] Epoch 1/"):
                break
        ports = [port for _, _, port in started]
        namespace = started[0][1]
        assert {ns for _, ns, _ in started} == {namespace}
        assert namespace != net_namespace(os.getpid())
        on_host = [f"127.0.0.1:{p}" for p in ports]
        on_lan = [f"{host_address}:{p}" for p in ports]
        results = {"host": pods.probe(on_host), "lan": pods.probe(on_lan, enter=from_lan),
                   # Last: if the ranks still answer inside, they were up all along.
                   "inside": pods.probe(on_host, enter=["nsenter", f"--net=/proc/{started[0][0]}"
                                                         "/ns/net"])}
        print(results)
        output = "".join(head) + launcher.communicate(timeout=180)[0]
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    assert launcher.returncode == 0, output[-3000:]
    assert results["host"] == {a: "refused" for a in on_host}
    assert results["lan"] == {a: "refused" for a in on_lan}
    assert results["inside"] == {a: "connected" for a in on_host}
    assert all(Path(f"{out}.rank{r}.npz").exists() for r in range(NPROC))
    assert processes_in(namespace) == []  # the namespace is gone with its processes


@pytest.mark.multiprocess
@needs_root
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_killed_launcher_leaves_no_rank_and_no_namespace(tmp_path, sig):
    launcher = launch(tmp_path, "sleep 120")
    try:
        started = ranks(tmp_path)
        namespace = started[0][1]
        assert len(processes_in(namespace)) == NPROC
        os.kill(launcher.pid, sig)
        launcher.wait(timeout=30)
        deadline = time.monotonic() + 10
        while processes_in(namespace) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = processes_in(namespace)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
        for pid, _, _ in started:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert left == [], left
    assert launcher.returncode == (128 + sig if sig == signal.SIGTERM else -sig)


def test_private_network_refuses_to_start_where_the_platform_does_not_allow_it(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(LaunchError, match=r"--private_network: creating a network namespace "
                                          r"needs root \(CAP_SYS_ADMIN\)"):
        Launcher(nproc=2, private_network=True)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which",
                        lambda name: None if name == "nsenter" else real_which(name) or name)
    with pytest.raises(LaunchError, match=r"`nsenter` \(util-linux\) not found; install them"):
        Launcher(nproc=2, private_network=True)
    Launcher(nproc=2)  # the default needs none of it
    assert "--private_network  (default: false)" in LAUNCH.help()
