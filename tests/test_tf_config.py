"""TF_CONFIG: what tfpar writes is what TensorFlow reads; what is malformed is refused."""

import json

import pytest
import tensorflow as tf

from tfpar.cluster import Cluster, ClusterConfigError


def tf_config(cluster, task_type="worker", index=0, **extra):
    return json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}, **extra})


TWO_WORKERS = {"worker": ["10.0.0.1:2222", "10.0.0.2:2222"]}


def test_written_tf_config_is_what_tensorflows_resolver_reads(monkeypatch):
    cluster = Cluster.from_hosts(["h0:2222", "h1:2222", "h2:2222"], task_type="worker",
                                 task_index=2, chief_host="c:2222")
    monkeypatch.setenv("TF_CONFIG", cluster.to_json())
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    assert resolver.cluster_spec().as_dict() == {"chief": ["c:2222"],
                                                 "worker": ["h0:2222", "h1:2222", "h2:2222"]}
    assert (resolver.task_type, resolver.task_id) == ("worker", 2)
    assert cluster.rank == 3 and cluster.num_workers == 4 and not cluster.is_chief


def test_worker_zero_is_chief_without_a_chief_task():
    c = Cluster.from_tf_config(tf_config(TWO_WORKERS, index=0))
    assert c.is_chief and c.rank == 0
    assert c.coordination_leader == "/job:worker/replica:0/task:0"


def test_kubeflow_tf_config_with_environment_key_is_accepted():
    raw = tf_config({"chief": ["job-chief-0.ns.svc:2222"],
                     "worker": ["job-worker-0.ns.svc:2222"], "ps": ["job-ps-0.ns.svc:2222"]},
                    task_type="worker", index=0, environment="cloud")
    c = Cluster.from_tf_config(raw)
    assert c.num_workers == 2 and c.rank == 1
    assert c.coordination_leader == "/job:chief/replica:0/task:0"


def test_ray_train_style_tf_config_is_accepted():
    c = Cluster.from_tf_config({"cluster": {"worker": ["127.0.0.1:5000", "127.0.0.1:5001"]},
                                "task": {"type": "worker", "index": "1"}})
    assert c.task_index == 1 and c.address == "127.0.0.1:5001"


def test_unset_or_empty_tf_config_means_no_cluster():
    assert Cluster.from_env({}) is None
    assert Cluster.from_env({"TF_CONFIG": ""}) is None
    assert Cluster.from_env({"TF_CONFIG": "{}"}) is None


@pytest.mark.parametrize("raw, message", [
    ('{"cluster": {"worker": ["a:1"]}, "task": ', "not valid JSON"),
    ('["a:1"]', "must be a JSON object"),
    (tf_config(TWO_WORKERS) [:-1] + ', "clusterr": {}}', "unknown keys ['clusterr']"),
    ('{"task": {"type": "worker", "index": 0}}', "no 'cluster' object"),
    ('{"cluster": {"worker": ["a:1"]}}', "no 'task' object"),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker"}}', "both 'type' and 'index'"),
    (tf_config(TWO_WORKERS, index=2), "task index 2 is out of range for 'worker', which has 2"),
    (tf_config(TWO_WORKERS, index=-1), "task index -1 is out of range"),
    (tf_config(TWO_WORKERS, index=1.5), "is not an integer"),
    (tf_config(TWO_WORKERS, task_type="master"), "task type 'master' is not a role"),
    (tf_config(TWO_WORKERS, task_type="chief"), "task type 'chief' is not in the cluster"),
    (tf_config({"worker": ["a:1"], "trainer": ["b:1"]}), "unknown roles ['trainer']"),
    (tf_config({"worker": ["a"]}), "has no port"),
    (tf_config({"worker": ["a:http"]}), "is not a number"),
    (tf_config({"worker": ["a:70000"]}), "out of range"),
    (tf_config({"worker": [""]}), "is not a 'host:port' string"),
    (tf_config({"worker": ["a:1", "a:1"]}), "used twice, by worker[0] and worker[1]"),
    (tf_config({"chief": ["c:1"], "worker": ["c:1"]}), "used twice"),
    (tf_config({"chief": ["c:1", "d:1"], "worker": ["a:1"]}, "chief"), "there can be only one chief"),
    (tf_config({"ps": ["p:1"]}, "ps"), "no chief and no workers"),
    (tf_config({"worker": []}), "no chief and no workers"),
    (tf_config({"worker": "a:1"}), "must be a list"),
])
def test_malformed_tf_config_is_refused_with_its_reason(raw, message):
    with pytest.raises(ClusterConfigError) as e:
        Cluster.from_env({"TF_CONFIG": raw})
    assert message in str(e.value)


def test_malformed_tf_config_never_falls_back_to_single_worker():
    with pytest.raises(ClusterConfigError):
        Cluster.from_env({"TF_CONFIG": "not json"})
