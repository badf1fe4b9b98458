"""JSON-schema subsets of the TFJob and JobSet CRDs, for validating rendered YAML offline.

kubernetes-validate bundles the schemas of Kubernetes' own kinds only; for a
CRD kind it warns and passes. These subsets are written from the CRDs'
documented fields (kubeflow/training-operator `pkg/apis/kubeflow.org/v1`
TFJob and common types; kubernetes-sigs/jobset `api/jobset/v1alpha2`). They
are closed (`additionalProperties: false`) down to the embedded Job and Pod
templates, which the tests validate with kubernetes-validate's own schemas,
so a misspelled field anywhere fails.
"""

_NAME = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}

_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": _NAME,
        "namespace": _NAME,
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "additionalProperties": False,
}

_TEMPLATE = {  # PodTemplateSpec / JobTemplateSpec: checked by kubernetes-validate
    "type": "object",
    "required": ["spec"],
    "properties": {"metadata": {"type": "object"}, "spec": {"type": "object"}},
    "additionalProperties": False,
}

_REPLICA_SPEC = {
    "type": "object",
    "required": ["template"],
    "properties": {
        "replicas": {"type": "integer", "minimum": 0},
        "restartPolicy": {"enum": ["Always", "OnFailure", "Never", "ExitCode"]},
        "template": _TEMPLATE,
    },
    "additionalProperties": False,
}

TFJOB = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "kubeflow.org/v1"},
        "kind": {"const": "TFJob"},
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "required": ["tfReplicaSpecs"],
            "properties": {
                "runPolicy": {
                    "type": "object",
                    "properties": {
                        "cleanPodPolicy": {"enum": ["All", "Running", "None"]},
                        "ttlSecondsAfterFinished": {"type": "integer"},
                        "activeDeadlineSeconds": {"type": "integer"},
                        "backoffLimit": {"type": "integer", "minimum": 0},
                        "suspend": {"type": "boolean"},
                        "schedulingPolicy": {"type": "object"},
                    },
                    "additionalProperties": False,
                },
                "successPolicy": {"enum": ["", "AllWorkers"]},
                "enableDynamicWorker": {"type": "boolean"},
                "tfReplicaSpecs": {
                    "type": "object",
                    "minProperties": 1,
                    "propertyNames": {"enum": ["Chief", "Master", "Worker", "PS", "Evaluator"]},
                    "additionalProperties": _REPLICA_SPEC,
                },
            },
            "additionalProperties": False,
        },
    },
    "additionalProperties": False,
}

_JOB_FAILURE_REASONS = ["BackoffLimitExceeded", "DeadlineExceeded", "FailedIndexes",
                        "MaxFailedIndexesExceeded", "PodFailurePolicy"]

JOBSET = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "jobset.x-k8s.io/v1alpha2"},
        "kind": {"const": "JobSet"},
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "required": ["replicatedJobs"],
            "properties": {
                "replicatedJobs": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["name", "template"],
                        "properties": {
                            "name": _NAME,
                            "groupName": {"type": "string"},
                            "replicas": {"type": "integer", "minimum": 0},
                            "dependsOn": {"type": "array"},
                            "template": _TEMPLATE,
                        },
                        "additionalProperties": False,
                    },
                },
                "network": {
                    "type": "object",
                    "properties": {
                        "enableDNSHostnames": {"type": "boolean"},
                        "subdomain": _NAME,
                        "publishNotReadyAddresses": {"type": "boolean"},
                    },
                    "additionalProperties": False,
                },
                "successPolicy": {
                    "type": "object",
                    "required": ["operator"],
                    "properties": {
                        "operator": {"enum": ["All", "Any"]},
                        "targetReplicatedJobs": {"type": "array", "items": {"type": "string"}},
                    },
                    "additionalProperties": False,
                },
                "failurePolicy": {
                    "type": "object",
                    "properties": {
                        "maxRestarts": {"type": "integer", "minimum": 0},
                        "restartStrategy": {"enum": ["Recreate", "BlockingRecreate"]},
                        "rules": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["name", "action"],
                                "properties": {
                                    "name": {"type": "string",
                                             "pattern": r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"},
                                    "action": {"enum": ["FailJobSet", "RestartJobSet",
                                                        "RestartJobSetAndIgnoreMaxRestarts"]},
                                    "onJobFailureReasons": {
                                        "type": "array", "items": {"enum": _JOB_FAILURE_REASONS}},
                                    "targetReplicatedJobs": {
                                        "type": "array", "items": {"type": "string"}},
                                },
                                "additionalProperties": False,
                            },
                        },
                    },
                    "additionalProperties": False,
                },
                "startupPolicy": {"type": "object"},
                "suspend": {"type": "boolean"},
                "ttlSecondsAfterFinished": {"type": "integer"},
                "managedBy": {"type": "string"},
            },
            "additionalProperties": False,
        },
    },
    "additionalProperties": False,
}
