import math

import keras
from keras import ops

from keras_gemma import _backend


def quantization_config(mode):
    """Our default config for a Keras quantization mode.

    int8 is weight-only: per-output-channel int8 weights, activations left
    in the compute dtype (Keras's default also quantizes activations, which
    costs accuracy and, on CPU, speed).
    """
    if mode == "int8":
        return keras.quantizers.Int8QuantizationConfig(activation_quantizer=None)
    return None


def quantized_policy(dtype_policy, mode):
    """The policy of a layer whose weights are stored quantized in `mode`."""
    if mode is None:
        return dtype_policy
    return keras.dtype_policies.get(f"{mode}_from_{dtype_policy.name}")


def projection(
    equation, output_shape, kernel_initializer, dtype_policy, name, quantization_mode=None
):
    """An unbiased `EinsumDense`, the one kind of projection Gemma uses.

    Composing Keras's own `EinsumDense` (rather than subclassing it) keeps its
    `enable_lora` and `quantize("int8")` working on every projection; with
    `quantization_mode` its build makes the quantized variables directly (no
    float kernel is ever allocated), as Keras does when reloading.
    The initializer is rebuilt from its config for each layer: a seeded Keras
    initializer reused as-is would give every projection identical weights.
    (Not through `keras.initializers.serialize`, which imports TensorFlow
    where it is installed: +0.5 GB resident and seconds, on every backend.)
    """
    initializer = type(kernel_initializer).from_config(kernel_initializer.get_config())
    return keras.layers.EinsumDense(
        equation,
        output_shape=output_shape,
        kernel_initializer=initializer,
        dtype=quantized_policy(dtype_policy, quantization_mode),
        quantization_config=quantization_config(quantization_mode),
        name=name,
    )


def project(layer, x):
    """`layer(x)` for a `projection`, through a faster product where the
    backend has one (the same product, rounded to the compute dtype as the
    layer's is): `_backend.projection_einsum`, and a decode step's single
    row (or, where `_backend.kernel_first_product` says so, every row) as a
    2-D `[rows, in] x [out, in]` product."""
    dtype = layer.compute_dtype
    if layer.quantization_mode is not None:
        return _quantized_product(layer, x)
    rows = math.prod(x.shape[:-1]) if None not in x.shape[:-1] else None
    einsum = _backend.projection_einsum(dtype, rows)
    kernel_first = _backend.kernel_first_product(dtype, rows)
    two_d = _contracts_last_axis(layer) and (rows == 1 or kernel_first is not None)
    if einsum is None and not two_d:
        return layer(x)
    einsum = einsum or ops.einsum
    # `layer.kernel` is the LoRA-merged kernel when LoRA is enabled, as in
    # the layer's call; the casts are the layer's autocasting.
    kernel = ops.cast(layer.kernel, dtype)
    x = ops.cast(x, dtype)
    if not two_d:
        return ops.cast(einsum(layer.equation, x, kernel), dtype)
    # 2-D: XLA decoded the small benchmark config ~10% slower with the
    # 3-D query/key/value products (float32).
    out_shape = kernel.shape[:-1]
    kernel = ops.reshape(kernel, (-1, kernel.shape[-1]))
    x_2d = ops.reshape(x, (rows, -1))
    if kernel_first is not None:
        y = kernel_first(x_2d, kernel)
    elif _backend.accumulates_in_float32(dtype):
        y = _backend.one_row_product_in_float32(x_2d, kernel)
    else:
        y = einsum("ri,oi->ro", x_2d, kernel)
    return ops.cast(ops.reshape(y, (*x.shape[:-1], *out_shape)), dtype)


def _quantized_product(layer, x):
    """`layer(x)` for a quantized layer, with its LoRA update computed here.

    Keras's quantized call computes the update as `einsum(equation, x, a)
    @ b`, which assumes the kernel's last axis is an output axis; ours is
    the input axis (`[out..., in]`), which that einsum rejects. So the
    layer's own call computes the quantized product alone and the update
    is `einsum(x @ b.T, a)`.
    """
    if not layer.lora_enabled:
        return layer(x)
    # Keras has no call for the quantized product alone: switch the layer's
    # LoRA off around its own call (Python state, read while tracing).
    layer.lora_enabled = False
    try:
        y = layer(x)
    finally:
        layer.lora_enabled = True
    inputs, kernel, output = _equation_parts(layer)
    rank_label = next(c for c in "rzyxwvu" if c not in layer.equation)
    equation = f"{inputs[:-1]}{rank_label},{kernel[:-1]}{rank_label}->{output}"
    a = ops.cast(layer.lora_kernel_a, layer.compute_dtype)
    b = ops.cast(layer.lora_kernel_b, layer.compute_dtype)
    update = ops.einsum(equation, ops.matmul(ops.cast(x, b.dtype), ops.transpose(b)), a)
    return ops.cast(y + (layer.lora_alpha / layer.lora_rank) * update, layer.compute_dtype)


def _equation_parts(layer):
    """`(inputs, kernel, output)` labels of the layer's einsum equation."""
    operands, output = layer.equation.split("->")
    inputs, kernel = operands.split(",")
    return inputs, kernel, output


def _contracts_last_axis(layer):
    """Whether the kernel is `[out..., in]`: only its last axis, the
    input's last, is contracted (every Gemma projection)."""
    inputs, kernel, _ = _equation_parts(layer)
    return kernel[-1] == inputs[-1] and set(kernel[:-1]).isdisjoint(inputs)
