"""`tfpar k8s render`: manifests that validate offline, carry the cluster contract, and refuse bad flags."""

import copy

import jsonschema
import pytest
import yaml
from kubernetes_validate import utils as kv

import k8s_schemas
from conftest import REPO, tfpar_cli
from tfpar import exit_codes
from tfpar.k8s import FORMATS, JobSpec, K8sSpecError, parse_egress, render

K8S_VERSION = "1.33"
COMMAND = ["python", "train.py", "--strategy=multi_worker", "--collective_timeout=60",
           "--backup_dir=$(TFPAR_CHECKPOINT_DIR)/backup", "--note", "two words"]


def spec(**overrides):
    args = dict(name="mnist", image="registry.example.com/train:1.0", workers=3,
                command=COMMAND)
    args.update(overrides)
    return JobSpec(**args)


def validate_strict(document):
    """Validates one object with Kubernetes' own schemas; CRDs against our subsets."""
    kind = document["kind"]
    if kind == "TFJob":
        jsonschema.validate(document, k8s_schemas.TFJOB)
        for replica in document["spec"]["tfReplicaSpecs"].values():
            validate_strict({"apiVersion": "v1", "kind": "PodTemplate",
                             "metadata": {"name": "t"}, "template": replica["template"]})
        return
    if kind == "JobSet":
        jsonschema.validate(document, k8s_schemas.JOBSET)
        for replicated in document["spec"]["replicatedJobs"]:
            validate_strict({"apiVersion": "batch/v1", "kind": "Job",
                             "metadata": {"name": replicated["name"]},
                             "spec": replicated["template"]["spec"]})
        return
    kv.validate(document, K8S_VERSION, strict=True)  # raises on any error


def by_kind(documents):
    return {d["kind"]: d for d in documents}


def container_of(pod_spec):
    (container,) = pod_spec["containers"]
    return container


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_validates_strictly(fmt):
    documents = render(spec(gpus_per_worker=2, cpu="8", memory="32Gi", namespace="ml",
                            checkpoint_dir="/ckpt", checkpoint_size="100Gi",
                            egress=["10.0.0.0/8:443", "2001:db8::/32"]), fmt)
    assert "NetworkPolicy" in by_kind(documents)
    for document in documents:
        validate_strict(document)
    # Each document survives the YAML round trip that kubectl reads.
    text = yaml.safe_dump_all(documents, sort_keys=False)
    assert list(yaml.safe_load_all(text)) == documents


@pytest.mark.parametrize("fmt", FORMATS)
def test_strict_validation_catches_a_misspelled_field(fmt):
    documents = copy.deepcopy(render(spec(), fmt))
    workload = documents[-1]
    pod = {"indexed-job": lambda d: d["spec"]["template"]["spec"],
           "jobset": lambda d: d["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"],
           "tfjob": lambda d: d["spec"]["tfReplicaSpecs"]["Worker"]["template"]["spec"]}[fmt](workload)
    pod["terminationGracePeriodSecond"] = 30  # missing "s"
    with pytest.raises((kv.ValidationError, jsonschema.ValidationError)):
        validate_strict(workload)


def test_crd_subset_schemas_reject_unknown_top_level_fields():
    jobset = by_kind(render(spec(), "jobset"))["JobSet"]
    jobset["spec"]["failurePolicy"]["maxRestart"] = 1
    with pytest.raises(jsonschema.ValidationError, match="maxRestart"):
        validate_strict(jobset)
    tfjob = by_kind(render(spec(), "tfjob"))["TFJob"]
    tfjob["spec"]["tfReplicaSpecs"]["Workers"] = tfjob["spec"]["tfReplicaSpecs"].pop("Worker")
    with pytest.raises(jsonschema.ValidationError, match="Workers"):
        validate_strict(tfjob)


def test_indexed_job_is_a_headless_service_and_an_indexed_job_that_find_each_other():
    docs = by_kind(render(spec(workers=4)))
    service, job = docs["Service"], docs["Job"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["ports"] == [{"name": "tfpar-grpc", "port": 2222, "targetPort": 2222,
                                         "protocol": "TCP"}]
    js = job["spec"]
    assert js["completionMode"] == "Indexed"
    assert js["completions"] == js["parallelism"] == 4
    pod = js["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"] == "mnist"
    labels = js["template"]["metadata"]["labels"]
    assert all(labels[k] == v for k, v in service["spec"]["selector"].items())
    container = container_of(pod)
    assert container["ports"][0]["containerPort"] == 2222
    assert container["ports"][0]["name"] == "tfpar-grpc"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["TFPAR_NUM_WORKERS"] == "4" and env["TFPAR_SUBDOMAIN"] == "mnist"
    assert env["TFPAR_PORT"] == "2222"


def test_pod_failure_policy_retries_preemption_and_fails_on_real_errors():
    job = by_kind(render(spec(max_restarts=5, grace_period_s=300)))["Job"]["spec"]
    assert job["backoffLimit"] == 5
    rules = job["podFailurePolicy"]["rules"]
    assert rules[0]["action"] == "FailJob"
    assert rules[0]["onExitCodes"]["values"] == [1, 2]
    assert rules[1]["action"] == "Ignore"
    assert rules[1]["onExitCodes"]["values"] == [exit_codes.PREEMPTED, exit_codes.PEER_LOST]
    assert all(r["onExitCodes"]["containerName"] == "worker" for r in rules[:2])
    assert rules[2] == {"action": "Ignore", "onPodConditions": [
        {"type": "DisruptionTarget", "status": "True"}]}
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "Never"  # podFailurePolicy requires it
    assert pod["terminationGracePeriodSeconds"] == 300


def test_retry_codes_are_ones_tfjob_exitcode_policy_retries():
    # TFJob's restartPolicy ExitCode retries 128-255 and fails on 1-127.
    assert all(128 <= code <= 255 for code in exit_codes.RETRYABLE)
    assert all(1 <= code <= 127 for code in exit_codes.PERMANENT)
    worker = by_kind(render(spec(), "tfjob"))["TFJob"]["spec"]["tfReplicaSpecs"]["Worker"]
    assert worker["restartPolicy"] == "ExitCode" and worker["replicas"] == 3
    assert container_of(worker["template"]["spec"])["name"] == "tensorflow"


def test_resources_security_and_gpus():
    pod = by_kind(render(spec(gpus_per_worker=8, cpu="500m", memory="64Gi")))["Job"]
    pod = pod["spec"]["template"]["spec"]
    container = container_of(pod)
    assert container["resources"] == {"requests": {"cpu": "500m", "memory": "64Gi"},
                                      "limits": {"memory": "64Gi", "nvidia.com/gpu": 8}}
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    cpu_only = container_of(by_kind(render(spec()))["Job"]["spec"]["template"]["spec"])
    assert "resources" not in cpu_only


def test_jobset_restarts_the_group_and_names_pods_in_one_subdomain():
    jobset = by_kind(render(spec(max_restarts=7), "jobset"))["JobSet"]
    s = jobset["spec"]
    assert s["failurePolicy"]["maxRestarts"] == 7
    assert s["failurePolicy"]["rules"][0]["action"] == "FailJobSet"
    assert s["network"] == {"enableDNSHostnames": True, "subdomain": "mnist"}
    (replicated,) = s["replicatedJobs"]
    job = replicated["template"]["spec"]
    assert job["completions"] == job["parallelism"] == 3 and job["backoffLimit"] == 0
    env = {e["name"]: e for e in container_of(job["template"]["spec"])["env"]}
    assert env["JOB_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.annotations['jobset.sigs.k8s.io/job-index']"
    assert spec().pod_hostnames("jobset")[2] == "mnist-workers-0-2"


def test_checkpoint_dir_is_a_mounted_claim_or_a_bucket():
    docs = by_kind(render(spec(checkpoint_dir="/ckpt", checkpoint_size="10Gi")))
    assert docs["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]
    pod = docs["Job"]["spec"]["template"]["spec"]
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "mnist-checkpoints"
    assert container_of(pod)["volumeMounts"] == [{"name": "checkpoints", "mountPath": "/ckpt"}]
    bucket = by_kind(render(spec(checkpoint_dir="gs://bucket/runs/mnist")))
    assert set(bucket) == {"NetworkPolicy", "Service", "Job"}
    pod = bucket["Job"]["spec"]["template"]["spec"]
    assert "volumes" not in pod
    env = {e["name"]: e.get("value") for e in container_of(pod)["env"]}
    assert env["TFPAR_CHECKPOINT_DIR"] == "gs://bucket/runs/mnist"


def pod_templates(documents):
    """Every pod template of a rendered job, whatever the format."""
    workload = documents[-1]
    return {"Job": lambda d: [d["spec"]["template"]],
            "JobSet": lambda d: [r["template"]["spec"]["template"]
                                 for r in d["spec"]["replicatedJobs"]],
            "TFJob": lambda d: [r["template"] for r in d["spec"]["tfReplicaSpecs"].values()],
            }[workload["kind"]](workload)


def selects(selector, labels):
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


@pytest.mark.parametrize("fmt", FORMATS)
def test_network_policy_admits_only_the_jobs_own_pods_and_only_to_the_worker_port(fmt):
    documents = render(spec(), fmt)
    policy = by_kind(documents)["NetworkPolicy"]["spec"]
    (template,) = pod_templates(documents)
    labels = template["metadata"]["labels"]
    assert selects(policy["podSelector"], labels)  # the policy applies to the job's pods
    assert policy["policyTypes"] == ["Ingress"] and "egress" not in policy  # egress open
    (rule,) = policy["ingress"]
    (source,) = rule["from"]
    assert set(source) == {"podSelector"} and selects(source["podSelector"], labels)
    (port,) = container_of(template["spec"])["ports"]
    assert rule["ports"] == [{"protocol": "TCP", "port": port["containerPort"]}] \
        == [{"protocol": "TCP", "port": 2222}]
    # Another job's pods (same labels but the instance) are neither protected nor admitted.
    (other,) = pod_templates(render(spec(name="other"), fmt))
    assert not selects(source["podSelector"], other["metadata"]["labels"])


def test_egress_rules_allow_the_peers_dns_and_the_listed_networks_only():
    policy = by_kind(render(spec(egress=["10.0.0.0/8:443", "2001:db8::/32"])))[
        "NetworkPolicy"]["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    peers, dns, bucket, v6 = policy["egress"]
    assert peers == {"to": policy["ingress"][0]["from"],
                     "ports": [{"protocol": "TCP", "port": 2222}]}
    assert dns == {"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}
    assert bucket == {"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}],
                      "ports": [{"protocol": "TCP", "port": 443}]}
    assert v6 == {"to": [{"ipBlock": {"cidr": "2001:db8::/32"}}]}  # every port
    closed = by_kind(render(spec(egress=["none"])))["NetworkPolicy"]["spec"]
    assert closed["egress"] == [peers, dns]


def test_network_policy_false_leaves_it_out():
    for fmt in FORMATS:
        kinds = [d["kind"] for d in render(spec(network_policy=False), fmt)]
        assert "NetworkPolicy" not in kinds and len(kinds) == (2 if fmt == "indexed-job" else 1)


@pytest.mark.parametrize("value, message", [
    ("10.1.2.3:443", "--egress='10.1.2.3:443': a rule is CIDR[:PORT] with a prefix length "
                     "(e.g. 10.1.2.3/32:443 for one address)"),
    ("10.0.0.0/8:https", "--egress='10.0.0.0/8:https': the port 'https' must be a number "
                         "from 1 to 65535"),
    ("10.0.0.0/8:0", "the port '0' must be a number from 1 to 65535"),
    ("10.0.0/8", "--egress='10.0.0/8': 10.0.0/8 is not an IPv4 or IPv6 network"),
    ("2001:db8::1/32", "2001:db8::1/32 has host bits set; the network is 2001:db8::/32"),
    ("none,10.0.0.0/8", "'none' stands alone"),
])
def test_bad_egress_rules_name_the_value_the_rule_and_the_fix(value, message):
    with pytest.raises(K8sSpecError) as error:
        spec(egress=value.split(","))
    assert message in str(error.value)
    assert parse_egress(["0.0.0.0/0:443"])[0].port == 443


@pytest.mark.multiprocess
def test_cli_writes_yaml_and_passes_the_command_through_unchanged(tmp_path):
    out = tmp_path / "job.yaml"
    result = tfpar_cli("k8s", "render", "--name=mnist", "--image=img:1", "--workers=2",
                       "--kind=jobset", f"--output={out}", "--", *COMMAND, timeout=60)
    assert result.returncode == 0, result.stdout
    jobset = by_kind(yaml.safe_load_all(out.read_text()))["JobSet"]
    pod = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert container_of(pod)["command"] == COMMAND
    assert pod["terminationGracePeriodSeconds"] == 120 and jobset["spec"]["failurePolicy"][
        "maxRestarts"] == 3
    assert "NetworkPolicy" in by_kind(yaml.safe_load_all(out.read_text()))
    stdout = tfpar_cli("k8s", "render", "--name=mnist", "--image=img:1", "--workers=2",
                       "--grace_period=45", "--max_restarts=1", "--", *COMMAND, timeout=60)
    docs = by_kind(yaml.safe_load_all(stdout.stdout))
    assert docs["Job"]["spec"]["backoffLimit"] == 1
    assert docs["Job"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 45
    closed = tfpar_cli("k8s", "render", "--name=mnist", "--image=img:1", "--workers=2",
                       "--egress=10.0.0.0/8:443,0.0.0.0/0:443", "--", *COMMAND, timeout=60)
    egress = by_kind(yaml.safe_load_all(closed.stdout))["NetworkPolicy"]["spec"]["egress"]
    assert [rule["to"][0]["ipBlock"]["cidr"] for rule in egress[2:]] == ["10.0.0.0/8",
                                                                         "0.0.0.0/0"]
    opened = tfpar_cli("k8s", "render", "--name=mnist", "--image=img:1", "--workers=2",
                       "--network_policy=false", "--", *COMMAND, timeout=60)
    assert set(by_kind(yaml.safe_load_all(opened.stdout))) == {"Service", "Job"}


@pytest.mark.multiprocess
@pytest.mark.parametrize("flags, message", [
    (["--name=My_Job"], "--name='My_Job': a job name must be a DNS-1123 label"),
    (["--workers=0"], "--workers=0: a job needs at least 1 worker"),
    (["--gpus_per_worker=-1"], "--gpus_per_worker=-1: must be an integer >= 0"),
    (["--cpu=4 cores"], "--cpu='4 cores': write a CPU quantity"),
    (["--memory=lots"], "--memory='lots': write a byte quantity"),
    (["--namespace=ML"], "--namespace='ML': a namespace is a DNS-1123 label"),
    (["--kind=helm"], "--kind='helm': use one of ['indexed-job', 'jobset', 'tfjob']"),
    (["--checkpoint_dir=ckpt"], "--checkpoint_dir='ckpt': give a bucket URL"),
    (["--checkpoint_size=10Gi"], "--checkpoint_claim/--checkpoint_size describe a volume"),
    (["--name=" + "a" * 61, "--workers=100"], "hostname 'aaaa"),
    (["--egress=10.0.0.1/8"], "--egress='10.0.0.1/8': 10.0.0.1/8 has host bits set; the "
                              "network is 10.0.0.0/8"),
    (["--egress=none", "--network_policy=false"], "--egress rules are part of the "
                                                  "NetworkPolicy"),
])
def test_bad_flags_name_the_value_the_rule_and_the_fix(flags, message):
    args = {"--name": "mnist", "--image": "img:1", "--workers": "2"}
    args.update(dict(f.split("=", 1) for f in flags))
    result = tfpar_cli("k8s", "render", *(f"{k}={v}" for k, v in args.items()), "--",
                       "python", "train.py", timeout=60)
    assert result.returncode == 2
    assert message in result.stdout, result.stdout


@pytest.mark.multiprocess
def test_missing_required_flags_and_command_are_errors():
    result = tfpar_cli("k8s", "render", "--image=img", "--", "python", "t.py", timeout=60)
    assert result.returncode == 2 and "--name, --workers required" in result.stdout
    result = tfpar_cli("k8s", "render", "--name=a", "--image=img", "--workers=1", timeout=60)
    assert result.returncode == 2 and "no training command" in result.stdout
    with pytest.raises(K8sSpecError, match="shorten the name|Shorten the name"):
        render(spec(name="x" * 62, workers=11))


@pytest.mark.parametrize("path", sorted((REPO / "examples" / "k8s").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_example_manifests_validate_strictly(path):
    documents = list(yaml.safe_load_all(path.read_text()))
    assert documents
    for document in documents:
        validate_strict(document)
