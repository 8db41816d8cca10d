"""Every Keras and PyTorch internal keras_gemma relies on, each in one small
function saying why no public API does. `tests/test_internals.py` checks each,
so an upgrade that changes one fails there, by name; `tests/test_imports.py`
keeps such uses out of every other module. Torch is imported when called.
"""

import functools

# Keras variables.


def supports_deferred_initialization(variables):
    """Whether `variables`, made in a `keras.StatelessScope(initialize_variables=False)`,
    are still unallocated and can be initialized one at a time by
    `initialize_deferred`."""
    # Keras allocates such variables all at once when the scope's creator
    # exits; until then `_value` is None, and `_deferred_initialize` is that
    # step for one variable. No public API initializes a single one.
    return all(
        getattr(v, "_value", 0) is None and hasattr(v, "_deferred_initialize") for v in variables
    )


def initialize_deferred(variable, initializer):
    """Allocates a deferred `variable` with `initializer(shape, dtype)`, so a
    checkpoint loads straight into the variables (peak: the model plus one
    tensor). There is no public way to swap Keras's `_initializer`."""
    variable._initializer = initializer
    variable._deferred_initialize()


def forget_uninitialized_variables(variables):
    """Takes `variables` off Keras's global list of variables that a later
    scope's exit initializes: ours are initialized (or abandoned) already."""
    from keras.src.backend.common import global_state

    ids = set(map(id, variables))
    collection = global_state.get_global_attribute("uninitialized_variables")
    if collection:
        collection[:] = [v for v in collection if id(v) not in ids]


# Keras layers.


def stored_kernel(layer):
    """The kernel variable an `EinsumDense` stores (`_kernel`, int8 when
    quantized), without the LoRA update its public `kernel` property adds."""
    return layer._kernel


def stored_embeddings(embedding):
    """The table variable an `Embedding` stores (`_embeddings`), as `stored_kernel`."""
    return embedding._embeddings


def kernel_with_merged_lora(layer):
    """`(kernel, kernel_scale, kernel_zero)` of an `EinsumDense` with its LoRA
    update folded in; quantized layers are dequantized, merged and
    re-quantized, with a new scale. Keras's own merge-and-requantize (used by
    `save_own_variables`); re-deriving it would duplicate each mode's scales."""
    return layer._get_kernel_with_merged_lora()


def flatten_layers(layer):
    """`layer` and every layer nested in it, recursively: `Model.layers` lists
    only direct children, and Keras itself walks `_flatten_layers`."""
    return list(layer._flatten_layers(include_self=True, recursive=True))


def default_quantization_config(model, config_for_mode):
    """Makes `model.quantize(mode)` use `config_for_mode(mode)` when no config
    is given (for Gemma: weight-only int8).

    Keras's `Layer.__new__` wraps `quantize` on each instance and fills in
    its own default config (int8 activations too) before the class's method
    runs, so the default has to be set on the instance, outside that wrapper.
    """
    keras_quantize = model.quantize

    @functools.wraps(keras_quantize)
    def quantize(mode=None, config=None, **kwargs):
        if config is None:
            config = config_for_mode(mode)
        return keras_quantize(mode, config=config, **kwargs)

    model.quantize = quantize


def call_without_lora(layer, x):
    """`layer(x)` for an `EinsumDense`, without its LoRA update: Keras's
    quantized call has no other way to compute the quantized product alone
    (`lora_enabled` is Python state, read while tracing)."""
    layer.lora_enabled = False
    try:
        return layer(x)
    finally:
        layer.lora_enabled = True


# PyTorch ops.


def onednn_linear(x, weight):
    """`x @ weight.T` for float32 on CPU by oneDNN's inner product, the op
    Inductor's CPU fusions emit, which no public function calls (raises
    AttributeError or RuntimeError on a PyTorch built without oneDNN)."""
    import torch

    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


def int8pack_mm(x, kernel, scale):
    """`(x @ kernel.T) * scale` for an int8 `kernel` `[out, in]` and a float
    `scale` `[out]`, on CPU: PyTorch's weight-only int8 kernel exists only as
    this private aten op (public functions convert the weights first). Its
    input limits are the caller's to respect (`backends/torch_cpu.py`)."""
    import torch

    return torch.ops.aten._weight_int8pack_mm(x, kernel, scale)


def torch_extension_library():
    """The path of PyTorch's compiled extension (`torch._C`), whose symbols
    resolve as PyTorch's own, so `ctypes.CDLL` of it finds the OpenMP runtime
    PyTorch loaded; no public API names that library."""
    import torch

    return torch._C.__file__
