"""Which mesh axis splits which dimension of which weight.

Layouts are given as a `keras.distribution.LayoutMap`: regexes on a
variable's Keras path (``"block_0/mlp_up/kernel"``) mapped to axes, one per
tensor dimension (a mesh axis name, or None for "not split"). These are
Keras's own semantics (`re.fullmatch`, exact keys first), so a LayoutMap
written for Keras's JAX `ModelParallel` works unchanged.

The "megatron" preset (Shoeybi et al., 2019) splits each transformer block so
that it needs one all-reduce in the forward pass of the MLP and one of the
attention:

- MLP: the up-projection is column-parallel (kernel ``(None, "model")``,
  bias ``("model",)``), the down-projection row-parallel (kernel
  ``("model", None)``, bias replicated).
- Attention (`keras.layers.MultiHeadAttention`): query/key/value kernels
  ``(d, heads, head_dim)`` split on heads, the output projection
  ``(heads, head_dim, d)`` on its input side.
- Token embedding ``(vocab, d)`` split on the vocabulary; an LM head
  ``(d, vocab)`` column-parallel.
- Everything else (LayerNormalization, position embeddings) replicated.

Dense layers are recognized by name: name MLP layers ``*mlp_up``/``*mlp_down``
(also ``fc1``/``fc2``, ``up_proj``/``down_proj``, ``gate_proj``), the LM head
``lm_head``. tfpar's reference GPT follows this.

keras-hub's decoder blocks are recognized by their own names:

| model | column-parallel | row-parallel |
| --- | --- | --- |
| GPT-2, Llama, Mistral, Qwen | ``feedforward_intermediate_dense``, ``feedforward_gate_dense`` | ``feedforward_output_dense`` |
| Gemma | ``ffw_gating``, ``ffw_gating_2`` | ``ffw_linear`` |

and ``self_attention/{query,key,value,attention_output}`` as above. Gemma's
attention kernels put heads first (query ``(heads, d, head_dim)``), so
``decoder_block_N/attention/{query,key,value}/kernel`` split their first
dimension. An untied LM head (``token_embedding/reverse_embeddings``,
``(d, vocab)``) is column-parallel. Grouped-query attention needs as many
key/value heads as a multiple of the model axis.

Example::

    mesh = keras.distribution.DeviceMesh((2, 2), ("batch", "model"))
    layout_map = tfpar.strategies.tensor.layouts.megatron(mesh)
    layout_map["block_0/mlp_up/kernel"].axes     # (None, 'model')
"""

from __future__ import annotations

import math
import re

import keras

PRESETS = ("megatron", "replicated")

_COLUMN = (r"(mlp_up|fc1|up_proj|gate_proj|ffn_up|dense_up|intermediate|lm_head"
           r"|feedforward_intermediate_dense|feedforward_gate_dense|ffw_gating|ffw_gating_2)")
_ROW = r"(mlp_down|fc2|down_proj|ffn_down|dense_down|output_proj|feedforward_output_dense|ffw_linear)"
# Gemma's EinsumDense attention kernels are (heads, d, head_dim), not (d, heads, head_dim).
_HEADS_FIRST = r"(.*/)?decoder_block_\d+/attention/"


class LayoutError(ValueError):
    """A layout that cannot apply to a variable."""


def megatron(mesh: keras.distribution.DeviceMesh, model_axis: str = "model") -> keras.distribution.LayoutMap:
    """The Megatron-style LayoutMap described in the module docstring."""
    if model_axis not in mesh.axis_names:
        raise LayoutError(
            f"megatron preset: mesh axes are {list(mesh.axis_names)}, no {model_axis!r} "
            "axis to split weights on. Use a mesh such as 'batch:2,model:2'."
        )
    m = model_axis
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[rf"(.*/)?{_COLUMN}/kernel"] = (None, m)
    layout_map[rf"(.*/)?{_COLUMN}/bias"] = (m,)
    layout_map[rf"(.*/)?{_ROW}/kernel"] = (m, None)
    # Keys must not overlap (a path matching two is an error): Gemma's are excluded here.
    layout_map[rf"(?!{_HEADS_FIRST})(.*/)?(query|key|value)/kernel"] = (None, m, None)
    layout_map[rf"{_HEADS_FIRST}(query|key|value)/kernel"] = (m, None, None)
    layout_map[r"(.*/)?(query|key|value)/bias"] = (m, None)
    layout_map[r"(.*/)?attention_output/kernel"] = (m, None, None)
    layout_map[r"(.*/)?(embedding(_\d+)?|token_embedding|tok_emb|wte)/embeddings"] = (m, None)
    layout_map[r"(.*/)?token_embedding/reverse_embeddings"] = (None, m)
    return layout_map


def replicated(mesh: keras.distribution.DeviceMesh) -> keras.distribution.LayoutMap:
    """Every weight replicated: pure data parallelism on the batch axis."""
    return keras.distribution.LayoutMap(mesh)


def preset(name: str, mesh: keras.distribution.DeviceMesh) -> keras.distribution.LayoutMap:
    if name == "megatron":
        return megatron(mesh)
    if name == "replicated":
        return replicated(mesh)
    raise LayoutError(f"layout preset {name!r}: use one of {list(PRESETS)} or a keras LayoutMap.")


def matching_keys(layout_map: keras.distribution.LayoutMap, path: str) -> list[str]:
    """The LayoutMap keys that apply to `path` (Keras's rule: exact key first)."""
    keys = list(iter(layout_map))  # LayoutMap's `in` is true for every key: it returns None
    if path in keys:
        return [path]
    return [k for k in keys if re.fullmatch(k, path)]


def check_axes(path: str, shape, axes, mesh_shape: dict[str, int]) -> tuple:
    """Validates `axes` for a variable; returns them as a tuple.

    Raises LayoutError naming the variable, its shape and the layout when an
    axis is unknown, used twice, or does not divide its dimension.
    """
    axes = tuple(axes)
    shape = tuple(int(d) for d in shape)
    where = f"variable {path!r} with shape {shape}, layout {axes}"
    if len(axes) != len(shape):
        raise LayoutError(
            f"{where}: the layout has {len(axes)} axes but the variable has {len(shape)} "
            "dimensions. Give one entry (mesh axis or None) per dimension."
        )
    used = [a for a in axes if a is not None]
    for axis in used:
        if axis not in mesh_shape:
            raise LayoutError(
                f"{where}: unknown mesh axis {axis!r}; the mesh has {list(mesh_shape)}."
            )
    if len(set(used)) != len(used):
        raise LayoutError(f"{where}: a mesh axis can split only one dimension.")
    for dim, axis in zip(shape, axes):
        if axis is not None and dim % mesh_shape[axis]:
            raise LayoutError(
                f"{where}: dimension {dim} is not divisible by mesh axis {axis!r} of size "
                f"{mesh_shape[axis]}. Choose a size that divides (heads or hidden a "
                f"multiple of {mesh_shape[axis]}; a vocabulary padded, as Megatron does, to a "
                f"multiple of 128 x {mesh_shape[axis]}) or replicate this dimension (None)."
            )
    return axes


def shard_fraction(axes, mesh_shape: dict[str, int]) -> float:
    """The fraction of a variable each device holds under `axes`."""
    return 1.0 / math.prod(mesh_shape[a] for a in axes if a is not None)
