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
    """
    initializer = keras.initializers.get(keras.initializers.serialize(kernel_initializer))
    return keras.layers.EinsumDense(
        equation,
        output_shape=output_shape,
        kernel_initializer=initializer,
        dtype=quantized_policy(dtype_policy, quantization_mode),
        quantization_config=quantization_config(quantization_mode),
        name=name,
    )


def project(layer, x):
    """`layer(x)` for a `projection`, through `_backend.projection_einsum`
    where the backend has a faster product than the layer's own call (the
    same product, rounded to the compute dtype as the layer's is)."""
    dtype = layer.compute_dtype
    if layer.quantization_mode is not None:
        return layer(x)
    rows = math.prod(x.shape[:-1]) if None not in x.shape[:-1] else None
    einsum = _backend.projection_einsum(dtype, rows)
    if einsum is None:
        return layer(x)
    # `layer.kernel` is the LoRA-merged kernel when LoRA is enabled, as in
    # the layer's call; the casts are the layer's autocasting.
    kernel = ops.cast(layer.kernel, dtype)
    x = ops.cast(x, dtype)
    if rows == 1 and _backend.pads_single_rows(dtype) and _is_out_in_matrix(layer):
        # As a 2-D product: XLA gave the `[2, 1, in]` form a transposed copy
        # of the kernel, made once before the decode loop.
        row = ops.reshape(x, (1, -1))
        y = as_two_rows_if_one(lambda row: einsum("ri,oi->ro", row, kernel), row)
        return ops.cast(ops.reshape(y, (*x.shape[:-1], -1)), dtype)
    return ops.cast(einsum(layer.equation, x, kernel), dtype)


def _is_out_in_matrix(layer):
    """Whether the kernel is an `[out, in]` matrix (the feed-forward's)."""
    inputs, kernel = layer.equation.split("->")[0].split(",")
    return len(kernel) == 2 and kernel[-1] == inputs[-1]


def as_two_rows_if_one(product, x, pad=True):
    """`product(x)`, computed on `x` and a second, zero row if `x` has one row
    and `pad`: XLA on CPU runs some one-row products through a far slower
    kernel than two-row ones (see the callers), and a zero row costs no extra
    weight traffic."""
    if x.shape[0] != 1 or not pad:
        return product(x)
    return product(ops.concatenate([x, ops.zeros_like(x)], axis=0))[:1]
