"""In-pod cluster discovery: TF_CONFIG, then JobSet, then Indexed Job; DTensor env; name checks."""

import json
import time

import pytest

from conftest import tfpar_cli
from tfpar.cluster import ClusterConfigError, discover, dtensor_env, wait_until_resolvable
from tfpar.cluster.tf_config import Cluster

POD = {"JOB_COMPLETION_INDEX": "2", "HOSTNAME": "mnist-2", "TFPAR_NUM_WORKERS": "3",
       "TFPAR_SUBDOMAIN": "mnist", "TFPAR_PORT": "2222"}


def test_indexed_job_pod_finds_its_peers_by_hostname_and_subdomain():
    found = discover(POD)
    assert found.source == "indexed-job"
    assert found.cluster.training_addresses == [
        "mnist-0.mnist:2222", "mnist-1.mnist:2222", "mnist-2.mnist:2222"]
    assert (found.cluster.rank, found.cluster.is_chief, found.cluster.num_workers) == (2, False, 3)
    assert found.details["job"] == "mnist"


def test_indexed_job_defaults_subdomain_to_the_job_and_port_to_2222():
    env = {"JOB_COMPLETION_INDEX": "0", "HOSTNAME": "my-job-0.my-job.ns.svc.cluster.local",
           "TFPAR_NUM_WORKERS": "2"}
    found = discover(env)
    assert found.cluster.training_addresses == ["my-job-0.my-job:2222", "my-job-1.my-job:2222"]
    assert found.cluster.is_chief


def test_tf_config_wins_over_the_pod_environment():
    tf_config = {"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 1}}
    found = discover(dict(POD, TF_CONFIG=json.dumps(tf_config)))
    assert found.source == "TF_CONFIG" and found.cluster.address == "b:1"


def test_no_cluster_outside_a_tfpar_pod():
    assert discover({}) is None
    # An Indexed Job that is not a tfpar job (no TFPAR_NUM_WORKERS): single process.
    assert discover({"JOB_COMPLETION_INDEX": "4", "HOSTNAME": "batch-4"}) is None


def test_index_out_of_range_is_a_clear_error():
    with pytest.raises(ClusterConfigError,
                       match=r"JOB_COMPLETION_INDEX=3 is out of range for TFPAR_NUM_WORKERS=3 "
                             r"\(indices 0..2\)"):
        discover(dict(POD, JOB_COMPLETION_INDEX="3", HOSTNAME="mnist-3"))


@pytest.mark.parametrize("env, message", [
    (dict(POD, HOSTNAME="mnist-7"), "hostname 'mnist-7' does not end with '-2'"),
    ({k: v for k, v in POD.items() if k != "JOB_COMPLETION_INDEX"},
     "JOB_COMPLETION_INDEX is not set; TFPAR_NUM_WORKERS is set, so this must be a pod of an "
     "Indexed Job"),
    (dict(POD, TFPAR_NUM_WORKERS="three"), "TFPAR_NUM_WORKERS='three' is not an integer"),
    (dict(POD, TFPAR_NUM_WORKERS="0"), "TFPAR_NUM_WORKERS=0 must be >= 1"),
])
def test_inconsistent_pod_environment_is_an_error(env, message):
    with pytest.raises(ClusterConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        discover(env)


JOBSET_POD = {"JOBSET_NAME": "llm", "REPLICATED_JOB_NAME": "workers", "JOB_INDEX": "1",
              "JOB_COMPLETION_INDEX": "0", "REPLICATED_JOB_REPLICAS": "2",
              "TFPAR_NUM_WORKERS": "4", "HOSTNAME": "llm-workers-1-0"}


def test_jobset_pod_ranks_jobs_then_pods_in_the_jobset_subdomain():
    found = discover(JOBSET_POD)
    assert found.source == "jobset"
    assert found.cluster.training_addresses == [
        "llm-workers-0-0.llm:2222", "llm-workers-0-1.llm:2222",
        "llm-workers-1-0.llm:2222", "llm-workers-1-1.llm:2222"]
    assert found.cluster.rank == 2


def test_jobset_pod_with_the_wrong_hostname_or_index_is_an_error():
    with pytest.raises(ClusterConfigError, match="enableDNSHostnames"):
        discover(dict(JOBSET_POD, HOSTNAME="llm-workers-1-0-x7z"))
    with pytest.raises(ClusterConfigError, match="out of range for 2 job"):
        discover(dict(JOBSET_POD, JOB_INDEX="2", HOSTNAME="llm-workers-2-0"))
    with pytest.raises(ClusterConfigError, match="REPLICATED_JOB_NAME is not"):
        discover({k: v for k, v in JOBSET_POD.items() if k != "REPLICATED_JOB_NAME"})


def test_dtensor_env_lists_every_client_in_rank_order():
    cluster = Cluster.from_hosts(["w0:1", "w1:1"], chief_host="c:1", task_index=1)
    assert dtensor_env(cluster) == {"DTENSOR_JOBS": "c:1,w0:1,w1:1", "DTENSOR_CLIENT_ID": "2",
                                    "DTENSOR_NUM_CLIENTS": "3", "DTENSOR_JOB_NAME": "worker"}


def test_resolvable_names_pass_and_an_unresolvable_service_fails_after_the_timeout():
    wait_until_resolvable(Cluster.from_hosts(["localhost:2222", "127.0.0.1:2223"]), timeout_s=5)
    missing = Cluster.from_hosts(["localhost:2222", "mnist-1.no-such-service.invalid:2222"])
    start = time.monotonic()
    with pytest.raises(ClusterConfigError) as e:
        wait_until_resolvable(missing, timeout_s=1.0, poll_s=0.2)
    assert time.monotonic() - start < 10
    assert "cannot resolve worker[1] host 'mnist-1.no-such-service.invalid'" in str(e.value)
    assert "headless Service" in str(e.value)


@pytest.mark.multiprocess
def test_info_in_a_pod_prints_the_cluster_its_source_and_dtensor_env():
    result = tfpar_cli("info", "--json", env=POD, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:]
    report = json.loads(result.stdout[result.stdout.index("{"):])
    c = report["cluster"]
    assert c["source"] == "indexed-job" and c["rank"] == 2 and c["num_workers"] == 3
    assert c["tf_config"]["cluster"]["worker"][0] == "mnist-0.mnist:2222"
    assert c["dtensor_env"]["DTENSOR_CLIENT_ID"] == "2"
    assert report["strategy"]["name"] == "multi_worker"
    bad = tfpar_cli("info", "--json", env=dict(POD, JOB_COMPLETION_INDEX="5", HOSTNAME="mnist-5"),
                    timeout=120)
    assert bad.returncode == 2
    assert "JOB_COMPLETION_INDEX=5 is out of range" in bad.stdout
