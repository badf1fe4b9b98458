"""Exit codes with a meaning for whoever restarts a training job.

They are the contract between a worker (`tfpar.callbacks.PreemptionCheckpoint`)
and what restarts it: the podFailurePolicy of the manifests `tfpar k8s render`
writes, JobSet's failure policy, Kubeflow's TFJob. Both are above 127 because
TFJob's `restartPolicy: ExitCode` retries exactly the codes >= 128 and treats
1-127 as permanent errors; both are above 192 so that they cannot be read as
"killed by signal N" (128 + N for N <= 64).

Example::

    >>> from tfpar import exit_codes
    >>> exit_codes.describe(exit_codes.PREEMPTED)
    'preempted: a checkpoint was saved; restart to resume'
"""

# SIGTERM (preemption, eviction, node drain) arrived; every worker stopped at
# the same step and the chief committed a checkpoint. Restarting resumes.
PREEMPTED = 210
# A peer worker vanished (its pod was killed, its link cut): this worker's
# collectives failed. Nothing is wrong with this worker; restarting the group
# resumes from the last checkpoint. The peer's own exit tells why it died.
PEER_LOST = 211
# Codes that a restart fixes; every other non-zero code is a real error.
RETRYABLE = (PREEMPTED, PEER_LOST)
# Codes that mean the job itself is wrong (an uncaught Python exception,
# a bad flag or cluster configuration): restarting cannot help.
PERMANENT = (1, 2)

_DESCRIPTIONS = {
    PREEMPTED: "preempted: a checkpoint was saved; restart to resume",
    PEER_LOST: "a peer worker was lost; restart the group to resume",
    1: "an uncaught error in the training program",
    2: "a usage or configuration error",
}


def describe(code: int) -> str:
    """A short human description of a worker's exit code."""
    if code in _DESCRIPTIONS:
        return _DESCRIPTIONS[code]
    if 128 < code <= 192:
        return f"killed by signal {code - 128}"
    return f"exit code {code}"
