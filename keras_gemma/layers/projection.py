import keras
from keras import ops

from keras_gemma import internals


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
    where it is installed, on every backend.)
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
    """`layer(x)` for a `projection`, and for a quantized one with LoRA, its
    update computed here.

    Keras's quantized call computes the update as `einsum(equation, x, a)
    @ b`, which assumes the kernel's last axis is an output axis; ours is
    the input axis (`[out..., in]`), which that einsum rejects.
    """
    if layer.quantization_mode is None or not layer.lora_enabled:
        return layer(x)
    # The quantized product by the layer's own call, plus `einsum(x @ b.T, a)`.
    y = internals.call_without_lora(layer, x)
    operands, output = layer.equation.split("->")
    inputs, kernel = operands.split(",")
    rank_label = next(c for c in "rzyxwvu" if c not in layer.equation)
    equation = f"{inputs[:-1]}{rank_label},{kernel[:-1]}{rank_label}->{output}"
    a = ops.cast(layer.lora_kernel_a, layer.compute_dtype)
    b = ops.cast(layer.lora_kernel_b, layer.compute_dtype)
    update = ops.einsum(equation, ops.matmul(ops.cast(x, b.dtype), ops.transpose(b)), a)
    return ops.cast(y + (layer.lora_alpha / layer.lora_rank) * update, layer.compute_dtype)
