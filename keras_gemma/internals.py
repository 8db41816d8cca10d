"""Every Keras and PyTorch internal keras_gemma relies on, each in one small function.

Each function wraps one private attribute, method or op, with a sentence on
why no public API does; `tests/test_internals.py` checks each one's
behaviour, so a Keras or PyTorch upgrade that changes it fails there, by
name, rather than somewhere deep in loading or decoding.
`tests/test_imports.py` keeps such uses out of every other module.

PyTorch is optional: the torch functions import it when called.
"""

import functools

from keras_gemma.layers.projection import quantization_config

# Keras variables.


def supports_deferred_initialization(variables):
    """Whether `variables`, made in a `keras.StatelessScope(initialize_variables=False)`,
    are still unallocated and can be initialized one at a time by
    `initialize_deferred`."""
    # Keras allocates such variables only when the scope's creator exits, all
    # at once; `_value` is None until then and `_deferred_initialize` is that
    # step for one variable. No public API initializes a single one.
    return all(
        getattr(v, "_value", 0) is None and hasattr(v, "_deferred_initialize") for v in variables
    )


def initialize_deferred(variable, initializer):
    """Allocates a deferred `variable` with `initializer(shape, dtype)`.

    Lets a checkpoint load tensor by tensor straight into the variables, so
    no random initial values are ever allocated (peak memory: the model plus
    one tensor).
    """
    # Keras keeps the initializer in `_initializer` and calls it in
    # `_deferred_initialize`; there is no public way to swap it.
    variable._initializer = initializer
    variable._deferred_initialize()


def forget_uninitialized_variables(variables):
    """Takes `variables` off Keras's list of variables to initialize later.

    Keras lists the variables made in a stateless scope, to initialize them
    when a later scope exits; ours are initialized (or abandoned, on an
    error) already, and Keras has no public API to unlist them.
    """
    from keras.src.backend.common import global_state

    ids = set(map(id, variables))
    collection = global_state.get_global_attribute("uninitialized_variables")
    if collection:
        collection[:] = [v for v in collection if id(v) not in ids]


# Keras layers.


def stored_kernel(layer):
    """The kernel variable an `EinsumDense` stores (int8 when quantized),
    without the LoRA update that its public `kernel` property adds."""
    # Keras keeps the stored variable in `_kernel`; `kernel` computes
    # `_kernel + a @ b` under LoRA (and unpacks int4).
    return layer._kernel


def stored_embeddings(embedding):
    """The table variable an `Embedding` stores (int8 when quantized),
    without the LoRA update that its public `embeddings` property adds."""
    # As `stored_kernel`, for `_embeddings` and `embeddings`.
    return embedding._embeddings


def kernel_with_merged_lora(layer):
    """`(kernel, kernel_scale, kernel_zero)` of an `EinsumDense` with its LoRA
    update folded in; quantized layers are dequantized, merged and
    re-quantized, with a new scale."""
    # Keras's own merge-and-requantize, which `save_own_variables` uses; not
    # public, and re-deriving it would duplicate each mode's scale layout.
    return layer._get_kernel_with_merged_lora()


def flatten_layers(layer):
    """`layer` and every layer nested in it, recursively."""
    # `Model.layers` lists only direct children, and `Layer` has no public
    # recursive listing; Keras itself walks `_flatten_layers`.
    return list(layer._flatten_layers(include_self=True, recursive=True))


def weight_only_int8_by_default(model):
    """Makes `model.quantize("int8")` weight-only (activations stay float).

    Keras's `Layer.__new__` wraps `quantize` on each instance and fills in
    its own default config (int8 activations too) before the class's method
    runs, so the default has to be set on the instance, outside that wrapper.
    """
    keras_quantize = model.quantize

    @functools.wraps(keras_quantize)
    def quantize(mode=None, config=None, **kwargs):
        if config is None:
            config = quantization_config(mode)
        return keras_quantize(mode, config=config, **kwargs)

    model.quantize = quantize


# PyTorch ops.


def onednn_linear(x, weight):
    """`x @ weight.T` for float32 on CPU, by oneDNN's inner product.

    Raises AttributeError or RuntimeError on a PyTorch built without oneDNN.
    """
    # oneDNN's linear op, which Inductor's CPU fusions emit; no public
    # function calls it, and it streams float32 weights up to twice as fast
    # as the MKL GEMV behind `F.linear` on the CPUs measured (see
    # keras_gemma/backends/torch_cpu.py).
    import torch

    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


def int8pack_mm(x, kernel, scale):
    """`(x @ kernel.T) * scale` for an int8 `kernel` `[out, in]` and a float
    `scale` `[out]`, in `x`'s dtype, on CPU.

    Its input limits (bfloat16 rows whose length is a multiple of 16 and that
    start 32-byte aligned) are the caller's to respect; see
    `keras_gemma/backends/torch_cpu.py`.
    """
    # PyTorch's CPU kernel for weight-only int8 products exists only as this
    # private aten op; public functions convert the int8 weights first.
    import torch

    return torch.ops.aten._weight_int8pack_mm(x, kernel, scale)


def torch_extension_library():
    """The path of PyTorch's compiled extension (`torch._C`), whose symbols
    resolve as PyTorch's own: `ctypes.CDLL` of it finds the OpenMP runtime
    PyTorch loaded."""
    # `torch._C` is private, and no public API names the library PyTorch's
    # native code was loaded from.
    import torch

    return torch._C.__file__


__all__ = [
    "flatten_layers",
    "forget_uninitialized_variables",
    "initialize_deferred",
    "int8pack_mm",
    "kernel_with_merged_lora",
    "onednn_linear",
    "stored_embeddings",
    "stored_kernel",
    "supports_deferred_initialization",
    "torch_extension_library",
    "weight_only_int8_by_default",
]
