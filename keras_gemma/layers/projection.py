import keras


def projection(equation, output_shape, kernel_initializer, dtype_policy, name):
    """An unbiased `EinsumDense`, the one kind of projection Gemma uses.

    Composing Keras's own `EinsumDense` (rather than subclassing it) keeps its
    `enable_lora` and `quantize("int8")` working on every projection.
    The initializer is rebuilt from its config for each layer: a seeded Keras
    initializer reused as-is would give every projection identical weights.
    """
    initializer = keras.initializers.get(keras.initializers.serialize(kernel_initializer))
    return keras.layers.EinsumDense(
        equation,
        output_shape=output_shape,
        kernel_initializer=initializer,
        dtype=dtype_policy,
        name=name,
    )
