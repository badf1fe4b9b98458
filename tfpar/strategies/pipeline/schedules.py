"""Schedules: the order in which each stage runs its forward and backward actions.

A schedule says, for every stage, the sequence of actions it runs in one
optimizer step: ``F(m)`` (forward of micro-batch m) and ``B(m)`` (its
backward). Everything else follows from that per-stage order and the data
dependencies (F(s, m) needs F(s-1, m); B(s, m) needs B(s+1, m) and F(s, m)):

- `creation_order` interleaves the stages' sequences into one order in which
  the runner can create the graph (a tensor must exist before it is used);
- `simulate` runs the schedule on given per-action costs, giving the ideal
  step time and bubble against which measured timelines are compared;
- `peak_stash` counts the activations each stage keeps for its backward.

Adding a schedule is one subclass that implements `stage_order`. Example
(K=3 stages, M=4 micro-batches)::

    GPipe().stage_order(0, 3, 4)   # F0 F1 F2 F3 B0 B1 B2 B3
    OneFOneB().stage_order(0, 3, 4)  # F0 F1 F2 B0 F3 B1 B2 B3
    OneFOneB().stage_order(2, 3, 4)  # F0 B0 F1 B1 F2 B2 F3 B3
"""

from __future__ import annotations

import dataclasses

FORWARD, BACKWARD = "F", "B"


@dataclasses.dataclass(frozen=True)
class Action:
    """One stage's forward or backward of one micro-batch."""

    kind: str  # FORWARD or BACKWARD
    stage: int
    microbatch: int

    def __str__(self):
        return f"{self.kind}{self.microbatch}@{self.stage}"


class Schedule:
    """The shared interface: a per-stage order of actions."""

    name = "schedule"

    def stage_order(self, stage: int, num_stages: int, num_microbatches: int) -> list[Action]:
        raise NotImplementedError

    def forward_only_order(self, stage: int, num_stages: int,
                           num_microbatches: int) -> list[Action]:
        """Evaluation and prediction: forwards in micro-batch order."""
        return [Action(FORWARD, stage, m) for m in range(num_microbatches)]

    # ---------------------------------------------------------- derived
    def orders(self, num_stages, num_microbatches, forward_only=False) -> list[list[Action]]:
        make = self.forward_only_order if forward_only else self.stage_order
        orders = [make(s, num_stages, num_microbatches) for s in range(num_stages)]
        for s, order in enumerate(orders):
            expected = {(k, m) for m in range(num_microbatches)
                        for k in ((FORWARD,) if forward_only else (FORWARD, BACKWARD))}
            got = [(a.kind, a.microbatch) for a in order]
            if sorted(got) != sorted(expected) or any(a.stage != s for a in order):
                raise ValueError(f"{type(self).__name__}.stage_order({s}, ...) must list each "
                                 f"forward and backward of stage {s} once; got {got}.")
        return orders

    def creation_order(self, num_stages, num_microbatches, forward_only=False) -> list[Action]:
        """Every action once, each after the actions it depends on.

        Round-robin over the stages: each takes its next action when that
        action's inputs exist. A schedule whose per-stage orders deadlock
        (a stage waits for something that waits for it) is refused.
        """
        orders = self.orders(num_stages, num_microbatches, forward_only)
        done: set[Action] = set()
        position = [0] * num_stages
        result = []
        while len(result) < sum(map(len, orders)):
            progressed = False
            for s in range(num_stages):
                while position[s] < len(orders[s]):
                    action = orders[s][position[s]]
                    if not all(d in done for d in _dependencies(action, num_stages)):
                        break
                    done.add(action)
                    result.append(action)
                    position[s] += 1
                    progressed = True
            if not progressed:
                stuck = [str(orders[s][position[s]]) for s in range(num_stages)
                         if position[s] < len(orders[s])]
                raise ValueError(f"schedule {self.name!r} deadlocks: stages wait on {stuck}.")
        return result

    def simulate(self, num_stages, num_microbatches, forward_cost=1.0, backward_cost=2.0,
                 forward_only=False) -> dict:
        """The ideal timing: every action starts once its stage is free and its inputs exist.

        Costs are per stage and micro-batch (a number, or a list per stage).
        Returns {"step_time", "busy": per stage, "bubble_fraction", "spans":
        {action: (start, end)}}.
        """
        fc = _per_stage(forward_cost, num_stages)
        bc = _per_stage(backward_cost, num_stages)
        end: dict[Action, float] = {}
        spans = {}
        free = [0.0] * num_stages
        for action in self.creation_order(num_stages, num_microbatches, forward_only):
            s = action.stage
            start = max([free[s]] + [end[d] for d in _dependencies(action, num_stages)])
            cost = fc[s] if action.kind == FORWARD else bc[s]
            end[action] = free[s] = start + cost
            spans[action] = (start, start + cost)
        step = max(end.values())
        busy = [sum(e - b for a, (b, e) in spans.items() if a.stage == s) for s in range(num_stages)]
        return {"step_time": step, "busy": busy, "spans": spans,
                "bubble_fraction": 1.0 - sum(busy) / (num_stages * step)}

    def peak_stash(self, num_stages, num_microbatches) -> list[int]:
        """Per stage: the most micro-batches whose forward ran and backward has not.

        Counted by walking each stage's order; schedules with a closed form
        override it (`tfpar plan` asks for thousands of micro-batches)."""
        return self.counted_peak_stash(num_stages, num_microbatches)

    def counted_peak_stash(self, num_stages, num_microbatches) -> list[int]:
        peaks = []
        for order in self.orders(num_stages, num_microbatches):
            live = peak = 0
            for action in order:
                live += 1 if action.kind == FORWARD else -1
                peak = max(peak, live)
            peaks.append(peak)
        return peaks


class GPipe(Schedule):
    """All forwards, then all backwards (Huang et al., 2019); stashes M micro-batches."""

    name = "gpipe"

    def stage_order(self, stage, num_stages, num_microbatches):
        return ([Action(FORWARD, stage, m) for m in range(num_microbatches)]
                + [Action(BACKWARD, stage, m) for m in range(num_microbatches)])

    def peak_stash(self, num_stages, num_microbatches):
        return [num_microbatches] * num_stages


class OneFOneB(Schedule):
    """One forward, one backward (PipeDream-Flush, Narayanan et al., 2021).

    Stage s runs min(K - 1 - s, M) warm-up forwards, then alternates one
    forward and one backward, then drains the remaining backwards. It does the same work as GPipe with the same bubble, but a
    stage never holds more than K - s micro-batches' activations (GPipe: M).
    """

    name = "1f1b"

    def stage_order(self, stage, num_stages, num_microbatches):
        warmup = min(num_stages - 1 - stage, num_microbatches)
        order = [Action(FORWARD, stage, m) for m in range(warmup)]
        forward, backward = warmup, 0
        while forward < num_microbatches:
            order.append(Action(FORWARD, stage, forward))
            order.append(Action(BACKWARD, stage, backward))
            forward, backward = forward + 1, backward + 1
        order += [Action(BACKWARD, stage, m) for m in range(backward, num_microbatches)]
        return order

    def peak_stash(self, num_stages, num_microbatches):
        # The warm-up forwards plus the one in flight of the steady state.
        return [min(num_stages - s, num_microbatches) for s in range(num_stages)]


SCHEDULES = {"gpipe": GPipe, "1f1b": OneFOneB}


def get(schedule) -> Schedule:
    """A Schedule from a name ("gpipe", "1f1b") or an instance."""
    if isinstance(schedule, Schedule):
        return schedule
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r}: use one of {sorted(SCHEDULES)} or a "
                         "tfpar.strategies.pipeline.Schedule instance.")
    return SCHEDULES[schedule]()


def _dependencies(action: Action, num_stages: int) -> list[Action]:
    s, m = action.stage, action.microbatch
    if action.kind == FORWARD:
        return [Action(FORWARD, s - 1, m)] if s > 0 else []
    deps = [Action(FORWARD, s, m)]
    if s < num_stages - 1:
        deps.append(Action(BACKWARD, s + 1, m))
    return deps


def _per_stage(cost, num_stages):
    if isinstance(cost, (int, float)):
        return [float(cost)] * num_stages
    if len(cost) != num_stages:
        raise ValueError(f"{len(cost)} costs for {num_stages} stages: give one per stage.")
    return [float(c) for c in cost]
