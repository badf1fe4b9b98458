"""Splitting a Keras model into stages along its chain of blocks.

A Sequential or functional model is a graph of operations (layers, and
`keras.ops` such as the `x + y` of the GPT's embeddings). tfpar lists them
in topological order and may cut between two consecutive operations only
where exactly one tensor crosses the cut: the tensor the next stage receives.
For the reference GPT::

    tokens -> token_embedding ┐
    tokens -> position_embedding ┴ add | block_0 | block_1 | ... | ln_f | lm_head

The embeddings cannot be separated (the token ids and the token embedding
both cross such a cut), so the first possible cut is after `add`; then after
every block and after `ln_f`. A residual connection that spans several
blocks, or a layer deep in the model that reads the model's input, removes
the cuts it spans; asking for one of them is an error that says which
tensor crosses and where the nearest possible cuts are.

Split points name the layer that *begins* a stage (torch's
``SplitPoint.BEGINNING``). Without them, the K-1 cuts are chosen to balance
the stages' parameter counts (or given per-layer costs): the contiguous
partition that minimizes the largest stage.
"""

from __future__ import annotations

import dataclasses

import keras

from tfpar.strategies.pipeline.balance import balanced_cuts


class PipelineSplitError(ValueError):
    """The model cannot be split as asked."""


@dataclasses.dataclass
class StageSpec:
    """Stage i: operations [start, stop) of the model's topological order."""

    index: int
    operations: list
    inputs: object      # KerasTensor(s) the stage receives (the model's inputs for stage 0)
    outputs: object     # KerasTensor(s) it returns (the model's outputs for the last stage)
    parameters: int

    @property
    def layer_names(self) -> list[str]:
        return [op.name for op in self.operations]


def graph_of(model: keras.Model):
    """The functional graph behind a Sequential or functional model."""
    if isinstance(model, keras.Sequential):
        graph = getattr(model, "_functional", None)
        if graph is None:
            raise PipelineSplitError(
                f"Sequential model {model.name!r} is not built: give it an input shape "
                "(keras.Input(...) as its first layer) before the pipeline splits it.")
        return graph
    if not hasattr(model, "_operations") or not hasattr(model, "_inputs_struct"):
        raise PipelineSplitError(
            f"model {model.name!r} ({type(model).__name__}) is a subclassed model: its "
            "call() is Python code with no graph of layers to split. Build it as a "
            "functional or Sequential model of blocks.")
    return model


def operations(model) -> list:
    """The model's operations in topological order, input layers excluded."""
    graph = graph_of(model)
    ops = [op for op in graph._operations if not isinstance(op, keras.layers.InputLayer)]
    for op in ops:
        nodes = [n for n in op._inbound_nodes if _node_in(graph, n)]
        if len(nodes) > 1:
            raise PipelineSplitError(
                f"layer {op.name!r} is called {len(nodes)} times in model {model.name!r}; "
                "shared layers (tied weights) cannot be split into stages. Untie them or "
                "keep the model on one stage.")
    return ops


def _node_in(graph, node) -> bool:
    return id(node) in {id(n) for nodes in graph._nodes_by_depth.values() for n in nodes}


def _node(graph, op):
    return next(n for n in op._inbound_nodes if _node_in(graph, n))


def node_of(graph, op):
    """The node of `op` in `graph`: its call with its input and output KerasTensors."""
    return _node(graph, op)


def crossing(model) -> list[list]:
    """For each cut position i (between op i and op i+1): the tensors crossing it.

    Model inputs that a later operation reads count as crossing.
    """
    graph = graph_of(model)
    ops = operations(model)
    produced_at = {id(t): -1 for t in keras.tree.flatten(graph.inputs)}
    tensors = {id(t): t for t in keras.tree.flatten(graph.inputs)}
    last_use: dict[int, int] = {}
    for i, op in enumerate(ops):
        node = _node(graph, op)
        for t in node.arguments.keras_tensors:
            last_use[id(t)] = max(last_use.get(id(t), -1), i)
        for t in node.outputs:
            produced_at[id(t)] = i
            tensors[id(t)] = t
    for t in keras.tree.flatten(graph.outputs):
        last_use[id(t)] = len(ops)
    cuts = []
    for i in range(len(ops) - 1):
        cuts.append([tensors[k] for k, p in produced_at.items()
                     if p <= i and last_use.get(k, -1) > i])
    return cuts


def _producer(tensor) -> str:
    history = getattr(tensor, "_keras_history", None)
    return history.operation.name if history else getattr(tensor, "name", "?")


def valid_cuts(model) -> list[int]:
    """Cut positions i (a stage ends after op i) crossed by exactly one non-input tensor."""
    graph = graph_of(model)
    inputs = {id(t) for t in keras.tree.flatten(graph.inputs)}
    return [i for i, tensors in enumerate(crossing(model))
            if len(tensors) == 1 and id(tensors[0]) not in inputs]


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
    crosses = crossing(model)
    specs = []
    for s in range(len(bounds) - 1):
        stage_ops = ops[bounds[s] + 1: bounds[s + 1] + 1]
        specs.append(StageSpec(
            index=s, operations=stage_ops,
            inputs=graph.inputs if s == 0 else crosses[bounds[s]][0],
            outputs=graph.outputs if s == len(bounds) - 2 else crosses[bounds[s + 1]][0],
            parameters=sum(_parameters(op) for op in stage_ops)))
    return specs


def _why_not(model, name, position, names, cuts) -> str:
    tensors = crossing(model)[position]
    graph = graph_of(model)
    inputs = {id(t) for t in keras.tree.flatten(graph.inputs)}
    described = [("the model input" if id(t) in inputs else f"the output of {_producer(t)!r}")
                 for t in tensors]
    nearest = [names[c + 1] for c in cuts]
    return (f"split point {name!r}: a stage boundary before it would be crossed by "
            f"{len(tensors)} tensors ({', '.join(described)}), e.g. a skip connection or an "
            "input read by a later layer. A boundary must be crossed by exactly one tensor. "
            f"Layers that can begin a stage: {nearest}.")


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
