"""The interface every tfpar strategy implements, and the one home of "who writes".

tfpar has three kinds of strategy: `tf.distribute` strategies (`OneDevice`,
`DataParallel`, `MultiWorker`), a DTensor one (`TensorParallel`) and a
staged runner (`Pipeline`). Callbacks, saving and `tfpar train` ask them
the same questions through `Strategy`, never `tf.distribute` directly:

    strategy.dims                  # tfpar.ParallelDims: the degrees it runs
    strategy.scope()               # build and compile the model inside
    strategy.num_replicas_in_sync  # a global batch must divide by it
    strategy.num_workers, strategy.worker_index, strategy.is_chief
    strategy.should_write()        # may this process write shared files?
    strategy.local_batch_rows(b)   # rows of each global batch this process feeds
    strategy.any_worker(flag)      # True everywhere if flag is set on any process
    strategy.describe()            # JSON-ready; includes dims
    strategy.memory_report(model)  # bytes per device

`should_write(model_or_strategy)` below is the single place that decides
whether a process writes a checkpoint, a saved model or a job's outputs:
the chief of a multi-worker job, client 0 of a multi-client DTensor mesh,
the only process otherwise.

Example::

    strategy = tfpar.DataParallel()
    isinstance(strategy, tfpar.strategies.Strategy)   # True
    tfpar.strategies.should_write(model)              # True on the chief only
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from tfpar.parallel_dims import ParallelDims


@runtime_checkable
class Strategy(Protocol):
    """What callbacks, saving and the train job may ask of any tfpar strategy."""

    kind: str

    @property
    def dims(self) -> ParallelDims: ...

    def scope(self): ...

    @property
    def num_replicas_in_sync(self) -> int: ...

    @property
    def num_workers(self) -> int: ...

    @property
    def worker_index(self) -> int: ...

    @property
    def is_chief(self) -> bool: ...

    def should_write(self) -> bool: ...

    def local_batch_rows(self, global_batch_size: int) -> tuple[int, int]: ...

    def any_worker(self, flag: bool) -> bool: ...

    def gather_weights(self, model) -> None: ...

    def describe(self) -> dict: ...

    def memory_report(self, model) -> dict: ...


class StrategyBase:
    """Shared answers of the interface; a strategy overrides what differs.

    Subclasses set `kind` and provide `dims`, `num_replicas_in_sync`, `scope`
    and `_devices()` (this process's devices, for `describe`).
    """

    kind: str = ""

    @property
    def num_workers(self) -> int:
        return 1

    @property
    def worker_index(self) -> int:
        return 0

    @property
    def is_chief(self) -> bool:
        return self.worker_index == 0

    def should_write(self) -> bool:
        """Whether this process writes shared files: the chief only.

        Every process still runs the same saving code (gathering sharded
        weights is a collective); the others write to a scratch directory
        (`Model.save`, see `tfpar.compat.chief_only_writes`) or only take
        the in-memory snapshot (`tfpar.callbacks.BackupAndRestore`).
        """
        return self.is_chief

    def local_batch_rows(self, global_batch_size: int) -> tuple[int, int]:
        """[start, stop) rows of each global batch that this process's input feeds.

        The whole batch by default: a `tf.distribute` strategy splits it
        between replicas and workers itself (tf.data auto-sharding).
        """
        return 0, global_batch_size

    def any_worker(self, flag: bool) -> bool:
        """Whether `flag` is set on any process of the job (all must call it).

        One process: the flag itself. Multi-process strategies override it
        with a collective, so every process gets the same answer at the same
        step (the preemption agreement of `PreemptionCheckpoint`).
        """
        return bool(flag)

    def gather_weights(self, model) -> None:
        """Makes this process's copy of `model` whole before it is saved.

        Nothing to do where every process holds the whole model (replicas) or
        reads it whole (a DTensor mesh gathers on read). A pipeline whose
        stages run in their own processes sends every stage's weights to the
        writer (`Pipeline.gather_weights`). A collective: every process calls
        it, through `gather_weights(model)` below.
        """

    def _devices(self) -> list[str]:
        """This process's devices (each strategy names its own)."""
        return []

    def describe(self) -> dict:
        return {"strategy": self.kind, "class": type(self).__name__,
                "dims": self.dims.describe(),
                "replicas": self.num_replicas_in_sync, "workers": self.num_workers,
                "worker_index": self.worker_index, "devices": list(self._devices())}

    def memory_report(self, model) -> dict:
        """Bytes per device of parameters, gradients and optimizer state.

        Counted from the real variables: a DTensor variable by its local
        component (what one device holds), any other by its whole shape
        (data-parallel replicas and pipeline stages hold whole variables;
        a pipeline's report is per stage device, see `Pipeline.memory_report`).
        Gradients are one per trainable parameter, laid out like it.
        """
        optimizer = getattr(model, "optimizer", None)
        return {
            "parameter_bytes_per_device": variable_bytes_per_device(model.weights),
            "gradient_bytes_per_device": variable_bytes_per_device(model.trainable_weights),
            "optimizer_bytes_per_device": (variable_bytes_per_device(optimizer.variables)
                                           if optimizer is not None else 0),
            "parameter_bytes_total": sum(_full_bytes(v) for v in model.weights),
        }


def ring_all_reduce_bytes(payload: float, devices: int) -> float:
    """Bytes each device sends to all-reduce `payload` bytes over `devices` in a
    ring: 2(n-1)/n of it (reduce-scatter, then all-gather). `tfpar plan`
    prices data-parallel gradients with this too."""
    return 0.0 if devices <= 1 else 2 * (devices - 1) / devices * payload


def _full_bytes(variable) -> int:
    return int(np.prod(variable.shape)) * np.dtype(_dtype_name(variable)).itemsize


def _dtype_name(variable) -> str:
    dtype = variable.dtype
    return dtype if isinstance(dtype, str) else dtype.name


def variable_bytes_per_device(variables) -> int:
    """Bytes one device holds of `variables` (a sharded DTensor variable: its component)."""
    total = 0
    for v in variables:
        value = getattr(v, "_value", v)
        shape = v.shape
        if _is_dvariable(value):
            from tensorflow.experimental import dtensor

            shape = dtensor.unpack(value.read_value())[0].shape
        total += int(np.prod(shape)) * np.dtype(_dtype_name(v)).itemsize
    return total


def _is_dvariable(value) -> bool:
    import sys

    if "tensorflow" not in sys.modules:
        return False
    from tensorflow.experimental import dtensor

    return isinstance(value, dtensor.DVariable)


# ------------------------------------------------------------ who writes
def strategy_for(model_or_strategy=None):
    """The strategy a model trains under (or the strategy itself, or the current one).

    A model built in a `TensorParallel` or `Pipeline` scope answers with that
    strategy (its weights carry it); any other with its `distribute_strategy`.
    """
    import tensorflow as tf

    from tfpar.strategies import registry

    if model_or_strategy is None:
        return registry.current() or tf.distribute.get_strategy()
    if hasattr(model_or_strategy, "weights") and hasattr(model_or_strategy, "distribute_strategy"):
        return registry.strategy_of(model_or_strategy) or model_or_strategy.distribute_strategy
    return model_or_strategy


def gather_weights(model) -> None:
    """Before a save: the strategy's `gather_weights` (every process calls it;
    `Model.save`, `save_weights` and tfpar's checkpoint callbacks do)."""
    strategy = strategy_for(model)
    if isinstance(strategy, StrategyBase):
        strategy.gather_weights(model)


def should_write(model_or_strategy=None) -> bool:
    """Whether this process writes shared files (checkpoints, saved models, outputs).

    The one place tfpar decides it: a tfpar strategy answers itself
    (`Strategy.should_write`); a plain `tf.distribute` strategy by its
    `should_checkpoint`.
    """
    strategy = strategy_for(model_or_strategy)
    if isinstance(strategy, StrategyBase):
        return strategy.should_write()
    return bool(strategy.extended.should_checkpoint)
