"""Schedules: the order in which each pipeline device runs its actions.

The model is cut into C = K x V stages (V "virtual stages" per device; V = 1
for GPipe, 1F1B and ZB-H1). A schedule places the stages on the K devices
(`device_of`) and says, for every device, the sequence of actions it runs in
one optimizer step (`stage_order`):

- ``F``: the forward of one micro-batch through one stage;
- ``B``: its backward. Schedules with `split_backward` cut it in two, as the
  zero-bubble schedules do (Qi et al., 2023): ``B`` computes only the input
  gradient (what the previous stage waits for) and ``W`` the weight
  gradient (which nobody waits for, so it can fill the bubble).

Everything else follows from the per-device orders and the data
dependencies (F(c, m) needs F(c-1, m); B(c, m) needs F(c, m) and B(c+1, m);
W(c, m) needs B(c, m)):

- `creation_order` interleaves the devices' sequences into one order in
  which the runner can create the graph (a tensor must exist before it is used);
- `simulate` runs the schedule on given per-action costs, giving the ideal
  step time and bubble against which measured timelines are compared;
- `peak_stash` counts the activations each device keeps for its backward.

Adding a schedule is one subclass that implements `stage_order`. Example
(K=3 devices, M=4 micro-batches; ``F1@2`` is the forward of micro-batch 1
through stage 2)::

    GPipe().stage_order(0, 3, 4)     # F0@0 F1@0 F2@0 F3@0 B0@0 B1@0 B2@0 B3@0
    OneFOneB().stage_order(0, 3, 4)  # F0@0 F1@0 F2@0 B0@0 F3@0 B1@0 B2@0 B3@0
    OneFOneB().stage_order(2, 3, 4)  # F0@2 B0@2 F1@2 B1@2 F2@2 B2@2 F3@2 B3@2
    ZBV().device_of(5, 3)            # 0: device 0 holds stages 0 and 5 (the V shape)

With equal costs F = B = W (a full backward 2F), the ideal bubbles are:

| schedule | bubble (share of the step) | peak stash, device d (stage activations) |
| --- | --- | --- |
| gpipe | (K-1)/(M+K-1) | M |
| 1f1b | (K-1)/(M+K-1) | K-d |
| interleaved_1f1b | (K-1)/(V*M+K-1) | 2(K-d-1)+(V-1)K+1 (stages of 1/V the layers) |
| zb_h1 | (K-1)/(3M+K-1) for M >= K | K |
| zbv | (K-1)/(6M+K-1) | 2K (stages of half the layers) |
"""

from __future__ import annotations

import dataclasses
import functools
import heapq

FORWARD, BACKWARD, WEIGHT = "F", "B", "W"


@dataclasses.dataclass(frozen=True)
class Action:
    """One stage's forward, backward (or input-gradient) or weight-gradient of one micro-batch."""

    kind: str  # FORWARD, BACKWARD or WEIGHT
    stage: int  # the model stage (0 .. K*V-1), not the device
    microbatch: int

    def __str__(self):
        return f"{self.kind}{self.microbatch}@{self.stage}"


class Schedule:
    """The shared interface: stages placed on devices, and a per-device order of actions.

    Attributes:
      virtual_stages: V, stages per device (the model is cut into K*V stages).
      split_backward: whether the backward is split into B (input gradient)
        and W (weight gradient) actions.
    """

    name = "schedule"
    virtual_stages = 1
    split_backward = False

    def stage_order(self, device: int, num_devices: int, num_microbatches: int) -> list[Action]:
        """The actions device `device` of `num_devices` runs, in order (all its stages)."""
        raise NotImplementedError

    def device_of(self, stage: int, num_devices: int) -> int:
        """The device that holds model stage `stage`. Default: round robin (stage % K)."""
        return stage % num_devices

    def stages_of(self, device: int, num_devices: int) -> list[int]:
        """The model stages device `device` holds, in model order."""
        return [c for c in range(num_devices * self.virtual_stages)
                if self.device_of(c, num_devices) == device]

    def check(self, num_devices: int, num_microbatches: int) -> str | None:
        """Why this schedule cannot run K devices and M micro-batches, or None."""
        return None

    def forward_only_order(self, device: int, num_devices: int,
                           num_microbatches: int) -> list[Action]:
        """Evaluation and prediction: forwards stage by stage, in micro-batch order."""
        return [Action(FORWARD, c, m) for c in self.stages_of(device, num_devices)
                for m in range(num_microbatches)]

    def kinds(self, forward_only: bool = False) -> tuple[str, ...]:
        if forward_only:
            return (FORWARD,)
        return (FORWARD, BACKWARD, WEIGHT) if self.split_backward else (FORWARD, BACKWARD)

    # ---------------------------------------------------------- derived
    def orders(self, num_devices, num_microbatches, forward_only=False) -> list[list[Action]]:
        reason = None if forward_only else self.check(num_devices, num_microbatches)
        if reason:
            raise ValueError(reason)
        make = self.forward_only_order if forward_only else self.stage_order
        orders = [make(d, num_devices, num_microbatches) for d in range(num_devices)]
        for d, order in enumerate(orders):
            expected = {(k, c, m) for c in self.stages_of(d, num_devices)
                        for m in range(num_microbatches) for k in self.kinds(forward_only)}
            got = [(a.kind, a.stage, a.microbatch) for a in order]
            if sorted(got) != sorted(expected):
                raise ValueError(f"{type(self).__name__}.stage_order({d}, ...) must list each "
                                 f"action of the stages of device {d} once; got "
                                 f"{[str(a) for a in order]}.")
        return orders

    def creation_order(self, num_devices, num_microbatches, forward_only=False) -> list[Action]:
        """Every action once, each after the actions it depends on.

        Round-robin over the devices: each takes its next action when that
        action's inputs exist. A schedule whose per-device orders deadlock
        (a device waits for something that waits for it) is refused.
        """
        orders = self.orders(num_devices, num_microbatches, forward_only)
        stages = num_devices * self.virtual_stages
        split = self.split_backward and not forward_only
        done: set[Action] = set()
        position = [0] * num_devices
        result = []
        while len(result) < sum(map(len, orders)):
            progressed = False
            for d in range(num_devices):
                while position[d] < len(orders[d]):
                    action = orders[d][position[d]]
                    if not all(x in done for x in dependencies(action, stages, split)):
                        break
                    done.add(action)
                    result.append(action)
                    position[d] += 1
                    progressed = True
            if not progressed:
                stuck = [str(orders[d][position[d]]) for d in range(num_devices)
                         if position[d] < len(orders[d])]
                raise ValueError(f"schedule {self.name!r} deadlocks: devices wait on {stuck}.")
        return result

    def simulate(self, num_devices, num_microbatches, forward_cost=1.0, backward_cost=1.0,
                 weight_cost=1.0, forward_only=False) -> dict:
        """The ideal timing: every action starts once its device is free and its inputs exist.

        Costs are per stage and micro-batch (a number, or a list per stage of
        the K*V): the forward, the input gradient and the weight gradient. A
        schedule that does not split the backward runs both in one B action.
        Returns {"step_time", "busy": per device, "bubble_fraction", "spans":
        {action: (start, end)}}.
        """
        stages = num_devices * self.virtual_stages
        fc = _per_stage(forward_cost, stages)
        bc = _per_stage(backward_cost, stages)
        wc = _per_stage(weight_cost, stages)
        split = self.split_backward and not forward_only
        if not split:
            bc = [b + w for b, w in zip(bc, wc)]
        cost = {FORWARD: fc, BACKWARD: bc, WEIGHT: wc}
        end: dict[Action, float] = {}
        spans = {}
        free = [0.0] * num_devices
        for action in self.creation_order(num_devices, num_microbatches, forward_only):
            d = self.device_of(action.stage, num_devices)
            start = max([free[d]] + [end[x] for x in dependencies(action, stages, split)])
            end[action] = free[d] = start + cost[action.kind][action.stage]
            spans[action] = (start, end[action])
        step = max(end.values())
        busy = [0.0] * num_devices
        for a, (b, e) in spans.items():
            busy[self.device_of(a.stage, num_devices)] += e - b
        return {"step_time": step, "busy": busy, "spans": spans,
                "bubble_fraction": 1.0 - sum(busy) / (num_devices * step)}

    def bubble_fraction(self, num_devices, num_microbatches) -> float:
        """The ideal bubble with equal forward, input- and weight-gradient costs.

        From `simulate`; beyond 4K micro-batches the step grows by the same
        amount per micro-batch (the steady state is full), so a plan with
        thousands of micro-batches extrapolates from two simulations.
        """
        return _bubble(self, num_devices, num_microbatches)

    def peak_stash(self, num_devices, num_microbatches) -> list[int]:
        """Per device: the most (stage, micro-batch) activations held at once.

        An activation is held from its forward until its backward (its W when
        the backward is split) ends; a stage holds 1/V of its device's layers.
        Counted by walking each device's order; schedules with a closed form
        override it (`tfpar plan` asks for thousands of micro-batches)."""
        return self.counted_peak_stash(num_devices, num_microbatches)

    def counted_peak_stash(self, num_devices, num_microbatches) -> list[int]:
        release = WEIGHT if self.split_backward else BACKWARD
        peaks = []
        for order in self.orders(num_devices, num_microbatches):
            live = peak = 0
            for action in order:
                live += {FORWARD: 1, release: -1}.get(action.kind, 0)
                peak = max(peak, live)
            peaks.append(peak)
        return peaks

    def __repr__(self):
        return f"{type(self).__name__}(virtual_stages={self.virtual_stages})"


class GPipe(Schedule):
    """All forwards, then all backwards (Huang et al., 2019); stashes M micro-batches."""

    name = "gpipe"

    def stage_order(self, device, num_devices, num_microbatches):
        return ([Action(FORWARD, device, m) for m in range(num_microbatches)]
                + [Action(BACKWARD, device, m) for m in range(num_microbatches)])

    def peak_stash(self, num_devices, num_microbatches):
        return [num_microbatches] * num_devices

    def bubble_fraction(self, num_devices, num_microbatches):
        return _flush_bubble(num_devices, num_microbatches)


class OneFOneB(Schedule):
    """One forward, one backward (PipeDream-Flush, Narayanan et al., 2021).

    Device d runs min(K - 1 - d, M) warm-up forwards, then alternates one
    forward and one backward, then drains the remaining backwards. It does
    the same work as GPipe with the same bubble, but a device never holds
    more than K - d micro-batches' activations (GPipe: M).
    """

    name = "1f1b"

    def stage_order(self, device, num_devices, num_microbatches):
        return _one_f_one_b(device, num_devices, num_microbatches)

    def peak_stash(self, num_devices, num_microbatches):
        # The warm-up forwards plus the one in flight of the steady state.
        return [min(num_devices - d, num_microbatches) for d in range(num_devices)]

    def bubble_fraction(self, num_devices, num_microbatches):
        return _flush_bubble(num_devices, num_microbatches)


class Interleaved1F1B(Schedule):
    """1F1B over V virtual stages per device (Megatron-LM, Narayanan et al., 2021).

    The model is cut into K*V stages; device d holds the non-adjacent stages
    d, d+K, d+2K, ... A micro-batch crosses every device V times, and each
    action is 1/V as long, so the warm-up and drain shrink V-fold: bubble
    (K-1)/(V*M + K-1) with equal costs (1F1B: (K-1)/(M+K-1)), for V times the
    point-to-point messages. Forwards go in rounds of K micro-batches per
    stage, so M must be a multiple of K (as Megatron requires).

    Device d's k-th forward is micro-batch (k // KV)*K + k % K of its stage
    (k // K) % V; backwards go the same way through its stages in reverse.
    It runs 2(K-d-1) + (V-1)K warm-up forwards, then one forward and one
    backward alternately. Its peak stash is one more than the warm-up, in
    stages of 1/V of the device's layers: K + (K-1)/V micro-batches'
    worth of activations on device 0 (1F1B: K).
    """

    name = "interleaved_1f1b"

    def __init__(self, virtual_stages: int = 2):
        if not isinstance(virtual_stages, int) or virtual_stages < 2:
            raise ValueError(f"virtual_stages={virtual_stages!r}: interleaved 1F1B needs at "
                             "least 2 stages per device (with 1 it is plain '1f1b').")
        self.virtual_stages = virtual_stages

    def check(self, num_devices, num_microbatches):
        if num_microbatches % num_devices:
            return (f"schedule 'interleaved_1f1b' with {num_devices} devices needs a number "
                    f"of micro-batches that divides by {num_devices} (it sends them in rounds "
                    f"of one per device), got {num_microbatches}; use e.g. "
                    f"microbatches={_round_up(num_microbatches, num_devices)}.")
        return None

    def _warmup(self, device, num_devices, num_microbatches):
        k, v = num_devices, self.virtual_stages
        return min(2 * (k - device - 1) + (v - 1) * k, num_microbatches * v)

    def stage_order(self, device, num_devices, num_microbatches):
        k, v, m = num_devices, self.virtual_stages, num_microbatches
        total = m * v

        def forward(i):
            return Action(FORWARD, ((i // k) % v) * k + device, (i // (k * v)) * k + i % k)

        def backward(i):
            return Action(BACKWARD, (v - 1 - (i // k) % v) * k + device,
                          (i // (k * v)) * k + i % k)

        warmup = self._warmup(device, k, m)
        order = [forward(i) for i in range(warmup)]
        f, b = warmup, 0
        while f < total:
            order += [forward(f), backward(b)]
            f, b = f + 1, b + 1
        return order + [backward(i) for i in range(b, total)]

    def peak_stash(self, num_devices, num_microbatches):
        return [min(self._warmup(d, num_devices, num_microbatches) + 1,
                    num_microbatches * self.virtual_stages) for d in range(num_devices)]


class ZeroBubbleH1(Schedule):
    """ZB-H1 (Qi et al., 2023): 1F1B with the backward split into B and W.

    B (the input gradient) is what the previous device waits for; W (the
    weight gradient) is not needed until the optimizer step, so it moves
    into the time a device would otherwise wait. Device d runs K-d warm-up
    forwards (as 1F1B), then for each micro-batch i: B(i), then W(i-d) (its
    weight gradients run d micro-batches late), then the next forward; the
    W's left over end the step. The backward chain then crosses the pipeline
    at the speed of B alone, and the late W's fill the drain. With equal
    costs the bubble is (K-1)F of a 3MF step, (K-1)/(3M+K-1): about a third
    of 1F1B's. Every device holds at most K micro-batches (activations are
    freed by W): the peak of 1F1B, reached on its device 0.
    """

    name = "zb_h1"
    split_backward = True

    def stage_order(self, device, num_devices, num_microbatches):
        d, m = device, num_microbatches
        warmup = min(num_devices - d, m)
        order = [Action(FORWARD, d, i) for i in range(warmup)]
        forward, weight = warmup, 0
        for i in range(m):
            order.append(Action(BACKWARD, d, i))
            if i - d >= weight:
                order.append(Action(WEIGHT, d, weight))
                weight += 1
            if forward < m:
                order.append(Action(FORWARD, d, forward))
                forward += 1
        return order + [Action(WEIGHT, d, i) for i in range(weight, m)]

    def peak_stash(self, num_devices, num_microbatches):
        return [min(num_devices, num_microbatches)] * num_devices


class ZBV(Schedule):
    """ZB-V (Qi et al., 2024): two stages per device in a V shape, backward split in B and W.

    Device d holds stages d and 2K-1-d, so a micro-batch goes down the
    devices and back up: the last stage sits on device 0, the first
    stage's backward ends there, and both ends of the pipeline keep device
    0 busy. With B and W split and the order from the list scheduler
    (`_list_schedule`, at most 2K stage activations per device: 1F1B's peak
    of K micro-batches, each stage half the layers), the bubble is close to
    zero when forward, input- and weight-gradient cost the same: the only
    idle time is the K-1 stage forwards before the first one reaches the last
    device, (K-1)/(6M+K-1) of the step (K=4, M=8: 5.9%; 1F1B: 27%).
    """

    name = "zbv"
    virtual_stages = 2
    split_backward = True

    def device_of(self, stage, num_devices):
        return stage if stage < num_devices else 2 * num_devices - 1 - stage

    def stage_order(self, device, num_devices, num_microbatches):
        return _list_schedule(self, num_devices, num_microbatches)[device]

    def peak_stash(self, num_devices, num_microbatches):
        return [min(2 * num_devices, 2 * num_microbatches)] * num_devices

    def limit(self, device, num_devices):
        return 2 * num_devices


SCHEDULES = {"gpipe": GPipe, "1f1b": OneFOneB, "interleaved_1f1b": Interleaved1F1B,
             "zb_h1": ZeroBubbleH1, "zbv": ZBV}


def default_virtual_stages(name: str) -> int:
    """V when none is given: 2 for the schedules with virtual stages, else 1."""
    return 2 if name in ("interleaved_1f1b", "zbv") else 1


def virtual_stages_error(name: str, virtual_stages: int) -> str | None:
    """Why `name` cannot run `virtual_stages` stages per device, or None."""
    if name == "interleaved_1f1b":
        if virtual_stages < 2:
            return (f"virtual_stages={virtual_stages}: 'interleaved_1f1b' needs at least 2 "
                    "stages per device (with 1 it is plain '1f1b')")
        return None
    allowed = default_virtual_stages(name)
    if virtual_stages != allowed:
        use = "use schedule='interleaved_1f1b' (or 'zbv', V=2) for more, or " \
            if allowed == 1 else ""
        return (f"virtual_stages={virtual_stages}: schedule {name!r} runs {allowed} stage(s) "
                f"per device; {use}virtual_stages={allowed}")
    return None


def get(schedule, virtual_stages: int | None = None) -> Schedule:
    """A Schedule from a name ("gpipe", "1f1b", "interleaved_1f1b", "zb_h1", "zbv") or an instance."""
    if isinstance(schedule, Schedule):
        if virtual_stages not in (None, schedule.virtual_stages):
            raise ValueError(f"virtual_stages={virtual_stages} but the schedule {schedule!r} "
                             f"has {schedule.virtual_stages}; give one of them.")
        return schedule
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r}: use one of {sorted(SCHEDULES)} or a "
                         "tfpar.strategies.pipeline.Schedule instance.")
    v = default_virtual_stages(schedule) if virtual_stages is None else virtual_stages
    reason = virtual_stages_error(schedule, v)
    if reason:
        raise ValueError(reason + ".")
    return Interleaved1F1B(v) if schedule == "interleaved_1f1b" else SCHEDULES[schedule]()


def _one_f_one_b(device, num_devices, num_microbatches):
    warmup = min(num_devices - 1 - device, num_microbatches)
    order = [Action(FORWARD, device, m) for m in range(warmup)]
    forward, backward = warmup, 0
    while forward < num_microbatches:
        order.append(Action(FORWARD, device, forward))
        order.append(Action(BACKWARD, device, backward))
        forward, backward = forward + 1, backward + 1
    return order + [Action(BACKWARD, device, m) for m in range(backward, num_microbatches)]


@functools.lru_cache(maxsize=256)
def _list_schedule(schedule, num_devices, num_microbatches) -> list[list[Action]]:
    """Per-device orders from a list scheduler run on unit costs (F = B = W = 1).

    For ZBV with M >= 2K-1 it finds the step of the hand-written ZB-V order
    of torch.distributed.pipelining (6M + K - 1 units for K = 2..4 and 8; one
    unit more at K = 5), and it also covers fewer micro-batches.

    Time advances in whole units; a free device takes, among its actions
    whose inputs exist:
      1. the B of the earliest micro-batch (later stage first): the previous
         device waits for it;
      2. else an F (later stage first, then the earliest micro-batch) while
         it holds fewer than `schedule.limit(d, K)` stage activations;
      3. else its oldest W (frees an activation; nobody waits for it).
    The result is a static order: the runner enforces it whatever the real
    costs are, and `simulate` gives its ideal timing.
    """
    k, m = num_devices, num_microbatches
    stages = k * schedule.virtual_stages
    device_of = [schedule.device_of(c, k) for c in range(stages)]
    end: dict[Action, int] = {}
    orders: list[list[Action]] = [[] for _ in range(k)]
    next_forward = [0] * stages      # the next micro-batch each stage forwards
    next_backward = [0] * stages
    pending_w: list[list[tuple]] = [[] for _ in range(k)]
    held = [0] * k
    busy_until = [0] * k
    total = 3 * stages * m
    now = 0
    while len(end) < total:
        for d in range(k):
            if busy_until[d] > now:
                continue
            mine = [c for c in range(stages) if device_of[c] == d]
            chosen = None
            # 1. input gradients
            ready_b = []
            for c in mine:
                mb = next_backward[c]
                if mb < next_forward[c] and end.get(Action(FORWARD, c, mb), now + 1) <= now and (
                        c == stages - 1 or end.get(Action(BACKWARD, c + 1, mb), now + 1) <= now):
                    ready_b.append((mb, -c))
            if ready_b:
                mb, c = min(ready_b)
                chosen = Action(BACKWARD, -c, mb)
                next_backward[-c] += 1
            # 2. forwards, within the memory limit
            if chosen is None and held[d] < schedule.limit(d, k):
                ready_f = []
                for c in mine:
                    mb = next_forward[c]
                    if mb < m and (c == 0 or end.get(Action(FORWARD, c - 1, mb), now + 1) <= now):
                        ready_f.append((-c, mb))
                if ready_f:
                    c, mb = min(ready_f)
                    chosen = Action(FORWARD, -c, mb)
                    next_forward[-c] += 1
                    held[d] += 1
            # 3. weight gradients
            if chosen is None and pending_w[d]:
                mb, c = heapq.heappop(pending_w[d])
                chosen = Action(WEIGHT, c, mb)
                held[d] -= 1
            if chosen is None:
                continue
            if chosen.kind == BACKWARD:
                heapq.heappush(pending_w[d], (chosen.microbatch, chosen.stage))
            orders[d].append(chosen)
            end[chosen] = now + 1
            busy_until[d] = now + 1
        now += 1
        if now > 10 * total:
            raise ValueError(f"schedule {schedule.name!r} found no order for {k} devices and "
                             f"{m} micro-batches (a device's memory limit blocks it).")
    return orders


def dependencies(action: Action, num_stages: int, split: bool = False) -> list[Action]:
    """The actions whose outputs `action` reads (of `num_stages` model stages)."""
    c, m = action.stage, action.microbatch
    if action.kind == FORWARD:
        return [Action(FORWARD, c - 1, m)] if c > 0 else []
    if action.kind == WEIGHT:
        return [Action(BACKWARD, c, m)]
    deps = [Action(FORWARD, c, m)]
    if c < num_stages - 1:
        deps.append(Action(BACKWARD, c + 1, m))
    return deps


@functools.lru_cache(maxsize=1024)
def _bubble(schedule, num_devices, num_microbatches) -> float:
    k, m = num_devices, num_microbatches
    base = 4 * k
    if m <= base + k:
        return schedule.simulate(k, m)["bubble_fraction"]
    # Extrapolate the step linearly from M0 and M0 + K (both multiples of K
    # when M is, as interleaving needs) to M.
    m0 = base + (m - base) % k
    s0 = schedule.simulate(k, m0)["step_time"]
    s1 = schedule.simulate(k, m0 + k)["step_time"]
    step = s0 + (s1 - s0) * (m - m0) / k
    return 1.0 - 3.0 * m * schedule.virtual_stages / step  # F + B + W per stage, unit costs


def _flush_bubble(num_devices, num_microbatches) -> float:
    """GPipe's and 1F1B's ideal bubble, (K-1)/(M+K-1): both fill and drain the
    pipeline once per step (the simulation agrees; closed form because `tfpar
    plan` asks for it thousands of times, at hundreds of micro-batches)."""
    return (num_devices - 1) / (num_microbatches + num_devices - 1)


def _per_stage(cost, num_stages):
    if isinstance(cost, (int, float)):
        return [float(cost)] * num_stages
    if len(cost) != num_stages:
        raise ValueError(f"{len(cost)} costs for {num_stages} stages: give one per stage.")
    return [float(c) for c in cost]


def _round_up(n, k):
    return -(-n // k) * k
