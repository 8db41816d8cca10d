import keras
from keras import ops


def inverse_frequencies(head_dim, max_wavelength=10000.0):
    """`[head_dim / 2]` float32 rotation speeds: `max_wavelength ** (-2i / head_dim)`."""
    exponents = ops.arange(0, head_dim, 2, dtype="float32") / head_dim
    return 1.0 / ops.power(max_wavelength, exponents)


def rotary_angles(length, head_dim, start_index=0, max_wavelength=10000.0, positions=None):
    """`(cos, sin)` of the rotation angles, each `[1 or batch, length, 1, head_dim / 2]`.

    Positions are `start_index, start_index + 1, ...`, or the given
    `[batch, length]` `positions` (packed rows restart them per example).
    """
    frequencies = inverse_frequencies(head_dim, max_wavelength)
    if positions is None:
        positions = (ops.arange(length, dtype="float32") + ops.cast(start_index, "float32"))[None]
    angles = ops.cast(positions, "float32")[..., None] * frequencies  # [b, t, h/2]
    return ops.cos(angles)[:, :, None, :], ops.sin(angles)[:, :, None, :]


def apply_rotary(x, cos, sin):
    """Rotates `x` (`[batch, length, heads, head_dim]`) by `rotary_angles`."""
    x1, x2 = ops.split(ops.cast(x, "float32"), 2, axis=-1)
    rotated = ops.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return ops.cast(rotated, x.dtype)


@keras.saving.register_keras_serializable(package="keras_gemma")
class RotaryEmbedding(keras.layers.Layer):
    """Rotary position embedding (RoPE) in Gemma's half-split layout.

    Feature `i` is rotated together with feature `i + head_dim / 2` (not with
    its neighbour), by an angle `position * max_wavelength ** (-2i/head_dim)`.
    Angles are computed in float32: positions up to 8192 times the highest
    frequency overflow bfloat16's few mantissa bits.

    Args:
        max_wavelength: the base of the geometric frequency progression.

    Call arguments:
        x: `[batch, sequence, heads, head_dim]` queries or keys.
        start_index: position of `x[:, 0]` in the whole sequence; non-zero when
            decoding with a cache.

    Example:
    >>> import numpy as np
    >>> rope = RotaryEmbedding()
    >>> tuple(rope(np.ones((1, 4, 2, 8), "float32"), start_index=3).shape)
    (1, 4, 2, 8)
    """

    def __init__(self, max_wavelength=10000.0, **kwargs):
        super().__init__(**kwargs)
        self.max_wavelength = max_wavelength

    def call(self, x, start_index=0):
        cos, sin = rotary_angles(
            ops.shape(x)[1], ops.shape(x)[-1], start_index, self.max_wavelength
        )
        return apply_rotary(x, cos, sin)

    def get_config(self):
        return {**super().get_config(), "max_wavelength": self.max_wavelength}
