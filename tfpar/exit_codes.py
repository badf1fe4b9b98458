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

import signal

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
    """A short human description of a worker's exit code.

    `code` is a process's exit status, or a `subprocess.Popen` return code,
    which is -N for a process killed by signal N::

        >>> describe(2)
        'a usage or configuration error'
        >>> describe(-9)
        'killed by SIGKILL'
        >>> describe(137)
        'killed by signal 9 (SIGKILL)'
    """
    if code in _DESCRIPTIONS:
        return _DESCRIPTIONS[code]
    if code < 0:
        return f"killed by {_signal_name(-code) or f'signal {-code}'}"
    if 128 < code <= 192:
        # A shell (or a launcher like this one) reports a child killed by
        # signal N as 128 + N.
        name = _signal_name(code - 128)
        return f"killed by signal {code - 128}" + (f" ({name})" if name else "")
    return f"exit code {code}"


def _signal_name(number: int) -> str | None:
    try:
        return signal.Signals(number).name
    except ValueError:
        return None
