import keras

from keras_gemma.layers.projection import project
from keras_gemma.layers.projection import projection


@keras.saving.register_keras_serializable(package="keras_gemma")
class GemmaFeedForward(keras.layers.Layer):
    """GeGLU feed-forward: `down(gelu_tanh(gate(x)) * up(x))`.

    `intermediate_dim` counts both branches together, as Gemma's configs do,
    so each of `ffw_gating` (gate) and `ffw_gating_2` (up) projects to half of
    it. The projections are `EinsumDense` layers so Keras's own LoRA and int8
    quantization apply to them unchanged; `quantization_mode` builds them
    quantized.

    Kernels are stored `[out, in]`, as Hugging Face and PyTorch store them
    (keras-hub's `[in, out]` made XLA keep float32 copies of the weights on CPU).

    Example:
    >>> import numpy as np
    >>> ffw = GemmaFeedForward(intermediate_dim=32)
    >>> tuple(ffw(np.ones((2, 3, 8), "float32")).shape)
    (2, 3, 8)
    """

    def __init__(
        self,
        intermediate_dim,
        kernel_initializer="glorot_uniform",
        quantization_mode=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.intermediate_dim = intermediate_dim
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        # (`quantization_mode` is Keras's name for this layer's own policy.)
        self.projection_quantization_mode = quantization_mode

    def build(self, input_shape):
        hidden_dim = input_shape[-1]
        branch_dim = self.intermediate_dim // 2
        mode = self.projection_quantization_mode

        def dense(name, equation, output_dim):
            return projection(
                equation, (None, output_dim), self.kernel_initializer, self.dtype_policy, name, mode
            )

        self.ffw_gating = dense("ffw_gating", "btd,fd->btf", branch_dim)  # [batch, seq, f]
        self.ffw_gating_2 = dense("ffw_gating_2", "btd,fd->btf", branch_dim)
        self.ffw_linear = dense("ffw_linear", "btf,df->btd", hidden_dim)  # [batch, seq, hidden]
        self.ffw_gating.build(input_shape)
        self.ffw_gating_2.build(input_shape)
        self.ffw_linear.build((None, None, branch_dim))

    def call(self, x):
        gate = keras.activations.gelu(project(self.ffw_gating, x), approximate=True)
        up = project(self.ffw_gating_2, x)
        return project(self.ffw_linear, gate * up)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "intermediate_dim": self.intermediate_dim,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "quantization_mode": self.projection_quantization_mode,
        }
