"""Every Keras and TensorFlow workaround tfpar needs, in one place.

Each fix names the upstream issue it works around and the versions it was
verified on. `apply_keras_fixes()` installs them once; tfpar's strategies call
it, so user code never has to. `remove_keras_fixes(name)` restores
upstream behaviour (the tests use it to show that each fix is needed).

Private TensorFlow APIs that tfpar relies on are called only from here, so a
TensorFlow upgrade has one file to check.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile

import keras
import tensorflow as tf

log = logging.getLogger("tfpar")

# The Keras releases whose TF trainer has the multi-worker bugs fixed below.
# Verified on 3.15.1; setup.cfg pins keras below 3.16 so that a new release is
# checked before it is used.
KERAS_FIXED_RANGE = ((3, 0), (3, 16))


def _keras_version() -> tuple[int, int]:
    major, minor = keras.__version__.split(".")[:2]
    return int(major), int(minor)


def keras_needs_fixes() -> bool:
    low, high = KERAS_FIXED_RANGE
    return low <= _keras_version() < high


def _trainer_module():
    from keras.src.backend.tensorflow import trainer  # private, pinned

    return trainer


def _first_local_value(value):
    if isinstance(value, tf.distribute.DistributedValues):
        return value.values[0]
    return value


# ---------------------------------------------------------------------------
# Fix 1: symbolic build under MultiWorkerMirroredStrategy.
# keras-team/keras#20585, tensorflow/tensorflow#72388, ray-project/ray#47464.
# `TensorFlowTrainer._maybe_symbolic_build` takes one batch to build the model
# and calls `strategy.reduce("MEAN", (x, y), axis=None)` on it. Under
# MultiWorkerMirroredStrategy that is a cross-worker collective on a tuple of
# PerReplica values and raises "Attempt to convert a value (PerReplica:...) to
# a Tensor". The batch is needed only for its shapes and dtypes, so a local
# replica's value serves, with no communication at all.
# ---------------------------------------------------------------------------
def _maybe_symbolic_build(self, iterator=None, data_batch=None):
    if self._distribute_strategy is None:
        return
    if iterator is not None:
        for _, _, it in iterator:
            data_batch = tf.nest.map_structure(_first_local_value, next(it))
            break
    with self.distribute_strategy.scope():
        self._symbolic_build(data_batch=data_batch)


# ---------------------------------------------------------------------------
# Fix 2: scalar metric reduction under MultiWorkerMirroredStrategy.
# Same upstream issues. `reduce_per_replica(..., "mean")` calls
# `strategy.reduce("MEAN", v, axis=0)`; the step's logs are scalars, and
# reducing a scalar along axis 0 raises "Invalid reduction dimension 0 for
# input with 0 dimensions". For scalars the right reduction is the
# element-wise mean across replicas: axis=None.
# ---------------------------------------------------------------------------
def _make_reduce_per_replica(upstream):
    @functools.wraps(upstream)
    def reduce_per_replica(values, strategy, reduction):
        trainer = _trainer_module()
        if reduction in ("auto", "mean") and trainer._collective_all_reduce_multi_worker(
            strategy
        ):

            def reduce_one(v):
                rank = _first_local_value(v).shape.rank
                if rank == 0:
                    return strategy.reduce("MEAN", v, axis=None)
                return upstream(v, strategy, reduction)

            return tf.nest.map_structure(reduce_one, values)
        return upstream(values, strategy, reduction)

    reduce_per_replica._tfpar_upstream = upstream
    return reduce_per_replica


# ---------------------------------------------------------------------------
# Fix 3: chief-only writes under MultiWorkerMirroredStrategy.
# Keras 3 removed Keras 2's chief/worker file logic: every worker writing one
# `.weights.h5` fails on the HDF5 file lock, and `.keras` archives race. The
# weights are identical on every worker (the optimizer applies all-reduced
# gradients), so only the chief needs to write; the others write to a private
# temporary directory that is removed at once (Keras 2's rule: every worker
# still runs the same code path, so a save that would fail, fails everywhere).
# Saving runs no collective, so the chief never waits for the others.
# ---------------------------------------------------------------------------
def should_write(strategy=None) -> bool:
    """Whether this process is the one that writes shared files."""
    strategy = strategy or tf.distribute.get_strategy()
    return bool(strategy.extended.should_checkpoint)


def _chief_only_writer(upstream):
    @functools.wraps(upstream)
    def write(self, filepath, *args, **kwargs):
        if should_write(self.distribute_strategy):
            return upstream(self, filepath, *args, **kwargs)
        scratch = tempfile.mkdtemp(prefix="tfpar-worker-")
        try:
            return upstream(
                self, os.path.join(scratch, os.path.basename(str(filepath))),
                *args, **kwargs,
            )
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    write._tfpar_upstream = upstream
    return write


# ---------------------------------------------------------------------------
# Fix 4: directory creation races between workers.
# Keras callbacks (ModelCheckpoint, BackupAndRestore) and saving_lib create
# directories with "if not exists(d): os.makedirs(d)"; two workers sharing a
# checkpoint directory both see it missing and one fails with FileExistsError.
# Creating a directory that a peer just created is success.
# ---------------------------------------------------------------------------
def _make_makedirs(upstream):
    @functools.wraps(upstream)
    def makedirs(path):
        try:
            return upstream(path)
        except FileExistsError:
            if not os.path.isdir(path):
                raise

    makedirs._tfpar_upstream = upstream
    return makedirs


def _install_makedirs_race(install: bool) -> None:
    from keras.src.utils import file_utils  # private, pinned

    file_utils.makedirs = (_make_makedirs(file_utils.makedirs) if install
                           else file_utils.makedirs._tfpar_upstream)


# ---------------------------------------------------------------------------
# Fix 5: DTensor variables behind Keras variables (TensorParallel).
# Keras 3's TensorFlow backend has no DTensor support (keras-team/keras#18473;
# keras/src/backend/tensorflow/distribution_lib.py is a prototype). Inside a
# TensorParallel scope, the TF backend Variable is created as a DVariable with
# the layout tfpar resolves from the variable's Keras path. Reading a sharded
# DVariable to NumPy (get_weights, save_weights, model.save) fails with
# "Trying to copy a non-single-device and non-replicated DTensor": it is
# gathered to a replicated layout first; assigning host values (set_weights,
# load_weights) lays them out on the variable's mesh first.
# Models whose weights live on a mesh get DTensor step functions.
# The same two hooks serve every strategy of tfpar.strategies.registry (the
# pipeline runner too): variables created in its scope are initialized by it,
# and models whose weights it owns get its step functions.
# ---------------------------------------------------------------------------
def _dtensor_variable_methods(cls):
    from tensorflow.experimental import dtensor

    def is_dvariable(variable):
        return isinstance(getattr(variable, "_value", None), dtensor.DVariable)

    upstream = {name: getattr(cls, name) for name in
                ("_initialize", "numpy", "__array__", "_direct_assign")}

    def _initialize(self, value):
        from tfpar.strategies import registry

        strategy = registry.current()
        if strategy is None:
            return upstream["_initialize"](self, value)
        strategy.initialize_variable(self, value, upstream["_initialize"])

    def numpy(self):
        if not is_dvariable(self):
            return upstream["numpy"](self)
        from tfpar.strategies import tensor_parallel

        layout = dtensor.fetch_layout(self._value)
        value = self._value.read_value()
        if not layout.is_fully_replicated():
            value = dtensor.relayout(value, dtensor.Layout.replicated(layout.mesh, layout.rank))
        return dtensor.unpack(value)[0].numpy()

    def __array__(self, dtype=None, *args, **kwargs):
        if not is_dvariable(self):
            return upstream["__array__"](self, dtype, *args, **kwargs)
        value = self.numpy()
        return value.astype(dtype) if dtype is not None else value

    def _direct_assign(self, value):
        if is_dvariable(self) and tf.executing_eagerly() and not dtensor.is_dtensor(value):
            from tfpar.strategies.tensor_parallel import to_layout

            value = to_layout(tf.cast(value, self._value.dtype), dtensor.fetch_layout(self._value))
        return upstream["_direct_assign"](self, value)

    return upstream, {"_initialize": _initialize, "numpy": numpy, "__array__": __array__,
                      "_direct_assign": _direct_assign}


def _install_dtensor_variables(install: bool) -> None:
    from keras.src.backend.tensorflow.core import Variable  # private, pinned

    if install:
        upstream, patched = _dtensor_variable_methods(Variable)
        Variable._tfpar_upstream = upstream
        for name, method in patched.items():
            setattr(Variable, name, method)
        trainer = _trainer_module().TensorFlowTrainer
        for name in _STEP_FACTORIES:
            setattr(trainer, name, _dtensor_step_factory(getattr(trainer, name), name))
    else:
        for name, method in Variable._tfpar_upstream.items():
            setattr(Variable, name, method)
        trainer = _trainer_module().TensorFlowTrainer
        for name in _STEP_FACTORIES:
            setattr(trainer, name, getattr(trainer, name)._tfpar_upstream)


# Keras's step-function factories and the trainer attribute each one sets.
_STEP_FACTORIES = {"make_train_function": "train_function",
                   "make_test_function": "test_function",
                   "make_predict_function": "predict_function"}
_STEP_KINDS = {"make_train_function": "train", "make_test_function": "test",
               "make_predict_function": "predict"}


def _dtensor_step_factory(upstream, name):
    attribute = _STEP_FACTORIES[name]

    @functools.wraps(upstream)
    def make(self, force=False):
        from tfpar.strategies import registry

        strategy = registry.strategy_of(self)
        if strategy is None:
            return upstream(self, force)
        if getattr(self, attribute) is None or force:
            setattr(self, attribute, strategy.step_function(self, _STEP_KINDS[name]))
        return getattr(self, attribute)

    make._tfpar_upstream = upstream
    return make


def dtensor_accelerator_system_initialized() -> bool:
    """Whether dtensor.initialize_accelerator_system ran (no public API in TF 2.21)."""
    from tensorflow.dtensor.python import accelerator_util  # private

    return accelerator_util.is_initialized()


def configure_dtensor() -> None:
    """Turns off DTensor's all-reduce-combining optimization.

    With it on (TensorFlow 2.21 default), a variable read that follows a write
    in the same function can return the old value on multi-device meshes, so
    Adam and momentum updates are silently lost (weights off by 6e-2 after 5
    steps on 2x2 and 4x1 meshes). TensorFlow reads the variable when it
    compiles DTensor functions; tests/test_tensor_parallel.py keeps a
    multi-step stateful-optimizer check that fails if it comes back.
    """
    key = "DTENSOR_ENABLE_COMBINE_ALL_REDUCES_OPTIMIZATION"
    if os.environ.get(key, "0") != "0":
        log.warning("tfpar: %s=%s is known to lose optimizer updates; setting it to 0.",
                    key, os.environ[key])
    os.environ[key] = "0"


# ---------------------------------------------------------------------------
# Fix 6: gradient clipping and accumulation under tf.distribute strategies.
# Keras 3's optimizer clips (`clipnorm`, `global_clipnorm`, `clipvalue`) and
# accumulates (`gradient_accumulation_steps`) *before* the TF backend's
# `_backend_update_step` all-reduces the gradients, so:
#   - each replica clips its own partial gradient by its own norm: data-parallel
#     training silently differs from one device (AdamW, global_clipnorm=0.05,
#     4 replicas: 2.2e-2 off after 24 steps). Clipping must follow the
#     all-reduce (tensorflow/tensorflow#33929, where tf.keras 2 refused to clip
#     under a strategy for this reason);
#   - accumulation puts the update in an `ops.cond` whose branches call
#     `merge_call`, which fails at once in every strategy that uses merge calls
#     (all of them except XLA on GPUs): "`merge_call` called while defining a
#     new graph or a tf.function" (keras-team/keras#17429).
# The fix changes the order, not the arithmetic: in replica context the raw
# gradients are all-reduced first (Keras already scales each replica's loss
# by 1/replicas, so the sum is the global batch's gradient), then one
# `merge_call` runs Keras's own clipping, accumulation, weight decay and
# update in cross-replica context on the reduced gradient, where a cond may
# hold variable updates. There `maybe_merge_call` (which Keras calls for each
# update) must call its function directly: `merge_call` only exists in
# replica context. Verified on Keras 3.15.1, TensorFlow 2.21.
# ---------------------------------------------------------------------------
def _reduce_before_apply(upstream):
    @functools.wraps(upstream)
    def _backend_apply_gradients(self, grads, trainable_variables):
        if not tf.distribute.has_strategy() or tf.distribute.in_cross_replica_context():
            return upstream(self, grads, trainable_variables)
        reduced = self._all_reduce_sum_gradients(
            list(zip(grads, [_tf_variable(v) for v in trainable_variables])))

        def apply_reduced(strategy, grads):
            # After the all-reduce every replica holds the same values; the
            # first local one stands for all (updates copy it to each device).
            grads = [None if g is None else strategy.experimental_local_results(g)[0]
                     for g in grads]
            return upstream(self, grads, trainable_variables)

        tf.distribute.get_replica_context().merge_call(
            apply_reduced, args=([g for g, _ in reduced],))

    _backend_apply_gradients._tfpar_upstream = upstream
    return _backend_apply_gradients


def _tf_variable(variable):
    return variable.value if isinstance(variable, keras.Variable) else variable


def _make_maybe_merge_call(upstream):
    @functools.wraps(upstream)
    def maybe_merge_call(fn, strategy, *args, **kwargs):
        if tf.distribute.in_cross_replica_context():
            return fn(strategy, *args, **kwargs)
        return upstream(fn, strategy, *args, **kwargs)

    maybe_merge_call._tfpar_upstream = upstream
    return maybe_merge_call


def _install_reduce_before_apply(install: bool) -> None:
    from keras.src.backend.tensorflow.optimizer import TFOptimizer  # private, pinned

    interim = tf.__internal__.distribute.interim
    if install:
        TFOptimizer._backend_apply_gradients = _reduce_before_apply(
            TFOptimizer._backend_apply_gradients)
        interim.maybe_merge_call = _make_maybe_merge_call(interim.maybe_merge_call)
    else:
        TFOptimizer._backend_apply_gradients = \
            TFOptimizer._backend_apply_gradients._tfpar_upstream
        interim.maybe_merge_call = interim.maybe_merge_call._tfpar_upstream


def _install_symbolic_build(install: bool) -> None:
    cls = _trainer_module().TensorFlowTrainer
    if install:
        cls._tfpar_upstream_symbolic_build = cls._maybe_symbolic_build
        cls._maybe_symbolic_build = _maybe_symbolic_build
    else:
        cls._maybe_symbolic_build = cls._tfpar_upstream_symbolic_build


def _install_reduce_scalar_metrics(install: bool) -> None:
    trainer = _trainer_module()
    if install:
        trainer.reduce_per_replica = _make_reduce_per_replica(trainer.reduce_per_replica)
    else:
        trainer.reduce_per_replica = trainer.reduce_per_replica._tfpar_upstream


def _install_chief_only_writes(install: bool) -> None:
    for name in ("save", "save_weights"):
        method = getattr(keras.Model, name)
        setattr(keras.Model, name,
                _chief_only_writer(method) if install else method._tfpar_upstream)


# name -> installer; the names are what tests pass to remove_keras_fixes().
KERAS_FIXES = {
    "symbolic_build": _install_symbolic_build,
    "reduce_scalar_metrics": _install_reduce_scalar_metrics,
    "chief_only_writes": _install_chief_only_writes,
    "makedirs_race": _install_makedirs_race,
    "dtensor_variables": _install_dtensor_variables,
    "reduce_before_apply": _install_reduce_before_apply,
}
_installed: set[str] = set()


def apply_keras_fixes() -> None:
    """Installs every fix above (idempotent). tfpar's strategies call it."""
    if not keras_needs_fixes():
        if not _installed:
            log.warning(
                "tfpar's Keras multi-worker fixes were verified for Keras %s <= v "
                "< %s; this is Keras %s, so they are not applied.",
                *(".".join(map(str, v)) for v in KERAS_FIXED_RANGE),
                keras.__version__,
            )
        return
    for name, install in KERAS_FIXES.items():
        if name not in _installed:
            install(True)
            _installed.add(name)


def remove_keras_fixes(*names: str) -> None:
    """Restores upstream Keras for the named fixes (default: all).

    For tests that show a fix is needed: the same run fails without it.
    """
    for name in names or tuple(KERAS_FIXES):
        if name not in KERAS_FIXES:
            raise ValueError(f"unknown fix {name!r}; known: {sorted(KERAS_FIXES)}")
        if name in _installed:
            KERAS_FIXES[name](False)
            _installed.discard(name)


# ---------------------------------------------------------------------------
# TensorFlow's coordination service: failure detection for multi-worker jobs.
# MultiWorkerMirroredStrategy configures the service itself, with no
# heartbeat setting and no registration barrier, unless one is configured
# before it is created. Without the barrier, a worker that never starts leaves
# the others hanging inside the strategy constructor for minutes; with it they
# fail after `register_timeout_s` ("Barrier timed out ...
# Wait_for_all_tasks_to_register"). `cluster_register_with_barrier` is not a
# parameter of the (private) configure call, so it is set on the config proto.
# Verified on TensorFlow 2.21.
# ---------------------------------------------------------------------------
def configure_coordination_service(
    cluster, *, heartbeat_timeout_s: float, register_timeout_s: float,
    shutdown_timeout_s: float = 30.0,
) -> None:
    from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
    from tensorflow.python.eager import context

    jobs = [
        coordination_config_pb2.CoordinatedJob(name=role, num_tasks=len(cluster.jobs[role]))
        for role in ("chief", "worker")
        if role in cluster.jobs
    ]
    ctx = context.context()
    ctx.configure_coordination_service(
        service_type="standalone",
        service_leader=cluster.coordination_leader,
        heartbeat_timeout_in_ms=int(heartbeat_timeout_s * 1000),
        cluster_register_timeout_in_ms=int(register_timeout_s * 1000),
        shutdown_barrier_timeout_in_ms=int(shutdown_timeout_s * 1000),
        coordinated_jobs=jobs,
    )
    ctx._coordination_service_config.cluster_register_with_barrier = True


# ---------------------------------------------------------------------------
# Collective keys of MirroredStrategy (TensorFlow 2.21).
# Every MirroredStrategy numbers its collective groups from the same start
# (`_collective_key_base` is 0 for all), and TensorFlow caches a collective's
# parameters per (group, instance) key for the life of the process. A second
# strategy over the same devices that trains another model then collides
# with the first: "Shape mismatch in the collective instance 100 ... expected
# shape [2] but another member in the group expected shape [676]". Each
# tfpar.DataParallel gets a key range of its own.
# ---------------------------------------------------------------------------
_COLLECTIVE_KEY_STRIDE = 100_000
_collective_key_bases = iter(range(_COLLECTIVE_KEY_STRIDE, 2**30, _COLLECTIVE_KEY_STRIDE))


def unique_collective_key_base() -> int:
    """A collective group-key base no other strategy of this process uses."""
    return next(_collective_key_bases)


def tensorflow_initialized() -> bool:
    """Whether TensorFlow's runtime context (and so its devices) is fixed."""
    from tensorflow.python.eager import context

    return context.context()._context_handle is not None


# ---------------------------------------------------------------------------
# Moving a Keras variable to another device (tfpar.Pipeline).
# Keras 3 has no API to place an existing variable; its TensorFlow backend
# keeps the tf.Variable in `Variable._value` (keras/src/backend/tensorflow/
# core.py, verified on 3.15.1) and reads it only through that attribute, so a
# copy made under tf.device replaces it and every layer, optimizer slot made
# later (colocated with it) and checkpoint sees the moved one. Must run before
# any tf.function that uses the variable is traced.
# ---------------------------------------------------------------------------
def place_variable(variable, device: str) -> None:
    """Re-creates the tf.Variable behind a Keras variable on `device`, same value."""
    old = getattr(variable, "_value", None)
    if not isinstance(old, tf.Variable):
        raise TypeError(f"variable {getattr(variable, 'path', variable)!r} has no TensorFlow "
                        "variable to move (is it a DTensor or an uninitialized variable?).")
    with tf.init_scope(), tf.device(device):
        variable._value = tf.Variable(
            tf.identity(old.read_value()), dtype=old.dtype, trainable=old.trainable,
            name=variable.name, aggregation=old.aggregation, synchronization=old.synchronization)
