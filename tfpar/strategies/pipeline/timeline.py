"""Timelines: when each (device, stage, micro-batch, F/B/W) span really ran.

With recording on, the runner threads every action's output through a
marker op that notes the wall-clock time when the executor reaches it: a
span ends when the action's outputs exist, and starts when its device's
previous action and the actions it reads from had ended (only the step's
first action has a marker on its input). A marker costs about a
millisecond on a busy CPU; one per action instead of two halved the
timeline's own share of a measured 1F1B step (see BUILD_NOTES.md). The markers are stateless
`tf.numpy_function`s on the data path: stateful ops (`tf.timestamp`,
`tf.py_function`) get automatic control dependencies in program order
inside `tf.function` and would serialize the pipeline they measure.

From the spans: the step time, the bubble fraction (idle share of the
devices' time; for equal stages GPipe and 1F1B have (K-1)/(M+K-1)), and
the peak number of (stage, micro-batch) activations a device holds (forward
started, backward not finished; with a split backward, until its weight
gradient W ends). `chrome_trace()` writes them for Perfetto or chrome://tracing.

Example::

    strategy = tfpar.Pipeline(stages=2, microbatches=8, record_timeline=True)
    ...
    model.fit(x, y, batch_size=64, epochs=1)
    timeline = strategy.timeline
    print(timeline.bubble_fraction(step=-1), timeline.peak_stash(step=-1))
    timeline.save_chrome_trace("pipeline.json")
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time

import keras
import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class Span:
    step: int
    replica: int
    stage: int  # the device's position in the pipeline (a lane of the timeline)
    microbatch: int
    kind: str  # "F", "B" or "W"
    start: float  # seconds (time.perf_counter)
    end: float
    model_stage: int = -1  # which of the model's K*V stages ran (-1: the same as `stage`)

    @property
    def label(self) -> str:
        return f"{self.kind}{self.microbatch}@{self.stage if self.model_stage < 0 else self.model_stage}"


class Timeline:
    """Spans of every action of every recorded step."""

    def __init__(self):
        self._lock = threading.Lock()
        self._open: dict[tuple, float] = {}
        self._lane_end: dict[tuple, float] = {}
        self._end: dict[tuple, float] = {}
        self.spans: list[Span] = []
        self.step = -1
        self.devices: dict[tuple[int, int], str] = {}

    def clear(self):
        with self._lock:
            self._open.clear()
            self._lane_end.clear()
            self._end.clear()
            self.spans.clear()
            self.step = -1

    def next_step(self) -> int:
        self.step += 1
        return self.step

    # ------------------------------------------------------------ recording
    def _note(self, key, begin: bool, after=()):
        now = time.perf_counter()
        step_key = (self.step, *key)
        with self._lock:
            if begin:
                self._open[step_key] = now
            else:
                # An action starts when its device's previous action ended and
                # the actions whose outputs it reads (`after`) ended: the runner
                # orders each device's actions, and its inputs existed by then.
                lane = (self.step, key[0], key[1])
                ready = [self._lane_end.get(lane)] + [
                    self._end.get((self.step, *k)) for k in after]
                ready = [t for t in ready if t is not None]
                start = self._open.pop(step_key, max(ready, default=now))
                self._lane_end[lane] = now
                self._end[step_key] = now
                self.spans.append(Span(self.step, *key[:4], start, now, *key[4:]))

    def add(self, spans) -> None:
        """Records spans measured elsewhere (a pipeline whose stages run in
        their own processes times each action around its call)."""
        with self._lock:
            self.spans.extend(spans)

    def mark(self, tensors, key: tuple, begin: bool, after=()):
        """Passes `tensors` (a structure) through a marker that records the time.

        `key` = (replica, device, microbatch, kind[, model stage]). Returns the same
        values. An end marker without a begin marker dates the action's start from
        the end of its device's previous action and of the actions (keys) in `after`.
        """
        flat = [t for t in tf.nest.flatten(tensors)]
        present = [tf.convert_to_tensor(t) for t in flat if t is not None]
        if not present:
            return tensors

        def record(*arrays):
            self._note(key, begin, after)
            return arrays if len(arrays) > 1 else arrays[0]

        out = tf.numpy_function(record, present, [t.dtype for t in present], stateful=False,
                                name=f"{'begin' if begin else 'end'}_{key[3]}{key[2]}_s{key[1]}")
        out = out if isinstance(out, (list, tuple)) else [out]
        for o, t in zip(out, present):
            o.set_shape(t.shape)
        it = iter(out)
        return tf.nest.pack_sequence_as(tensors, [None if t is None else next(it) for t in flat])

    # ------------------------------------------------------------- analysis
    def steps(self) -> list[int]:
        return sorted({s.step for s in self.spans})

    def of_step(self, step: int = -1) -> list[Span]:
        steps = self.steps()
        if not steps:
            raise ValueError("the timeline has no spans: create the Pipeline with "
                             "record_timeline=True and run a step first.")
        step = steps[step] if step < 0 else step
        return [s for s in self.spans if s.step == step]

    def step_time(self, step: int = -1) -> float:
        spans = self.of_step(step)
        return max(s.end for s in spans) - min(s.start for s in spans)

    def bubble_fraction(self, step: int = -1) -> float:
        """1 - (busy time of all stages) / (stages x step time)."""
        spans = self.of_step(step)
        lanes = {(s.replica, s.stage) for s in spans}
        busy = sum(s.end - s.start for s in spans)
        return 1.0 - busy / (len(lanes) * self.step_time(step))

    def peak_stash(self, step: int = -1) -> dict[tuple[int, int], int]:
        """{(replica, device): most activations held (forward started, backward unfinished)}.

        With a split backward an activation is held until its W ends."""
        spans = self.of_step(step)
        release = "W" if any(s.kind == "W" for s in spans) else "B"
        events = {}
        for s in spans:
            lane = events.setdefault((s.replica, s.stage), [])
            if s.kind == "F":
                lane.append((s.start, 1))
            elif s.kind == release:
                lane.append((s.end, -1))
        peaks = {}
        for lane, changes in events.items():
            live = peak = 0
            # At equal times a release is counted before a new stash.
            for _, change in sorted(changes):
                live += change
                peak = max(peak, live)
            peaks[lane] = peak
        return peaks

    def order(self, step: int = -1) -> dict[tuple[int, int], list[str]]:
        """{(replica, device): actions in the order they started, e.g. ["F0@0", "F1@0", "B0@0"]}
        (kind, micro-batch @ model stage, as `str(schedules.Action)`)."""
        lanes: dict[tuple[int, int], list] = {}
        for s in sorted(self.of_step(step), key=lambda s: s.start):
            lanes.setdefault((s.replica, s.stage), []).append(s.label)
        return lanes

    # --------------------------------------------------------------- export
    def chrome_trace(self, steps=None) -> dict:
        """The spans as Chrome trace JSON (a process per replica, a thread per stage)."""
        spans = [s for s in self.spans if steps is None or s.step in steps]
        if not spans:
            return {"traceEvents": [], "displayTimeUnit": "ms"}
        origin = min(s.start for s in spans)
        events = []
        for replica, stage in sorted({(s.replica, s.stage) for s in spans}):
            device = self.devices.get((replica, stage), "")
            events.append({"ph": "M", "name": "process_name", "pid": replica, "tid": stage,
                           "args": {"name": f"replica {replica}"}})
            events.append({"ph": "M", "name": "thread_name", "pid": replica, "tid": stage,
                           "args": {"name": f"stage {stage} {device}".strip()}})
        names = {"F": "forward", "B": "backward", "W": "weight gradient"}
        for s in spans:
            events.append({
                "name": f"{names[s.kind]} {s.microbatch}"
                        + (f" stage {s.model_stage}" if s.model_stage >= 0 else ""),
                "cat": s.kind, "ph": "X", "pid": s.replica, "tid": s.stage,
                "ts": (s.start - origin) * 1e6, "dur": (s.end - s.start) * 1e6,
                "args": {"step": s.step, "microbatch": s.microbatch}})
        return {"traceEvents": events, "displayTimeUnit": "ms"}

    def save_chrome_trace(self, path: str, steps=None) -> str:
        with open(path, "w") as f:
            json.dump(self.chrome_trace(steps), f)
        return path


# How early a FixedCost sleep wakes before its deadline, to spin the rest:
# a plain 20 ms sleep on a busy 2-core host overshoots by 0.2 ms (measured),
# which would count the stand-in's imprecision as the pipeline's overhead.
_SPIN_SECONDS = 0.0005


def _sleep_until(deadline: float):
    """Sleeps until `deadline` (time.perf_counter): most of it in time.sleep,
    the last half millisecond yielding (time.sleep(0) releases the GIL)."""
    rest = deadline - time.perf_counter() - _SPIN_SECONDS
    if rest > 0:
        time.sleep(rest)
    while time.perf_counter() < deadline:
        time.sleep(0)


# One lock per device: a device runs one FixedCost sleep at a time, as a real
# accelerator runs one kernel stream, so the input- and weight-gradient
# sleeps of one full backward add up instead of overlapping on two threads.
_DEVICE_LOCKS: dict[str, threading.Lock] = {}
_DEVICE_LOCKS_GUARD = threading.Lock()


def _device_lock(device: str) -> threading.Lock:
    with _DEVICE_LOCKS_GUARD:
        return _DEVICE_LOCKS.setdefault(device, threading.Lock())


@keras.saving.register_keras_serializable(package="tfpar")
class FixedCost(keras.layers.Layer):
    """An identity layer whose forward, input gradient and weight gradient take fixed times.

    For checking schedules: a stack of these behaves like stages of known
    cost, so a measured step can be compared with `Schedule.simulate`. The
    sleeps are stateless `tf.numpy_function`s on the data path (a stateful
    op would be ordered after every other stateful op of the step):

    - forward: `forward_seconds`;
    - input gradient (B): `backward_seconds`, on the path to the layer's input;
    - weight gradient (W): `weight_seconds`, on the path to its one weight.

    A full backward asks for both (B + W; sleeps on one device do not
    overlap); a split backward's B and W actions each find only theirs (the
    other's op has no consumer and is pruned). Example::

        keras.Sequential([keras.Input((4,))] + [FixedCost(0.02, 0.02, 0.02) for _ in range(4)])
    """

    def __init__(self, forward_seconds=0.01, backward_seconds=0.02, weight_seconds=0.0,
                 **kwargs):
        super().__init__(**kwargs)
        self.forward_seconds, self.backward_seconds = forward_seconds, backward_seconds
        self.weight_seconds = weight_seconds

    def build(self, input_shape):
        # One weight, so the layer has a gradient and a place.
        self.scale = self.add_weight(shape=(), initializer="ones", name="scale")

    def call(self, x):
        forward, backward, weight = self.forward_seconds, self.backward_seconds, \
            self.weight_seconds
        # The op's device, fixed when the step is traced under tf.device(stage).
        lock = _device_lock(tf.identity(x).device or "default")

        def sleep(seconds):
            def run(a):
                if seconds > 0:
                    with lock:
                        _sleep_until(time.perf_counter() + seconds)
                return a
            return run

        def timed(seconds, tensor):
            if seconds <= 0:
                # No Python call for a free action: each one costs the executor
                # a hand-off to a Python thread and back.
                return tensor
            out = tf.numpy_function(sleep(seconds), [tensor], tensor.dtype, stateful=False)
            out.set_shape(tensor.shape)
            return out

        @tf.custom_gradient
        def scaled(v, s):
            out = timed(forward, v * s)

            def grad(dy):
                dx = timed(backward, dy * s)
                ds = timed(weight, tf.reduce_sum(dy * v))
                return dx, ds
            return out, grad

        return scaled(x, tf.convert_to_tensor(self.scale))

    @classmethod
    def stages(cls, num_stages: int, forward_seconds, backward_seconds, weight_seconds=0.0,
               width: int = 4):
        """A model of `num_stages` FixedCost layers, and the split points that make each a stage.

        A weighted layer of no cost comes first, in stage 0: its weight
        gradient needs the first FixedCost's input gradient, so stage 0's
        backward does its B work as every other stage's does (a model's
        first layer has no input gradient to compute). Example::

            model, points = FixedCost.stages(4, 0.02, 0.02, 0.02)
            strategy = tfpar.Pipeline(split_points=points, microbatches=8, schedule="zb_h1")
        """
        model = keras.Sequential(
            [keras.Input((width,)), cls(0.0, 0.0, 0.0, name="cost_in")]
            + [cls(forward_seconds, backward_seconds, weight_seconds, name=f"cost_{i}")
               for i in range(num_stages)])
        return model, [f"cost_{i}" for i in range(1, num_stages)]

    def get_config(self):
        return {**super().get_config(), "forward_seconds": self.forward_seconds,
                "backward_seconds": self.backward_seconds,
                "weight_seconds": self.weight_seconds}
