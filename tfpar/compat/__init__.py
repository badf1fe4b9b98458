"""Every Keras and TensorFlow workaround tfpar needs, one module each, in one registry.

A patch is either a **fix** (Keras or TensorFlow is wrong for distribution;
the patch names the upstream issue) or a **mechanism** (Keras has no hook
for what a tfpar strategy does, so the patch *is* part of that strategy:
DTensor variables, weights gathered where layers read them, and step
functions for `TensorParallel` and `Pipeline`).

| patch | kind | module |
| --- | --- | --- |
| symbolic_build | fix | `symbolic_build` |
| reduce_scalar_metrics | fix | `reduce_scalar_metrics` |
| chief_only_writes | fix | `chief_only_writes` |
| makedirs_race | fix | `makedirs_race` |
| reduce_before_apply | fix | `reduce_before_apply` |
| sum_duplicate_rows | fix | `sum_duplicate_rows` |
| dtensor_variables | mechanism | `dtensor_variables` |
| dtensor_layer_inputs | mechanism | `dtensor_layer_inputs` |
| gather_on_read | mechanism | `gather_on_read` |
| step_functions | mechanism | `step_functions` |

`apply_keras_fixes()` installs them once; tfpar's strategies call it, so
user code never has to. Inside the verified Keras range every patch is
installed. Outside it, fixes are skipped with a warning (the bug may be
gone), while mechanisms are still installed after checking that the Keras
internals they replace exist, or refused with an error that says what to
do: a strategy never trains silently unsharded or unsplit.
`remove_keras_fixes(name)` restores upstream behaviour (the tests use it to
show that each patch is needed).

Private TensorFlow calls that are not patches (the coordination service,
collective keys, moving variables) live in `tfpar.compat.tf_runtime`.
"""

from __future__ import annotations

import logging

import keras

from tfpar.compat import (
    chief_only_writes,
    dtensor_layer_inputs,
    dtensor_variables,
    gather_on_read,
    makedirs_race,
    reduce_before_apply,
    reduce_scalar_metrics,
    step_functions,
    sum_duplicate_rows,
    symbolic_build,
)
from tfpar.compat.patch import CompatError, Patch, keras_version
from tfpar.compat.tf_runtime import (
    configure_coordination_service,
    configure_dtensor,
    dtensor_accelerator_system_initialized,
    place_variable,
    tensorflow_initialized,
    unique_collective_key_base,
    wait_for_every_process,
)

log = logging.getLogger("tfpar")

# In installation order. name -> Patch; the names are what tests pass to
# remove_keras_fixes().
PATCHES: dict[str, Patch] = {p.name: p for p in (
    symbolic_build.PATCH,
    reduce_scalar_metrics.PATCH,
    chief_only_writes.PATCH,
    makedirs_race.PATCH,
    dtensor_variables.PATCH,
    dtensor_layer_inputs.PATCH,
    gather_on_read.PATCH,
    step_functions.PATCH,
    reduce_before_apply.PATCH,
    sum_duplicate_rows.PATCH,
)}
_installed: set[str] = set()
_warned: set[str] = set()


def keras_needs_fixes() -> bool:
    """Whether this Keras is inside every fix's verified range."""
    return all(p.verified_for(keras_version()) for p in PATCHES.values() if p.kind == "fix")


def apply_keras_fixes() -> None:
    """Installs every patch (idempotent); see the module docstring for the rules."""
    version = keras_version()
    for name, patch in PATCHES.items():
        if name in _installed:
            continue
        if not patch.verified_for(version):
            if patch.kind == "fix":
                if name not in _warned:
                    _warned.add(name)
                    log.warning("tfpar: the Keras fix %r (%s) was verified for Keras %s; this "
                                "is Keras %s, so it is not applied.", name, patch.upstream,
                                patch.verified_range, keras.__version__)
                continue
            patch.check()  # a mechanism: CompatError if Keras no longer has what it replaces
            if name not in _warned:
                _warned.add(name)
                log.warning("tfpar: %r, part of how tfpar's strategies work, was verified for "
                            "Keras %s; this is Keras %s, and the internals it replaces are "
                            "still there, so it is applied.", name, patch.verified_range,
                            keras.__version__)
        patch.install()
        _installed.add(name)


def remove_keras_fixes(*names: str) -> None:
    """Restores upstream Keras for the named patches (default: all).

    For tests that show a patch is needed: the same run fails without it.
    """
    for name in names or tuple(PATCHES):
        if name not in PATCHES:
            raise ValueError(f"unknown fix {name!r}; known: {sorted(PATCHES)}")
        if name in _installed:
            PATCHES[name].uninstall()
            _installed.discard(name)


__all__ = ["CompatError", "PATCHES", "Patch", "apply_keras_fixes", "configure_coordination_service",
           "configure_dtensor", "dtensor_accelerator_system_initialized", "keras_needs_fixes",
           "place_variable", "remove_keras_fixes", "tensorflow_initialized",
           "unique_collective_key_base", "wait_for_every_process"]
