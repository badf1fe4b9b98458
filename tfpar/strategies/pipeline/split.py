"""Splitting a Keras model into stages along its chain of blocks.

A Sequential or functional model is a graph of operations (layers, and
`keras.ops` such as the `x + y` of the GPT's embeddings). tfpar lists their
calls in topological order and may cut between two consecutive calls only
where exactly one computed tensor crosses the cut (the hidden state the next
stage receives), together with any of the model's inputs that later calls
read (a padding mask): every stage passes those on. So are integer or boolean
tensors made from the model's inputs alone by operations without weights (the
all-ones padding mask `tfpar.models.hub` computes from the tokens): they carry
no gradient, and the stage that computes one passes it on as if it were an
input. For the reference GPT::

    tokens -> token_embedding ┐
    tokens -> position_embedding ┴ add | block_0 | block_1 | ... | ln_f | lm_head

The two embeddings' outputs cannot be separated (both would cross), so the
possible cuts are after `token_embedding` (its output and the tokens cross),
after `add`, after every block and after `ln_f`. A residual connection that
spans several blocks removes the cuts it spans; asking for one of them is an
error that says which tensors cross and where the nearest possible cuts are.

Nested functional models (a keras-hub `CausalLM` around its `Backbone`) are
inlined: their layers are called again, on the same weights, in one flat
graph, so a cut can fall between two transformer blocks of the backbone::

    token_ids -> token_embedding -> transformer_layer_0 | transformer_layer_1 -> ... -> token_embedding(reverse=True)
    padding_mask ----------------------┴-----------------------┘   (crosses the cut with the hidden state)

A layer called more than once (an embedding tied to the LM head) may fall in
several stages: its weights live on the last stage that calls it, earlier
stages read them from there, and its gradient is the sum of every stage's
(the runner accumulates gradients per variable across stages).

Split points name the layer that *begins* a stage (torch's
``SplitPoint.BEGINNING``). Without them, the K-1 cuts are chosen to balance
the stages' parameter counts (or given per-layer costs): the contiguous
partition that minimizes the largest stage.
"""

from __future__ import annotations

import dataclasses
import weakref

import keras
from keras.src.models.functional import Functional  # private, pinned (setup.cfg)

from tfpar.strategies.pipeline.balance import balanced_cuts


class PipelineSplitError(ValueError):
    """The model cannot be split as asked."""


@dataclasses.dataclass
class StageSpec:
    """Stage i: operations [start, stop) of the model's topological order."""

    index: int
    operations: list
    inputs: object      # KerasTensor(s) the stage receives (the model's inputs for stage 0):
                        # one hidden state, or a list of it and the model inputs passed on
    outputs: object     # KerasTensor(s) it returns (the model's outputs for the last stage)
    parameters: int

    @property
    def layer_names(self) -> list[str]:
        return [op.name for op in self.operations]


def graph_of(model: keras.Model):
    """The functional graph behind a Sequential or functional model, nested
    functional models inlined (the same layers and weights, called again)."""
    if isinstance(model, keras.Sequential):
        graph = getattr(model, "_functional", None)
        if graph is None:
            raise PipelineSplitError(
                f"Sequential model {model.name!r} is not built: give it an input shape "
                "(keras.Input(...) as its first layer) before the pipeline splits it.")
    elif not hasattr(model, "_operations") or not hasattr(model, "_inputs_struct"):
        raise PipelineSplitError(
            f"model {model.name!r} ({type(model).__name__}) is a subclassed model: its "
            "call() is Python code with no graph of layers to split. Build it as a "
            "functional or Sequential model of blocks.")
    else:
        graph = model
    if not any(_inlinable(op) is not None for op in graph._operations):
        return graph
    if model not in _FLAT:
        _FLAT[model] = _flatten(graph)
    return _FLAT[model]


# model -> its flat graph: inlining calls every layer again, so it is done once.
_FLAT: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _inlinable(op):
    """The graph of a nested model whose call is its graph (functional, Sequential), else None."""
    if isinstance(op, keras.Sequential):
        return getattr(op, "_functional", None)
    if isinstance(op, Functional) and type(op).call is Functional.call:
        return op
    return None


def _flatten(graph) -> keras.Model:
    """A functional model calling `graph`'s layers on new inputs, nested graphs inlined."""
    inputs = keras.tree.map_structure(
        lambda t: keras.Input(batch_shape=t.shape, dtype=t.dtype, sparse=t.sparse, name=t.name),
        graph._inputs_struct)
    outputs = _call_inlined(graph, inputs)
    return keras.Model(inputs, outputs, name=graph.name)


def _call_inlined(graph, inputs, mask=None):
    try:
        keras.tree.assert_same_structure(inputs, graph._inputs_struct)
        inputs = keras.tree.flatten(inputs)  # the order of graph.inputs
    except (ValueError, TypeError):
        # Keras's own matching; it adds a convert_to_tensor call per input,
        # which then crosses cuts as a computed tensor.
        inputs = graph._standardize_inputs(inputs)
    if mask is not None:  # as Functional.call does
        for x, m in zip(inputs, keras.tree.flatten(mask)):
            if m is not None:
                x._keras_mask = m
    return graph._run_through_graph(inputs, operation_fn=_inliner)


def _inliner(op):
    inner = _inlinable(op)
    if inner is None:
        return op

    def call(inputs, mask=None, **kwargs):
        if any(v is not None for v in keras.tree.flatten(kwargs)):
            raise PipelineSplitError(
                f"nested model {op.name!r} is called with {sorted(kwargs)}; the splitter "
                "inlines nested models called on their inputs (and masks) alone. Call it as "
                f"{op.name}(inputs), or split the model by hand into functional blocks.")
        return _call_inlined(inner, inputs, mask)

    return call


def operations(model) -> list:
    """The model's operations in the order they are called (input layers excluded).

    A layer called several times (a tied embedding) appears once per call.
    """
    return [node.operation for node in calls(model)]


def calls(model) -> list:
    """The nodes (one call of an operation each) of the model's graph, topologically ordered:
    deepest first, as Keras orders its operations (ties in Keras's operation order)."""
    graph = graph_of(model)
    order = {id(op): i for i, op in enumerate(graph._operations)}
    nodes = []
    for depth in sorted(graph._nodes_by_depth, reverse=True):
        at_depth = [n for n in graph._nodes_by_depth[depth]
                    if n.operation is not None and not n.is_input]
        nodes += sorted(at_depth, key=lambda n: order[id(n.operation)])
    return nodes


def _node_in(graph, node) -> bool:
    return id(node) in {id(n) for nodes in graph._nodes_by_depth.values() for n in nodes}


def _node(graph, op):
    return next(n for n in op._inbound_nodes if _node_in(graph, n))


def node_of(graph, op):
    """The node of `op` in `graph`: its call with its input and output KerasTensors."""
    return _node(graph, op)


def crossing(model) -> list[list]:
    """For each cut position i (between call i and call i+1): the tensors crossing it.

    Model inputs that a later call reads count as crossing.
    """
    graph = graph_of(model)
    nodes = calls(model)
    produced_at = {id(t): -1 for t in keras.tree.flatten(graph.inputs)}
    tensors = {id(t): t for t in keras.tree.flatten(graph.inputs)}
    last_use: dict[int, int] = {}
    for i, node in enumerate(nodes):
        for t in node.arguments.keras_tensors:
            last_use[id(t)] = max(last_use.get(id(t), -1), i)
        for t in node.outputs:
            produced_at[id(t)] = i
            tensors[id(t)] = t
    for t in keras.tree.flatten(graph.outputs):
        last_use[id(t)] = len(nodes)
    cuts = []
    for i in range(len(nodes) - 1):
        cuts.append([tensors[k] for k, p in produced_at.items()
                     if p <= i and last_use.get(k, -1) > i])
    return cuts


def passed_on(model) -> set[int]:
    """ids of the tensors every stage may pass on next to the hidden state: the
    model's inputs, and the integer or boolean tensors computed from them alone
    by operations without weights (a padding mask made from the token ids)."""
    graph = graph_of(model)
    found = {id(t) for t in keras.tree.flatten(graph.inputs)}
    for node in calls(model):
        if getattr(node.operation, "weights", None):
            continue
        if all(id(t) in found for t in node.arguments.keras_tensors):
            found.update(id(t) for t in node.outputs
                         if not keras.backend.is_float_dtype(t.dtype))
    return found


def carried(model, position: int):
    """What crosses cut `position`: the one hidden state, or [hidden state, *passed on]."""
    inputs = passed_on(model)
    tensors = crossing(model)[position]
    computed = [t for t in tensors if id(t) not in inputs]
    passed = [t for t in tensors if id(t) in inputs]
    return computed[0] if not passed else [computed[0], *passed]


def _producer(tensor) -> str:
    history = getattr(tensor, "_keras_history", None)
    return history.operation.name if history else getattr(tensor, "name", "?")


def valid_cuts(model) -> list[int]:
    """Cut positions i (a stage ends after call i) crossed by exactly one computed
    tensor (and any model inputs, which the stages pass on: `passed_on`)."""
    inputs = passed_on(model)
    return [i for i, tensors in enumerate(crossing(model))
            if sum(id(t) not in inputs for t in tensors) == 1]


def plan(model, *, num_stages: int | None = None, split_points=None,
         costs: dict | None = None) -> list[StageSpec]:
    """The stages of `model`: from `split_points`, or `num_stages` balanced ones.

    Args:
      num_stages: K; the cuts balance `costs` (default: parameter counts).
      split_points: names of the layers that begin stages 1..K-1.
      costs: {layer name: cost} for balancing (e.g. measured seconds); layers
        not named cost their parameter count scaled to the named ones' mean.
    """
    graph = graph_of(model)
    ops = operations(model)
    names = [op.name for op in ops]
    cuts = valid_cuts(model)
    if split_points:
        positions = []
        for name in split_points:
            if name not in names:
                raise PipelineSplitError(
                    f"split point {name!r} names no layer of model {model.name!r}; its "
                    f"layers are {names}.")
            # A layer called twice (a tied LM head) begins a stage at its first call.
            position = names.index(name) - 1
            if position < 0:
                raise PipelineSplitError(
                    f"split point {name!r} is the model's first layer: stage 0 would be "
                    "empty. Name the layers that begin stages 1, 2, ...")
            if position not in cuts:
                raise PipelineSplitError(_why_not(model, name, position, names, cuts))
            positions.append(position)
        if sorted(set(positions)) != positions:
            raise PipelineSplitError(
                f"split_points {list(split_points)} must name distinct layers in model order "
                f"(the model's order is {names}).")
        if num_stages is not None and num_stages != len(positions) + 1:
            raise PipelineSplitError(
                f"{len(positions)} split points make {len(positions) + 1} stages, but "
                f"stages={num_stages} was asked; give K-1 split points for K stages.")
    else:
        if num_stages is None or num_stages < 1:
            raise PipelineSplitError(f"stages={num_stages}: give K >= 1 or split_points.")
        if num_stages - 1 > len(cuts):
            raise PipelineSplitError(
                f"model {model.name!r} can be cut in at most {len(cuts) + 1} stages (possible "
                f"stage starts: {[names[c + 1] for c in cuts]}), but stages={num_stages} was "
                "asked. Use fewer stages, or a model with more blocks.")
        weights = _costs(ops, costs)
        positions = balanced_cuts(weights, cuts, num_stages)
    bounds = [-1] + positions + [len(ops) - 1]
    specs = []
    for s in range(len(bounds) - 1):
        stage_ops = _unique(ops[bounds[s] + 1: bounds[s + 1] + 1])
        specs.append(StageSpec(
            index=s, operations=stage_ops,
            inputs=graph._inputs_struct if s == 0 else carried(model, bounds[s]),
            outputs=(graph._outputs_struct if s == len(bounds) - 2
                     else carried(model, bounds[s + 1])),
            parameters=sum(_parameters(op) for op in stage_ops)))
    return specs


def _unique(ops) -> list:
    seen = set()
    return [op for op in ops if not (id(op) in seen or seen.add(id(op)))]


def _why_not(model, name, position, names, cuts) -> str:
    inputs = passed_on(model)
    tensors = [t for t in crossing(model)[position] if id(t) not in inputs]
    described = [f"the output of {_producer(t)!r}" for t in tensors]
    nearest = [names[c + 1] for c in cuts]
    return (f"split point {name!r}: a stage boundary before it would be crossed by "
            f"{len(tensors)} tensors ({', '.join(described)}), e.g. a skip connection. A "
            "boundary must be crossed by exactly one tensor the model computes (model inputs, "
            f"such as a padding mask, may cross too). Layers that can begin a stage: {nearest}.")


def _parameters(op) -> int:
    return sum(_size(v.shape) for v in getattr(op, "weights", ()))


def _size(shape) -> int:
    total = 1
    for d in shape:
        total *= int(d)
    return total


def _costs(ops, costs) -> list[float]:
    params = [float(_parameters(op)) for op in ops]
    if not costs:
        return params
    unknown = set(costs) - {op.name for op in ops}
    if unknown:
        raise PipelineSplitError(f"costs name layers {sorted(unknown)} that the model lacks.")
    named = [params[i] for i, op in enumerate(ops) if op.name in costs]
    scale = (sum(costs.values()) / len(costs)) / max(sum(named) / max(len(named), 1), 1.0)
    return [float(costs[op.name]) if op.name in costs else params[i] * scale
            for i, op in enumerate(ops)]
