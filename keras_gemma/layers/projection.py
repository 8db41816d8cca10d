import keras


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
