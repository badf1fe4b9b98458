"""How much the `tfpar` commands log: quiet by default, `--verbosity` for more.

TensorFlow and absl log a great deal at INFO (device placement, collective
set-up, `I1202 ... cross_device_ops.py` lines) and TensorFlow's C++ runtime
at W level; a user running `tfpar info` or `tfpar train` wants the command's
own output. `--verbosity` has absl's meaning:

| --verbosity | tfpar's logger | TensorFlow, absl |
| --- | --- | --- |
| -2 | errors | errors |
| -1 (default) | warnings and errors | errors |
| 0 | info | info |
| 1 | debug | debug |

A non-chief worker of a multi-process job logs warnings and errors only,
whatever the flag: N copies of the chief's lines help nobody.

`configure` must run before TensorFlow is imported: the C++ runtime reads
TF_CPP_MIN_LOG_LEVEL once, when it loads. A TF_CPP_MIN_LOG_LEVEL the user
set is left as it is. Some of TensorFlow's libraries log while they load,
before that level applies (`I0000 ... port.cc] oneDNN custom operations are
on`); `import_tensorflow` drops those lines.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile

# absl's verbosity -> Python logging level.
LEVELS = {-2: logging.ERROR, -1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG}
# Python logging level -> TF_CPP_MIN_LOG_LEVEL (0 info, 1 warning, 2 error).
_TF_CPP = {logging.DEBUG: "0", logging.INFO: "0", logging.WARNING: "1", logging.ERROR: "2"}
# Python logging level -> absl verbosity.
_ABSL = {level: verbosity for verbosity, level in LEVELS.items()}


def configure(verbosity: int, chief: bool = True) -> None:
    """Sets tfpar's, TensorFlow's and absl's log levels for `verbosity`."""
    own = LEVELS[min(max(verbosity, -2), 1)]
    framework = own if verbosity >= 0 else logging.ERROR
    if not chief:
        own, framework = max(own, logging.WARNING), max(framework, logging.WARNING)
    if not os.environ.get("TF_CPP_MIN_LOG_LEVEL"):
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = _TF_CPP[framework]

    from absl import logging as absl_logging

    absl_logging.set_verbosity(_ABSL[framework])
    for name in ("tensorflow", "absl"):
        logging.getLogger(name).setLevel(framework)
    log = logging.getLogger("tfpar")
    log.setLevel(own)
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        log.addHandler(handler)
        log.propagate = False


def is_chief(flag_values=None) -> bool:
    """Whether this process is the chief (or alone), from its environment.

    Non-chief: DTENSOR_CLIENT_ID != 0 (a multi-client mesh), or a cluster
    (`tfpar.cluster.discover()`: TF_CONFIG, a JobSet or Indexed Job pod; or
    the command's --worker_hosts/--task_index) in which this is not the
    chief. A cluster description that does not parse counts as chief here:
    the command reports the error itself.
    """
    from tfpar.cluster import ClusterConfigError, discover
    from tfpar.flags import discover_from_flags

    if os.environ.get("DTENSOR_CLIENT_ID", "0").strip() not in ("", "0"):
        return False
    try:
        if flag_values is not None and "worker_hosts" in flag_values:
            found = discover_from_flags(flag_values)
        else:
            found = discover()
    except ClusterConfigError:
        return True
    return found is None or found.cluster.is_chief


# C++ log lines (absl's format: level letter, MMDD, time) and absl's notice
# that logging is not initialized yet.
_CPP_LINE = re.compile(r"^([IWEF])\d{4} ")
_ABSL_NOTICE = "WARNING: All log messages before absl::InitializeLog() is called"


def import_tensorflow() -> None:
    """Imports TensorFlow, keeping of what its libraries print while loading
    only the lines TF_CPP_MIN_LOG_LEVEL lets through."""
    min_level = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0")
    dropped = {"1": "I", "2": "IW", "3": "IWE"}.get(min_level.strip(), "")
    if "tensorflow" in sys.modules or not dropped:
        import tensorflow  # noqa: F401
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines(keepends=True):
                match = _CPP_LINE.match(line)
                if not (line.startswith(_ABSL_NOTICE) or (match and match[1] in dropped)):
                    sys.stderr.write(line)
