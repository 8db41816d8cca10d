import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_gemma")
class RMSNormalization(keras.layers.Layer):
    """Gemma's RMS normalization: `x * rsqrt(mean(x^2) + eps) * (1 + scale)`.

    The scale starts at zeros (so the layer starts as a plain RMS norm) and is
    applied as `1 + scale`, which is how Gemma checkpoints store it; Keras's
    own `RMSNormalization` layer multiplies by `scale` initialised to ones and
    would misread those weights. The statistics are computed in float32
    whatever the compute dtype: in bfloat16 the mean of squares loses too many
    digits.

    Example:
    >>> import numpy as np
    >>> norm = RMSNormalization()
    >>> tuple(norm(np.ones((2, 3, 8), "float32")).shape)
    (2, 3, 8)
    """

    def __init__(self, epsilon=1e-6, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon

    def build(self, input_shape):
        self.scale = self.add_weight(name="scale", shape=(input_shape[-1],), initializer="zeros")

    def call(self, x):
        scale = 1.0 + ops.cast(self.scale, "float32")
        x = ops.rms_normalization(
            ops.cast(x, "float32"), scale=scale, axis=-1, epsilon=self.epsilon
        )
        return ops.cast(x, self.compute_dtype)

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}
