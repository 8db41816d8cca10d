"""Model-parallel layouts for `GemmaBackbone` under `keras.distribution` (JAX).

Each big matrix is split over the mesh's model axis along the first axis in
its preference list that the model axis divides: heads first (Megatron-style,
so attention stays local to a device), then the hidden or feed-forward axis.
An axis the model axis does not divide is never sharded: Gemma 2B's
key/value kernels `[1, head_dim, hidden]` shard along `hidden` (keras-hub's
layout splits the size-1 head axis and fails).
Norm scales and LoRA adapters are replicated, and so are all weights across
the data (batch) axis. Without a config (keras-hub's
`GemmaBackbone.get_layout_map(mesh)`, set before `from_preset`) the layout
fits every Gemma 1 preset; a config gives the best layout for that model.

Example:
>>> import keras
>>> from keras_gemma import GemmaConfig
>>> config = GemmaConfig(vocabulary_size=256000, num_layers=18,
...     num_query_heads=8, num_key_value_heads=1, hidden_dim=2048,
...     intermediate_dim=32768, head_dim=256)
>>> mesh = keras.distribution.DeviceMesh((2, 4), ("batch", "model"),
...     devices=[f"cpu:{i}" for i in range(8)])
>>> layout_map = get_layout_map(config, mesh)
>>> layout_map["decoder_block_0/attention/key/kernel"].axes
(None, None, 'model')
>>> layout_map["decoder_block_0/attention/query/kernel"].axes
('model', None, None)
>>> get_layout_map(None, mesh)["decoder_block_0/attention/key/kernel"].axes
(None, None, 'model')
"""

import re

import keras

from keras_gemma.config import GemmaConfig
from keras_gemma.presets import PRESETS

# One config per preset architecture: what a config-less layout must fit.
_PRESET_CONFIGS = tuple(
    {p["architecture"]: GemmaConfig(**p["config"]) for p in PRESETS.values()}.values()
)

# Variable-path regex -> (axes to shard in order of preference, whether it
# must be shardable). Query/key/value `[heads, head_dim, hidden]`, output
# `[hidden, heads * head_dim]`, feed-forward `[out, in]`: heads, then the
# intermediate axis, shard first.
_RULES = {
    "token_embedding/embeddings": ((0, 1), True),
    r"decoder_block_\d+/attention/query/kernel": ((0, 2, 1), True),
    # With fewer key/value heads than model shards (multi-query 2B, small
    # groups) the kernels shard along hidden; replicating is the fallback.
    r"decoder_block_\d+/attention/(key|value)/kernel": ((0, 2, 1), False),
    r"decoder_block_\d+/attention/attention_output/kernel": ((1, 0), True),
    r"decoder_block_\d+/feed_forward/ffw_gating(_2)?/kernel": ((0, 1), True),
    r"decoder_block_\d+/feed_forward/ffw_linear/kernel": ((1, 0), True),
}
_REPLICATED = (
    r"decoder_block_\d+/(pre_attention_norm|pre_ffw_norm)/scale",
    "final_normalization/scale",
)


def _as_config(config):
    if config is None or isinstance(config, GemmaConfig):
        return config
    if isinstance(config, dict):
        keys = GemmaConfig.__dataclass_fields__
        return GemmaConfig(**{k: v for k, v in config.items() if k in keys})
    if hasattr(config, "config") and isinstance(config.config, GemmaConfig):
        return config.config  # a GemmaBackbone
    raise ValueError(
        "`config` must be a `GemmaConfig`, a backbone config dict, a "
        f"`GemmaBackbone` or None (a layout for every preset). Received: {config!r}"
    )


def _check_mesh(device_mesh, model_parallel_dim_name, data_parallel_dim_name):
    if not isinstance(device_mesh, keras.distribution.DeviceMesh):
        raise ValueError(
            f"`device_mesh` must be a `keras.distribution.DeviceMesh`. Received: {device_mesh!r}"
        )
    names = tuple(device_mesh.axis_names)
    arguments = ("model_parallel_dim_name", "data_parallel_dim_name")
    for argument, name in zip(arguments, (model_parallel_dim_name, data_parallel_dim_name)):
        if name not in names:
            raise ValueError(
                f"`{argument}`={name!r} is not an axis of the device mesh, whose axes are {names}."
            )
    if model_parallel_dim_name == data_parallel_dim_name:
        raise ValueError(
            "The model and data parallel mesh axes must differ; both are "
            f"{model_parallel_dim_name!r}. Use a 2-D mesh such as (batch, model)."
        )
    return device_mesh.shape[names.index(model_parallel_dim_name)]


def _axes(config, pattern, model_size, model_parallel_dim_name):
    configs = _PRESET_CONFIGS if config is None else (config,)
    preferences, required = _RULES[pattern]
    # The pattern's variable in block 0, which every config has.
    example = next(p for p in configs[0].weight_shapes() if re.fullmatch(pattern, p))
    shapes = [c.weight_shapes()[example] for c in configs]
    shape = shapes[0]
    for axis in preferences:
        # A size-1 axis (the single key/value head) is never sharded, even
        # over a mesh axis of size 1.
        if all(s[axis] > 1 and s[axis] % model_size == 0 for s in shapes):
            axes = [None] * len(shape)
            axes[axis] = model_parallel_dim_name
            return tuple(axes)
    if required and config is not None:
        raise ValueError(
            f"Cannot shard '{example}' (shape {shape}) over a model-parallel mesh "
            f"axis of size {model_size}: it divides none of the axes. Use a "
            f"model axis size that divides one of {shape} (for Gemma's configs "
            "a power of two up to the number of query heads) and put the "
            "remaining devices on the data axis."
        )
    return (None,) * len(shape)


def variable_axes(config, path, model_size, model_parallel_dim_name="model"):
    """Sharding spec (a tuple of mesh axis names or None) for one variable path.

    `config=None` gives the spec that fits every Gemma 1 preset.
    """
    for pattern in _RULES:
        if re.fullmatch(pattern, path):
            return _axes(config, pattern, model_size, model_parallel_dim_name)
    if any(re.fullmatch(pattern, path) for pattern in _REPLICATED):
        return (None,)
    return None


def get_layout_map(
    config, device_mesh, model_parallel_dim_name="model", data_parallel_dim_name="batch"
):
    """A `keras.distribution.LayoutMap` sharding a Gemma backbone's weights.

    Args:
        config: a `GemmaConfig` (or backbone config dict, or a backbone):
            the layout depends on head counts and widths. `None`: one layout
            valid for every Gemma 1 preset (what keras-hub's config-less
            `get_layout_map(mesh)` is for).
        device_mesh: a `keras.distribution.DeviceMesh` with both axes below.
        model_parallel_dim_name: mesh axis the weights are split over.
        data_parallel_dim_name: mesh axis the batch is split over; weights are
            replicated along it. Pass it to `ModelParallel(batch_dim_name=...)`.

    Returns:
        A `LayoutMap` keyed by regexes over variable paths; use it as
        `keras.distribution.ModelParallel(layout_map=..., batch_dim_name=...)`
        and build the backbone inside that distribution's `scope()` or after
        `keras.distribution.set_distribution(...)`.

    Raises:
        ValueError: for a mesh without these axes, or (with a config) whose
            model axis size divides no axis of one of the big matrices.
    """
    config = _as_config(config)
    model_size = _check_mesh(device_mesh, model_parallel_dim_name, data_parallel_dim_name)
    layout_map = keras.distribution.LayoutMap(device_mesh)
    for pattern in _RULES:
        layout_map[pattern] = _axes(config, pattern, model_size, model_parallel_dim_name)
    for pattern in _REPLICATED:
        layout_map[pattern] = (None,)
    return layout_map


def model_parallel(config, mesh_shape, axis_names=("batch", "model"), devices=None):
    """A `keras.distribution.ModelParallel` over a new mesh, with Gemma's layout.

    `mesh_shape` is `(data, model)` in the order of `axis_names`, e.g. `(2, 4)`
    on 8 devices. Create the backbone (and call `enable_lora`) inside
    `distribution.scope()`.
    """
    devices = devices if devices is not None else keras.distribution.list_devices()
    mesh = keras.distribution.DeviceMesh(tuple(mesh_shape), tuple(axis_names), devices=devices)
    data_name, model_name = axis_names
    layout_map = get_layout_map(config, mesh, model_name, data_name)
    return keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name=data_name)


__all__ = ["get_layout_map", "model_parallel", "variable_axes"]
