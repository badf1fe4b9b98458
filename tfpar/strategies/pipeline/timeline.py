"""Timelines: when each (stage, micro-batch, forward/backward) span really ran.

With recording on, the runner threads every action's input and output
through a marker op that notes the wall-clock time when the executor reaches
it, so a span starts when the action's inputs are ready (and its stage is
free) and ends when its outputs exist. The markers are stateless
`tf.numpy_function`s on the data path: stateful ops (`tf.timestamp`,
`tf.py_function`) get automatic control dependencies in program order
inside `tf.function` and would serialize the pipeline they measure.

From the spans: the step time, the bubble fraction (idle share of the
stages' time, theory (K-1)/(M+K-1) for equal stages), and the peak number
of micro-batches whose activations a stage holds (forward started, backward
not finished). `chrome_trace()` writes them for Perfetto or chrome://tracing.

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
    stage: int
    microbatch: int
    kind: str  # "F" or "B"
    start: float  # seconds (time.perf_counter)
    end: float


class Timeline:
    """Spans of every action of every recorded step."""

    def __init__(self):
        self._lock = threading.Lock()
        self._open: dict[tuple, float] = {}
        self._lane_end: dict[tuple, float] = {}
        self.spans: list[Span] = []
        self.step = -1
        self.devices: dict[tuple[int, int], str] = {}

    def clear(self):
        with self._lock:
            self._open.clear()
            self._lane_end.clear()
            self.spans.clear()
            self.step = -1

    def next_step(self) -> int:
        self.step += 1
        return self.step

    # ------------------------------------------------------------ recording
    def _note(self, key, begin: bool):
        now = time.perf_counter()
        step_key = (self.step, *key)
        with self._lock:
            if begin:
                self._open[step_key] = now
            else:
                # An action with no input to mark (the last stage's backward)
                # starts when its stage's previous action ended: the runner
                # orders each stage's actions, and its input existed by then.
                lane = (self.step, key[0], key[1])
                start = self._open.pop(step_key, self._lane_end.get(lane, now))
                self._lane_end[lane] = now
                self.spans.append(Span(self.step, *key, start, now))

    def mark(self, tensors, key: tuple, begin: bool):
        """Passes `tensors` (a structure) through a marker that records the time.

        `key` = (replica, stage, microbatch, kind). Returns the same values.
        """
        flat = [t for t in tf.nest.flatten(tensors)]
        present = [tf.convert_to_tensor(t) for t in flat if t is not None]
        if not present:
            return tensors

        def record(*arrays):
            self._note(key, begin)
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
        """{(replica, stage): most micro-batches with forward started, backward unfinished}."""
        events = {}
        for s in self.of_step(step):
            lane = events.setdefault((s.replica, s.stage), [])
            if s.kind == "F":
                lane.append((s.start, 1))
            else:
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
        """{(replica, stage): actions in the order they started, e.g. ["F0", "F1", "B0"]}."""
        lanes: dict[tuple[int, int], list] = {}
        for s in sorted(self.of_step(step), key=lambda s: s.start):
            lanes.setdefault((s.replica, s.stage), []).append(f"{s.kind}{s.microbatch}")
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
        for s in spans:
            events.append({
                "name": f"{'forward' if s.kind == 'F' else 'backward'} {s.microbatch}",
                "cat": s.kind, "ph": "X", "pid": s.replica, "tid": s.stage,
                "ts": (s.start - origin) * 1e6, "dur": (s.end - s.start) * 1e6,
                "args": {"step": s.step, "microbatch": s.microbatch}})
        return {"traceEvents": events, "displayTimeUnit": "ms"}

    def save_chrome_trace(self, path: str, steps=None) -> str:
        with open(path, "w") as f:
            json.dump(self.chrome_trace(steps), f)
        return path


@keras.saving.register_keras_serializable(package="tfpar")
class FixedCost(keras.layers.Layer):
    """An identity layer whose forward and backward each take a fixed time.

    For checking schedules: a stack of these behaves like stages of known
    cost, so a measured step can be compared with `Schedule.simulate`. The
    sleep is a stateless `tf.numpy_function` on the data path (a stateful op
    would be ordered after every other stateful op of the step).
    """

    def __init__(self, forward_seconds=0.01, backward_seconds=0.02, **kwargs):
        super().__init__(**kwargs)
        self.forward_seconds, self.backward_seconds = forward_seconds, backward_seconds

    def build(self, input_shape):
        # One weight, so the layer has a gradient and a place.
        self.scale = self.add_weight(shape=(), initializer="ones", name="scale")

    def call(self, x):
        forward, backward = self.forward_seconds, self.backward_seconds

        def sleep(seconds):
            def run(a):
                time.sleep(seconds)
                return a
            return run

        @tf.custom_gradient
        def timed(v):
            out = tf.numpy_function(sleep(forward), [v], v.dtype, stateful=False)
            out.set_shape(v.shape)

            def grad(dy):
                g = tf.numpy_function(sleep(backward), [dy], dy.dtype, stateful=False)
                g.set_shape(dy.shape)
                return g
            return out, grad

        # The scale enters before the timed op, so that the weight's gradient
        # also waits for the backward's work.
        return timed(x * self.scale)

    def get_config(self):
        return {**super().get_config(), "forward_seconds": self.forward_seconds,
                "backward_seconds": self.backward_seconds}
