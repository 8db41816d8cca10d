"""LoRA adapters on a `GemmaBackbone`: enable, save, load, merge, export to PEFT.

The adapters are Keras's own: every Gemma projection is a
`keras.layers.EinsumDense`, whose `enable_lora(rank, lora_alpha)` adds
`lora_kernel_a` (the kernel's shape with the last axis replaced by `rank`) and
`lora_kernel_b` (`[rank, last axis]`) and adds
`(lora_alpha / rank) * a @ b` to the frozen kernel. That works unchanged on an
int8-quantized base (QLoRA-style). Our kernels are `[out, in]` (see
`GemmaAttention`), so every adapter is a Hugging Face PEFT adapter of the same
rank: `lora_B` is `a` with its output axes merged, `lora_A` is `b`.

Adapters are addressed by layer name, e.g. `decoder_block_3/attention/query`,
never by position in a layer list, so files survive code refactors.

Example:
>>> from keras_gemma import GemmaBackbone
>>> backbone = GemmaBackbone(vocabulary_size=64, num_layers=1,
...     num_query_heads=2, num_key_value_heads=1, hidden_dim=8,
...     intermediate_dim=16, head_dim=4)
>>> enable_lora(backbone, rank=2)
>>> # query a [2, 4, 2] + b [2, 8], value a [1, 4, 2] + b [2, 8]
>>> sum(int(np.prod(v.shape)) for v in backbone.trainable_weights)
56
"""

import json
import os

import keras
import numpy as np
from keras import ops

from keras_gemma import internals
from keras_gemma.checkpoints import SafetensorsFile
from keras_gemma.checkpoints import atomic_file
from keras_gemma.checkpoints import save_arrays
from keras_gemma.weight_names import huggingface_tensors

# Projections LoRA may target, by layer name, and where each lives in a block.
LORA_TARGETS = {
    "query": ("attention", "query_dense"),
    "key": ("attention", "key_dense"),
    "value": ("attention", "value_dense"),
    "attention_output": ("attention", "output_dense"),
    "ffw_gating": ("feed_forward", "ffw_gating"),
    "ffw_gating_2": ("feed_forward", "ffw_gating_2"),
    "ffw_linear": ("feed_forward", "ffw_linear"),
}
DEFAULT_TARGETS = ("query", "value")

_FORMAT = "keras_gemma.lora"
# Version 1 files predate `[out, in]` feed-forward kernels, versions 1 and 2
# `[out, in]` attention kernels; see `_from_older_version`.
_FORMAT_VERSION = "3"


def _layer_path(index, target):
    sublayer = LORA_TARGETS[target][0]
    return f"decoder_block_{index}/{sublayer}/{target}"


def _projection(block, target):
    sublayer, attribute = LORA_TARGETS[target]
    return getattr(getattr(block, sublayer), attribute)


def _target_layers(backbone, targets):
    """`{layer_path: EinsumDense}` for `targets` in every decoder block, in order."""
    return {
        _layer_path(i, target): _projection(block, target)
        for i, block in enumerate(backbone.transformer_layers)
        for target in targets
    }


def _validate_targets(target_layer_names):
    if target_layer_names is None:
        return DEFAULT_TARGETS
    if isinstance(target_layer_names, str):
        target_layer_names = [target_layer_names]
    targets = tuple(dict.fromkeys(target_layer_names))  # ordered, no duplicates
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown or not targets:
        raise ValueError(
            f"Unknown LoRA target layer names {unknown}. Choose from "
            f"{list(LORA_TARGETS)} (default: {list(DEFAULT_TARGETS)})."
        )
    return tuple(t for t in LORA_TARGETS if t in targets)  # canonical order


def lora_state(backbone):
    """`(rank, lora_alpha, targets)` of the enabled adapters, or `None`."""
    block = backbone.transformer_layers[0]
    targets = tuple(t for t in LORA_TARGETS if _projection(block, t).lora_enabled)
    if not targets:
        return None
    layer = _projection(block, targets[0])
    return layer.lora_rank, float(layer.lora_alpha), targets


def check_merged_before_saving(backbone):
    """Refuses to write a preset that would silently drop enabled adapters."""
    if lora_state(backbone) is not None:
        raise ValueError(
            "This model has LoRA adapters, which a preset does not hold. Call "
            "`backbone.merge_lora()` first to save the tuned model, or "
            "`backbone.save_lora_weights(path)` to save the adapters alone."
        )


def enable_lora(backbone, rank, target_layer_names=None, lora_alpha=None):
    """Adds LoRA adapters and freezes every other weight of `backbone`.

    Args:
        backbone: a `GemmaBackbone`.
        rank: adapter rank, a positive integer.
        target_layer_names: projections to adapt in every decoder block, any
            of `LORA_TARGETS`; default `("query", "value")`.
        lora_alpha: scale numerator: adapters add `(lora_alpha / rank) * a @ b`.
            Defaults to `rank` (scale 1), Keras's default.

    Afterwards `backbone.trainable_weights` are exactly the adapter matrices.
    Compile (or re-compile) the task model after this, so the optimizer
    tracks the new variables.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"`rank` must be a positive integer. Received: rank={rank!r}")
    if lora_alpha is not None and (not isinstance(lora_alpha, (int, float)) or lora_alpha <= 0):
        raise ValueError(f"`lora_alpha` must be a positive number. Received: {lora_alpha!r}")
    targets = _validate_targets(target_layer_names)
    if lora_state(backbone) is not None:
        raise ValueError(
            "LoRA is already enabled on this backbone "
            f"(rank, alpha, targets = {lora_state(backbone)}). Call `merge_lora()` "
            "first to fold those adapters in, or start from a fresh backbone."
        )
    backbone.trainable = True
    for layer in (backbone.token_embedding, backbone.final_normalization):
        layer.trainable = False
    for block in backbone.transformer_layers:
        block.trainable = False  # recursive: freezes every variable in the block
    for layer in _target_layers(backbone, targets).values():
        layer.trainable = True
        # Freezes the kernel; the two new float32 adapter matrices train.
        layer.enable_lora(rank, lora_alpha=lora_alpha)


def check_trainable_through_int8(backbone):
    """Raises before `fit` where Keras cannot backpropagate (inference is fine).

    Keras's weight-only int8 `EinsumDense` on torch applies its scale layout
    twice in the backward pass, which fails on the query/key/value kernels
    (keras/src/layers/core/einsum_dense.py, `_int8_call`).
    """
    if keras.config.backend() != "torch" or lora_state(backbone) is None:
        return
    query = backbone.transformer_layers[0].attention.query_dense
    if query.quantization_mode == "int8" and query.inputs_quantizer is None:
        raise ValueError(
            "LoRA cannot train through weight-only int8 projections on the torch backend "
            "(a Keras bug in their backward pass). Quantize the base with int8 activations "
            "too: backbone.quantize('int8', config=keras.quantizers.Int8QuantizationConfig()), "
            "or use the JAX or TensorFlow backend."
        )


def _require_lora(backbone):
    state = lora_state(backbone)
    if state is None:
        raise ValueError(
            "This backbone has no LoRA adapters. Call `backbone.enable_lora(rank)` first."
        )
    return state


def _adapters(backbone, targets):
    """`{"<layer path>/lora_kernel_a" or "/lora_kernel_b": variable}`."""
    return {
        f"{path}/{name}": getattr(layer, name)
        for path, layer in _target_layers(backbone, targets).items()
        for name in ("lora_kernel_a", "lora_kernel_b")
    }


def lora_weights(backbone):
    """`{"<layer path>/lora_kernel_a" or "/lora_kernel_b": numpy array}`."""
    _, _, targets = _require_lora(backbone)
    adapters = _adapters(backbone, targets)
    return {name: np.asarray(ops.convert_to_numpy(v)) for name, v in adapters.items()}


def save_lora_weights(backbone, path):
    """Writes the adapters (float32) to a safetensors file keyed by layer path.

    The header records rank, alpha, targets and the number of layers, so
    `load_lora_weights` can rebuild the adapters on a fresh backbone.
    """
    rank, alpha, targets = _require_lora(backbone)
    metadata = {
        "format": _FORMAT,
        "format_version": _FORMAT_VERSION,
        "rank": str(rank),
        "lora_alpha": repr(alpha),
        "target_layer_names": json.dumps(list(targets)),
        "num_layers": str(backbone.num_layers),
    }
    save_arrays(path, lora_weights(backbone), metadata)


def _read_lora_file(path):
    reader = SafetensorsFile(path)
    metadata = reader.metadata
    if metadata.get("format") != _FORMAT:
        raise ValueError(
            f"'{path}' is not a keras_gemma LoRA file (no '{_FORMAT}' header); "
            "save one with `backbone.save_lora_weights(path)`. For Hugging Face "
            "PEFT adapters use the PEFT library."
        )
    tensors = {name: reader.read(name) for name in reader.tensors}
    version = metadata.get("format_version")
    if version in ("1", "2"):
        tensors = _from_older_version(path, version, tensors)
    elif version != _FORMAT_VERSION:
        raise ValueError(
            f"'{path}' is a keras_gemma LoRA file of format version {version!r}; this "
            f"keras_gemma reads versions '1' to {_FORMAT_VERSION!r}. Upgrade keras_gemma."
        )
    return metadata, tensors


def _from_older_version(path, version, tensors):
    """Version 1 and 2 adapters as the same updates to `[out, in]` kernels.

    Each old pair `a`, `b` updated an `[in, out]`-like kernel by `a @ b`.
    Feed-forward (version 1: `a [in, r]`, `b [r, out]`) and attention output
    (`a [heads, head_dim, r]`, `b [r, hidden]`) updates are the transposes
    of rank-r updates of ours, exactly. Old query/key/value adapters
    (`a [heads, hidden, r]`, `b [r, head_dim]`: rank r per head) are rank
    `heads * r` in our layout and cannot be loaded at the file's rank.
    """
    converted = dict(tensors)
    for name in tensors:
        layer, leaf = name.rsplit("/", 1)
        if leaf != "lora_kernel_a":
            continue
        a, b = tensors[name], tensors[f"{layer}/lora_kernel_b"]
        target = layer.rsplit("/", 1)[-1]
        if target in ("query", "key", "value"):
            raise ValueError(
                f"'{path}' holds {target} adapters in keras_gemma's LoRA format version "
                f"{version}, made per head for `[heads, hidden, head_dim]` kernels; this "
                "version's `[heads, head_dim, hidden]` kernels cannot take them at the "
                "file's rank. Merge them with the keras_gemma that wrote the file "
                "(`backbone.merge_lora()`, then save the model), or train new adapters."
            )
        if target == "attention_output" or version == "1":
            a = np.reshape(a, (-1, a.shape[-1]))  # the output's [heads, head_dim] -> in
            converted[name] = np.ascontiguousarray(b.T)
            converted[f"{layer}/lora_kernel_b"] = np.ascontiguousarray(a.T)
    return converted


def load_lora_weights(backbone, path):
    """Loads adapters saved by `save_lora_weights`.

    On a backbone without LoRA the adapters are enabled with the file's rank,
    alpha and targets; on one with LoRA these must match. Every tensor name
    and shape is checked before any value is assigned.
    """
    metadata, tensors = _read_lora_file(path)
    rank = int(metadata["rank"])
    alpha = float(metadata["lora_alpha"])
    targets = tuple(json.loads(metadata["target_layer_names"]))
    num_layers = int(metadata["num_layers"])
    if num_layers != backbone.num_layers:
        raise ValueError(
            f"'{path}' holds adapters for {num_layers} decoder blocks, but this "
            f"backbone has {backbone.num_layers}. Load it onto the model it was trained on."
        )
    state, file_state = lora_state(backbone), (rank, alpha, targets)
    if state is None:
        enable_lora(backbone, rank, targets, lora_alpha=alpha)
    mismatches = [
        f"{name}: file {theirs!r}, model {ours!r}"
        for name, theirs, ours in zip(("rank", "lora_alpha", "targets"), file_state, state or ())
        if theirs != ours
    ]
    if mismatches:
        raise ValueError(
            f"The LoRA adapters in '{path}' do not match those enabled on this "
            f"backbone ({'; '.join(mismatches)}). Load the file onto a backbone "
            "without LoRA (it enables matching adapters itself) or call "
            "`enable_lora` with the file's settings."
        )
    expected = _adapters(backbone, targets)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"'{path}' does not match this backbone's adapters. Missing: "
            f"{missing[:5]}{' ...' if len(missing) > 5 else ''}; unexpected: "
            f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}."
        )
    for key, variable in expected.items():
        if tuple(tensors[key].shape) != tuple(variable.shape):
            raise ValueError(
                f"Adapter '{key}' in '{path}' has shape {tuple(tensors[key].shape)}, "
                f"but this backbone expects {tuple(variable.shape)}: the file was "
                "trained on a model with different dimensions."
            )
    for key, variable in expected.items():
        variable.assign(tensors[key])


def merge_lora(backbone):
    """Folds the adapters into the base kernels and removes them.

    Logits are unchanged (up to the kernel dtype's rounding); afterwards the
    backbone has exactly its original variables again, all trainable as when
    constructed. An int8 base is re-quantized with the merged kernel.
    Re-compile a task model before training it further.
    """
    _, _, targets = _require_lora(backbone)
    for layer in _target_layers(backbone, targets).values():
        kernel = internals.stored_kernel(layer)  # float or int8
        if layer.quantization_mode is None:
            scale = layer.lora_alpha / layer.lora_rank
            delta = ops.matmul(layer.lora_kernel_a, layer.lora_kernel_b)  # kernel shape
            merged = ops.cast(kernel.value, "float32") + scale * delta
            kernel.assign(ops.cast(merged, kernel.dtype))
        elif layer.quantization_mode == "int8":
            # Keras's own merge-and-requantize, as used when saving a LoRA model.
            merged, kernel_scale, _ = internals.kernel_with_merged_lora(layer)
            kernel.assign(merged)
            layer.kernel_scale.assign(kernel_scale)
        else:
            raise NotImplementedError(
                f"Merging LoRA into a {layer.quantization_mode!r}-quantized layer is not "
                "supported; merge before quantizing."
            )
        # `Layer.__delattr__` untracks the variables (and torch parameters).
        del layer.lora_kernel_a
        del layer.lora_kernel_b
        layer.lora_enabled = False
        layer.lora_rank = None
        layer.lora_alpha = None
        # `enable_lora` froze the kernel itself (the layer stays trainable);
        # an int8 kernel is never trainable.
        kernel.trainable = layer.quantization_mode is None
    # Unfreeze every layer explicitly: on TensorFlow, setting `trainable` on
    # a parent does not always reach the layers its `build` created.
    for layer in internals.flatten_layers(backbone):
        layer.trainable = True


def export_lora_to_peft(backbone, directory, base_model_name_or_path=None):
    """Writes the adapters as a Hugging Face PEFT LoRA adapter.

    Produces `adapter_config.json` and `adapter_model.safetensors` for
    transformers' `GemmaForCausalLM`, e.g.
    `PeftModel.from_pretrained(hf_model, directory)`. Tensors are named like
    `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`; every
    adapter keeps its rank and scale exactly.
    """
    rank, alpha, targets = _require_lora(backbone)
    hf_names = huggingface_tensors(backbone.config)
    weights = lora_weights(backbone)
    tensors, modules = {}, set()
    for path in _target_layers(backbone, targets):
        hf_module = hf_names[f"{path}/kernel"][0].removesuffix(".weight")
        # PEFT's `lora_B @ lora_A` is our `a @ b` with the output axes merged.
        a, b = weights[f"{path}/lora_kernel_a"], weights[f"{path}/lora_kernel_b"]
        tensors[f"base_model.model.{hf_module}.lora_A.weight"] = b
        tensors[f"base_model.model.{hf_module}.lora_B.weight"] = np.reshape(a, (-1, a.shape[-1]))
        modules.add(hf_module.rsplit(".", 1)[-1])
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": sorted(modules),
        "rank_pattern": {},
        "alpha_pattern": {},
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    save_arrays(os.path.join(directory, "adapter_model.safetensors"), tensors, {"format": "pt"})
    with atomic_file(os.path.join(directory, "adapter_config.json")) as temporary:
        temporary.write_text(json.dumps(adapter_config, indent=2))


def lora_parameter_count(config, rank, target_layer_names=None):
    """Adapter parameters for `config`, computed from shapes alone.

    >>> from keras_gemma import GemmaConfig
    >>> config = GemmaConfig(vocabulary_size=256000, num_layers=18,
    ...     num_query_heads=8, num_key_value_heads=1, hidden_dim=2048,
    ...     intermediate_dim=32768, head_dim=256)
    >>> lora_parameter_count(config, rank=4)
    460800
    """
    shapes = config.weight_shapes()
    total = 0
    for target in _validate_targets(target_layer_names):
        shape = shapes[f"{_layer_path(0, target)}/kernel"]
        total += int(np.prod(shape[:-1])) * rank + rank * shape[-1]
    return total * config.num_layers


__all__ = [
    "DEFAULT_TARGETS",
    "LORA_TARGETS",
    "enable_lora",
    "export_lora_to_peft",
    "load_lora_weights",
    "lora_parameter_count",
    "lora_state",
    "lora_weights",
    "merge_lora",
    "save_lora_weights",
]
